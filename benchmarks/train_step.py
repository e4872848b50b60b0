"""Time of one optimizer step through the project's training path against a bare PyTorch loop.

    python benchmarks/train_step.py                                   # the four default experiments, CPU
    python benchmarks/train_step.py --device cuda --steps 200 --json steps.json
    python benchmarks/train_step.py --experiments indrnn_adding_t1000 --set model.hidden_size=8 task.seq_len=10

For each experiment the run's config is composed as ``python train.py`` would (Hydra, with the
experiment's overrides, ``--set`` overrides and ``trainer=cpu`` or ``gpu``), then two loops run
over the same synthetic batches (random inputs and targets of the task's real shapes: nothing is
downloaded), one after the other in this process:

* ``pipeline_ms``: the real training path: the network, objective, callbacks and loggers built by
  the run driver's own functions (lightning_modules/run/build.py, ``run_callbacks``), ``trainer.fit`` for
  ``--warmup + --steps`` optimizer steps with validation off; the time from the start of the first
  timed step to the end of the last, divided by ``--steps`` (logging steps included, so their cost
  is spread over the steps as in a real run). With ``--block K`` both loops report their fastest
  run of K consecutive steps instead of the mean over all: on a shared machine this filters out
  the steps other jobs slowed down.
* ``bare_ms``: a plain loop over a second copy of the network (same config, same seed): forward,
  the objective's own loss, backward, the configured optimizer's step, zero_grad. No clipping, no
  constraint, no metric, no logging.
* ``lightning_ms``: Lightning's own floor: the bare loop's network, loss and optimizer in a minimal
  LightningModule (its ``training_step`` returns the loss; automatic optimization) under a Trainer
  with no callback, logger, checkpoint or progress bar. ``lightning_ms - bare_ms`` is what any
  Lightning training loop costs per step; ``pipeline_ms - lightning_ms`` is the project's share
  (objective, learning rule, callbacks, loggers, clipping and constraints).
* ``gpu_busy_ms`` (CUDA only, else null): the device time of one pipeline step, from
  ``torch.profiler`` over ``--steps`` further pipeline steps (the sum of the CUDA kernels' and
  memory copies' times, divided by the steps): what a step costs without any launch or Python
  overhead.

On CUDA the run's config takes ``trainer=gpu_eager`` (``trainer=gpu`` without CUDA graphs). With
``--graphs`` pipeline, bare and GPU-busy time are measured a second time with CUDA-graph training steps
(:mod:`lightning_modules.cuda_graph`: the pipeline gets the ``CudaGraphs`` callback, as ``trainer=gpu``
has it; the bare loop the same ``GraphedForward`` on its network and ``OptimizerStepGraph`` on its
optimizer), reported as
``pipeline_graphs_ms``, ``bare_graphs_ms`` and ``gpu_busy_graphs_ms`` (on CPU the graph columns
equal eager runs: nothing is captured off CUDA). Graph capture happens during the warm-up steps.

``--repeat R`` measures the loops R times, interleaved (pipeline, bare, Lightning floor, then again),
and reports each one's fastest: on a shared machine the runs that other jobs slowed down drop out,
and no loop gains from running at a quieter moment than the others.

On CUDA ``torch.cuda.synchronize()`` brackets each timed span (not each step). ``--clock thread``
times with this thread's CPU time instead of the wall clock (CPU only, with ``--threads 1``): on a
machine shared with other jobs it leaves out the time spent waiting for a core. Experiments are
named by a key of :data:`EXPERIMENTS` (overrides of train.yaml) or ``experiment=NAME`` for any file
in conf/experiment. ``--json FILE`` writes ``{experiment: {"pipeline_ms": .., "bare_ms": ..,
"lightning_ms": .., "gpu_busy_ms": ..}}`` (and the ``*_graphs_ms`` keys with ``--graphs``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the project importable without installing
    sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from lightning_modules.run.build import (compose_config, build_loggers, build_network, build_objective,  # noqa: E402
                                         build_trainer, instantiate_node)
from lightning_modules.run.driver import run_callbacks  # noqa: E402
from lightning_modules.cuda_graph import CudaGraphs, GraphedForward, OptimizerStepGraph  # noqa: E402
from src.batch import SequenceBatch  # noqa: E402

# The experiments: name -> overrides of train.yaml.
EXPERIMENTS: dict[str, list[str]] = {
    "indrnn_pmnist_6layer": ["experiment=indrnn_pmnist_6layer"],
    "lstm_pmnist": ["experiment=lstm_pmnist"],
    "indrnn_adding_t1000": ["experiment=indrnn_adding_t1000"],
    "cwrnn_smnist": ["task=smnist", "model=cwrnn"],
}
DISTINCT_BATCHES = 8  # synthetic batches, cycled: enough that no step reuses the last one's tensors


def compose_run(overrides: list[str], output_dir: Path) -> DictConfig:
    """train.yaml composed with ``overrides`` as train.py would, writing into ``output_dir``."""
    return compose_config(overrides, output_dir)


class SyntheticBatches(Dataset):
    """``length`` batches cycling through ``count`` fixed SequenceBatch objects of the task's shapes,
    served whole (the loader does not re-batch them): inputs (B, T, I) standard normal; targets (B,)
    class labels for a classifier, (B, O) normal values for a regression task, (B, T) labels for a
    per-step task. One epoch holds every step, so no epoch boundary falls inside the timing."""

    def __init__(self, cfg: DictConfig, count: int, length: int, seed: int = 0) -> None:
        self.length = length
        task = cfg.task
        batch_size = int(task.datamodule.batch_size)
        steps = int(task.get("steps") or task.seq_len)
        generator = torch.Generator().manual_seed(seed)
        self.batches = []
        for _ in range(count):
            inputs = torch.randn(batch_size, steps, int(task.input_size), generator=generator)
            classes = int(task.output_size)
            if task.get("per_step_targets", False):
                targets = torch.randint(classes, (batch_size, steps), generator=generator)
            elif "classification" in str(cfg.objective._target_):
                targets = torch.randint(classes, (batch_size,), generator=generator)
            else:
                targets = torch.randn(batch_size, classes, generator=generator)
            self.batches.append(SequenceBatch(inputs, targets))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> SequenceBatch:
        return self.batches[index % len(self.batches)]


def loader(batches: SyntheticBatches) -> DataLoader:
    return DataLoader(batches, batch_size=None, shuffle=False)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
clock = time.perf_counter


def fastest_block_ms(marks: list[float], block: int) -> float:
    """Milliseconds per step of the fastest run of ``block`` consecutive steps, from the clock readings
    ``marks`` (one before the first step, one after each step)."""
    spans = [marks[end] - marks[end - block] for end in range(block, len(marks), block)]
    return 1000 * min(spans) / block


class StepTimer(pl.Callback):
    """Clock readings at the start of step ``first`` and after each of the ``count`` steps from it
    (0-based global steps); on CUDA synchronised every ``block`` steps."""

    def __init__(self, first: int, count: int, block: int) -> None:
        self.first, self.count, self.block = first, count, block
        self.marks: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.first and not self.marks:
            synchronize(pl_module.device)
            self.marks.append(clock())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.marks and len(self.marks) <= self.count:
            if len(self.marks) % self.block == 0:
                synchronize(pl_module.device)
            self.marks.append(clock())


def pipeline_trainer(cfg: DictConfig, callbacks: list, max_steps: int) -> pl.Trainer:
    """The run's own trainer (its loggers and callbacks) for one epoch of ``max_steps`` steps, validated
    once at its end on one batch (after the timing: the epoch-end callbacks and schedulers need
    the monitored metric)."""
    with open_dict(cfg):
        cfg.trainer.max_steps = max_steps
        cfg.trainer.max_epochs = 1
        cfg.trainer.limit_val_batches = 1
        cfg.trainer.num_sanity_val_steps = 0
        cfg.trainer.enable_model_summary = False
        cfg.trainer.val_check_interval = 1.0
        cfg.trainer.check_val_every_n_epoch = 1
    return build_trainer(cfg, build_loggers(cfg), run_callbacks(cfg)[0] + callbacks)


def fit(trainer: pl.Trainer, objective: pl.LightningModule, batches: "SyntheticBatches") -> None:
    trainer.fit(objective, train_dataloaders=loader(batches), val_dataloaders=loader(batches))


def graph_callbacks(graphs: bool) -> list:
    """[CudaGraphs()] for the CUDA-graph columns (as ``trainer=gpu`` has it), else []."""
    return [CudaGraphs()] if graphs else []


def time_pipeline(cfg: DictConfig, batches: SyntheticBatches, steps: int, warmup: int, block: int,
                  graphs: bool = False) -> float:
    """Milliseconds per optimizer step through the objective, callbacks, loggers and Lightning's loop."""
    pl.seed_everything(cfg.seed, workers=True)
    objective = build_objective(cfg, build_network(cfg), {})
    timer = StepTimer(warmup, steps, block)
    fit(pipeline_trainer(cfg, [timer, *graph_callbacks(graphs)], warmup + steps), objective, batches)
    return fastest_block_ms(timer.marks, block)


def gpu_busy_ms(cfg: DictConfig, batches: SyntheticBatches, steps: int, warmup: int, graphs: bool = False) -> float:
    """Device time per pipeline step (CUDA kernels and copies), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile, schedule

    pl.seed_everything(cfg.seed, workers=True)
    objective = build_objective(cfg, build_network(cfg), {})
    profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                       schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1))

    class Step(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            profiler.step()

    with profiler:
        fit(pipeline_trainer(cfg, [Step(), *graph_callbacks(graphs)], warmup + steps), objective, batches)
    device_us = sum(event.self_device_time_total for event in profiler.key_averages()
                    if event.device_type == torch.autograd.DeviceType.CUDA)
    return device_us / 1000 / steps


def time_bare(cfg: DictConfig, batches: SyntheticBatches, steps: int, warmup: int, block: int,
              device: torch.device, graphs: bool = False) -> float:
    """Milliseconds per step of forward, loss, backward, optimizer step and zero_grad, nothing else
    (``graphs``: the network's forward and backward, and the optimizer's update, replayed from CUDA graphs
    where possible)."""
    pl.seed_everything(cfg.seed, workers=True)
    network = build_network(cfg).to(device)
    if graphs:
        GraphedForward(network).install()
    loss_of = build_objective(cfg, network, {}).loss  # the objective's loss function, nothing else of it
    network.train()
    optimizer = instantiate_node(cfg.optimizer, "optimizer")(params=network.parameters())
    if graphs:
        OptimizerStepGraph(optimizer).install()
    data = [SequenceBatch(b.inputs.to(device), b.targets.to(device)) for b in batches.batches]

    def step(batch: SequenceBatch) -> None:
        loss = loss_of(network(batch.inputs)[0], batch.targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for index in range(warmup):
        step(data[index % len(data)])
    synchronize(device)
    marks = [clock()]
    for index in range(steps):
        step(data[index % len(data)])
        if (index + 1) % block == 0:
            synchronize(device)
        marks.append(clock())
    return fastest_block_ms(marks, block)


class MinimalObjective(pl.LightningModule):
    """The bare loop's step as a LightningModule: forward, the objective's loss, nothing else."""

    def __init__(self, network: torch.nn.Module, loss_of, optimizer_factory) -> None:
        super().__init__()
        self.network, self.loss_of, self.optimizer_factory = network, loss_of, optimizer_factory

    def training_step(self, batch: SequenceBatch, batch_idx: int) -> torch.Tensor:
        return self.loss_of(self.network(batch.inputs)[0], batch.targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(params=self.network.parameters())


def time_lightning_floor(cfg: DictConfig, batches: SyntheticBatches, steps: int, warmup: int, block: int,
                         device: torch.device) -> float:
    """Milliseconds per step of :class:`MinimalObjective` under a Trainer with nothing configured."""
    pl.seed_everything(cfg.seed, workers=True)
    network = build_network(cfg)
    loss_of = build_objective(cfg, network, {}).loss
    module = MinimalObjective(network, loss_of, instantiate_node(cfg.optimizer, "optimizer"))
    timer = StepTimer(warmup, steps, block)
    trainer = pl.Trainer(accelerator="cuda" if device.type == "cuda" else "cpu", devices=1,
                         max_steps=warmup + steps, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[timer])
    trainer.fit(module, train_dataloaders=loader(batches))
    return fastest_block_ms(timer.marks, block)


def measure(name: str, overrides: list[str], device: torch.device, steps: int, warmup: int, block: int,
            extra: list[str], graphs: bool = False, repeat: int = 1) -> dict:
    """{"pipeline_ms", "bare_ms", "lightning_ms", "gpu_busy_ms"} of one experiment (the first three:
    the fastest of ``repeat`` interleaved measurements); with ``graphs`` also {"pipeline_graphs_ms",
    "bare_graphs_ms", "gpu_busy_graphs_ms"}."""
    trainer = "trainer=gpu_eager" if device.type == "cuda" else "trainer=cpu"
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="train_step_") as folder:
        cfg = compose_run([*overrides, trainer, *extra], Path(folder) / "run")
        batches = SyntheticBatches(cfg, DISTINCT_BATCHES, length=warmup + steps)
        loops = {"pipeline_ms": lambda: time_pipeline(cfg, batches, steps, warmup, block),
                 "bare_ms": lambda: time_bare(cfg, batches, steps, warmup, block, device),
                 "lightning_ms": lambda: time_lightning_floor(cfg, batches, steps, warmup, block, device)}
        runs = {key: [] for key in loops}
        for _ in range(repeat):
            for key, loop in loops.items():
                runs[key].append(loop())
        result = {key: min(values) for key, values in runs.items()}
        result["gpu_busy_ms"] = gpu_busy_ms(cfg, batches, steps, warmup) if cuda else None
        if graphs:
            result.update({
                "pipeline_graphs_ms": time_pipeline(cfg, batches, steps, warmup, block, graphs=True),
                "bare_graphs_ms": time_bare(cfg, batches, steps, warmup, block, device, graphs=True),
                "gpu_busy_graphs_ms": gpu_busy_ms(cfg, batches, steps, warmup, graphs=True) if cuda else None})
    return {key: (round(value, 4) if value is not None else None) for key, value in result.items()}


def format_table(results: dict) -> str:
    """One row per experiment (and one more, "+ graphs", per experiment measured with CUDA graphs)."""
    lines = [f"{'experiment':<36} {'pipeline ms':>12} {'bare ms':>10} {'overhead ms':>12} {'ratio':>7} "
             f"{'lightning ms':>13} {'ours ms':>8} {'gpu busy ms':>12}"]
    for name, row in results.items():
        variants = [(name, "")] + ([(name + " + graphs", "_graphs")] if "pipeline_graphs_ms" in row else [])
        for label, suffix in variants:
            pipeline, bare, busy = (row[f"pipeline{suffix}_ms"], row[f"bare{suffix}_ms"], row[f"gpu_busy{suffix}_ms"])
            floor = row.get(f"lightning{suffix}_ms")  # measured without graphs only
            floor_text, ours_text = ("-", "-") if floor is None else (f"{floor:.3f}", f"{pipeline - floor:.3f}")
            busy_text = "-" if busy is None else f"{busy:.3f}"
            lines.append(f"{label:<36} {pipeline:>12.3f} {bare:>10.3f} {pipeline - bare:>12.3f} "
                         f"{pipeline / bare:>7.2f} {floor_text:>13} {ours_text:>8} {busy_text:>12}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS),
                        help=f"keys of EXPERIMENTS ({', '.join(EXPERIMENTS)}) or experiment=NAME")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=50, help="timed optimizer steps (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--block", type=int, help="report the fastest run of this many consecutive steps "
                        "(default: all --steps; a multiple of trainer.log_every_n_steps keeps logging in)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides for every experiment, e.g. model.hidden_size=8")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall (default) or thread: this thread's CPU time (CPU only)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--graphs", action="store_true",
                        help="measure each loop again with CUDA-graph training steps (the *_graphs_ms columns)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure the loops this many times, interleaved, and keep each one's fastest (default 1)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    args.block = args.block or args.steps
    if args.steps < 1 or args.warmup < 0 or not 1 <= args.block <= args.steps or args.repeat < 1:
        parser.error(f"--steps must be >= 1, --warmup >= 0, --block in [1, steps] and --repeat >= 1, got "
                     f"{args.steps}, {args.warmup}, {args.block} and {args.repeat}")
    if args.clock == "thread" and args.device != "cpu":
        parser.error("--clock thread measures CPU time: use it with --device cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    for name in args.experiments:
        if name not in EXPERIMENTS and not name.startswith("experiment="):
            parser.error(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)} or experiment=NAME")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    for noisy in ("pytorch_lightning", "lightning_fabric", "lightning_modules"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {}
    for name in args.experiments:
        overrides = EXPERIMENTS.get(name, [name])
        results[name] = measure(name, overrides, device, args.steps, args.warmup, args.block, args.set, args.graphs,
                                args.repeat)
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
