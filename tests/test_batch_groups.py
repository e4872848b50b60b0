"""Test-time augmentation in the batch contract: ``SequenceBatch.groups`` marks samplings of one
example, and :func:`src.batch.average_samplings` makes one prediction per example, as averaging a
(B, K, ...) stack of the samplings over K would."""
import pytest
import torch

from src.batch import SequenceBatch, average_samplings, repeat_samplings


def test_repeat_samplings_numbers_adjacent_samplings():
    assert repeat_samplings(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert repeat_samplings(2, 1).dtype == torch.int64


@pytest.mark.parametrize("shape", [(5,), (7, 5)])  # logits (C,) per sequence, or per-step outputs (T, O)
def test_average_equals_the_mean_over_a_stack_of_samplings(shape):
    examples, samplings = 4, 3
    generator = torch.Generator().manual_seed(0)
    stacked = torch.randn(examples, samplings, *shape, generator=generator, dtype=torch.float64)  # (B, K, ...)
    targets = torch.randint(0, 5, (examples,), generator=generator)
    lengths = torch.tensor([7, 3, 5, 1])
    batch = SequenceBatch(torch.zeros(examples * samplings, 7, 2), targets.repeat_interleave(samplings),
                          lengths=lengths.repeat_interleave(samplings), groups=repeat_samplings(examples, samplings))
    predictions, grouped_targets, grouped_lengths = average_samplings(stacked.flatten(0, 1), batch)
    torch.testing.assert_close(predictions, stacked.mean(dim=1))
    assert torch.equal(grouped_targets, targets) and torch.equal(grouped_lengths, lengths)


def test_groups_of_different_sizes_and_no_groups():
    values = torch.tensor([[1.0], [3.0], [10.0], [4.0], [5.0], [6.0]])
    batch = SequenceBatch(torch.zeros(6, 2, 1), torch.tensor([7, 7, 8, 9, 9, 9]), groups=torch.tensor([0, 0, 1, 2, 2, 2]))
    predictions, targets, lengths = average_samplings(values, batch)
    assert predictions.flatten().tolist() == [2.0, 10.0, 5.0] and targets.tolist() == [7, 8, 9] and lengths is None
    plain = batch._replace(groups=None)
    assert all(a is b for a, b in zip(average_samplings(values, plain), (values, plain.targets, None)))


def test_groups_that_skip_an_id_are_one_line():
    batch = SequenceBatch(torch.zeros(3, 2, 1), torch.zeros(3, dtype=torch.long), groups=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match=r"^batch.groups must number the examples 0, 1, \.\.\., G - 1 in order"):
        average_samplings(torch.zeros(3, 4), batch)
