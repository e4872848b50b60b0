"""The Penn Treebank language model on a tiny corpus (tests/ptb_files.py): truncated BPTT with a carried
state, resets, the window-length learning-rate rule, the metrics, the evaluation protocol, dynamic
evaluation, generate.py, and every model through train.py (no internet, CPU only)."""
from __future__ import annotations

import glob
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from datamodules.download import DataError
from datamodules.ptb import PTBDataModule, batchify, saved_vocabulary
from lightning_modules.dynamic_evaluation import DynamicEvaluation
from lightning_modules.language_model import LanguageModel
from lightning_modules.run import train
from src.state import detach_state, state_tensors
from tests.conftest import CONF, compose_train, run_script
from tests.ptb_files import corpus, one_thread  # noqa: F401 (fixtures)
from tests.ptb_files import (WORDS, datamodule, language_model, one_line, ptb_overrides, reference_loss, vocab_size,
                             write_corpus)

MODELS = sorted(Path(path).stem for path in glob.glob(str(CONF / "model" / "*.yaml")))
SMALL = {"hidden_size": 8, "num_layers": 1, "num_blocks": 1, "growth_rate": 4, "block_config": "[1]"}  # model sizes


# Truncated BPTT ----------------------------------------------------------------------------------

def assert_windows_equal_one_pass(model: LanguageModel, tokens: torch.Tensor, window: int = 8) -> None:
    """Logits of ``tokens`` (B, T) read in windows with the detached state carried == one pass (float64)."""
    whole, _ = model(tokens)
    state, pieces = None, []
    for chunk in tokens.split(window, dim=1):
        logits, state = model(chunk, state)
        pieces.append(logits)
        state = detach_state(state)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layer", ["lstm", "gru", "indrnn", "rnn"])
def test_carried_state_equals_one_pass_and_no_gradient_crosses_windows(layer):
    torch.manual_seed(1)
    model = language_model(20, layer).double().eval()
    tokens = torch.randint(0, 20, (3, 24))
    assert_windows_equal_one_pass(model, tokens)
    # Gradients: window 2's loss, from window 1's detached state, reaches nothing of window 1.
    model.train()
    first_embedded = model.embed(tokens[:, :8]).detach().requires_grad_(True)
    _, first_state = model.net(first_embedded)
    carried = detach_state(first_state)
    assert all(not t.requires_grad for t in state_tensors(carried))
    logits, _ = model(tokens[:, 8:16], carried)
    loss = F.cross_entropy(logits.reshape(-1, 20), tokens[:, 9:17].reshape(-1))
    assert torch.autograd.grad(loss, first_embedded, allow_unused=True)[0] is None
    # ... while without the detach it would.
    logits, _ = model(tokens[:, 8:16], first_state)
    loss = F.cross_entropy(logits.reshape(-1, 20), tokens[:, 9:17].reshape(-1))
    assert torch.autograd.grad(loss, first_embedded)[0].abs().sum() > 0


@pytest.mark.parametrize("model", MODELS)
def test_every_model_carries_its_state_across_windows(model):
    """Each model of conf/model (small; IndRNNs with per-step BN before the recurrence), inside the
    language model: windows with the carried state give the values of one pass over the whole text."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    cfg = OmegaConf.merge({"task": {"input_size": 8, "output_size": 11, "readout": "all", "seq_len": 24}},
                          {"model": OmegaConf.load(CONF / "model" / f"{model}.yaml")})
    for key, value in {**SMALL, "num_layers": 2, "block_config": [1]}.items():
        if key in cfg.model and not (model == "cwrnn" and key == "hidden_size"):
            cfg.model[key] = value
    if "batch_norm" in cfg.model.get("layer", {}):
        cfg.model.layer.batch_norm, cfg.model.layer.batch_norm_stats = "before", "per_step"
    torch.manual_seed(0)
    lm = LanguageModel(instantiate(cfg.model), optimizer=None, vocab_size=11, embedding_size=8).double().eval()
    assert_windows_equal_one_pass(lm, torch.randint(0, 11, (3, 24)))


def test_training_step_carries_a_detached_state_and_resets(corpus):
    data_dir, md5 = corpus
    module = datamodule(data_dir, md5, batch_size=3, seq_len=6)
    model = language_model(len(module.vocabulary)).double()
    model.log = lambda *args, **kwargs: None  # outside a Trainer
    batches = list(module.train_dataloader())
    model.on_train_epoch_start()
    model.training_step(batches[0], 0)
    after_first = model.train_state
    assert all(t.grad_fn is None for t in state_tensors(after_first))
    model.eval()
    with torch.no_grad():
        _, expected = model(batches[0].inputs)
    torch.testing.assert_close(state_tensors(after_first)[0], state_tensors(expected)[0])  # dropout is 0
    model.train()
    seen = []
    forward = model.net.forward
    model.net.forward = lambda x, state=None: (seen.append(state is None), forward(x, state))[1]
    model.training_step(batches[1], 1)
    model.training_step(batches[0], 2)  # reset=True: starts afresh
    assert seen == [False, True]


def test_reset_probability(corpus):
    data_dir, md5 = corpus
    module = datamodule(data_dir, md5, batch_size=2, seq_len=4)
    model = language_model(len(module.vocabulary), reset_probability=0.25)
    model.log = lambda *args, **kwargs: None
    seen = []
    forward = model.net.forward
    model.net.forward = lambda x, state=None: (seen.append(state is None), forward(x, state))[1]
    batch = next(iter(module.train_dataloader()))._replace(reset=None)
    torch.manual_seed(0)
    for step in range(400):
        model.training_step(batch, step)
    fraction = np.mean(seen[1:])
    assert 0.18 < fraction < 0.32  # binomial(399, 0.25): sd 0.022


def test_lr_scaled_by_window_length(corpus, tmp_path):
    """The update a window gets is lr x t / T (plain SGD: delta = -lr_eff * grad), and the rate is restored."""
    import pytorch_lightning as pl
    data_dir, md5 = corpus
    module = PTBDataModule(data_dir=str(data_dir), level="char", md5=md5, download=False, batch_size=2, seq_len=10,
                           variable_length=True)
    model = language_model(vocab_size(data_dir, "char"), base_length=10, scale_lr_by_length=True)
    records = []

    class Watch(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            weight = pl_module.embedding.weight
            records.append([weight.detach().clone(), weight.grad.detach().clone(), pl_module._window])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            before, grad, window = records[-1]
            moved = (before - pl_module.embedding.weight.detach())[grad.abs() > 1e-6]
            records[-1] = (moved / grad[grad.abs() > 1e-6]).mean().item(), window, \
                trainer.optimizers[0].param_groups[0]["lr"]

    trainer = pl.Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[Watch()], accelerator="cpu")
    trainer.fit(model, datamodule=module)
    windows = {window for _, window, _ in records}
    assert len(windows) > 2  # random lengths
    for effective, window, restored in records:
        assert effective == pytest.approx(0.1 * window / 10, rel=2e-3)  # float32 steps; windows differ by >= 1.6%
        assert restored == 0.1


# Metrics and the evaluation protocol ----------------------------------------------------------------

@pytest.mark.parametrize("level", ["char", "word"])
def test_bpc_and_perplexity_against_a_hand_computation(corpus, level):
    import pytorch_lightning as pl
    data_dir, md5 = corpus
    module = datamodule(data_dir, md5, level=level, seq_len=5, eval_seq_len=7)
    vocab = len(module.vocabulary)
    model = language_model(vocab, level=level)
    logits = torch.linspace(-2.0, 1.0, vocab)
    with torch.no_grad():  # a fixed model: every prediction is softmax(logits), whatever the input
        for parameter in model.net.parameters():
            parameter.zero_()
        model.net.head.bias.copy_(logits)
    tested = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu").test(model, datamodule=module, verbose=False)[0]
    log_p = torch.log_softmax(logits.double(), 0)
    targets = batchify(module.ids["test"], 1)[:, 1:].reshape(-1)  # test: one stream
    mean_nll = float(-log_p[targets].mean())
    if level == "char":
        assert tested["test/bpc"] == pytest.approx(mean_nll / math.log(2), rel=1e-5)
    else:
        assert tested["test/ppl"] == pytest.approx(math.exp(mean_nll), rel=1e-5)
    assert tested["test/loss"] == pytest.approx(mean_nll, rel=1e-5)


def test_evaluation_protocol_matches_a_reference_loop(corpus):
    import pytorch_lightning as pl
    data_dir, md5 = corpus
    module = datamodule(data_dir, md5, level="word", batch_size=4, seq_len=6)  # val batch 10, test batch 1
    model = language_model(len(module.vocabulary), "gru", level="word", seed=4).eval()
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    validated = trainer.validate(model, datamodule=module, verbose=False)[0]
    tested = trainer.test(model, datamodule=module, verbose=False)[0]
    val = reference_loss(model, module.ids["val"], 10, 6)
    test = reference_loss(model, module.ids["test"], 1, 6)
    assert validated["val/loss"] == pytest.approx(val, rel=1e-5)
    assert validated["val/ppl"] == pytest.approx(math.exp(val), rel=1e-5)
    assert tested["test/loss"] == pytest.approx(test, rel=1e-5)
    # The carried state matters: starting every window afresh gives another number.
    fresh = np.mean([reference_loss(model, module.ids["test"][i:i + 7], 1, 6) for i in range(0, 60, 6)])
    assert abs(fresh - test) > 1e-4


# Dynamic evaluation --------------------------------------------------------------------------------

def dynamic_evaluate(model: LanguageModel, module: PTBDataModule, **settings) -> dict:
    """The objective's dynamic-evaluation mode (``settings`` as DynamicEvaluation's) on the test split,
    through Lightning's test loop; the metrics it logs."""
    import pytorch_lightning as pl
    model.dynamic = DynamicEvaluation(**settings)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    (metrics,) = trainer.test(model, datamodule=module, verbose=False)
    model.dynamic = None
    return metrics


def test_dynamic_evaluation_improves_on_a_shifted_test_split(tmp_path):
    shifted = WORDS[::-1]  # the test text follows the reverse word order
    md5 = write_corpus(tmp_path / "ptb", {"train": 200, "val": 20, "test": 60}, seed=1, test_words=shifted)
    module = datamodule(tmp_path, md5, level="word", batch_size=4, seq_len=8, eval_seq_len=8)
    model = language_model(len(module.vocabulary), level="word", seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):  # learn the training order
        state = None
        for batch in module.train_dataloader():
            logits, state = model(batch.inputs, state)
            state = detach_state(state)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    static = dynamic_evaluate(model, module, lr=0.0)
    assert static["test/dynamic_loss"] == pytest.approx(reference_loss(model, module.ids["test"], 1, 8), rel=1e-5)
    before = [p.detach().clone() for p in model.parameters()]
    dynamic = dynamic_evaluate(model, module, lr=0.05, decay=0.01)
    assert dynamic["test/dynamic_loss"] < static["test/dynamic_loss"] - 0.1
    assert dynamic["test/dynamic_ppl"] == pytest.approx(math.exp(dynamic["test/dynamic_loss"]))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model is left as it was
    rms = dynamic_evaluate(model, module, lr=1e-3, rms=True)
    assert rms["test/dynamic_loss"] < static["test/dynamic_loss"]


# Through train.py, eval.py and generate.py -----------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_every_model_runs_fast_dev_run_on_ptb_char(tmp_path, corpus, model):
    import yaml
    data_dir, md5 = corpus
    keys = yaml.safe_load((CONF / "model" / f"{model}.yaml").read_text())
    small = [f"model.{key}={value}" for key, value in SMALL.items() if key in keys]
    if model == "cwrnn":
        small = [item for item in small if not item.startswith("model.hidden_size")]
    overrides = ptb_overrides(data_dir, md5) + [f"model={model}", "trainer.fast_dev_run=true"] + small
    train(compose_train(tmp_path / "run", overrides))
    results = __import__("json").loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "finished" and math.isfinite(results["test/bpc"])


def test_bidirectional_model_is_refused_in_one_line(tmp_path, corpus):
    data_dir, md5 = corpus
    overrides = ptb_overrides(data_dir, md5) + ["model=lstm", "model.bidirectional=true", "trainer.fast_dev_run=true"]
    with pytest.raises(Exception) as error:
        train(compose_train(tmp_path / "run", overrides))
    assert "bidirectional" in one_line(error)


@pytest.fixture(scope="module")
def trained_char_run(tmp_path_factory, corpus):
    """A short LSTM training on the tiny char corpus: (run directory, unigram entropy of val in bits)."""
    data_dir, md5 = corpus
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    overrides = ptb_overrides(data_dir, md5) + [
        "model=lstm", "model.hidden_size=48", "objective.embedding_size=16", "task.max_epochs=6",
        "task.datamodule.batch_size=8", "task.seq_len=20", "optimizer.lr=0.01", "objective.reset_probability=0.1",
        "task.datamodule.variable_length=true"]
    train(compose_train(run_dir, overrides))
    module = datamodule(data_dir, md5)
    counts = torch.bincount(module.ids["val"], minlength=len(module.vocabulary)).double()
    p = counts[counts > 0] / counts.sum()
    return run_dir, float(-(p * p.log2()).sum())


def test_short_training_beats_the_unigram_entropy(trained_char_run):
    run_dir, unigram_bits = trained_char_run
    results = __import__("json").loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished"
    assert results["val/bpc_best"] < 0.6 * unigram_bits, (results["val/bpc_best"], unigram_bits)
    assert results["test/bpc"] < 0.6 * unigram_bits


def stored_lists(value) -> list[list]:
    """Every list of strings anywhere inside a checkpoint's nested dicts, lists and tuples."""
    if isinstance(value, dict):
        return [found for item in value.values() for found in stored_lists(item)]
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(item, str) for item in value):
            return [list(value)]
        return [found for item in value for found in stored_lists(item)]
    return []


def test_a_checkpoint_holds_the_vocabulary_once_in_the_datamodule_state(trained_char_run, corpus):
    run_dir, _ = trained_char_run
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    vocabulary = datamodule(*corpus).vocabulary  # what the training files give
    assert saved_vocabulary(checkpoint) == vocabulary == checkpoint[PTBDataModule.__qualname__]["vocabulary"]
    assert stored_lists(checkpoint).count(vocabulary) == 1
    assert saved_vocabulary({"state_dict": {}}) is None


def test_a_checkpoint_of_another_vocabulary_is_refused_in_one_line(corpus):
    module = datamodule(*corpus)
    module.load_state_dict({"vocabulary": list(module.vocabulary), "passes": 2})  # the same corpus: fine
    other = [*module.vocabulary[:3], module.vocabulary[4], module.vocabulary[3], *module.vocabulary[5:]]
    with pytest.raises(DataError, match=r"^PTB: the checkpoint's vocabulary is not the one .*ptb\.char\.train\.txt "
                                        r"gives \(token 3 is .* there, .* here\): .* point data_dir at the corpus"):
        module.load_state_dict({"vocabulary": other, "passes": 0})


def test_generate_samples_vocabulary_tokens_reproducibly(trained_char_run, corpus):
    from generate import generate, load_language_model
    run_dir, _ = trained_char_run
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain types only
    vocabulary = saved_vocabulary(checkpoint)
    assert isinstance(vocabulary, list) and all(isinstance(t, str) for t in vocabulary)
    outputs = [io.StringIO() for _ in range(3)]
    first = generate(str(ckpt), prompt="the cat", length=60, temperature=1.0, seed=5, out=outputs[0])
    again = generate(str(ckpt), prompt="the cat", length=60, temperature=1.0, seed=5, out=outputs[1])
    other = generate(str(ckpt), prompt="the cat", length=60, temperature=1.0, seed=6, out=outputs[2])
    assert len(first) == 60 and set(first) <= set(vocabulary)
    assert first == again and outputs[0].getvalue() == outputs[1].getvalue() and first != other
    assert outputs[0].getvalue().startswith("the cat")
    assert load_language_model(ckpt).vocabulary == vocabulary


def evaluate_checkpoint(ckpt: Path, output_dir: Path, overrides: list[str]) -> dict:
    """eval.py's work in this process: eval.yaml composed with ``overrides``, then the driver's evaluate."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict
    from lightning_modules.run import evaluate, register_resolvers
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=[f"ckpt_path={ckpt}", "trainer=cpu", "trainer.enable_model_summary=false",
                                         f"paths.log_dir={output_dir}", *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir / "eval")
        del cfg.hydra
    return evaluate(cfg)


def test_eval_dynamic_evaluation_option(trained_char_run, tmp_path):
    run_dir, _ = trained_char_run
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    static = evaluate_checkpoint(ckpt, tmp_path / "a", ["dynamic_eval=true", "dynamic_eval_lr=0"])
    assert static["test/dynamic_loss"] == pytest.approx(static["test/loss"], rel=1e-5)  # lr 0: plain evaluation
    assert static["test/dynamic_bpc"] == pytest.approx(static["test/bpc"], rel=1e-5)
    adapted = evaluate_checkpoint(ckpt, tmp_path / "b", ["dynamic_eval=true", "dynamic_eval_lr=0.003",
                                                         "dynamic_eval_decay=0.01", "dynamic_eval_rms=true"])
    assert math.isfinite(adapted["test/dynamic_bpc"]) and adapted["test/dynamic_bpc"] != static["test/bpc"]
    assert adapted["test/bpc"] == pytest.approx(static["test/bpc"], rel=1e-6)  # the static score is unchanged


@pytest.mark.slow  # three interpreter starts
def test_generate_py_streams_from_the_command_line(trained_char_run):
    run_dir, _ = trained_char_run
    args = [f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}", "prompt=the", "length=30", "temperature=0.5",
            "seed=1"]
    first, second = run_script("generate.py", args), run_script("generate.py", args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout == second.stdout and first.stdout.startswith("the") and len(first.stdout) > 20
    missing = run_script("generate.py", ["ckpt_path=/nonexistent.ckpt"])
    assert missing.returncode != 0 and missing.stderr.strip().startswith("error: ckpt_path")
