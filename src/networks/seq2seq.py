"""Encoder-decoder for asynchronous sequence -> sequence tasks (Cho et al. 2014; Sutskever et al. 2014).

Like every network here it reads vectors: the token embeddings, teacher forcing and greedy decoding
are the objective's (:class:`lightning_modules.seq2seq.EncoderDecoderModule`), as the language
model's embedding and sampling are (:mod:`lightning_modules.language_model`).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from src.checks import check_positive_int


def causal_factory(model: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """``model`` (a functools.partial of a network class) with bidirectionality switched off, both
    the network's own ``bidirectional`` keyword and a ``bidirectional`` keyword of its ``layer`` partial."""
    if not isinstance(model, functools.partial):
        return model
    keywords = dict(model.keywords)
    if "bidirectional" in keywords:
        keywords["bidirectional"] = False
    layer = keywords.get("layer")
    if isinstance(layer, functools.partial) and "bidirectional" in layer.keywords:
        keywords["layer"] = functools.partial(layer.func, *layer.args, **{**layer.keywords, "bidirectional": False})
    return functools.partial(model.func, *model.args, **keywords)


class EncoderDecoder(nn.Module):
    """An encoder reads the whole source; a separate decoder then writes the target token by token.

    The encoder's readout is a context vector c (B, C). At output step j the decoder reads the
    embedding of the previous token y_{j-1} (BOS at j = 0) concatenated with c, and predicts y_j.
    Feeding c at every step (Cho et al.'s variant), rather than handing the encoder's state to the
    decoder, works for every layer in this project whatever its state format and lets encoder and
    decoder use different widths. The token embeddings come from the objective; ``vocab_size``,
    ``embedding_size`` and the special tokens describe the token interface the objective builds them for.

    Args:
        model: builds both networks, e.g. ``functools.partial(RecurrentNetwork, layer=..., hidden_size=...)``
            (a model config instantiated with ``_partial_=True``). The encoder is
            ``model(input_size=embedding_size, output_size=context_size)`` with the factory's own
            readout ("last" or "mean": the task's summary of the source); the decoder is
            ``model(input_size=embedding_size + context_size, output_size=vocab_size, readout="all")``
            with ``bidirectional`` switched off (at network level and in a ``layer`` partial).
        vocab_size: V, token ids 0 .. V-1, shared by sources and targets.
        embedding_size: E, width of the source and target token embeddings.
        context_size: C, width of the encoder's output.
        pad_id, bos_id, eos_id: the padding, start and end tokens (see :mod:`datamodules.transduction`).
        encoder, decoder: instead of ``model``, the two networks already built: a
            :class:`src.networks.SequenceNetwork` (B, S, E) -> (B, C) and a causal one
            (B, L, E + C) -> (B, L, V) with readout "all".
    """

    def __init__(self, model: Callable[..., nn.Module] | None = None, vocab_size: int | None = None,
                 embedding_size: int = 32, context_size: int = 128, pad_id: int = 0, bos_id: int = 1,
                 eos_id: int = 2, *, encoder: nn.Module | None = None, decoder: nn.Module | None = None) -> None:
        super().__init__()
        check_positive_int("vocab_size", vocab_size)
        check_positive_int("embedding_size", embedding_size)
        check_positive_int("context_size", context_size)
        if isinstance(model, nn.Module):
            raise ValueError("encoder-decoder: model is a factory that builds both networks (e.g. a functools.partial "
                             "of a network class); pass networks already built as encoder=... and decoder=...")
        if (model is None) == (encoder is None or decoder is None):
            raise ValueError("encoder-decoder: give either model (a network factory that builds both) or both "
                             "encoder and decoder")
        if model is not None:
            encoder = model(input_size=embedding_size, output_size=context_size)
            decoder = causal_factory(model)(input_size=embedding_size + context_size, output_size=vocab_size,
                                              readout="all")
        if getattr(encoder, "readout", "last") == "all":
            raise ValueError("encoder-decoder: the encoder must summarise the source (readout 'last' or 'mean'), "
                             "not readout 'all'")
        if getattr(decoder, "readout", "all") != "all":
            raise ValueError(f"encoder-decoder: the decoder must predict every step (readout 'all'), "
                             f"got {decoder.readout!r}")
        for name, token in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
            if not 0 <= token < vocab_size:
                raise ValueError(f"encoder-decoder: {name}={token} is not a token id in [0, {vocab_size})")
        self.encoder, self.decoder = encoder, decoder
        self.vocab_size, self.embedding_size, self.context_size = vocab_size, embedding_size, context_size
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    def encode(self, source: torch.Tensor) -> torch.Tensor:
        """source (B, S, E), the source tokens' embeddings -> context (B, C)."""
        context = self.encoder(source)[0]
        if context.shape != (source.shape[0], self.context_size):
            raise ValueError(f"encoder-decoder: the encoder returned {tuple(context.shape)}, expected "
                             f"(batch, context_size={self.context_size})")
        return context

    def decode(self, context: torch.Tensor, previous: torch.Tensor, state=None) -> tuple[torch.Tensor, object]:
        """context (B, C), previous (B, L, E): the embeddings of the tokens before each output step (BOS
        first), state: the decoder's after the steps before them (None: none) -> (logits (B, L, V) of
        the next tokens, the decoder's state after them)."""
        steps = context.unsqueeze(1).expand(-1, previous.shape[1], -1)
        return self.decoder(torch.cat([previous, steps], dim=-1), state)

    def forward(self, source: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: source (B, S, E) and previous (B, L, E), the embeddings of the source and of
        the target shifted right (BOS, then target[:, :-1]) -> (logits (B, L, V), context (B, C)).

        logits[:, j] predicts target[:, j] from the source and the true target[:, :j].
        """
        context = self.encode(source)
        return self.decode(context, previous)[0], context
