"""CUDA-graph training steps (lightning_modules/cuda_graph/): on a GPU, N steps with the forward, backward
and optimizer update replayed give the eager run's losses and weights (batch norm's running statistics
included; SGD to float32 round-off, Adam within its capturable path's rounding), a scheduler's rates
included, and steps that cannot replay (a short batch, evaluation) run eagerly with a one-line reason;
without CUDA, the callback and the dispatcher change nothing. The optimizer wrapper's decisions are
checked on the CPU in tests/test_cuda_graph_optimizer.py."""
from __future__ import annotations

import functools

import pytest
import torch
from torch.nn import functional as F

from lightning_modules.cuda_graph import CudaGraphs, GraphedForward, OptimizerStepGraph
from src.layers import IndRNN
from src.networks import RecurrentNetwork

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_network(device: str, seed: int = 0) -> RecurrentNetwork:
    torch.manual_seed(seed)
    layer = functools.partial(IndRNN, u_bound=1.0, batch_norm="after")
    return RecurrentNetwork(layer, input_size=2, output_size=5, hidden_size=32, num_layers=2,
                            readout="last").to(device)


def train(network, batches, graphed: bool, make_optimizer=None):
    """Steps of ``make_optimizer`` (default Adam, lr 1e-2; the rate halved every 3 steps) over ``batches``
    ((inputs (B, T, 2), labels (B,))); returns the losses, the reasons, the forward dispatcher and the
    optimizer-step graph (None, None when eager) and the optimizer."""
    reasons = []
    dispatcher = GraphedForward(network, report=reasons.append).install() if graphed else None
    optimizer = (make_optimizer or functools.partial(torch.optim.Adam, lr=1e-2))(network.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5)
    step_graph = OptimizerStepGraph(optimizer, report=reasons.append).install() if graphed else None
    losses = []
    for inputs, labels in batches:
        network.train()
        loss = F.cross_entropy(network(inputs)[0], labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        network.eval()
        with torch.no_grad():
            network(inputs)  # an evaluation in between runs eagerly and leaves the graph alone
    if graphed:
        dispatcher.uninstall()
        step_graph.uninstall()
    return torch.stack(losses), reasons, dispatcher, step_graph, optimizer


def random_batches(device, sizes, steps=20):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(b, steps, 2, generator=generator).to(device),
             torch.randint(5, (b,), generator=generator).to(device)) for b in sizes]


@needs_cuda
@pytest.mark.parametrize("name, make_optimizer, tolerance", [
    ("sgd", functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9), 1e-6),
    # Adam's capturable path (replays) divides by the bias-corrected step where the eager one multiplies:
    # float32 round-off, about 1e-7 per step; a stale gradient or learning rate would differ by ~1e-3.
    ("adam", None, 1e-4)])
def test_graphed_steps_equal_eager_steps_on_gpu(name, make_optimizer, tolerance):
    batches = random_batches("cuda", [16] * 10 + [5])  # the last, short batch cannot replay the forward graph
    eager_net, graphed_net = make_network("cuda"), make_network("cuda")
    eager_losses, _, _, _, eager_optimizer = train(eager_net, batches, False, make_optimizer)
    graphed_losses, reasons, dispatcher, step_graph, optimizer = train(graphed_net, batches, True, make_optimizer)
    assert dispatcher.replays == 10, reasons
    assert any("differs from the captured (16, 20, 2)" in r for r in reasons), reasons
    # SGD bakes each rate into its graph (captured anew after a rate change), Adam refills a tensor.
    assert step_graph.replays >= (4 if name == "sgd" else 9) and not step_graph.failed, reasons
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=tolerance, atol=tolerance / 10)
    for (key, a), b in zip(graphed_net.state_dict().items(), eager_net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance / 10, msg=f"{key} differs after training")
    # The checkpoint is an eager run's: step counters on the CPU, float rates, the same groups.
    saved, eager_saved = optimizer.state_dict(), eager_optimizer.state_dict()
    assert saved["param_groups"] == eager_saved["param_groups"]
    assert all(t.device.type == "cpu" for values in saved["state"].values() for k, t in values.items() if k == "step")


@needs_cuda
def test_through_lightning_the_graphed_optimizer_step_gives_the_eager_fits_weights():
    from tests.test_cuda_graph_optimizer import adam, fit_tiny

    eager = fit_tiny([], accelerator="gpu", make_optimizer=adam)
    callback = CudaGraphs(forward=False)  # the tiny module's net returns a tensor, not (predictions, state)
    graphed = fit_tiny([callback], accelerator="gpu", make_optimizer=adam)
    torch.testing.assert_close(torch.stack(graphed.losses), torch.stack(eager.losses), rtol=1e-4, atol=1e-5)
    for p, q in zip(graphed.net.parameters(), eager.net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert callback.steps == [] and "step" not in graphed.trainer.optimizers[0].__dict__  # removed after the fit


def test_without_cuda_every_step_is_eager_and_the_network_is_unchanged():
    batches = random_batches("cpu", [4, 4])
    eager_net, dispatched_net = make_network("cpu"), make_network("cpu")
    eager_losses, _, _, _, _ = train(eager_net, batches, graphed=False)
    losses, reasons, dispatcher, step_graph, _ = train(dispatched_net, batches, graphed=True)
    assert dispatcher.replays == 0 and step_graph.replays == 0
    assert reasons == ["CUDA graphs: eager step: inputs on cpu, not CUDA",
                       "CUDA graphs: eager optimizer step: parameters on cpu, not CUDA"]
    torch.testing.assert_close(losses, eager_losses, rtol=0, atol=0)
    assert "forward" not in dispatched_net.__dict__  # uninstalled: the class's forward again
    assert list(dispatched_net.state_dict()) == list(eager_net.state_dict())


def test_a_carried_state_is_named_as_the_reason():
    network = make_network("cpu")
    reasons = []
    GraphedForward(network, report=reasons.append).install()
    network.train()
    inputs = torch.randn(3, 4, 2)
    _, state = network(inputs)
    network(inputs, state=state)
    assert reasons[-1].startswith("CUDA graphs: eager step: state given (a carried state")


def test_callback_does_nothing_off_cuda():
    class Module:  # the two attributes the callback reads
        device = torch.device("cpu")
        net = make_network("cpu")

    callback = CudaGraphs()
    callback.on_fit_start(None, Module)
    assert callback.graphed is None and "forward" not in Module.net.__dict__


def test_trainer_gpu_has_the_graphs_and_gpu_eager_is_the_same_trainer_without(train_cfg):
    from lightning_modules.run.build import build_callbacks

    gpu, alias, eager = (train_cfg([f"trainer={name}"]) for name in ("gpu", "gpu_graphs", "gpu_eager"))
    assert gpu.trainer == alias.trainer == eager.trainer and gpu.callbacks == alias.callbacks
    callbacks = build_callbacks(gpu)
    assert [type(c).__name__ for c in callbacks] == ["CudaGraphs"] + [type(c).__name__ for c in build_callbacks(eager)]
    assert callbacks[0].forward and callbacks[0].optimizer_step
    assert "cuda_graphs" not in train_cfg(["trainer=gpu", "~callbacks.cuda_graphs"]).callbacks
    only_forward = build_callbacks(train_cfg(["trainer=gpu", "callbacks.cuda_graphs.optimizer_step=false"]))[0]
    assert only_forward.forward and not only_forward.optimizer_step
