"""IndRNN variants: batch norm, conv projection, bidirectional, residual and dense networks, the
paper configurations' parameter counts, weight-decay groups and the papers' LR schedule."""
import functools
from types import SimpleNamespace

import pytest
import torch

from lightning_modules.callbacks import PlateauReloadBest
from lightning_modules.classification import SequenceClassificationModule
from src.layers import Bidirectional, IndRNN, TimeBatchNorm
from src.networks import DenseIndRNN, RecurrentNetwork, ResidualIndRNN

T, B = 784, 3


def count(module):
    return sum(p.numel() for p in module.parameters())


def indrnn_layer_params(width_in, width_out, batch_norm=True):
    """FC (weights + bias) + u + BN (scale + shift)."""
    return width_in * width_out + width_out + width_out + (2 * width_out if batch_norm else 0)


PAPER_LAYER = functools.partial(IndRNN, magnitude=5.0, bound_steps=T, batch_norm="after")
LONG_MEMORY = {"recurrent_init": "long_memory"}


def test_plain_six_layer_pmnist_parameter_count():
    network = RecurrentNetwork(PAPER_LAYER, 1, 10, hidden_size=128, num_layers=6, dropout=0.1,
                               last_layer_kwargs=LONG_MEMORY)
    expected = indrnn_layer_params(1, 128) + 5 * indrnn_layer_params(128, 128) + 128 * 10 + 10
    assert count(network) == expected == 86_410  # the official code's log reports 86,410


def test_residual_pmnist_parameter_count():
    network = ResidualIndRNN(PAPER_LAYER, 1, 10, hidden_size=128, num_blocks=5, last_layer_kwargs=LONG_MEMORY)
    recurrence_with_bn = 128 + 2 * 128           # u + BN
    block = 2 * (recurrence_with_bn + 128 * 128 + 128)
    expected = (1 * 128 + 128) + 5 * block + recurrence_with_bn + 128 * 10 + 10
    assert count(network) == expected
    recurrent = [m for m in network.modules() if isinstance(m, IndRNN)]
    assert len(recurrent) == 11 and recurrent[-1].recurrence.recurrent_init == "long_memory"


def test_dense_pmnist_parameter_count_and_widths():
    network = DenseIndRNN(PAPER_LAYER, 1, 10, growth_rate=16, block_config=(8, 6, 4), last_layer_kwargs=LONG_MEMORY)
    k, width, expected = 16, 96, indrnn_layer_params(1, 96)
    widths = [width]
    for layers in (8, 6, 4):
        for _ in range(layers):
            expected += indrnn_layer_params(width, 4 * k) + indrnn_layer_params(4 * k, k)
            width += k
        widths.append(width)
        expected += indrnn_layer_params(width, width // 2)
        width //= 2
        widths.append(width)
    expected += width * 10 + 10
    assert widths == [96, 224, 112, 208, 104, 168, 84]  # as in the official code
    assert count(network) == expected and network.output_width == 84
    assert network.transitions[-1].recurrence.recurrent_init == "long_memory"


@pytest.mark.parametrize("network", ["residual", "dense"])
def test_deep_networks_run_forward_and_backward(network):
    layer = functools.partial(IndRNN, magnitude=5.0, bound_steps=12, batch_norm="after")
    model = (ResidualIndRNN(layer, 2, 4, hidden_size=8, num_blocks=2) if network == "residual"
             else DenseIndRNN(layer, 2, 4, growth_rate=4, block_config=(2, 1)))
    prediction, _ = model(torch.randn(B, 12, 2))
    assert prediction.shape == (B, 4)
    prediction.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("kwargs, message", [
    ({"block_config": []}, "block_config must be a non-empty list"),
    ({"block_config": [2, 0]}, "block_config must be a non-empty list"),
    ({"growth_rate": 0}, "growth_rate must be a positive integer"),
    ({"block_config": "864"}, "block_config must be a non-empty list"),
    ({"bottleneck_factor": 0}, "bottleneck_factor must be a positive integer"),
])
def test_dense_rejects_block_specs_that_do_not_fit(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DenseIndRNN(functools.partial(IndRNN, u_bound=1.0), 1, 10, **kwargs)


def test_projection_none_needs_matching_sizes():
    with pytest.raises(ValueError, match="projection='none' needs input_size == hidden_size"):
        IndRNN(3, 5, projection="none")


def test_batch_norm_all_steps_equals_batchnorm1d_over_batch_and_time():
    x = torch.randn(6, 4, 5)
    norm, reference = TimeBatchNorm(5), torch.nn.BatchNorm1d(5)
    torch.testing.assert_close(norm(x), reference(x.reshape(-1, 5)).view(6, 4, 5))
    torch.testing.assert_close(norm.running_mean[0], reference.running_mean)
    torch.testing.assert_close(norm.running_var[0], reference.running_var)


def test_batch_norm_per_step_uses_each_steps_statistics():
    x = torch.randn(6, 4, 5) * torch.arange(1, 7).view(6, 1, 1) + torch.arange(6).view(6, 1, 1)
    norm = TimeBatchNorm(5, stats="per_step", max_steps=6)
    out = norm(x)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(6, 5), atol=1e-5, rtol=0)
    expected = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, expected)
    norm.eval()  # evaluation: running statistics per step; steps beyond max_steps reuse the last
    longer = norm(torch.randn(8, 4, 5))
    assert longer.shape == (8, 4, 5) and torch.isfinite(longer).all()
    with pytest.raises(ValueError, match="per-step batch norm needs max_steps"):
        TimeBatchNorm(5, stats="per_step")


@pytest.mark.parametrize("batch_norm", ["before", "after"])
@pytest.mark.parametrize("stats", ["all_steps", "per_step"])
def test_fused_and_reference_agree_through_batch_norm(batch_norm, stats):
    torch.manual_seed(0)
    kwargs = dict(u_bound=1.2, bound_steps=9, batch_norm=batch_norm, batch_norm_stats=stats, batch_first=True)
    fused, reference = IndRNN(3, 6, backend="cpu", **kwargs).double(), IndRNN(3, 6, backend="reference", **kwargs).double()
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(B, 9, 3, dtype=torch.float64)
    outputs = [layer(x)[0] for layer in (fused, reference)]
    torch.testing.assert_close(outputs[0], outputs[1])
    for output in outputs:
        output.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert torch.autograd.gradcheck(lambda inp: fused(inp)[0], (x[:1, :5].clone().requires_grad_(),))


def test_fused_and_reference_agree_with_dropout():
    torch.manual_seed(0)
    networks = [RecurrentNetwork(functools.partial(IndRNN, u_bound=1.1, backend=backend), 2, 1, hidden_size=8,
                                 num_layers=3, dropout=0.3).double() for backend in ("cpu", "reference")]
    networks[1].load_state_dict(networks[0].state_dict())
    x = torch.randn(B, 10, 2, dtype=torch.float64)
    results = []
    for network in networks:
        torch.manual_seed(1)  # the same dropout masks
        prediction, _ = network(x)
        prediction.sum().backward()
        results.append([prediction] + [p.grad for p in network.parameters()])
    for fused, reference in zip(*results):
        torch.testing.assert_close(fused, reference)


def test_conv1d_projection_is_causal():
    layer = IndRNN(2, 4, projection="conv1d", kernel_size=3, u_bound=1.0, nonlinearity="identity")
    x = torch.randn(10, 1, 2)
    changed = x.clone()
    changed[6] += 1.0
    before, after = layer(x)[0], layer(changed)[0]
    torch.testing.assert_close(before[:6], after[:6])
    assert not torch.allclose(before[6], after[6])


def test_bidirectional_indrnn_goes_through_the_one_wrapper():
    """``bidirectional`` given to the layer factory (model.layer.bidirectional) or to the network
    (model.bidirectional), with last-layer settings, builds src.layers.Bidirectional around IndRNN."""
    x = torch.randn(B, 6, 3)
    for layer, flag in ((functools.partial(IndRNN, u_bound=1.0, bidirectional=True), False),
                        (functools.partial(IndRNN, magnitude=2.0, bound_steps=6), True)):
        network = RecurrentNetwork(layer, 3, 2, hidden_size=4, num_layers=2, bidirectional=flag,
                                   last_layer_kwargs=LONG_MEMORY)
        assert all(isinstance(m, Bidirectional) and isinstance(m.backward_layer, IndRNN) for m in network.layers)
        assert network.layers[1].input_size == 8
        assert network.layers[1].backward_layer.recurrence.recurrent_init == "long_memory"
        wrapped = network.layers[0]
        output, state = wrapped(x)
        backward, _ = wrapped.backward_layer(x.flip(1).transpose(0, 1))
        torch.testing.assert_close(output[..., 4:], backward.flip(0).transpose(0, 1))
        assert state.shape == (2, B, 4) and network(x)[0].shape == (B, 2)
    assert not any("reverse" in name for name, _ in IndRNN(3, 4, u_bound=1.0).named_modules())


def test_one_dimensional_parameters_get_no_weight_decay():
    network = RecurrentNetwork(PAPER_LAYER, 1, 10, hidden_size=8, num_layers=2)
    module = SequenceClassificationModule(network, functools.partial(torch.optim.Adam, lr=1e-3, weight_decay=1e-4),
                                          num_classes=10)
    decayed, exempt = module.configure_optimizers().param_groups
    assert decayed["weight_decay"] == 1e-4 and exempt["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in exempt["params"])
    u = {id(layer.recurrence.weight_hh) for layer in network.layers}
    assert u <= {id(p) for p in exempt["params"]}


def test_plateau_reload_best_restores_weights_lowers_lr_and_stops():
    module = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-5)
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={}, optimizers=[optimizer], should_stop=False)
    callback = PlateauReloadBest("val/acc", mode="max", factor=0.1, patience=2, min_lr=1e-6)

    def validate(accuracy):
        trainer.callback_metrics["val/acc"] = torch.tensor(accuracy)
        callback.on_validation_end(trainer, module)

    validate(0.5)
    best = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        module.weight.add_(1.0)
    for accuracy in (0.4, 0.4, 0.4):  # three bad validations > patience 2: reduce
        validate(accuracy)
    torch.testing.assert_close(module.weight, best["weight"])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6) and callback.current_patience() == 1
    assert not trainer.should_stop
    for accuracy in (0.4, 0.4):  # patience halved to 1: two bad validations reduce again, below min_lr
        validate(accuracy)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-7) and trainer.should_stop
