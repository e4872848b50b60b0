"""Regenerating tests/fixtures/official_parity_*.json from the official IndRNN code (see
tests/test_official_parity.py, which replays them). The official code is run by hand from a checkout
given on the command line and never copied here; only its figures are written:

    python -m tests.test_official_parity --official <HEAD checkout> --official-cvpr <c925461 checkout>
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.test_official_parity import (BATCH, CASES, DATA_SEED, FIXTURES, INIT_SEED, STEPS, Case, evaluation_windows,
                                        initial_objective, parameter_norm, parity_batches, parity_config,
                                        project_losses)

OFFICIAL_MODULES = ("Indrnn_plainnet", "Indrnn_residualnet_preact", "Indrnn_densenet", "utils", "IndRNN_onlyrecurrent",
                    "cuda_IndRNN_onlyrecurrent")


def _official_network(case: Case, official_dir: Path) -> torch.nn.Module:
    """The official network of ``case``, on its pure-PyTorch recurrence (no CUDA). Its modules read
    ``args`` and ``U_bound`` from ``__main__`` when imported: they are set to the case's command line
    (no dropout, T = case.seq_len) and the modules imported afresh from the case's folder."""
    import importlib
    from argparse import ArgumentParser, Namespace

    import numpy as np

    args = dict(MAG=5.0, seq_len=case.seq_len, bn_location="bn_after", u_lastlayer_ini=True, block_config="(8,6,4)",
                add_last_layer=True, dropout=0.0, dropout_sec=0.0, dropout_trans=0.0, dropout_first=0.0,
                dropout_last=0.0, hidden_size=128, num_layers=6, num_blocks=5, growth_rate=16, num_first=6)
    args.update(case.official_sizes)
    main = sys.modules["__main__"]
    main.parser, main.args = ArgumentParser(), Namespace(**args)
    main.U_bound = float(np.power(10, np.log10(args["MAG"]) / case.seq_len))
    if not hasattr(torch.nn.init, "uniform"):  # removed from torch; its values are overwritten anyway
        torch.nn.init.uniform = torch.nn.init.uniform_
    for name in OFFICIAL_MODULES:
        sys.modules.pop(name, None)
    sys.path.insert(0, str(official_dir / case.official_folder))
    try:
        # The official modules import the CUDA recurrence; its own comment names the CPU one instead.
        sys.modules["cuda_IndRNN_onlyrecurrent"] = importlib.import_module("IndRNN_onlyrecurrent")
        if case.official_model == "plain":
            return importlib.import_module("Indrnn_plainnet").stackedIndRNN_encoder(case.input_size, case.classes)
        if case.official_model == "residual":
            return importlib.import_module("Indrnn_residualnet_preact").ResidualNet(case.input_size, case.classes)
        return importlib.import_module("Indrnn_densenet").DenseNet(
            case.input_size, case.classes, growth_rate=args["growth_rate"], block_config=(8, 6, 4),
            num_init_features=args["growth_rate"] * args["num_first"])
    finally:
        sys.path.pop(0)


def _official_char_lm(case: Case, official_dir: Path) -> torch.nn.Module:
    """The CVPR-era official char-PTB network (PyTorch c925461, cPTB/language_model.py) on its
    pure-PyTorch recurrence; its module parses ``sys.argv`` when imported, so the case's command line
    (run.sh's settings, dropout 0, the case's sizes) is put there for the import."""
    import importlib

    if not hasattr(torch.nn.init, "kaiming_uniform"):  # removed from torch; same values as the underscored one
        torch.nn.init.kaiming_uniform = torch.nn.init.kaiming_uniform_
    for name in ("language_model", "opts", "IndRNN_onlyrecurrent", "cuda_IndRNN_onlyrecurrent"):
        sys.modules.pop(name, None)
    sizes = case.official_sizes
    argv, sys.argv = sys.argv, ["language_model.py", "--hidden_size", str(sizes["hidden_size"]), "--num_layers",
                                str(sizes["num_layers"]), "--seq_len", str(case.seq_len), "--batch_size", str(BATCH),
                                "--dropout", "0", "--use_weightdecay_nohiddenW"]
    sys.path.insert(0, str(official_dir / case.official_folder))
    try:
        sys.modules["cuda_IndRNN_onlyrecurrent"] = importlib.import_module("IndRNN_onlyrecurrent")
        return importlib.import_module("language_model").stackedIndRNN_encoder(case.classes)
    finally:
        sys.path.pop(0)
        sys.argv = argv


def _parameters_in_call_order(net: torch.nn.Module, forward, leaves: tuple[type, ...],
                              owners: tuple[type, ...] = ()) -> list[torch.nn.Parameter]:
    """The parameters of ``net`` in the order ``forward()`` (a forward pass of it) first uses their
    modules: each module of type ``owners`` (whole layers, e.g. an IndRNN with its projection and
    batch norm) or ``leaves`` (e.g. Linear) contributes its parameters when it is called, once."""
    order: list[torch.nn.Parameter] = []
    seen: set[int] = set()

    def record(module, _inputs):
        for parameter in module.parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                order.append(parameter)

    handles = [m.register_forward_pre_hook(record) for m in net.modules() if isinstance(m, owners + leaves)]
    with torch.no_grad():
        forward()
    for handle in handles:
        handle.remove()
    return order


def official_losses(experiment: str, official_dir: Path, output_dir: Path) -> dict:
    """The official network, given the project's initial weights, trained by the official loop."""
    import numpy as np

    from src.layers import IndRNN

    case = CASES[experiment]
    objective = initial_objective(parity_config(experiment, output_dir)).double().eval()
    ours = objective.net
    probe = parity_batches(case, 1)[0].inputs
    if case.language_model:
        official = _official_char_lm(case, official_dir).double().eval()
        layers, units = case.official_sizes["num_layers"], case.official_sizes["hidden_size"]
        hidden = torch.zeros(layers, BATCH, units, dtype=torch.float64)
        official_forward = lambda: official(probe.t().contiguous(), hidden)  # noqa: E731
        ours_forward = lambda: ours(objective.embedding(probe))  # noqa: E731
        with torch.no_grad():
            official.embed.weight.copy_(objective.embedding.weight)
    else:
        official = _official_network(case, official_dir).double().eval()
        official_forward = lambda: official(probe.transpose(0, 1))  # noqa: E731
        ours_forward = lambda: ours(probe)  # noqa: E731
    recurrent = sys.modules["IndRNN_onlyrecurrent"].IndRNN_onlyrecurrent
    ours_order = _parameters_in_call_order(ours, ours_forward, (torch.nn.Linear,), owners=(IndRNN,))
    official_order = _parameters_in_call_order(official, official_forward,
                                               (torch.nn.Linear, recurrent, torch.nn.BatchNorm1d))
    assert [tuple(p.shape) for p in ours_order] == [tuple(p.shape) for p in official_order]
    embedding = 1 if case.language_model else 0
    assert len(ours_order) == len(list(ours.parameters())) == len(list(official.parameters())) - embedding
    with torch.no_grad():
        for mine, theirs in zip(ours_order, official_order):
            theirs.copy_(mine)
    official.train()
    # The official training loops (Indrnn_mnist_train.py, Indrnn_action_train.py, cPTB/train_cPTB.py)
    # by hand: groups by name, every gradient clamped to 10 after backward, u clamped before each
    # forward pass (pMNIST, NTU) or after each step (char PTB, |u| <= 1), the char-PTB state carried.
    exempt = [p for name, p in official.named_parameters() if "weight_hh" in name or "bias" in name]
    decayed = [p for name, p in official.named_parameters() if not ("weight_hh" in name or "bias" in name)]
    optimizer = torch.optim.Adam([{"params": exempt}, {"params": decayed, "weight_decay": 1e-4}], lr=2e-4)
    u_bound = 1.0 if case.language_model else sys.modules["__main__"].U_bound

    def clamp_u():
        for name, parameter in official.named_parameters():
            if "weight_hh" in name:
                parameter.data.clamp_(-u_bound, u_bound)

    losses = []
    for batch in parity_batches(case):
        official.zero_grad()
        if case.language_model:
            logits, hidden = official(batch.inputs.t().contiguous(), hidden)
            hidden = hidden.detach()
            loss = torch.nn.functional.cross_entropy(logits, batch.targets.t().reshape(-1))
        else:
            clamp_u()
            loss = torch.nn.functional.cross_entropy(official(batch.inputs.transpose(0, 1)), batch.targets)
        loss.backward()
        for parameter in official.parameters():
            parameter.grad.data.clamp_(-10, 10)
        optimizer.step()
        if case.language_model:
            clamp_u()
        losses.append(loss.item())
    run = {"seq_len": case.seq_len, "batch": BATCH, "steps": STEPS, "u_bound": u_bound,
           "initial_parameter_norm": parameter_norm(ours), "official_losses": losses,
           "final_official_parameter_norm": parameter_norm(official), "numpy": np.__version__}
    # The official eval(): model.eval() (running statistics); char PTB: the state carried from zeros.
    official.eval()

    def evaluation_loss() -> float:
        window_losses = []
        with torch.no_grad():
            hidden = torch.zeros(layers, BATCH, units, dtype=torch.float64) if case.language_model else None
            for batch in evaluation_windows(case):
                if case.language_model:
                    logits, hidden = official(batch.inputs.t().contiguous(), hidden)
                    targets = batch.targets.t().reshape(-1)
                else:
                    logits, targets = official(batch.inputs.transpose(0, 1)), batch.targets
                window_losses.append(torch.nn.functional.cross_entropy(logits, targets).item())
        return sum(window_losses) / len(window_losses)  # batches of equal size

    # The pMNIST/NTU loops clamp u before each training forward pass only, so their evaluations see
    # the last step's u unclamped (by at most one step), where ours (clamped after every step) sees
    # it clamped: recorded as is, then with u clamped (what the next training step would see).
    run["official_evaluation_loss_u_unclamped"] = evaluation_loss()
    clamp_u()
    run["official_evaluation_loss"] = evaluation_loss()
    return run


def main(argv: list[str]) -> None:
    import argparse
    import datetime
    import subprocess
    import tempfile

    from lightning_modules.run import register_resolvers

    parser = argparse.ArgumentParser(description="Regenerate tests/fixtures/official_parity_*.json")
    parser.add_argument("--official", type=Path, required=True,
                        help="a checkout of Sunnydreamrain/IndRNN_pytorch at HEAD (pixelMNIST/, action_recognition/)")
    parser.add_argument("--official-cvpr", type=Path, default=None,
                        help="the same repository at c925461 (cPTB/: the CVPR char-PTB code), for ptb_char")
    parser.add_argument("--commit", default=None, help="--official's commit (read with git when omitted)")
    parser.add_argument("--cvpr-commit", default=None, help="--official-cvpr's commit (read with git when omitted)")
    parser.add_argument("--benchmark", choices=sorted({case.benchmark for case in CASES.values()}), nargs="*",
                        help="only these fixtures (default: all)")
    args = parser.parse_args(argv)
    register_resolvers()

    def commit_of(folder: Path, given: str | None) -> str:
        return given or subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True,
                                       text=True, check=True).stdout.strip()

    for benchmark in args.benchmark or sorted({case.benchmark for case in CASES.values()}):
        cvpr = benchmark == "ptb_char"
        official = args.official_cvpr if cvpr else args.official
        if official is None:
            raise SystemExit("ptb_char needs --official-cvpr (a checkout of IndRNN_pytorch at c925461)")
        commit = commit_of(official, args.cvpr_commit if cvpr else args.commit)
        runs = {}
        with tempfile.TemporaryDirectory() as folder:
            for experiment in sorted(name for name, case in CASES.items() if case.benchmark == benchmark):
                run = official_losses(experiment, official, Path(folder) / experiment)
                _, ours, evaluation = project_losses(experiment, Path(folder) / f"{experiment}-ours")
                largest = max(abs(a - b) for a, b in zip(ours, run["official_losses"]))
                run["largest_difference_from_project_when_recorded"] = largest
                runs[experiment] = run
                print(experiment, "largest difference", largest)
                run["evaluation_difference_from_project_when_recorded"] = abs(evaluation - run["official_evaluation_loss"])
                print(experiment, "evaluation difference", run["evaluation_difference_from_project_when_recorded"])
        folder_name = CASES[next(iter(runs))].official_folder
        (FIXTURES / f"official_parity_{benchmark}.json").write_text(json.dumps({
            "note": (f"Per-step training losses of the official {folder_name} networks (Sunnydreamrain/IndRNN_pytorch, "
                     "pure-PyTorch recurrence IndRNN_onlyrecurrent.py on CPU, float64, dropout 0, the official "
                     "training loop by hand) from this project's initial weights on seeded batches; figures only, no "
                     "code. Produced by: python -m tests.test_official_parity --official <checkout> "
                     "[--official-cvpr <checkout at c925461>]"),
            "official_repository": "https://github.com/Sunnydreamrain/IndRNN_pytorch", "official_commit": commit,
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "data_seed": DATA_SEED, "init_seed": INIT_SEED, "runs": runs}, indent=1) + "\n")


