"""Jordan network (Jordan 1986): the previous *output*, not the hidden state, is fed back.

    h_t = f(W x_t + V y_{t-1} + b)
    y_t = g(U h_t + c)

The layer returns the outputs y_t, which are also its recurrent state: with the default
``output_size`` = ``hidden_size`` it stacks in :class:`src.networks.RecurrentNetwork` like any
other layer (the network expects ``hidden_size`` features per step).
"""
from __future__ import annotations


import torch
from torch import nn
from torch.nn import functional as F

from src.activations import FUNCTIONS, activate
from src.checks import check_choice, check_positive_int
from src.kernels.dense_triton import DENSE_BACKENDS, resolve_dense_backend
from src.layers.common import initial_state, init_uniform_, sequence_and_final_state, to_time_major

NONLINEARITIES = tuple(FUNCTIONS)


def set_feedback_settings(layer: nn.Module, name: str, input_size: int, hidden_size: int, nonlinearity: str,
                          output_nonlinearity: str, batch_first: bool) -> None:
    """The settings every output-feedback layer (Jordan, NARX) keeps, checked and set on ``layer``: input_size I,
    hidden_size H (ints >= 1), nonlinearity f and output_nonlinearity g (each one of :data:`NONLINEARITIES`),
    batch_first; ``name`` names the layer in errors."""
    layer.input_size = check_positive_int("input_size", input_size)
    layer.hidden_size = check_positive_int("hidden_size", hidden_size)
    layer.nonlinearity = check_choice(f"{name} nonlinearity", nonlinearity, NONLINEARITIES)
    layer.output_nonlinearity = check_choice(f"{name} output_nonlinearity", output_nonlinearity, NONLINEARITIES)
    layer.batch_first = batch_first


def output_feedback_loop(drive: torch.Tensor, past_outputs: list[torch.Tensor], weight_fb: torch.Tensor,
                         weight_out: torch.Tensor, bias_out: torch.Tensor | None, nonlinearity: str,
                         output_nonlinearity: str) -> torch.Tensor:
    """y_t = g(U f(z_t + V [y_{t-1}, ..., y_{t-p}]) + c) for every step: the loop of Jordan (p = 1) and NARX.

    Args:
        drive: z_t, the input part of the hidden pre-activation for every step (T, B, M).
        past_outputs: y_{-p}, ..., y_{-1}, oldest first, (B, O) each.
        weight_fb: V (M, p O), column block k - 1 for y_{t-k}. weight_out: U (O, M); bias_out: c (O,) or None.
        nonlinearity, output_nonlinearity: f and g.

    Returns:
        y (T, B, O).
    """
    history, feedback_steps = list(past_outputs), len(past_outputs)
    weight_fb_t = weight_fb.t()
    for z_t in drive.unbind(0):
        feedback = history[-1] if feedback_steps == 1 else torch.cat(history[-1:-feedback_steps - 1:-1], dim=-1)
        hidden = activate(torch.addmm(z_t, feedback, weight_fb_t), nonlinearity)
        history.append(activate(F.linear(hidden, weight_out, bias_out), output_nonlinearity))
    return torch.stack(history[feedback_steps:])


class JordanRNN(nn.Module):
    r"""Jordan network layer, following torch.nn.RNN's contract (one layer, one direction).

    Args:
        input_size: features per input step, I.
        hidden_size: hidden units h_t, H.
        output_size: width O of the output y_t, which is fed back; default (None) H. Keep the
            default inside :class:`src.networks.RecurrentNetwork`, which expects H features per step.
        nonlinearity: f for the hidden units: "tanh", "relu", "sigmoid" or "identity".
        output_nonlinearity: g for the outputs (default "tanh", a bounded feedback).
        bias: learn the biases b and c.
        batch_first: inputs/outputs are (B, T, *) instead of (T, B, *).
        backend: "reference" (a PyTorch loop over time), "triton" (the persistent GPU kernel of
            :mod:`src.kernels.jordan_triton`, hand-written backward) or "auto" (as
            :func:`src.kernels.dense_triton.resolve_dense_backend`: the kernel on CUDA, the loop elsewhere or
            for good once the kernel failed to compile or launch, with a one-line warning).
        device, dtype: where and in which dtype to create the parameters.

    Parameters: ``weight_ih`` W (H, I), ``weight_fb`` V (H, O), ``bias_h`` b (H,), ``weight_out`` U
    (O, H), ``bias_out`` c (O,); W, V, b as torch.nn.RNN (U(-1/sqrt(H), 1/sqrt(H))), U and c like
    torch.nn.Linear(H, O).

    Shapes:
        input: (T, B, I), (B, T, I) with ``batch_first``, or (T, I) unbatched.
        state: (1, B, O), the output y_{t-1} fed back at the next step (zeros when None); (1, O)
            unbatched. The returned state is the last output y_{T-1}, the whole recurrent state.
        output: (T, B, O) (or (B, T, O)), the outputs y_t.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int | None = None,
                 nonlinearity: str = "tanh", output_nonlinearity: str = "tanh", bias: bool = True,
                 batch_first: bool = False, backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        self.backend = check_choice("JordanRNN backend", backend, DENSE_BACKENDS)
        set_feedback_settings(self, "JordanRNN", input_size, hidden_size, nonlinearity, output_nonlinearity, batch_first)
        self.output_size = hidden_size if output_size is None else check_positive_int("output_size", output_size)
        factory = {"device": device, "dtype": dtype}
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size, **factory))
        self.weight_fb = nn.Parameter(torch.empty(hidden_size, self.output_size, **factory))
        self.bias_h = nn.Parameter(torch.empty(hidden_size, **factory)) if bias else None
        self.weight_out = nn.Parameter(torch.empty(self.output_size, hidden_size, **factory))
        self.bias_out = nn.Parameter(torch.empty(self.output_size, **factory)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_uniform_((self.weight_ih, self.weight_fb, self.bias_h, self.weight_out, self.bias_out), self.hidden_size)

    def initial_state(self, batch_size: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """Zeros (1, batch_size, O): no output fed back yet (dtype and device of ``like``, default the parameters)."""
        return (self.weight_ih if like is None else like).new_zeros(1, batch_size, self.output_size)

    def forward(self, input: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, unbatched = to_time_major(input, self.batch_first, self.input_size, "JordanRNN")
        batch = x.shape[1]
        y = initial_state(state, batch, self.output_size, unbatched, "JordanRNN", like=x,
                          what="hx (the previous output y)")
        z = F.linear(x, self.weight_ih, self.bias_h)  # W x_t + b for all steps at once
        if resolve_dense_backend(self.backend, self.weight_fb, "JordanRNN") == "triton":
            from src.kernels.jordan_triton import JordanTriton  # triton is optional

            bias_out = self.bias_out if self.bias_out is not None else self.weight_out.new_zeros(self.output_size)
            output = JordanTriton.apply(z, self.weight_fb, self.weight_out, bias_out, y, self.nonlinearity,
                                        self.output_nonlinearity, "JordanRNN" if self.backend == "auto" else None)
            return sequence_and_final_state(output, self.batch_first, unbatched)
        output = output_feedback_loop(z, [y], self.weight_fb, self.weight_out, self.bias_out, self.nonlinearity,
                                      self.output_nonlinearity)
        return sequence_and_final_state(output, self.batch_first, unbatched)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, output_size={self.output_size}, "
                f"nonlinearity={self.nonlinearity!r}, output_nonlinearity={self.output_nonlinearity!r}, "
                f"batch_first={self.batch_first}, backend={self.backend!r}")
