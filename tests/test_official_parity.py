"""The project's training path step by step against the official IndRNN code (issue 23 §4).

tests/fixtures/official_parity_pmnist.json holds the per-step training losses that the authors'
pixel-MNIST code (Sunnydreamrain/IndRNN_pytorch, its pure-PyTorch recurrence on CPU) computes for
the plain, residual and dense networks when it starts from this project's initial weights (the
networks built from the experiment files under a fixed seed) and trains on batches regenerated here
from a seed: float64, dropout 0, a short T. The test replays the project's real training path (the
experiment files composed as train.py does, build(), the callbacks, the Lightning Trainer with
value clipping, Adam with the official weight-decay groups, u clamped after every step) and
compares every loss (<= 1e-9).

The fixture holds figures only. To regenerate it (the official code is never copied here; give the
path of a checkout of IndRNN_pytorch):

    python -m tests.test_official_parity --official /path/to/IndRNN_pytorch

Differences that break it at the first steps: the weight-decay groups, the value clipping, the u
bound, Adam's eps, dropout, the batch norm's statistics (over batch and time).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_modules.run.build import build, build_callbacks, build_trainer, compose_config
from src.batch import SequenceBatch

FIXTURE = Path(__file__).parent / "fixtures" / "official_parity_pmnist.json"
SEQ_LEN, BATCH, STEPS, DATA_SEED, INIT_SEED = 16, 8, 20, 23, 0
NO_DROPOUT = {
    "indrnn_pmnist_6layer": ["model.dropout=0.0"],
    "res_indrnn_pmnist": ["model.dropout=0.0"],
    "dense_indrnn_pmnist": ["model.dropout_first=0.0", "model.dropout_bottleneck=0.0", "model.dropout_dense=0.0",
                            "model.dropout_transition=0.0"],
}


def parity_batches(steps: int = STEPS, batch: int = BATCH, seq_len: int = SEQ_LEN,
                   seed: int = DATA_SEED) -> list[SequenceBatch]:
    """``steps`` batches of pixel sequences: inputs (B, T, 1) float64 with the official scaling
    (p / 256 - 0.5) * 2 of bytes p, targets (B,) classes 0-9; the same for every call with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        pixels = torch.randint(0, 256, (batch, seq_len, 1), generator=generator, dtype=torch.float64)
        labels = torch.randint(0, 10, (batch,), generator=generator)
        batches.append(SequenceBatch((pixels / 256 - 0.5) * 2, labels))
    return batches


def parity_config(experiment: str, output_dir: Path, steps: int = STEPS, overrides: tuple[str, ...] = ()):
    """The experiment as train.py composes it, on the CPU in float64, T = SEQ_LEN, no dropout, ``steps``
    optimizer steps and no validation (the test compares training steps only)."""
    return compose_config([f"experiment={experiment}", "trainer=cpu", f"task.seq_len={SEQ_LEN}",
                           "task.datamodule.download=false", "trainer.precision=64-true", f"trainer.max_steps={steps}",
                           "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                           "trainer.enable_model_summary=false", "~callbacks.lr_monitor",  # no logger here
                           *NO_DROPOUT[experiment], *overrides], output_dir)


def initial_objective(cfg) -> pl.LightningModule:
    """The objective (and its network) from ``build``, initialised under INIT_SEED."""
    torch.manual_seed(INIT_SEED)
    return build(cfg)[1]


class _LossRecorder(pl.Callback):
    """The training loss of every step, as the optimizer step used it."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def project_losses(experiment: str, output_dir: Path, steps: int = STEPS,
                   overrides: tuple[str, ...] = ()) -> tuple[float, list[float]]:
    """(norm of the initial parameters, per-step training losses) of ``experiment`` through the
    project's training path (``overrides`` after the parity settings)."""
    cfg = parity_config(experiment, output_dir, steps, overrides)
    objective = initial_objective(cfg)
    initial_norm = parameter_norm(objective.net)
    recorder = _LossRecorder()
    trainer = build_trainer(cfg, [], build_callbacks(cfg) + [recorder])
    loader = DataLoader(parity_batches(steps), batch_size=None, shuffle=False)
    trainer.fit(objective, train_dataloaders=loader)
    return initial_norm, recorder.losses


def parameter_norm(net: torch.nn.Module) -> float:
    """The L2 norm of all of ``net``'s parameters together, in float64."""
    return torch.cat([p.detach().flatten().double() for p in net.parameters()]).norm().item()


@pytest.fixture(scope="module")
def recorded():
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("experiment", sorted(NO_DROPOUT))
def test_training_matches_the_official_code_step_by_step(experiment, recorded, tmp_path):
    run = recorded["runs"][experiment]
    assert (run["seq_len"], run["batch"], run["steps"]) == (SEQ_LEN, BATCH, STEPS)
    initial_norm, ours = project_losses(experiment, tmp_path)
    assert initial_norm == pytest.approx(run["initial_parameter_norm"], rel=1e-12), (
        "the experiment's initial weights changed: regenerate the fixture (see this module's docstring)")
    assert len(ours) == STEPS
    differences = [abs(a - b) for a, b in zip(ours, run["official_losses"])]
    worst = max(range(STEPS), key=differences.__getitem__)
    assert differences[worst] <= 1e-9, f"step {worst + 1}: ours {ours[worst]!r}, official {run['official_losses'][worst]!r}"


# --- Regenerating the fixture from the official code ----------------------------------------------------


def _official_args(official_dir: Path):
    """The official pixel-MNIST command lines' settings (run.sh, run_residual.sh, run_dense.sh) with
    T = SEQ_LEN and no dropout, as the ``args`` its network modules read from ``__main__``."""
    from argparse import ArgumentParser, Namespace

    return ArgumentParser(), Namespace(
        MAG=5.0, seq_len=SEQ_LEN, hidden_size=128, num_layers=6, num_blocks=5, bn_location="bn_after",
        u_lastlayer_ini=True, growth_rate=16, num_first=6, block_config="(8,6,4)", add_last_layer=True,
        dropout=0.0, dropout_sec=0.0, dropout_trans=0.0, dropout_first=0.0, dropout_last=0.0)


def _official_network(experiment: str, official_dir: Path) -> torch.nn.Module:
    """The official network for ``experiment``, on its pure-PyTorch recurrence (no CUDA)."""
    import importlib

    import numpy as np

    folder = official_dir / "pixelMNIST"
    sys.path.insert(0, str(folder))
    main = sys.modules["__main__"]
    main.parser, main.args = _official_args(official_dir)
    main.U_bound = float(np.power(10, np.log10(main.args.MAG) / SEQ_LEN))
    if not hasattr(torch.nn.init, "uniform"):  # removed from torch; its values are overwritten anyway
        torch.nn.init.uniform = torch.nn.init.uniform_
    # The official modules import the CUDA recurrence; its own comment names the CPU one instead.
    sys.modules["cuda_IndRNN_onlyrecurrent"] = importlib.import_module("IndRNN_onlyrecurrent")
    if experiment == "indrnn_pmnist_6layer":
        return importlib.import_module("Indrnn_plainnet").stackedIndRNN_encoder(1, 10)
    if experiment == "res_indrnn_pmnist":
        return importlib.import_module("Indrnn_residualnet_preact").ResidualNet(1, 10)
    return importlib.import_module("Indrnn_densenet").DenseNet(1, 10, growth_rate=16, block_config=(8, 6, 4),
                                                                 num_init_features=16 * 6)


def _parameters_in_call_order(net: torch.nn.Module, inputs: torch.Tensor, leaves: tuple[type, ...],
                              owners: tuple[type, ...] = ()) -> list[torch.nn.Parameter]:
    """The parameters of ``net`` in the order a forward pass on ``inputs`` first uses their modules:
    each module of type ``owners`` (whole layers, e.g. an IndRNN with its projection and batch norm)
    or ``leaves`` (e.g. Linear) contributes its parameters when it is called, once."""
    order: list[torch.nn.Parameter] = []
    seen: set[int] = set()

    def record(module, _inputs):
        for parameter in module.parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                order.append(parameter)

    handles = [m.register_forward_pre_hook(record) for m in net.modules() if isinstance(m, owners + leaves)]
    with torch.no_grad():
        net(inputs)
    for handle in handles:
        handle.remove()
    return order


def official_losses(experiment: str, official_dir: Path, output_dir: Path) -> dict:
    """The official network, given the project's initial weights, trained by the official loop."""
    import numpy as np

    from src.layers import IndRNN

    objective = initial_objective(parity_config(experiment, output_dir))
    ours = objective.net.double().eval()
    official = _official_network(experiment, official_dir).double().eval()
    recurrent = sys.modules["IndRNN_onlyrecurrent"].IndRNN_onlyrecurrent
    probe = parity_batches(1)[0].inputs
    ours_order = _parameters_in_call_order(ours, probe, (torch.nn.Linear,), owners=(IndRNN,))
    official_order = _parameters_in_call_order(official, probe.transpose(0, 1),
                                               (torch.nn.Linear, recurrent, torch.nn.BatchNorm1d))
    assert [tuple(p.shape) for p in ours_order] == [tuple(p.shape) for p in official_order]
    assert len(ours_order) == len(list(ours.parameters())) == len(list(official.parameters()))
    with torch.no_grad():
        for mine, theirs in zip(ours_order, official_order):
            theirs.copy_(mine)
    official.train()
    # The official training loop (Indrnn_mnist_train.py), by hand: groups by name, u clamped
    # before each forward pass, every gradient clamped to 10 after backward.
    exempt = [p for name, p in official.named_parameters() if "weight_hh" in name or "bias" in name]
    decayed = [p for name, p in official.named_parameters() if not ("weight_hh" in name or "bias" in name)]
    optimizer = torch.optim.Adam([{"params": exempt}, {"params": decayed, "weight_decay": 1e-4}], lr=2e-4)
    u_bound = sys.modules["__main__"].U_bound
    losses = []
    for batch in parity_batches():
        official.zero_grad()
        for name, parameter in official.named_parameters():
            if "weight_hh" in name:
                parameter.data.clamp_(-u_bound, u_bound)
        loss = torch.nn.functional.cross_entropy(official(batch.inputs.transpose(0, 1)), batch.targets)
        loss.backward()
        for parameter in official.parameters():
            parameter.grad.data.clamp_(-10, 10)
        optimizer.step()
        losses.append(loss.item())
    initial_norm = parameter_norm(ours)
    return {"seq_len": SEQ_LEN, "batch": BATCH, "steps": STEPS, "u_bound": u_bound,
            "initial_parameter_norm": initial_norm, "official_losses": losses,
            "final_official_parameter_norm": parameter_norm(official),
            "numpy": np.__version__}


def main(argv: list[str]) -> None:
    import argparse
    import datetime
    import subprocess
    import tempfile

    from lightning_modules.run import register_resolvers

    parser = argparse.ArgumentParser(description="Regenerate " + str(FIXTURE))
    parser.add_argument("--official", type=Path, required=True, help="a checkout of Sunnydreamrain/IndRNN_pytorch")
    parser.add_argument("--commit", default=None, help="its commit (read with git when omitted)")
    args = parser.parse_args(argv)
    register_resolvers()
    commit = args.commit or subprocess.run(["git", "-C", str(args.official), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, check=True).stdout.strip()
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for experiment in sorted(NO_DROPOUT):
            run = official_losses(experiment, args.official, Path(folder) / experiment)
            _, ours = project_losses(experiment, Path(folder) / f"{experiment}-ours")
            run["largest_difference_from_project_when_recorded"] = max(abs(a - b) for a, b in zip(ours, run["official_losses"]))
            runs[experiment] = run
            print(experiment, "largest difference", run["largest_difference_from_project_when_recorded"])
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({
        "note": ("Per-step training losses of the official pixel-MNIST networks (Sunnydreamrain/IndRNN_pytorch, "
                 "pure-PyTorch recurrence IndRNN_onlyrecurrent.py on CPU, float64, dropout 0, the official training "
                 "loop by hand) from this project's initial weights; figures only, no code. Produced by: "
                 "python -m tests.test_official_parity --official <checkout>"),
        "official_repository": "https://github.com/Sunnydreamrain/IndRNN_pytorch", "official_commit": commit,
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "data_seed": DATA_SEED, "init_seed": INIT_SEED, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
