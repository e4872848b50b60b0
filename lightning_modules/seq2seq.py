"""Encoder-decoder objective: asynchronous sequence -> sequence (e.g. reversing or sorting a sequence).

Training is teacher-forced; validation and test decode greedily and score whole sequences. The
objective holds the token embeddings (source and target) and the token-level loops (teacher forcing,
greedy decoding), as the language model does; the network (:class:`src.networks.EncoderDecoder`)
maps embeddings to logits.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import Metric

from lightning_modules.base import STAGES, SequenceObjective, check_causal
from lightning_modules.carried_state import refuse_samplings
from lightning_modules.labelling import PerStepAccuracy
from src.batch import as_batch
from src.checks import check_positive_int


class SequenceAccuracy(Metric):
    """Fraction of sequences predicted exactly.

    preds (B, L) and target (B, L) int64 token ids; target is padded with ``pad_id`` after its end
    token. A sequence is right when every non-pad target position matches, the end token included,
    so a prediction that stops early or runs on past the end counts as wrong.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, pad_id: int = 0) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.shape != target.shape:
            raise ValueError(f"sequence accuracy: preds {tuple(preds.shape)} and target {tuple(target.shape)} differ")
        right = ((preds == target) | (target == self.pad_id)).all(dim=1)
        self.correct += right.sum()
        self.total += target.shape[0]

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)


class EncoderDecoderModule(SequenceObjective):
    """Cross-entropy with teacher forcing; greedy decoding to score sequences at validation and test.

    Logs ``train/loss``, ``{train,val,test}/acc`` (teacher-forced per-token accuracy),
    ``{val,test}/loss``, ``{val,test}/seq_acc`` (greedy decoding, exact match) and ``val/seq_acc_best``.
    Batches (:class:`src.batch.SequenceBatch`): inputs = source (B, S) and targets = target (B, L),
    int64 token ids; sources are left-padded and targets padded after their end token with the
    network's ``pad_id`` (see :mod:`datamodules.transduction`), so ``lengths`` must be None. The
    network is a :class:`src.networks.EncoderDecoder` whose encoder summarises the source (readout
    "last" or "mean") and whose decoder has no bidirectional layer (teacher forcing would let it
    read the answer). The objective embeds the tokens: ``source_embedding`` and ``target_embedding``,
    V x E each (the network's ``vocab_size`` and ``embedding_size``; the PAD row stays zero).

    Args:
        (as :class:`lightning_modules.base.SequenceObjective`; padding is ignored by loss and metrics;
        ``causal`` applies to the encoder as well)
    """

    metric_name = "seq_acc"
    learning_rules = ("bptt",)  # two networks and teacher forcing: RTRL's one diagonal stack does not apply
    best_mode = "max"

    def __init__(self, net, *args, **kwargs) -> None:
        super().__init__(net, *args, **kwargs)
        self.source_embedding = nn.Embedding(net.vocab_size, net.embedding_size, padding_idx=net.pad_id)
        self.target_embedding = nn.Embedding(net.vocab_size, net.embedding_size, padding_idx=net.pad_id)
        self.token_metrics = torch.nn.ModuleDict({
            f"{stage}_acc": PerStepAccuracy(num_classes=net.vocab_size, average="micro", ignore_index=net.pad_id)
            for stage in STAGES})

    def check_network(self, net, causal: bool) -> None:
        for attribute in ("encoder", "decoder", "encode", "decode", "vocab_size", "embedding_size", "pad_id"):
            if not hasattr(net, attribute):
                raise ValueError(f"the encoder-decoder objective needs a src.networks.EncoderDecoder network, "
                                 f"got {type(net).__name__}")
        readout = getattr(net.encoder, "readout", "last")
        if readout not in ("last", "mean"):
            raise ValueError(f"encoder-decoder: task.readout is the encoder's summary of the source, so it must be "
                             f"'last' or 'mean', not {readout!r}")
        check_causal(net.decoder, "encoder-decoder: the decoder is teacher-forced (it must not read the answer)")
        if causal:
            check_causal(net.encoder, "the task is causal (task.causal=true)")

    def make_metric(self) -> Metric:
        return SequenceAccuracy(pad_id=self.net.pad_id)

    def shift_right(self, target: torch.Tensor) -> torch.Tensor:
        """target (B, L) -> the decoder's teacher-forced inputs (B, L): BOS, then target[:, :-1]."""
        start = target.new_full((target.shape[0], 1), self.net.bos_id)
        return torch.cat([start, target[:, :-1]], dim=1)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: source (B, S), target (B, L) int64 -> logits (B, L, V); logits[:, j] predicts
        target[:, j] from the source and the true target[:, :j]."""
        previous = self.target_embedding(self.shift_right(target))
        return self.net(self.source_embedding(source), previous)[0]

    @torch.no_grad()
    def generate(self, source: torch.Tensor, max_length: int) -> torch.Tensor:
        """Greedy decoding: source (B, S) int64 -> tokens (B, max_length) int64.

        Each sequence stops at its first EOS (included); later positions are PAD. The decoder reads
        one token per step and carries its state (every layer's state holds all it needs to
        continue), so decoding costs max_length decoder steps, not the max_length^2 of re-running
        the prefix; the tokens are the same.
        """
        check_positive_int("max_length", max_length)
        net = self.net
        context = net.encode(self.source_embedding(source))
        batch = source.shape[0]
        tokens = source.new_full((batch, max_length), net.pad_id)
        previous = source.new_full((batch, 1), net.bos_id)
        finished = torch.zeros(batch, dtype=torch.bool, device=source.device)
        state = None
        for step in range(max_length):
            logits, state = net.decode(context, self.target_embedding(previous), state)
            next_token = logits[:, -1].argmax(dim=-1).masked_fill(finished, net.pad_id)
            tokens[:, step] = next_token
            finished |= next_token == net.eos_id
            if bool(finished.all()):
                break
            previous = next_token.unsqueeze(1)
        return tokens

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1),
                               ignore_index=self.net.pad_id)

    def _step(self, batch, stage: str) -> torch.Tensor:
        batch = as_batch(batch)
        refuse_samplings(batch, type(self).__name__, "greedy decoding scores each source's own output sequence")
        source, target, lengths = batch.inputs, batch.targets, batch.lengths
        if lengths is not None:
            raise ValueError("encoder-decoder: batches carry no lengths; pad sources on the left and targets "
                             "after their end token with the network's pad_id")
        logits = self(source, target)
        loss = self.loss(logits, target)
        batch_size = target.shape[0]
        if stage == "train":
            self.check_training_loss(loss)
        token_accuracy = self.token_metrics[f"{stage}_acc"]
        token_accuracy(logits.detach(), target)
        self.log(f"{stage}/acc", token_accuracy, on_step=stage == "train", on_epoch=stage != "train",
                 batch_size=batch_size)
        self.log_loss(stage, loss, batch_size)
        if stage == "train":
            return loss
        # Greedy decoding is what a user of the model gets; it is scored outside training only,
        # where its extra cost (a pass per output step) does not slow the optimisation.
        decoded = self.generate(source, max_length=target.shape[1])
        sequence_accuracy = self.metrics[f"{stage}_metric"]
        sequence_accuracy(decoded, target)
        self.log(f"{stage}/seq_acc", sequence_accuracy, on_epoch=True, prog_bar=True, batch_size=batch_size)
        return loss
