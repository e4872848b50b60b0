"""No objective reads a tensor back to the host in a training step that does not log.

On a GPU every read-back (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``, ``.numpy()``)
waits for the device to finish, so one per step stalls the pipeline. Each objective of conf/ is built
as train.py builds it and trained a few steps with ``log_every_n_steps`` larger than the run; the
read-backs made inside ``training_step`` are counted: there must be none.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_modules.run.build import build
from tests.conftest import ROOT, compose_train
from tests.ptb_files import write_corpus

READ_BACKS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")

# One task per objective (and the RTRL learning rule), at test size: more batches per epoch than steps
# run, so no step is an epoch's last (which checks the losses of the epoch, once).
SYNTHETIC = ["task.datamodule.train_size=256", "task.datamodule.val_size=32", "task.datamodule.test_size=32",
             "task.datamodule.batch_size=16"]
OBJECTIVES = {
    "regression": ["task=adding", "task.seq_len=20"] + SYNTHETIC,
    "labelling": ["task=copy_memory", "task.seq_len=10"] + SYNTHETIC,
    "seq2seq": ["task=reverse", "task.seq_len=4", "task.network.context_size=16", "task.network.embedding_size=8"]
    + SYNTHETIC,
    "stream_regression": ["task=streaming_adding", "task.seq_len=20", "task.datamodule.train_segments=20"],
    "rtrl": ["task=adding", "task.seq_len=20", "learning=rtrl"] + SYNTHETIC,
    "language_model": ["task=ptb_char", "task.seq_len=20", "task.datamodule.batch_size=4", "task.vocab_size=20",
                       "task.datamodule.max_offset=0",
                       "objective.reset_probability=0.5"],
    "language_model_reset_per_stream": ["task=ptb_char", "task.seq_len=20", "task.datamodule.batch_size=4",
                                        "task.vocab_size=20", "task.datamodule.max_offset=0",
                                        "objective.reset_probability=0.5", "objective.reset_per_stream=true"],
}


PROJECT_CODE = tuple(str(ROOT / package) for package in ("src", "datamodules", "lightning_modules"))


@contextlib.contextmanager
def counting_read_backs(counts: dict[str, int]):
    """Count the project's calls of the read-back methods of torch.Tensor while inside the block.

    Calls made inside torch itself are left out: e.g. Adam reads its step counter, a tensor that torch
    keeps on the host by design (``capturable=False``), so that read waits for nothing."""
    originals = {name: getattr(torch.Tensor, name) for name in READ_BACKS}

    def counter(name):
        original = originals[name]

        def counted(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PROJECT_CODE):
                where = f"{name} in {Path(caller).relative_to(ROOT)}:{sys._getframe(1).f_lineno}"
                counts[where] = counts.get(where, 0) + 1
            return original(self, *args, **kwargs)
        return counted

    for name in READ_BACKS:
        setattr(torch.Tensor, name, counter(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_no_host_read_back_in_training_steps_that_do_not_log(objective, tmp_path):
    # The reference IndRNN loop: the fused CPU kernel hands numpy arrays to numba, a CPU-only path.
    overrides = ["trainer=cpu", "model.hidden_size=8", "model.layer.backend=reference"] + OBJECTIVES[objective]
    if objective.startswith("language_model"):
        md5 = write_corpus(tmp_path / "data" / "ptb")
        overrides += [f"paths.data_dir={tmp_path / 'data'}", "task.datamodule.download=false",
                      "task.datamodule.md5={" + ",".join(f"{k}:{v}" for k, v in md5.items()) + "}"]
    cfg = compose_train(tmp_path / "run", overrides)
    pl.seed_everything(0)
    datamodule, module = build(cfg)
    counts: dict[str, int] = {}
    steps: list[int] = []
    training_step = module.training_step

    def counted_step(*args, **kwargs):
        steps.append(1)
        with counting_read_backs(counts):
            return training_step(*args, **kwargs)

    module.training_step = counted_step
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, log_every_n_steps=1000, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    assert len(steps) >= 3, f"{objective}: only {len(steps)} training steps ran"
    assert counts == {}, f"{objective}: host read-backs in training steps that do not log: {counts}"


@pytest.mark.parametrize("accumulate", [1, 2])
def test_logging_step_is_lightnings_rule(tmp_path, accumulate):
    """The objectives' public-counter rule agrees with Lightning's own (private) decision to write logs."""
    cfg = compose_train(tmp_path / "run", ["trainer=cpu", "model.hidden_size=8"] + OBJECTIVES["regression"])
    _, module = build(cfg)
    decisions = []
    training_step = module.training_step

    def recording_step(*args, **kwargs):
        decisions.append((module.logging_step(), module.trainer._logger_connector.should_update_logs))
        return training_step(*args, **kwargs)

    module.training_step = recording_step
    trainer = pl.Trainer(accelerator="cpu", max_steps=7, log_every_n_steps=3, logger=False,
                         accumulate_grad_batches=accumulate, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=build(cfg)[0])
    assert len(decisions) >= 7 and any(ours for ours, _ in decisions)
    assert [ours for ours, _ in decisions] == [lightning for _, lightning in decisions]
