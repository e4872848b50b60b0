"""One autograd Function for the IndRNN kernels that take (z, u, h0) and return all states.

Every such kernel has the same autograd boilerplate: run the forward pass on detached tensors, save
the outputs with u and h0, and in the backward pass hand the incoming gradient, the saved tensors,
the activation and the clip bound to a hand-written backward. :class:`RecurrenceFunction` holds it
once; a kernel is a subclass that names its two passes:

    class IndRNNScanTorch(RecurrenceFunction):
        run_forward = staticmethod(scan_forward_torch)    # (z, u, h0, activation) -> out (T, B, H)
        run_backward = staticmethod(scan_backward_torch)  # (grad_out, out, u, h0, activation, grad_clip)
                                                          #   -> (grad_z (T, B, H), grad_u (H,), grad_h0 (B, H))

and is called as every autograd Function: ``IndRNNScanTorch.apply(z, u, h0, activation, grad_clip=None)``
(its autograd node is named ``IndRNNScanTorchBackward``). The backward pass is not itself
differentiable (``once_differentiable``): second derivatives raise.
"""
from __future__ import annotations

import torch


class RecurrenceFunction(torch.autograd.Function):
    """h_t = act(z_t + u * h_{t-1}) with a hand-written backward; subclasses set ``run_forward``,
    ``run_backward`` and optionally ``check`` (see the module docstring).

    ``apply(z, u, h0, activation, grad_clip=None)``: z (T, B, H), u (H,), h0 (B, H) -> all states
    (T, B, H); ``grad_clip`` c clamps dL/da_t to [-c, c] at every step of the backward pass.
    """

    @staticmethod
    def check(z: torch.Tensor, u: torch.Tensor, h0: torch.Tensor, activation: str) -> None:
        """Raise a one-line error for inputs the kernel cannot take (default: accept all)."""

    @classmethod
    def apply(cls, z, u, h0, activation: str, grad_clip: float | None = None):  # noqa: D102 - see the class
        cls.check(z, u, h0, activation)
        return super().apply(cls, z, u, h0, activation, grad_clip)

    @staticmethod
    def forward(ctx, kernel, z, u, h0, activation: str, grad_clip: float | None):
        out = kernel.run_forward(z.detach(), u.detach(), h0.detach(), activation)
        ctx.save_for_backward(out, u, h0)
        ctx.kernel, ctx.activation, ctx.grad_clip = kernel, activation, grad_clip
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        out, u, h0 = ctx.saved_tensors
        grad_z, grad_u, grad_h0 = ctx.kernel.run_backward(grad_out, out, u, h0, ctx.activation, ctx.grad_clip)
        return None, grad_z, grad_u, grad_h0, None, None
