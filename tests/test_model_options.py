"""Every documented model option works on its own, with every other value at its default (issue 11):
each (model, option) below is one alternative that a model config's comment documents. The network
is built from the composed config as train.py builds it, runs forward and backward, and its
parameters receive finite gradients. Options that cannot work give one line at build time."""
from __future__ import annotations

import pytest
import torch

from lightning_modules.run import UserError
from lightning_modules.run.build import build_network
from tests.conftest import compose_train

OPTIONS = {
    "indrnn": ["model.layer.nonlinearity=tanh", "model.layer.nonlinearity=identity", "model.layer.magnitude=5",
               "model.layer.u_bound=0.99", "model.layer.recurrent_init=uniform01",
               "model.layer.recurrent_init=long_memory", "model.layer.projection=conv1d",
               "model.layer.kernel_size=5", "model.layer.input_init=kaiming_a8", "model.layer.input_init=normal",
               "model.layer.batch_norm=before", "model.layer.batch_norm=after",
               "model.layer.batch_norm_stats=per_step", "model.layer.bidirectional=true",
               "model.layer.backend=cpu_torch", "model.layer.backend=reference", "model.layer.grad_clip=10",
               "model.bidirectional=true", "model.projection_size=8", "model.dropout=0.1",
               "model.head_init=kaiming_normal", "model.num_layers=1"],
    "res_indrnn": ["model.fc_init=kaiming_a8", "model.head_init=kaiming_normal", "model.layer.u_bound=0.99",
                   "model.layer.batch_norm_stats=per_step", "model.layer.grad_clip=10", "model.num_blocks=1"],
    "dense_indrnn": ["model.head_init=kaiming_normal", "model.add_last_layer=false", "model.layer.u_bound=0.99",
                     "model.layer.batch_norm_stats=per_step", "model.layer.grad_clip=10"],
    "cwrnn": ["model.layer.periods=[1,3,5,7,11,13,17,19]", "model.layer.nonlinearity=relu",
              "model.layer.nonlinearity=identity", "model.layer.bias=false", "model.layer.time_origin=1",
              "model.layer.backend=reference", "model.bidirectional=true"],
    "leaky_rnn": ["model.layer.alpha_mode=learned", "model.layer.alpha_groups=[0.0,0.5,0.9,0.99]",
                  "model.layer.nonlinearity=relu", "model.layer.bias=false"],
    "skip_rnn": ["model.layer.delays=[1,3]", "model.layer.nonlinearity=relu", "model.layer.bias=false"],
    "jordan": ["model.layer.nonlinearity=relu", "model.layer.nonlinearity=sigmoid",
               "model.layer.output_nonlinearity=identity", "model.layer.bias=false"],
    "narx": ["model.layer.input_delays=0", "model.layer.output_delays=1", "model.layer.mlp_hidden=8",
             "model.layer.nonlinearity=relu", "model.layer.output_nonlinearity=identity", "model.layer.bias=false"],
    "tdnn": ["model.layer.window=1", "model.layer.dilation=2", "model.layer.nonlinearity=relu",
             "model.layer.nonlinearity=sigmoid", "model.layer.bias=false"],
    "irnn": ["model.layer.identity_scale=0.5", "model.layer.input_init_std=0.01", "model.num_layers=2"],
    "rnn": ["model.layer.nonlinearity=relu", "model.num_layers=2", "model.bidirectional=true"],
    "lstm": ["model.num_layers=2", "model.projection_size=4", "model.bidirectional=true"],
    "gru": ["model.num_layers=2", "model.dropout=0.2", "model.bidirectional=true"],
}
CASES = [(model, option) for model, options in OPTIONS.items() for option in options]
SMALL = {"indrnn": "model.hidden_size=8", "res_indrnn": "model.hidden_size=8",
         "dense_indrnn": "model.growth_rate=2", "cwrnn": "model.hidden_size=16"}


@pytest.mark.parametrize("model, option", CASES, ids=[f"{m}-{o.split('=')[0][6:]}={o.split('=')[1]}" for m, o in CASES])
def test_each_documented_option_alone_builds_and_trains(tmp_path, model, option):
    small = SMALL.get(model, "model.hidden_size=8")
    cfg = compose_train(tmp_path / "run", [f"model={model}", small, "task.seq_len=12", option])
    network = build_network(cfg)
    inputs = torch.rand(3, 12, cfg.task.input_size)
    predictions, _ = network(inputs)
    assert predictions.shape == (3, cfg.task.output_size)
    predictions.square().mean().backward()
    gradients = [p.grad for p in network.parameters() if p.requires_grad]
    assert gradients and all(g is not None and torch.isfinite(g).all() for g in gradients)


@pytest.mark.parametrize("overrides, message", [
    (["model.layer.projection=none"], "projection='none' needs input_size == hidden_size"),
    (["model=cwrnn", "model.hidden_size=10"], "hidden_size 10 is not divisible by num_modules 8"),
    (["model=leaky_rnn", "model.layer.alpha_range=[0.5,1.5]"], "alpha values must be in [0, 1]"),
])
def test_options_that_cannot_work_say_so_in_one_line(tmp_path, overrides, message):
    cfg = compose_train(tmp_path / "run", overrides)
    with pytest.raises(UserError) as error:
        build_network(cfg)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_long_memory_under_a_bound_below_one_starts_every_unit_at_the_bound():
    from src.layers import IndRNN
    layer = IndRNN(2, 16, u_bound=0.99, recurrent_init="long_memory")
    assert torch.allclose(layer.recurrence.weight_hh, torch.full((16,), 0.99))


def test_a_dtype_mismatch_is_the_same_line_on_every_indrnn_backend():
    from src.layers import IndRNN
    messages = set()
    for backend in ("cpu", "cpu_torch", "reference"):
        for input_size in (1, 16):  # the fused projection kernel (<= 8 inputs) and the plain one
            layer = IndRNN(input_size, 4, batch_first=True, backend=backend)
            with pytest.raises(ValueError) as error:
                layer(torch.rand(2, 5, input_size, dtype=torch.float64))
            messages.add(str(error.value))
    assert messages == {"IndRNN got torch.float64 input but its parameters are torch.float32: convert the input "
                        "(input.to(torch.float32)) or the layer (layer.to(torch.float64))"}
