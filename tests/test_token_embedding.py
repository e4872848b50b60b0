"""Token embeddings live in the objective (the language model's and the encoder-decoder's): networks read
vectors only. A checkpoint of this layout trains, saves and is re-scored by eval.py's driver."""
from __future__ import annotations

import json

import pytest
import torch

from lightning_modules.run import evaluate, train
from lightning_modules.run.build import build, compose_config
from tests.conftest import compose_train

QUICK_REVERSE = ["task=reverse", "task.seq_len=4", "task.datamodule.train_size=32", "task.datamodule.val_size=16",
                 "task.datamodule.test_size=16", "task.datamodule.batch_size=8", "task.network.context_size=16",
                 "task.network.embedding_size=8", "model=gru", "model.hidden_size=16", "task.max_epochs=1",
                 "trainer=cpu", "trainer.enable_model_summary=false", "callbacks.progress_bar.refresh_rate=0",
                 "logger=csv"]


def test_the_objectives_hold_the_token_embeddings_and_the_networks_none(tmp_path):
    _, seq2seq = build(compose_train(tmp_path / "s", QUICK_REVERSE))
    _, language_model = build(compose_train(tmp_path / "l", ["task=ptb_char", "model.hidden_size=8",
                                                             "objective.embedding_size=8"]))
    for objective, names in ((seq2seq, {"source_embedding", "target_embedding"}), (language_model, {"embedding"})):
        embeddings = {name for name, module in objective.named_modules() if isinstance(module, torch.nn.Embedding)}
        assert embeddings == names, type(objective).__name__
    assert seq2seq.source_embedding.weight.shape == (11, 8) and not seq2seq.source_embedding.weight[0].any()  # PAD


def test_a_seq2seq_checkpoint_of_this_layout_is_rescored_by_eval(tmp_path):
    train(compose_train(tmp_path / "run", QUICK_REVERSE))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    checkpoint = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=True)
    assert {"source_embedding.weight", "target_embedding.weight"} <= set(checkpoint["state_dict"])
    assert not any("embedding" in key for key in checkpoint["state_dict"] if key.startswith("net."))
    cfg = compose_config([f"ckpt_path={results['best_checkpoint']}", "trainer=cpu", f"paths.log_dir={tmp_path}"],
                         tmp_path / "eval", config_name="eval")
    metrics = evaluate(cfg)
    assert metrics["test/seq_acc"] == pytest.approx(results["test/seq_acc"])
    assert metrics["test/loss"] == pytest.approx(results["test/loss"], rel=1e-6)
