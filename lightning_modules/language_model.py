"""Language modelling: embedding -> any recurrent network -> decoder, predicting the next token.

Training is truncated backpropagation through time: the batches are consecutive windows of B
parallel streams (datamodules/ptb.py), and the network's state at the end of one window starts the
next, detached, so values flow across window boundaries and gradients do not. Lightning 2 has no
TBPTT of its own, so the objective keeps the state. It starts afresh at each epoch, where a batch's
``reset`` says so, and with probability ``reset_probability`` before any training batch (official
IndRNN code: 1/10). Validation and test carry their own state through the whole split, never reset
(the papers' protocol: validation batch 10, test batch 1).

The state is whatever the network returns, one entry per layer in each layer's own format (LSTM
(h, c), IndRNN h, Clockwork's phase, TDNN's window...), handled through :mod:`src.state`.

Also here: :func:`dynamic_evaluate` (Krause et al. 2018) and :func:`sample` (text generation).
"""
from __future__ import annotations

import copy
import math
import random
from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import Metric

from lightning_modules.base import SequenceObjective, check_causal
from lightning_modules.carried_state import HostResetFlags
from src.batch import as_batch
from src.layers.common import apply_constraints
from src.checks import check_choice, check_fraction, check_positive_int
from src.networks import TimeSharedDropout
from src.state import detach_state

LEVELS = ("word", "char")
LOG2 = math.log(2.0)


class TokenCrossEntropy(Metric):
    """Token-weighted mean cross-entropy, reported as bits per character or perplexity.

    ``update(loss_sum, tokens)`` adds a window's summed negative log-likelihood (nats) and its token
    count; ``compute()`` returns mean / ln 2 (``unit="bpc"``) or exp(mean) (``unit="ppl"``).
    """

    full_state_update = False

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = check_choice("language-model metric", unit, ("bpc", "ppl"))
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, loss_sum: torch.Tensor, tokens: int) -> None:
        self.total += loss_sum.detach().to(torch.float64)
        self.tokens += int(tokens)

    def compute(self) -> torch.Tensor:
        mean = self.total / self.tokens.clamp(min=1)
        return mean / LOG2 if self.unit == "bpc" else torch.exp(mean)


def nll_to_metric(mean_nll: float, level: str) -> float:
    """Mean cross-entropy in nats -> bits per character (char) or perplexity (word)."""
    return mean_nll / LOG2 if level == "char" else math.exp(mean_nll)


class LanguageModel(HostResetFlags, SequenceObjective):
    """Next-token prediction with truncated BPTT; logs ``{stage}/loss`` and ``{stage}/bpc`` (char) or
    ``{stage}/ppl`` (word), token-weighted, and ``val/bpc_best`` / ``val/ppl_best``.

    Batches: :class:`src.batch.SequenceBatch` with inputs (B, T) and targets (B, T) int64 token ids
    and ``reset`` (B,) bool. The network gets the embeddings (B, T, E) and returns (B, T, O): O is the
    vocabulary size V (its head is then the decoder) or, with a separate decoder, the embedding size
    E (the head is the projection from the last layer's width to E). The objective knows token ids
    only: the tokens' strings are the data's, kept by the DataModule (and saved in checkpoints with its
    state, see :func:`datamodules.ptb.saved_vocabulary`).

    Args:
        net: any network of the project with readout "all", input_size E.
        vocab_size: V.
        embedding_size: E.
        level: "char" (metric bpc) or "word" (metric ppl).
        tie_weights: the decoder's weight is the embedding matrix (Press & Wolf; needs O == E).
        embedding_dropout: drop whole tokens: rows of the embedding matrix, one mask per batch.
        input_dropout: time-shared dropout on the embeddings (one mask per stream and window).
        output_dropout: time-shared dropout on the network's output before the separate decoder.
        reset_probability: chance of starting the carried state afresh before a training batch.
        base_length: the base window length; with ``scale_lr_by_length`` a window of length t is
            trained with learning rate x t / base_length (the official variable-length recipe).
        scale_lr_by_length: see ``base_length``.
        init_range: embeddings (and a separate decoder) start in U(-init_range, init_range).
        (optimizer, scheduler, monitor, scheduler_interval, decay_1d_params, run_config: as
        :class:`lightning_modules.base.SequenceObjective`)
    """

    best_mode = "min"
    readouts = ("all",)
    learning_rules = ("bptt",)  # truncated BPTT over windows; the embedding is outside RTRL's diagonal layers

    def __init__(self, net: nn.Module, optimizer, scheduler=None, *, vocab_size: int, embedding_size: int,
                 level: str = "word", tie_weights: bool = False, embedding_dropout: float = 0.0,
                 input_dropout: float = 0.0, output_dropout: float = 0.0, reset_probability: float = 0.0,
                 base_length: int | None = None, scale_lr_by_length: bool = False, init_range: float = 0.1,
                 **kwargs) -> None:
        self.level = check_choice("language-model level", level, LEVELS)
        self.metric_name = "bpc" if level == "char" else "ppl"
        check_positive_int("language model vocab_size", vocab_size)
        check_positive_int("language model embedding_size", embedding_size)
        for name, value in (("embedding_dropout", embedding_dropout), ("input_dropout", input_dropout),
                            ("output_dropout", output_dropout)):
            check_fraction(f"language model {name}", value)
        check_fraction("language model reset_probability", reset_probability, closed_high=True)
        if scale_lr_by_length:
            check_positive_int("language model base_length (needed by scale_lr_by_length)", base_length)
        kwargs.pop("causal", None)  # always causal: see check_network
        super().__init__(net, optimizer, scheduler, causal=True, **kwargs)
        head = getattr(net, "head", None)
        width = getattr(head, "out_features", None)
        if width not in (vocab_size, embedding_size) or (tie_weights and width != embedding_size):
            wanted = f"embedding_size {embedding_size}" if tie_weights else \
                f"vocab_size {vocab_size} or embedding_size {embedding_size}"
            raise ValueError(f"language model: the network's output width is {width}; it must be {wanted} "
                             f"(set task.output_size)")
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        nn.init.uniform_(self.embedding.weight, -init_range, init_range)
        self.decoder = None
        if width == embedding_size and not (width == vocab_size and not tie_weights):
            self.decoder = nn.Linear(embedding_size, vocab_size)
            nn.init.zeros_(self.decoder.bias)
            if tie_weights:
                self.decoder.weight = self.embedding.weight
            else:
                nn.init.uniform_(self.decoder.weight, -init_range, init_range)
        self.vocab_size, self.embedding_dropout = vocab_size, embedding_dropout
        self.input_dropout = TimeSharedDropout(input_dropout)
        self.output_dropout = TimeSharedDropout(output_dropout)
        self.reset_probability, self.base_length = reset_probability, base_length
        self.scale_lr_by_length = scale_lr_by_length
        self.train_state = self.eval_state = None
        self._window = None  # the current training window's length, for the LR scaling
        self._unscaled_lrs: list[float] | None = None

    def check_network(self, net: nn.Module, causal: bool) -> None:
        readout = getattr(net, "readout", None)
        if readout is not None and readout not in self.readouts:
            raise ValueError(self.readout_error(readout))
        check_causal(net, "a language model predicts each token from the past and carries its state forward "
                          "from window to window")

    def make_metric(self) -> Metric:
        return TokenCrossEntropy(self.metric_name)

    # Model ----------------------------------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 -> (B, T, E), with embedding (whole-token) dropout while training."""
        weight = self.embedding.weight
        if self.training and self.embedding_dropout > 0:
            keep = weight.new_empty(weight.shape[0], 1).bernoulli_(1 - self.embedding_dropout)
            weight = weight * keep / (1 - self.embedding_dropout)
        return self.input_dropout(F.embedding(tokens, weight))

    def forward(self, tokens: torch.Tensor, state=None):
        """tokens (B, T) int64, state (None or the network's) -> (logits (B, T, V), state)."""
        outputs, state = self.net(self.embed(tokens), state)
        if self.decoder is not None:
            outputs = self.decoder(self.output_dropout(outputs))
        return outputs, state

    def summed_loss(self, tokens: torch.Tensor, targets: torch.Tensor, state=None):
        """(summed cross-entropy in nats over the B x T targets, final state)."""
        logits, state = self(tokens, state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        return loss, state

    # Carried state --------------------------------------------------------------------------------

    def reset_state(self, state, reset: torch.Tensor | None):
        """The state to start a batch from: None where every stream resets, the state where none does
        (the flags as read on the host before the batch moved: :class:`HostResetFlags`).

        A reset of only some streams would need each layer's batch dimension, which the state formats
        do not name; the PTB loaders reset all streams together.
        """
        all_reset, any_reset = self.reset_flags(reset)
        if state is None or reset is None or not any_reset:
            return state
        if all_reset:
            return None
        raise ValueError("language model: batch.reset restarts only some streams; a carried state can only be "
                         "reset for all streams at once")

    def on_train_epoch_start(self) -> None:
        self.train_state = None

    def on_validation_epoch_start(self) -> None:
        self.eval_state = None

    def on_test_epoch_start(self) -> None:
        self.eval_state = None

    # Steps ----------------------------------------------------------------------------------------

    def bptt_training_step(self, batch) -> torch.Tensor:
        batch = as_batch(batch)
        state = self.reset_state(self.train_state, batch.reset)
        # Python's generator (seeded by seed_everything, saved in checkpoints): no tensor read back per step.
        if self.reset_probability > 0 and random.random() < self.reset_probability:
            state = None
        summed, state = self.summed_loss(batch.inputs, batch.targets, state)
        self.train_state = detach_state(state)  # values carry on; no gradient crosses into the next window
        tokens = batch.targets.numel()
        loss = summed / tokens
        self.check_training_loss(loss)
        self._window = batch.inputs.shape[1]
        if self.logging_step():  # tensors only, and only when they are written: no host sync per step
            mean_nll = loss.detach()
            metric = mean_nll / LOG2 if self.level == "char" else torch.exp(mean_nll)
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=tokens)
            self.log(f"train/{self.metric_name}", metric, on_step=True, on_epoch=False, batch_size=tokens)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        batch = as_batch(batch)
        summed, state = self.summed_loss(batch.inputs, batch.targets, self.eval_state)
        self.eval_state = detach_state(state)
        tokens = batch.targets.numel()
        self.losses[f"{stage}_loss"](summed / tokens, weight=tokens)
        self.log(f"{stage}/loss", self.losses[f"{stage}_loss"], on_epoch=True, batch_size=tokens)
        metric = self.metrics[f"{stage}_metric"]
        metric.update(summed, tokens)
        self.log(f"{stage}/{self.metric_name}", metric, on_epoch=True, prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    # Learning rate x window / base ------------------------------------------------------------------

    def on_before_optimizer_step(self, optimizer) -> None:
        # Runs after this batch's backward and before the update, so the update sees the scaled rate.
        if self.scale_lr_by_length and self._window is not None:
            self._unscaled_lrs = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * self._window / self.base_length

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self._unscaled_lrs is not None:  # schedulers and the LR monitor see the unscaled rate
            for group, lr in zip(optimizer.param_groups, self._unscaled_lrs):
                group["lr"] = lr
            self._unscaled_lrs = None


# Evaluation and generation without Lightning -------------------------------------------------------

def dynamic_evaluate(model: LanguageModel, datamodule, lr: float = 1e-4, decay: float = 0.0, rms: bool = False,
                     split: str = "test", device: str | torch.device | None = None, epsilon: float = 1e-8) -> dict:
    """Dynamic evaluation (Krause et al., 2018): score each window of a split, then adapt to it.

    The split is read as in the papers' protocol (its loader: test batch 1, validation batch 10, the
    state carried, never reset). For every window in order, its cross-entropy is counted with the
    current weights; then one gradient step on that same loss moves the weights, pulled back towards
    the trained weights theta_0: ``theta <- theta - lr * g + decay * (theta_0 - theta)``. With ``rms``
    the gradient is divided by the root of its running mean square over the windows so far (the
    paper's RMS-normalised step). Dropout and batch norm stay in evaluation mode. ``model`` itself
    is left unchanged: the steps act on a copy.

    Args:
        model: a trained :class:`LanguageModel` (e.g. the objective after ``trainer.test(ckpt_path=...)``).
        datamodule: its DataModule (e.g. :class:`datamodules.ptb.PTBDataModule`); prepared and set
            up here if it was not yet.
        lr: step size, >= 0 (0: plain evaluation).
        decay: pull towards the trained weights per step, in [0, 1).
        rms: scale the steps by the gradients' running RMS.
        split: "test" or "val".
        device: where to run (None: where ``model`` is).

    Returns:
        ``{"{split}/dynamic_loss": mean nats, "{split}/dynamic_bpc" or "..._ppl": value,
        "{split}/dynamic_tokens": count}``.
    """
    if not isinstance(model, LanguageModel):
        raise ValueError(f"dynamic_eval=true needs a language model's checkpoint, got a {type(model).__name__} run")
    check_fraction("dynamic_eval lr", lr, 0.0, math.inf)
    check_fraction("dynamic_eval decay", decay)
    check_choice("dynamic_eval split", split, ("val", "test"))
    if getattr(datamodule, "vocabulary", None) is None:
        datamodule.prepare_data()
        datamodule.setup("test")
    windows = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    adapted = copy.deepcopy(model).to(device if device is not None else model.device)
    adapted.eval()
    params = [p for p in adapted.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in params]
    mean_square = [torch.zeros_like(p) for p in params]
    state, total, tokens, steps = None, 0.0, 0, 0
    for batch in windows:
        batch = as_batch(batch)
        summed, state = adapted.summed_loss(batch.inputs.to(adapted.device), batch.targets.to(adapted.device), state)
        count = batch.targets.numel()
        total += float(summed.detach())
        tokens += count
        state = detach_state(state)
        grads = torch.autograd.grad(summed / count, params, allow_unused=True)
        steps += 1
        with torch.no_grad():
            for param, grad, start, square in zip(params, grads, initial, mean_square):
                if grad is None:
                    continue
                if rms:
                    square.mul_(1 - 1 / steps).add_(grad * grad, alpha=1 / steps)
                    grad = grad / (square.sqrt() + epsilon)
                param.add_(grad, alpha=-lr)
                param.add_(start - param, alpha=decay)
        apply_constraints(adapted.net)  # e.g. IndRNN's |u| bound, as after every training step
    mean = total / max(tokens, 1)
    return {f"{split}/dynamic_loss": mean, f"{split}/dynamic_{model.metric_name}": nll_to_metric(mean, model.level),
            f"{split}/dynamic_tokens": tokens}


@torch.no_grad()
def sample(model: LanguageModel, prompt_ids: list[int], length: int, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> Iterable[int]:
    """Yield ``length`` token ids sampled one at a time after reading ``prompt_ids`` (a non-empty list).

    Each step feeds the last token with the carried state and samples from softmax(logits / temperature)
    (temperature 0: the most likely token).
    """
    model.eval()
    check_positive_int("generate length", length)
    if not prompt_ids:
        raise ValueError("generate: the prompt must hold at least one token")
    device = model.device
    logits, state = model(torch.tensor([prompt_ids], dtype=torch.long, device=device))
    last = logits[0, -1]
    for _ in range(length):
        if temperature == 0:
            token = int(last.argmax())
        else:
            probabilities = torch.softmax(last.double() / temperature, dim=-1).cpu()
            token = int(torch.multinomial(probabilities, 1, generator=generator))
        yield token
        logits, state = model(torch.tensor([[token]], dtype=torch.long, device=device), state)
        last = logits[0, -1]
