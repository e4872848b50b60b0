"""The IndRNN recurrence as a plain PyTorch loop over time.

This is the reference that every fused kernel is tested against, and the fallback for dtypes and
devices that have no fused kernel. Autograd records every step, so it is slower than the fused
kernels (about 2-4x on CPU at T=784, B=64, H=128: see benchmarks/recurrence.py) but obviously correct.
"""
import torch

from src.activations import activate

ACTIVATIONS = ("relu", "tanh", "identity")


def indrnn_recurrence_reference(
    input_projection: torch.Tensor, recurrent_weight: torch.Tensor, h0: torch.Tensor, activation: str
) -> torch.Tensor:
    """h_t = act(z_t + u * h_{t-1}) for t = 0..T-1, with h_{-1} = h0.

    Args:
        input_projection: z, shape (T, B, H): W x_t + b for every step.
        recurrent_weight: u, shape (H,).
        h0: initial state, shape (B, H).
        activation: "relu", "tanh" or "identity".

    Returns:
        All hidden states, shape (T, B, H). The final state is the last row.
    """
    state = h0
    outputs = []
    for z_t in input_projection.unbind(0):
        state = activate(z_t + recurrent_weight * state, activation)
        outputs.append(state)
    return torch.stack(outputs)
