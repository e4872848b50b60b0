"""Language modelling: embedding -> any recurrent network -> decoder, predicting the next token.

Training is truncated backpropagation through time: the batches are consecutive windows of B
parallel streams (datamodules/ptb.py), and the network's state at the end of one window starts the
next, detached, so values flow across window boundaries and gradients do not. Lightning 2 has no
TBPTT of its own, so the objective keeps the state. It starts afresh at each epoch, stream by stream
where a batch's ``reset`` says so, and with probability ``reset_probability`` before any training
batch: all streams together (official IndRNN code: 1/10), or each stream on its own
(``reset_per_stream``). Validation and test carry their own state through the whole split, never
reset (the papers' protocol: validation batch 10, test batch 1).

The state is whatever the network returns, one entry per layer in each layer's own format (LSTM
(h, c), IndRNN h, Clockwork's phase, TDNN's window...), handled through :mod:`src.state`.

Evaluation modes: the test split is scored as it is and, with ``dynamic_eval``, also by dynamic
evaluation (Krause et al. 2018; :mod:`lightning_modules.dynamic_evaluation`). Also here:
:func:`sample` (text generation).
"""
from __future__ import annotations

import math
import random
from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import Metric, SumMetric

from lightning_modules.base import SequenceObjective, check_causal
from lightning_modules.carried_state import CarriedState, refuse_samplings
from lightning_modules.dynamic_evaluation import DynamicEvaluation
from src.batch import as_batch
from src.checks import check_choice, check_fraction, check_positive_int
from src.networks import TimeSharedDropout
from src.state import detach_state, reset_streams

LEVELS = ("word", "char")
LOG2 = math.log(2.0)


class TokenCrossEntropy(Metric):
    """Token-weighted mean cross-entropy, reported as bits per character, perplexity or nats.

    ``update(loss_sum, tokens)`` adds a window's summed negative log-likelihood (nats) and its token
    count; ``compute()`` returns mean / ln 2 (``unit="bpc"``), exp(mean) (``unit="ppl"``) or the mean
    itself (``unit="nats"``).
    """

    full_state_update = False

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = check_choice("language-model metric", unit, ("bpc", "ppl", "nats"))
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, loss_sum: torch.Tensor, tokens: int) -> None:
        self.total += loss_sum.detach().to(torch.float64)
        self.tokens += int(tokens)

    def compute(self) -> torch.Tensor:
        mean = self.total / self.tokens.clamp(min=1)
        if self.unit == "nats":
            return mean
        return mean / LOG2 if self.unit == "bpc" else torch.exp(mean)


class LanguageModel(CarriedState, SequenceObjective):
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
        reset_per_stream: False: all streams restart together with that chance (the official recipe);
            True: each stream on its own.
        base_length: the base window length; with ``scale_lr_by_length`` a window of length t is
            trained with learning rate x t / base_length (the official variable-length recipe).
        scale_lr_by_length: see ``base_length``.
        init_range: embeddings (and a separate decoder) start in U(-init_range, init_range).
        dynamic_eval: the test also scores the split by dynamic evaluation, logged as
            ``test/dynamic_loss``, ``test/dynamic_bpc`` or ``test/dynamic_ppl`` and ``test/dynamic_tokens``.
        dynamic_eval_lr, dynamic_eval_decay, dynamic_eval_rms: its step size, pull back towards the
            trained weights and RMS scaling (:class:`lightning_modules.dynamic_evaluation.DynamicEvaluation`).
        (optimizer, scheduler, monitor, scheduler_interval, decay_1d_params, run_config: as
        :class:`lightning_modules.base.SequenceObjective`)
    """

    best_mode = "min"
    readouts = ("all",)
    learning_rules = ("bptt",)  # truncated BPTT over windows; the embedding is outside RTRL's diagonal layers

    def __init__(self, net: nn.Module, optimizer, scheduler=None, *, vocab_size: int, embedding_size: int,
                 level: str = "word", tie_weights: bool = False, embedding_dropout: float = 0.0,
                 input_dropout: float = 0.0, output_dropout: float = 0.0, reset_probability: float = 0.0,
                 reset_per_stream: bool = False, base_length: int | None = None, scale_lr_by_length: bool = False,
                 init_range: float = 0.1, dynamic_eval: bool = False, dynamic_eval_lr: float = 1e-4,
                 dynamic_eval_decay: float = 0.0, dynamic_eval_rms: bool = False, **kwargs) -> None:
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
        self.reset_probability, self.reset_per_stream = reset_probability, bool(reset_per_stream)
        self.base_length = base_length
        self.dynamic = DynamicEvaluation(dynamic_eval_lr, dynamic_eval_decay, dynamic_eval_rms) if dynamic_eval else None
        self.dynamic_scores = nn.ModuleDict({"loss": TokenCrossEntropy("nats"), self.metric_name: self.make_metric(),
                                             "tokens": SumMetric()})
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

    def training_state(self, batch) -> object:
        """The state a training batch starts from: the carried one, with the streams of ``batch.reset``
        restarted (:meth:`CarriedState.restart`) and, with ``reset_probability``, all streams (or each
        stream, ``reset_per_stream``) restarted by chance. No tensor is read back to the host: the
        all-streams draw uses Python's generator (seeded by seed_everything, saved in checkpoints), the
        per-stream one draws on the device."""
        state = self.restart(self.train_state, batch.reset)
        if self.reset_probability == 0:
            return state
        if not self.reset_per_stream:  # drawn before every batch, a state or not, as the official loop does
            return None if random.random() < self.reset_probability else state
        restart = torch.rand(batch.inputs.shape[0], device=batch.inputs.device) < self.reset_probability
        return reset_streams(self.net, state, restart)

    def on_train_epoch_start(self) -> None:
        self.train_state = None

    def on_validation_epoch_start(self) -> None:
        self.eval_state = None

    def on_test_epoch_start(self) -> None:
        self.eval_state = None
        if self.dynamic is not None:
            self.dynamic.start()

    def on_test_epoch_end(self) -> None:
        if self.dynamic is not None:
            self.dynamic.start()  # frees the adapted weights (two copies of the parameters)

    # Steps ----------------------------------------------------------------------------------------

    def bptt_training_step(self, batch) -> torch.Tensor:
        batch = self.checked(batch)
        summed, state = self.summed_loss(batch.inputs, batch.targets, self.training_state(batch))
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

    def checked(self, batch):
        """``batch`` as a :class:`src.batch.SequenceBatch`; one without test-time samplings."""
        batch = as_batch(batch)
        refuse_samplings(batch, type(self).__name__, "a language model carries each stream's state from "
                                                     "window to window and scores every token")
        return batch

    def _evaluate(self, batch, stage: str) -> None:
        batch = self.checked(batch)
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
        if self.dynamic is not None:  # the evaluation mode: dynamic evaluation beside the static score
            batch = as_batch(batch)
            summed = self.dynamic.score(self, batch.inputs, batch.targets)
            tokens = batch.targets.numel()
            for name, score in self.dynamic_scores.items():
                score.update(*((tokens,) if name == "tokens" else (summed, tokens)))
                self.log(f"test/dynamic_{name}", score, on_epoch=True)

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


# Generation without Lightning -----------------------------------------------------------------------

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
