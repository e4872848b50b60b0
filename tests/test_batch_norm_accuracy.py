"""TimeBatchNorm's batch statistics in float32 against float64 (issue 23 §1), its hand-written
backward against autograd (gradcheck), its running statistics, and per-window statistics (§7)."""
from __future__ import annotations

import pytest
import torch

from src.layers import IndRNN, IndRNNState, TimeBatchNorm

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def hidden_states(steps: int, batch: int, units: int, seed: int = 0) -> torch.Tensor:
    """(T, B, H) float64 values shaped like ReLU IndRNN outputs: non-negative, offsets of 0 to 3 and
    scales of 0.5 to 4 (float32 values). Far smaller scales would measure float32's rounding of
    x - mean, which no float32 layout avoids, rather than the accumulation of the statistics."""
    generator = torch.Generator().manual_seed(seed)
    scale = 0.5 + torch.rand(units, generator=generator, dtype=torch.float64) * 3.5
    offset = torch.rand(units, generator=generator, dtype=torch.float64) * 3
    x = torch.relu(torch.randn(steps, batch, units, generator=generator, dtype=torch.float64) * scale + offset)
    return x.float().double()  # exactly representable in float32: only the arithmetic differs


def forward_and_gradients(norm: TimeBatchNorm, x: torch.Tensor, upstream: torch.Tensor, dtype: torch.dtype,
                          device: str) -> list[torch.Tensor]:
    """Output and the gradients of sum(output * upstream) for x, weight and bias, computed in ``dtype``."""
    norm = norm.to(device=device, dtype=dtype).train()
    norm.zero_grad()
    x = x.to(device=device, dtype=dtype).clone().requires_grad_()
    output = norm(x)
    (output * upstream.to(device=device, dtype=dtype)).sum().backward()
    return [t.detach().double().cpu() for t in (output, x.grad, norm.weight.grad, norm.bias.grad)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stats", ["all_steps", "per_step"])
def test_float32_batch_norm_is_within_2e_6_of_float64_at_the_pmnist_shape(stats, device):
    steps, batch, units = 784, 32, 128  # pixel MNIST: 784 steps, batch 32, 128 units
    x = hidden_states(steps, batch, units)
    upstream = torch.randn(steps, batch, units, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64).float().double()
    norm = TimeBatchNorm(units, stats=stats, max_steps=steps)
    with torch.no_grad():  # a scale and shift other than 1 and 0
        norm.weight.copy_(torch.linspace(0.5, 1.5, units))
        norm.bias.copy_(torch.linspace(-0.3, 0.3, units))
    reference = forward_and_gradients(norm, x, upstream, torch.float64, "cpu")
    single = forward_and_gradients(norm, x, upstream, torch.float32, device)
    for name, ours, exact in zip(("output", "input gradient", "weight gradient", "bias gradient"), single, reference):
        # Relative to the largest value: the weight and bias gradients are sums of T x B terms.
        error = ((ours - exact).abs().max() / exact.abs().max()).item()
        assert error < 2e-6, f"{stats} {name}: float32 is {error:.2e} from float64"


@pytest.mark.parametrize("stats", ["all_steps", "per_step", "per_window"])
def test_batch_norm_backward_passes_gradcheck(stats):
    norm = TimeBatchNorm(3, stats=stats, max_steps=4).double()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.7, 1.3, -0.4]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: torch.func.functional_call(norm, {"weight": w, "bias": b}, (x,)),
                                    (x, norm.weight, norm.bias))


def test_running_statistics_follow_batchnorm1d_and_drive_evaluation():
    norm, reference = TimeBatchNorm(4, momentum=0.3), torch.nn.BatchNorm1d(4, momentum=0.3).double()
    norm.double()
    for seed in range(3):
        x = hidden_states(6, 5, 4, seed=seed)
        assert torch.allclose(norm(x), reference(x.reshape(30, 4)).view(6, 5, 4), atol=1e-12)
    assert torch.allclose(norm.running_mean[0], reference.running_mean, atol=1e-14)
    assert torch.allclose(norm.running_var[0], reference.running_var, atol=1e-14)
    norm.eval(), reference.eval()
    x = hidden_states(6, 5, 4, seed=9)
    assert torch.allclose(norm(x), reference(x.reshape(30, 4)).view(6, 5, 4), atol=1e-12)


def test_per_window_statistics_restart_at_every_window():
    # The CVPR char-PTB code: row = position in the window, whatever the absolute step.
    per_window = TimeBatchNorm(2, stats="per_window", max_steps=3, momentum=1.0).double()
    per_step = TimeBatchNorm(2, stats="per_step", max_steps=6, momentum=1.0).double()
    first, second = hidden_states(3, 4, 2, seed=0), hidden_states(3, 4, 2, seed=1)
    per_window(first, step=0), per_window(second, step=3)   # the second window overwrites rows 0-2
    per_step(first, step=0), per_step(second, step=3)       # the second window fills rows 3-5
    assert torch.allclose(per_window.running_mean, per_step.running_mean[3:], atol=1e-14)
    assert torch.allclose(per_window.running_var, per_step.running_var[3:], atol=1e-14)
    per_window.eval()
    longer = hidden_states(5, 4, 2, seed=2)   # positions 3 and 4 reuse the last row
    rows = torch.tensor([0, 1, 2, 2, 2])
    expected = (longer - per_window.running_mean[rows].unsqueeze(1)) / torch.sqrt(
        per_window.running_var[rows].unsqueeze(1) + per_window.eps)
    assert torch.allclose(per_window(longer, step=40), expected, atol=1e-12)


def test_indrnn_per_window_batch_norm_restarts_with_a_carried_state():
    torch.manual_seed(0)
    kwargs = dict(u_bound=1.0, bound_steps=4, batch_norm="before")
    layer = IndRNN(3, 5, batch_norm_stats="per_window", **kwargs).double().eval()
    absolute = IndRNN(3, 5, batch_norm_stats="per_step", **kwargs).double().eval()
    with torch.no_grad():
        layer.norm_before.running_mean.copy_(torch.randn(4, 5))  # four distinct rows
    absolute.load_state_dict(layer.state_dict())
    x = torch.randn(8, 2, 3, dtype=torch.float64)
    _, state = layer(x[:4])
    assert isinstance(state, torch.Tensor)          # h only: the window position is not carried
    second, _ = layer(x[4:], state)
    # Rows 0-3 again, as a sequence that starts at the second window with the carried h ...
    restarted, _ = absolute(x[4:], IndRNNState(state, None, 0))
    assert torch.allclose(second, restarted, atol=1e-12)
    # ... where per-step statistics go on from the absolute step 4 (capped: row 3 for every step).
    continued, _ = absolute(x[4:], IndRNNState(state, None, 4))
    assert not torch.allclose(second, continued)


def test_per_window_needs_max_steps():
    with pytest.raises(ValueError, match="per-window batch norm needs max_steps"):
        TimeBatchNorm(2, stats="per_window")


@pytest.mark.parametrize("stats", ["all_steps", "per_step"])
def test_half_precision_inputs_are_normalised_in_float32(stats):
    half, single = TimeBatchNorm(6, stats=stats, max_steps=50), TimeBatchNorm(6, stats=stats, max_steps=50)
    x = hidden_states(50, 8, 6).to(torch.bfloat16).requires_grad_()
    output, reference = half(x), single(x.detach().float())
    assert output.dtype == torch.bfloat16
    assert torch.equal(output, reference.to(torch.bfloat16))  # float32 throughout, rounded once at the end
    assert torch.equal(half.running_mean, single.running_mean) and torch.equal(half.running_var, single.running_var)
    output.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
