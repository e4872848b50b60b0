"""Leaky-integrator RNN (Mozer 1992; Jaeger et al. 2007; Pascanu, Mikolov & Bengio 2013).

Each unit i mixes its previous state with a fresh Elman update, with its own leak rate alpha_i:

    h_t = alpha * h_{t-1} + (1 - alpha) * f(W x_t + U h_{t-1} + b)

alpha close to 1 gives a slow unit (time constant about 1 / (1 - alpha) steps), alpha = 0 the plain
Elman update (torch.nn.RNN). The leak rates are either fixed (a buffer, sampled once uniformly in
``alpha_range`` or given per group of units by ``alpha_groups``) or learned, parametrised as
alpha = sigmoid(alpha_logit) so that they stay in (0, 1).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from src.activations import activate
from src.checks import check_choice, check_positive_int
from src.kernels.dense_triton import DENSE_BACKENDS, dense_recurrence_triton, resolve_dense_backend
from src.layers.common import initial_state, init_uniform_, sequence_and_final_state, to_time_major

NONLINEARITIES = ("tanh", "relu")
ALPHA_MODES = ("fixed", "learned")
LOGIT_BOUND = 12.0  # learned alpha_logit is clamped to [-12, 12]: alpha in [6e-6, 1 - 6e-6]


class LeakRates:
    """What the leaky-integrator layers (LeakyRNN, DiagonalLeakyRNN) share, mixed into their nn.Module: per-unit
    leak rates, a parameter ``alpha_logit`` (H,) in learned mode or the buffer ``alpha_value`` (H,) otherwise,
    and the state h (1, B, H)."""

    @property
    def alpha(self) -> torch.Tensor:
        """Leak rate per unit, shape (H,), in [0, 1] (fixed) or (0, 1) (learned: sigmoid(alpha_logit))."""
        return torch.sigmoid(self.alpha_logit) if self.alpha_mode == "learned" else self.alpha_value

    def initial_state(self, batch_size: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """Zeros (1, batch_size, H) (dtype and device of ``like``, default the parameters)."""
        return (self.weight_ih if like is None else like).new_zeros(1, batch_size, self.hidden_size)


class LeakyRNN(LeakRates, nn.Module):
    r"""Leaky-integrator RNN layer, following torch.nn.RNN's contract (one layer, one direction).

    Args:
        input_size: features per input step, I.
        hidden_size: units, H.
        alpha_mode: "fixed" (alpha is a buffer, never trained) or "learned" (alpha = sigmoid(alpha_logit),
            a parameter initialised from ``alpha_range`` / ``alpha_groups``).
        alpha_range: (a, b): every unit's alpha is drawn once uniformly in [a, b]. Fixed mode needs
            0 <= a <= b <= 1; learned mode 0 < a <= b < 1 (a logit must exist). Ignored when
            ``alpha_groups`` is given.
        alpha_groups: one alpha per group of H / len(alpha_groups) consecutive units, e.g.
            [0.0, 0.5, 0.9, 0.99] for four timescales; H must be a multiple of the number of groups.
        nonlinearity: f, "tanh" or "relu".
        bias: learn the bias b.
        batch_first: inputs/outputs are (B, T, *) instead of (T, B, *).
        backend: "reference" (a PyTorch loop over time), "triton" (the persistent GPU kernel of
            :mod:`src.kernels.dense_triton`, hand-written backward) or "auto" (see
            :func:`src.kernels.dense_triton.resolve_dense_backend`); SkipRNN and JordanRNN take the same.
        device, dtype: where and in which dtype to create the parameters.

    Parameters: ``weight_ih`` W (H, I), ``weight_hh`` U (H, H), ``bias`` b (H,), initialised like
    torch.nn.RNN (U(-1/sqrt(H), 1/sqrt(H))); ``alpha_logit`` (H,) in learned mode, else the buffer
    ``alpha_value`` (H,) (saved in checkpoints). :attr:`alpha` returns the leak rates (H,) either way.
    In learned mode :meth:`constrain_parameters_` (called after each optimizer step by the training
    loop) clamps the logits to [-12, 12], so alpha never rounds to exactly 0 or 1.

    Shapes:
        input: (T, B, I), (B, T, I) with ``batch_first``, or (T, I) unbatched.
        state: (1, B, H), h_{t-1} (zeros when None); (1, H) unbatched. The returned state is the last h.
        output: (T, B, H) (or (B, T, H)), the state after every step.
    """

    def __init__(self, input_size: int, hidden_size: int, alpha_mode: str = "fixed",
                 alpha_range: Sequence[float] = (0.0, 0.95), alpha_groups: Sequence[float] | None = None,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        check_choice("LeakyRNN nonlinearity", nonlinearity, NONLINEARITIES)
        self.backend = check_choice("LeakyRNN backend", backend, DENSE_BACKENDS)
        check_choice("LeakyRNN alpha_mode", alpha_mode, ALPHA_MODES)
        low, high = 0.0, 1.0
        if alpha_groups is not None:
            groups = [float(a) for a in alpha_groups]
            if not groups or hidden_size % len(groups):
                raise ValueError(f"alpha_groups needs one value per equal group of units: hidden_size {hidden_size} "
                                 f"is not a multiple of {len(groups)} groups")
            values = groups
        else:
            values = [float(a) for a in alpha_range]
            if len(values) != 2 or values[0] > values[1]:
                raise ValueError(f"alpha_range must be (low, high) with low <= high, got {list(alpha_range)}")
        # Learned alphas live in (0, 1) as sigmoid(logit); a value of 0 or 1 (e.g. the default range's 0.0)
        # starts at the logit bound, alpha = sigmoid(-+12), instead of being refused.
        bad = [a for a in values if not low <= a <= high]
        if bad:
            raise ValueError(f"alpha values must be in [0, 1], got {values}")
        self.alpha_mode, self.nonlinearity, self.batch_first = alpha_mode, nonlinearity, batch_first
        self.alpha_range = tuple(float(a) for a in alpha_range)
        self.alpha_groups = None if alpha_groups is None else tuple(values)
        factory = {"device": device, "dtype": dtype}
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size, **factory))
        self.bias = nn.Parameter(torch.empty(hidden_size, **factory)) if bias else None
        if alpha_mode == "learned":
            self.alpha_logit = nn.Parameter(torch.empty(hidden_size, **factory))
        else:
            self.register_buffer("alpha_value", torch.empty(hidden_size, **factory))
        self.reset_parameters()

    def _initial_alpha(self, like: torch.Tensor) -> torch.Tensor:
        if self.alpha_groups is not None:
            groups = torch.tensor(self.alpha_groups, dtype=like.dtype, device=like.device)
            return groups.repeat_interleave(self.hidden_size // len(self.alpha_groups))
        low, high = self.alpha_range
        return torch.empty_like(like).uniform_(low, high)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Weights as torch.nn.RNN; alpha drawn again from ``alpha_range`` (or set from ``alpha_groups``)."""
        init_uniform_((self.weight_ih, self.weight_hh, self.bias), self.hidden_size)
        if self.alpha_mode == "learned":
            self.alpha_logit.copy_(torch.logit(self._initial_alpha(self.alpha_logit)).clamp(-LOGIT_BOUND, LOGIT_BOUND))
            self.constrain_parameters_()
        else:
            self.alpha_value.copy_(self._initial_alpha(self.alpha_value))

    @torch.no_grad()
    def constrain_parameters_(self) -> None:
        """Learned mode: clamp alpha_logit to [-12, 12] (alpha stays strictly inside (0, 1))."""
        if self.alpha_mode == "learned":
            self.alpha_logit.clamp_(-LOGIT_BOUND, LOGIT_BOUND)

    def forward(self, input: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, unbatched = to_time_major(input, self.batch_first, self.input_size, "LeakyRNN")
        batch = x.shape[1]
        h = initial_state(state, batch, self.hidden_size, unbatched, "LeakyRNN", like=x)
        z = F.linear(x, self.weight_ih, self.bias)  # W x_t + b for all steps at once
        alpha = self.alpha
        if resolve_dense_backend(self.backend, self.weight_hh, "LeakyRNN") == "triton":
            # lam = alpha: the kernel's h = lam * h + (1 - lam) * f(...), the same update.
            output = dense_recurrence_triton(z, self.weight_hh.unsqueeze(0), h.unsqueeze(0),
                                             alpha.expand(x.shape[0], self.hidden_size), (1,), self.nonlinearity,
                                             fallback_for="LeakyRNN" if self.backend == "auto" else None)
            return sequence_and_final_state(output, self.batch_first, unbatched)
        keep, weight_hh_t = 1.0 - alpha, self.weight_hh.t()
        outputs = []
        for t in range(x.shape[0]):
            h = alpha * h + keep * activate(torch.addmm(z[t], h, weight_hh_t), self.nonlinearity)
            outputs.append(h)
        output = torch.stack(outputs)
        return sequence_and_final_state(output, self.batch_first, unbatched)

    def extra_repr(self) -> str:
        alpha = f"alpha_groups={list(self.alpha_groups)}" if self.alpha_groups else f"alpha_range={self.alpha_range}"
        return (f"{self.input_size}, {self.hidden_size}, alpha_mode={self.alpha_mode!r}, {alpha}, "
                f"nonlinearity={self.nonlinearity!r}, batch_first={self.batch_first}, backend={self.backend!r}")
