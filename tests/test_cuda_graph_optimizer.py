"""The optimizer step inside a CUDA graph (lightning_modules/cuda_graph/optimizer.py), checked on the CPU
with a stand-in graph that replays by re-running what was recorded on the objects the real graph reads
(the static gradients, the lr tensors): steps equal the eager ones (SGD bit for bit, Adam within
float32 rounding, schedulers' rates included), every fallback is taken with its one-line reason, the
state dict is an eager run's and loads both ways, and Lightning's closure path (clipping, a scheduler)
gives the eager fit's weights. The real graphs are checked on a GPU in tests/test_cuda_graph.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_modules.cuda_graph import CudaGraphs, OptimizerStepGraph, scaler_refusal, unsupported_optimizer


class ReplayedGraph:
    """CPU stand-in for :class:`CudaGraph`: ``replay`` re-runs the recorded update."""

    def __init__(self, record):
        self.record = record

    def replay(self):
        self.record()

    @staticmethod
    def unsupported(params):
        return None


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)


def adam(params):
    return torch.optim.Adam(params, lr=0.01)


def run(make_optimizer, graphed: bool, steps: int = 12, skip: tuple = (), net=None, optimizer=None):
    """``steps`` closure steps with a StepLR (halving every 3); a step in ``skip`` returns None with no
    gradients. Returns (losses, net, optimizer, the OptimizerStepGraph or None, reasons)."""
    net = net or make_net()
    optimizer = optimizer or make_optimizer(net.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5)
    reasons = []
    wrapper = OptimizerStepGraph(optimizer, reasons.append, graph=ReplayedGraph).install() if graphed else None
    generator = torch.Generator().manual_seed(1)
    losses = []
    for index in range(steps):
        inputs = torch.randn(4, 3, generator=generator)

        def closure():
            optimizer.zero_grad(set_to_none=True)
            if index in skip:
                return None
            loss = net(inputs).pow(2).mean()
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        losses.append(float("nan") if loss is None else loss.item())
        scheduler.step()
    return losses, net, optimizer, wrapper, reasons


def assert_same_weights(a: nn.Module, b: nn.Module, tolerance: float) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=tolerance, atol=tolerance)


def test_sgd_replays_equal_eager_steps_bit_for_bit_and_a_new_lr_is_recaptured():
    eager_losses, eager_net, _, _, _ = run(sgd, graphed=False)
    losses, net, _, wrapper, reasons = run(sgd, graphed=True)
    assert losses == eager_losses
    assert_same_weights(net, eager_net, 0)
    # lr 0.1 for steps 0-2 (0 creates the momentum buffers, 1 is the warm-up, 2 captured), 0.05 for 3-5
    # (3 eager, 4 captured, 5 replayed), ...
    assert wrapper.captures == 4 and wrapper.replays == 7
    assert any("SGD's lr is a constant in its graph" in r for r in reasons), reasons


def test_adam_replays_read_the_schedulers_rate_from_the_lr_tensor():
    eager_losses, eager_net, _, _, _ = run(adam, graphed=False)
    losses, net, optimizer, wrapper, reasons = run(adam, graphed=True)
    assert wrapper.captures == 1 and wrapper.replays == 10, reasons  # the lr changes need no new capture
    assert wrapper.lr_values == [0.01 * 0.5 ** 3]  # the last step's rate reached the graph's lr tensor
    assert optimizer.param_groups[0]["lr"] == 0.01 * 0.5 ** 4  # a float: what schedulers and checkpoints see
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-6, atol=1e-7)
    assert_same_weights(net, eager_net, 1e-6)


def test_a_skipped_step_is_eager_and_keeps_the_graph():
    eager_losses, eager_net, _, _, _ = run(adam, graphed=False, skip=(5,))
    losses, net, _, wrapper, reasons = run(adam, graphed=True, skip=(5,))
    assert reasons[-1] == ("CUDA graphs: eager optimizer step: no parameter has a gradient "
                           "(a skipped step: training_step returned None)")
    assert wrapper.captures == 1 and wrapper.replays == 9
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-6, atol=1e-7, equal_nan=True)
    assert_same_weights(net, eager_net, 1e-6)


def test_a_new_parameter_group_is_named_and_captured_anew():
    net = make_net()
    optimizer = sgd(net[0].parameters())
    reasons = []
    wrapper = OptimizerStepGraph(optimizer, reasons.append, graph=ReplayedGraph).install()
    inputs = torch.randn(4, 3)
    for index in range(8):
        if index == 4:
            optimizer.add_param_group({"params": net[2].parameters()})
        optimizer.zero_grad()
        net(inputs).pow(2).mean().backward()
        optimizer.step()
    assert reasons[1] == ("CUDA graphs: eager optimizer step: the optimizer's parameters changed since the "
                          "capture (a new capture follows)")
    assert wrapper.captures == 2 and len(wrapper.graph_params) == 4


@pytest.mark.parametrize("make, reason", [
    (lambda p: torch.optim.LBFGS(p), "LBFGS is not one of the optimizers checked"),
    (lambda p: torch.optim.Adagrad(p), "Adagrad is not one of the optimizers checked"),
    (lambda p: torch.optim.Adam(p, fused=True), "Adam(fused=True) is not checked"),
    (lambda p: torch.optim.Adam(p, lr=torch.tensor(0.01)), "tensor hyperparameters (lr) are not handled"),
])
def test_optimizers_that_cannot_be_captured_step_eagerly_with_the_reason(make, reason):
    net = make_net()
    optimizer = make(net.parameters())
    assert reason in unsupported_optimizer(optimizer)
    reasons = []
    wrapper = OptimizerStepGraph(optimizer, reasons.append, graph=ReplayedGraph).install()
    before = [p.detach().clone() for p in net.parameters()]

    def closure():
        optimizer.zero_grad()
        loss = net(torch.ones(2, 3)).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(4):
        optimizer.step(closure)
    assert wrapper.captures == 0 and len(reasons) == 1 and reason in reasons[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))  # it did step


def test_hooks_sparse_gradients_and_extra_arguments_are_refused_per_step():
    embedding = nn.Embedding(5, 3, sparse=True)
    optimizer = torch.optim.SGD(embedding.parameters(), lr=0.1)
    wrapper = OptimizerStepGraph(optimizer, graph=ReplayedGraph)
    embedding(torch.tensor([1, 2])).sum().backward()
    assert wrapper.why_not({}).startswith("sparse gradients")
    assert wrapper.why_not({"grad_scaler": None}) == "step called with grad_scaler (a GradScaler's step)"
    net = make_net()
    optimizer = adam(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    wrapper = OptimizerStepGraph(optimizer, graph=ReplayedGraph)
    assert wrapper.why_not({}) is None
    handle = optimizer.register_step_post_hook(lambda *args: None)
    assert wrapper.why_not({}) == "optimizer step hooks are registered (a replay would not run them)"
    handle.remove()
    optimizer.param_groups[0]["lr"] = torch.tensor(0.1)
    assert wrapper.why_not({}).startswith("a hyperparameter became a tensor")


def test_state_dict_is_an_eager_runs_and_loads_both_ways():
    _, eager_net, eager_optimizer, _, _ = run(adam, graphed=False, steps=6)
    _, net, optimizer, wrapper, _ = run(adam, graphed=True, steps=6)
    saved, eager_saved = optimizer.state_dict(), eager_optimizer.state_dict()
    assert saved["param_groups"] == eager_saved["param_groups"]  # float lr, capturable False, same keys
    for index, values in saved["state"].items():
        eager_values = eager_saved["state"][index]
        assert values.keys() == eager_values.keys() and values["step"].device.type == "cpu"
        for key in values:
            torch.testing.assert_close(values[key], eager_values[key], rtol=1e-6, atol=1e-8)
    # The graphed run's state continues eagerly, and the eager run's state continues graphed.
    plain = adam(net.parameters())
    plain.load_state_dict(saved)
    resumed = adam(eager_net.parameters())
    resumed_wrapper = OptimizerStepGraph(resumed, graph=ReplayedGraph).install()
    resumed.load_state_dict(eager_saved)
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):
        inputs = torch.randn(4, 3, generator=generator)
        for model, opt in ((net, plain), (eager_net, resumed)):
            opt.zero_grad()
            model(inputs).pow(2).mean().backward()
            opt.step()
    assert resumed_wrapper.replays == 4 and wrapper.graph is not None
    assert_same_weights(net, eager_net, 1e-6)


def test_uninstall_restores_the_step_a_scheduler_wrapped():
    net = make_net()
    optimizer = adam(net.parameters())
    torch.optim.lr_scheduler.StepLR(optimizer, 3)  # wraps optimizer.step (an instance attribute)
    schedulers_step = optimizer.step
    wrapper = OptimizerStepGraph(optimizer, graph=ReplayedGraph).install()
    assert optimizer.step is not schedulers_step
    wrapper.uninstall()
    assert optimizer.step is schedulers_step and not optimizer._optimizer_state_dict_post_hooks


def test_a_grad_scaler_keeps_the_optimizer_step_eager():
    scaling = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()))
    assert "GradScaler" in scaler_refusal(scaling)
    assert scaler_refusal(SimpleNamespace(precision_plugin=SimpleNamespace())) is None
    assert scaler_refusal(None) is None


class TinyRegression(pl.LightningModule):
    """A linear-tanh regression with SGD and a per-step StepLR: Lightning's closure path in a few steps."""

    def __init__(self, make_optimizer=sgd):
        super().__init__()
        self.net = make_net()
        self.make_optimizer = make_optimizer
        self.losses = []

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = (self.net(inputs) - targets).pow(2).mean()
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self):
        optimizer = self.make_optimizer(self.parameters())
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 4, 0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def tiny_batches(device: str, count: int = 16) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(3)
    inputs, targets = torch.randn(8 * count, 3, generator=generator), torch.randn(8 * count, 2, generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs.to(device), targets.to(device)),
                                       batch_size=8)


def fit_tiny(callbacks: list, accelerator: str = "cpu", make_optimizer=sgd) -> TinyRegression:
    module = TinyRegression(make_optimizer)
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_epochs=1, logger=False, callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=0.5)
    trainer.fit(module, train_dataloaders=tiny_batches(accelerator.replace("gpu", "cuda")))
    return module


class ReplayedSteps(pl.Callback):
    """What CudaGraphs installs on CUDA, with the CPU stand-in graph."""

    def on_fit_start(self, trainer, pl_module):
        self.steps = [OptimizerStepGraph(o, graph=ReplayedGraph).install() for o in trainer.optimizers]

    def on_fit_end(self, trainer, pl_module):
        for step in self.steps:
            step.uninstall()


def test_through_lightnings_closure_with_clipping_and_a_step_scheduler_the_weights_are_the_eager_fits():
    eager = fit_tiny([])
    replayed = ReplayedSteps()
    graphed = fit_tiny([replayed])
    # 4 steps per rate: the first rate 2 eager (the momentum buffers' creation, the warm-up) and 2 replayed,
    # each later one 1 eager (a new constant lr) and 3 replayed (the first right after its capture).
    assert replayed.steps[0].replays == 2 + 3 * 3
    assert torch.equal(torch.stack(graphed.losses), torch.stack(eager.losses))
    assert_same_weights(graphed.net, eager.net, 0)


def test_the_callback_installs_nothing_off_cuda():
    callback = CudaGraphs()
    fit_tiny([callback])
    assert callback.graphed is None and callback.steps == []
