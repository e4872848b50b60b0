"""CUDA-graph training steps (lightning_modules/cuda_graph.py): on a GPU, N graphed optimizer steps give
the eager run's losses and weights (batch norm's running statistics included), and steps that cannot
replay (a short batch, evaluation) run eagerly with a one-line reason; without CUDA, the callback and
the dispatcher change nothing."""
from __future__ import annotations

import functools

import pytest
import torch
from torch.nn import functional as F

from lightning_modules.cuda_graph import CudaGraphs, GraphedForward
from src.layers import IndRNN
from src.networks import RecurrentNetwork

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_network(device: str, seed: int = 0) -> RecurrentNetwork:
    torch.manual_seed(seed)
    layer = functools.partial(IndRNN, u_bound=1.0, batch_norm="after")
    return RecurrentNetwork(layer, input_size=2, output_size=5, hidden_size=32, num_layers=2,
                            readout="last").to(device)


def train(network, batches, graphed: bool):
    """Adam steps over ``batches`` ((inputs (B, T, 2), labels (B,))); returns the losses and reasons."""
    reasons = []
    dispatcher = GraphedForward(network, report=reasons.append).install() if graphed else None
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    losses = []
    for inputs, labels in batches:
        network.train()
        loss = F.cross_entropy(network(inputs)[0], labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        network.eval()
        with torch.no_grad():
            network(inputs)  # an evaluation in between runs eagerly and leaves the graph alone
    if dispatcher is not None:
        dispatcher.uninstall()
    return torch.stack(losses), reasons, dispatcher


def random_batches(device, sizes, steps=20):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(b, steps, 2, generator=generator).to(device),
             torch.randint(5, (b,), generator=generator).to(device)) for b in sizes]


@needs_cuda
def test_graphed_steps_equal_eager_steps_on_gpu():
    batches = random_batches("cuda", [16] * 8 + [5])  # the last, short batch cannot replay the graph
    eager_net, graphed_net = make_network("cuda"), make_network("cuda")
    eager_losses, _, _ = train(eager_net, batches, graphed=False)
    graphed_losses, reasons, dispatcher = train(graphed_net, batches, graphed=True)
    assert dispatcher.replays == 8, reasons
    assert any("differs from the captured (16, 20, 2)" in r for r in reasons), reasons
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=1e-6, atol=1e-7)
    for (name, a), b in zip(graphed_net.state_dict().items(), eager_net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"{name} differs after training")


def test_without_cuda_every_step_is_eager_and_the_network_is_unchanged():
    batches = random_batches("cpu", [4, 4])
    eager_net, dispatched_net = make_network("cpu"), make_network("cpu")
    eager_losses, _, _ = train(eager_net, batches, graphed=False)
    losses, reasons, dispatcher = train(dispatched_net, batches, graphed=True)
    assert dispatcher.replays == 0 and reasons == ["CUDA graphs: eager step: inputs on cpu, not CUDA"]
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


def test_trainer_gpu_graphs_is_trainer_gpu_plus_the_callback(train_cfg):
    from lightning_modules.run.build import build_callbacks

    graphs, plain = train_cfg(["trainer=gpu_graphs"]), train_cfg(["trainer=gpu"])
    assert graphs.trainer == plain.trainer
    assert [type(c).__name__ for c in build_callbacks(graphs)] == ["CudaGraphs"] + [
        type(c).__name__ for c in build_callbacks(plain)]
