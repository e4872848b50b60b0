"""The objectives on their own: classification learns, schedulers and gradient clipping plug in,
padded variable-length batches score exactly as the sequences one by one, test-time samplings
(``SequenceBatch.groups``) are averaged per example, and each objective rejects a network whose
readout or direction does not suit it."""
import functools

import pytest
import pytorch_lightning as pl
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from datamodules.splits import collate_sequences
from lightning_modules.base import clip_gradient_norm_
from lightning_modules.callbacks import PlateauReloadBest
from lightning_modules.classification import SequenceClassificationModule
from lightning_modules.labelling import SequenceLabellingModule
from lightning_modules.regression import SequenceRegressionModule
from lightning_modules.seq2seq import EncoderDecoderModule
from src.batch import SequenceBatch
from src.networks import EncoderDecoder, RecurrentNetwork


def sign_of_first_step(samples=256, steps=12, seed=0):
    """Class = whether the first input is positive: the answer must be carried over every step."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, steps, 1, generator=generator)
    return TensorDataset(inputs, (inputs[:, 0, 0] > 0).long())


def fit(module, dataset, **trainer_kwargs):
    loader = DataLoader(dataset, batch_size=32, shuffle=True)
    trainer = make_trainer(**trainer_kwargs)
    trainer.fit(module, loader, loader)
    return trainer


def make_trainer(**kwargs):
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


def gru(output_size=2, readout="last", **kwargs):
    return RecurrentNetwork(torch.nn.GRU, input_size=1, output_size=output_size, hidden_size=8, readout=readout,
                            **kwargs)


@pytest.mark.slow  # 3-7 s (loaded): make test-slow, which CI runs too
def test_classification_learns_and_tracks_the_best_accuracy():
    pl.seed_everything(0)
    network = RecurrentNetwork(torch.nn.GRU, input_size=1, output_size=2, hidden_size=16)
    module = SequenceClassificationModule(network, functools.partial(torch.optim.Adam, lr=0.02), num_classes=2,
                                          monitor="val/acc")
    trainer = fit(module, sign_of_first_step(), max_epochs=30)
    accuracy = float(trainer.callback_metrics["val/acc"])
    assert accuracy > 0.9
    assert float(trainer.callback_metrics["val/acc_best"]) >= accuracy


class GradientSpy(pl.Callback):
    """Largest |gradient| before Lightning clips it and when the optimizer applies it, per step."""

    def __init__(self):
        self.before_clipping, self.applied = [], []

    def on_train_start(self, trainer, pl_module):
        largest = lambda: max(p.grad.abs().max().item() for p in pl_module.parameters() if p.grad is not None)
        # Lightning hands the optimizer a closure (forward, backward, clipping): its gradients exist
        # only after step() ran it, and stay until the next step zeroes them.
        trainer.optimizers[0].register_step_post_hook(lambda *_: self.applied.append(largest()))
        self.largest = largest

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before_clipping.append(self.largest())


class LearningRateAtValidation(pl.Callback):
    """Per validation: whether it improved the run's best, and the learning rate after the schedule acted."""

    def __init__(self, plateau):
        self.plateau, self.seen = plateau, []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.seen.append((self.plateau.improved, trainer.optimizers[0].param_groups[0]["lr"]))


def test_plateau_schedule_and_value_clipping():
    pl.seed_everything(0)
    network = RecurrentNetwork(torch.nn.RNN, input_size=1, output_size=1, hidden_size=8)
    module = SequenceRegressionModule(network, functools.partial(torch.optim.SGD, lr=0.1), monitor="val/mse")
    dataset = sign_of_first_step(samples=64)
    regression = TensorDataset(dataset.tensors[0], dataset.tensors[1].float().unsqueeze(1))
    # scheduler=plateau's settings with patience 0: every validation without a new best halves the LR.
    # mode "max" on a falling MSE makes most validations bad ones, so the schedule acts within 6 epochs.
    plateau = PlateauReloadBest("val/mse", mode="max", factor=0.5, patience=0, shrink_patience=False,
                                reload_best=False, stop_below_min_lr=False)
    spy, rates = GradientSpy(), LearningRateAtValidation(plateau)
    trainer = fit(module, regression, max_epochs=6, gradient_clip_val=0.01, gradient_clip_algorithm="value",
                  callbacks=[plateau, spy, rates])
    assert len(rates.seen) == 6 and rates.seen[0][0], "the first validation is the first best"
    expected = 0.1
    for improved, rate in rates.seen:
        expected *= 1.0 if improved else 0.5
        assert rate == pytest.approx(expected)
    assert any(not improved for improved, _ in rates.seen), "no plateau in 6 epochs: the test proves nothing"
    # One best: the objective, the logged val/mse_best and the schedule read the same value.
    assert module.best_value == float(trainer.callback_metrics["val/mse_best"]) == plateau.best["val/mse"]
    assert len(spy.applied) == len(spy.before_clipping) == 6 * 2  # 64 samples, batches of 32
    assert max(spy.before_clipping) > 0.01, "the gradients were large enough to need clipping"
    assert max(spy.applied) <= 0.01 + 1e-9, "every gradient the optimizer applied was clipped to [-0.01, 0.01]"


@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])  # below, near and far above the limit
def test_norm_clipping_is_bitwise_torchs(scale):
    generator = torch.Generator().manual_seed(1)
    shapes = [(8, 2), (8,), (8, 8), (1, 8), (1,)]
    reference = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    ours = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    for index, (a, b) in enumerate(zip(reference, ours)):
        if index != 3:  # one parameter without a gradient (frozen or unused)
            a.grad = torch.randn(a.shape, generator=generator) * scale
            b.grad = a.grad.clone()
    torch.nn.utils.clip_grad_norm_(reference, 0.7)
    clip_gradient_norm_(ours, 0.7)
    assert ours[3].grad is None
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(reference, ours) if a.grad is not None)
    if scale == 50.0:  # the clipping acted: the total norm is now the limit
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ours if p.grad is not None]))
        assert float(total) == pytest.approx(0.7, rel=1e-5)


class LightningClipping(SequenceRegressionModule):
    """The same objective with Lightning's own gradient clipping (torch's clip_grad_norm_)."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        pl.LightningModule.configure_gradient_clipping(self, optimizer, gradient_clip_val, gradient_clip_algorithm)


def test_norm_clipping_trains_exactly_as_lightnings():
    """trainer.gradient_clip_val by norm: the objective's clipping gives the weights Lightning's gives."""
    dataset = sign_of_first_step(samples=64)
    regression = TensorDataset(dataset.tensors[0], dataset.tensors[1].float().unsqueeze(1))
    weights = []
    for module_class in (SequenceRegressionModule, LightningClipping):
        pl.seed_everything(0)
        network = RecurrentNetwork(torch.nn.RNN, input_size=1, output_size=1, hidden_size=8)
        module = module_class(network, functools.partial(torch.optim.SGD, lr=0.5), monitor="val/mse")
        spy = GradientSpy()
        fit(module, regression, max_epochs=2, gradient_clip_val=0.05, callbacks=[spy])
        assert max(spy.before_clipping) > 0.05, "the gradients were large enough to need clipping"
        weights.append([p.detach().clone() for p in module.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_torch_reduce_on_plateau_is_refused_in_one_line():
    network = RecurrentNetwork(torch.nn.RNN, input_size=1, output_size=1, hidden_size=8)
    module = SequenceRegressionModule(network, functools.partial(torch.optim.SGD, lr=0.1), monitor="val/mse",
                                      scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau)
    with pytest.raises(ValueError, match="the plateau schedule is the callback .*use scheduler=plateau"):
        module.configure_optimizers()


# Variable-length sequences padded on the right -------------------------------------------------

class VariableLengths(Dataset):
    """Sequences of 3 to 9 steps: inputs (T_i, 1); targets per sequence (label or value) or per step."""

    def __init__(self, kind: str, count: int = 10, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, 10, (count,), generator=generator)
        self.inputs = [torch.randn(int(t), 1, generator=generator) for t in lengths]
        self.kind = kind

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        x = self.inputs[index]
        if self.kind == "label":
            return x, (x.sum() > 0).long()
        if self.kind == "value":
            return x, x.sum(dim=0)
        return x, (x[:, 0].cumsum(0) > 0).long()  # a label per step


@pytest.mark.parametrize("readout", ["last", "mean"])
def test_padded_batch_reads_each_sequence_at_its_own_last_step(readout):
    torch.manual_seed(0)
    dataset = VariableLengths("value")
    batch = collate_sequences([dataset[i] for i in range(len(dataset))])
    assert isinstance(batch, SequenceBatch) and batch.inputs.shape == (10, int(batch.lengths.max()), 1)
    assert len(set(batch.lengths.tolist())) > 1
    module = SequenceRegressionModule(gru(output_size=1, readout=readout), torch.optim.Adam).eval()
    with torch.no_grad():
        padded = module(batch.inputs, batch.lengths)
        one_by_one = torch.cat([module(x[None]) for x, _ in dataset])
        ignored = module(batch.inputs, None)  # without lengths the padding would be read
    torch.testing.assert_close(padded, one_by_one)
    assert not torch.allclose(ignored, one_by_one)


def validate(module, dataset, batch_size):
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_sequences)
    return make_trainer().validate(module, loader, verbose=False)[0]


@pytest.mark.parametrize("kind, make", [
    ("label", lambda: SequenceClassificationModule(gru(), torch.optim.Adam, num_classes=2)),
    ("value", lambda: SequenceRegressionModule(gru(output_size=1), torch.optim.Adam)),
])
def test_padded_batches_score_as_the_sequences_one_by_one(kind, make):
    torch.manual_seed(0)
    module, dataset = make(), VariableLengths(kind, count=12)
    padded, one_by_one = validate(module, dataset, batch_size=6), validate(module, dataset, batch_size=1)
    assert padded.keys() == one_by_one.keys() and len(padded) >= 2
    for key in padded:
        assert padded[key] == pytest.approx(one_by_one[key], rel=1e-5), key


def test_labelling_leaves_padded_steps_out_of_loss_and_accuracy():
    torch.manual_seed(0)
    module = SequenceLabellingModule(gru(readout="all"), torch.optim.Adam, num_classes=2).eval()
    dataset = VariableLengths("steps", count=12)
    with torch.no_grad():
        logits = torch.cat([module(x[None])[0] for x, _ in dataset])  # (sum of T_i, 2)
    labels = torch.cat([y for _, y in dataset])
    expected_loss = F.cross_entropy(logits, labels).item()
    expected_accuracy = (logits.argmax(-1) == labels).float().mean().item()
    metrics = validate(module, dataset, batch_size=12)  # one batch: its loss is the mean over its steps
    assert metrics["val/loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["val/acc"] == pytest.approx(expected_accuracy)
    # Padded steps with labels that would count: the result must not move.
    batch = collate_sequences([dataset[i] for i in range(len(dataset))])
    poisoned = batch.targets.masked_fill(~torch.arange(batch.inputs.shape[1]).lt(batch.lengths[:, None]), 1)
    with torch.no_grad():
        predictions, targets = module.valid_steps(module(batch.inputs, batch.lengths), poisoned, batch.lengths)
    assert module.loss(predictions, targets).item() == pytest.approx(expected_loss, rel=1e-5)


# Test-time augmentation: groups of samplings ---------------------------------------------------------

@pytest.mark.parametrize("make, target", [
    (lambda: SequenceClassificationModule(gru(output_size=3), torch.optim.Adam, num_classes=3),
     lambda g, b: torch.randint(0, 3, (b,), generator=g)),
    (lambda: SequenceRegressionModule(gru(output_size=2, readout="mean"), torch.optim.Adam),
     lambda g, b: torch.randn(b, 2, generator=g)),
    (lambda: SequenceLabellingModule(gru(output_size=3, readout="all"), torch.optim.Adam, num_classes=3),
     lambda g, b: torch.randint(0, 3, (b, 6), generator=g)),
], ids=["classification", "regression", "labelling"])
def test_objectives_average_the_samplings_of_each_example(make, target):
    """Loss and metric of a batch of B x K samplings with groups equal those of the K-averaged
    predictions (the old (B, K, T, I) path) against the B examples' targets."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    module, examples, samplings = make().eval(), 4, 3
    stacked = 4 * torch.randn(examples, samplings, 6, 1, generator=generator)    # (B, K, T, I)
    targets = target(generator, examples)
    batch = SequenceBatch(stacked.flatten(0, 1), targets.repeat_interleave(samplings, dim=0),
                          groups=torch.arange(examples).repeat_interleave(samplings))
    with torch.no_grad():
        per_sampling = module(stacked.flatten(0, 1))
        averaged = per_sampling.view(examples, samplings, *per_sampling.shape[1:]).mean(dim=1)
    expected_metric = module.make_metric()
    expected_metric(averaged, targets)
    loader = DataLoader([batch], batch_size=None)
    metrics = make_trainer().test(module, loader, verbose=False)[0]
    name = f"test/{module.metric_name}"
    assert metrics["test/loss"] == pytest.approx(module.loss(averaged, targets).item(), rel=1e-5)
    assert metrics[name] == pytest.approx(expected_metric.compute().item(), rel=1e-5)
    # Scoring the samplings one by one gives another loss: what was measured is the averaging.
    assert module.loss(per_sampling, batch.targets).item() != pytest.approx(metrics["test/loss"], rel=1e-4)


# Each objective checks its network ----------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: SequenceClassificationModule(gru(readout="all"), torch.optim.Adam, num_classes=2),
     "sequence classification: one label per sequence, so task.readout must be 'last' or 'mean', not 'all'"),
    (lambda: SequenceRegressionModule(gru(output_size=1, readout="all"), torch.optim.Adam),
     "sequence regression: one target per sequence, so task.readout must be 'last' or 'mean', not 'all'"),
    (lambda: SequenceRegressionModule(gru(output_size=1, readout="mean"), torch.optim.Adam, per_step_targets=True),
     "sequence regression: a target at every step needs task.readout=all, not 'mean'"),
    (lambda: SequenceLabellingModule(gru(readout="last"), torch.optim.Adam, num_classes=2),
     "sequence labelling: a label at every step needs task.readout=all, not 'last'"),
    (lambda: SequenceLabellingModule(gru(readout="all", bidirectional=True), torch.optim.Adam, num_classes=2,
                                     causal=True),
     "the task is causal (task.causal=true): it predicts each step from the past only, but a bidirectional "
     "model sees the future"),
    (lambda: SequenceClassificationModule(
        RecurrentNetwork(functools.partial(torch.nn.GRU, bidirectional=True), input_size=1, output_size=2,
                         hidden_size=4), torch.optim.Adam, num_classes=2, causal=True),
     "the task is causal"),
], ids=["classification-all", "regression-all", "per-step-regression-mean", "labelling-last",
        "causal-bidirectional-wrapper", "causal-bidirectional-gru"])
def test_objective_rejects_an_unsuitable_network_in_one_line(make, message):
    with pytest.raises(ValueError) as error:
        make()
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert "set model.bidirectional=false" in str(error.value) or "causal" not in message


def test_bidirectional_network_is_fine_on_a_non_causal_task():
    module = SequenceClassificationModule(gru(bidirectional=True), torch.optim.Adam, num_classes=2)
    assert module(torch.randn(3, 5, 1)).shape == (3, 2)


def test_encoder_decoder_objective_checks_encoder_and_decoder():
    def network(readout, bidirectional=False, input_size=8, output_size=11):
        return RecurrentNetwork(torch.nn.GRU, input_size=input_size, output_size=output_size, hidden_size=8,
                                readout=readout, bidirectional=bidirectional)

    encoder = network("last", bidirectional=True, output_size=8)
    net = EncoderDecoder(encoder=encoder, decoder=network("all", input_size=16), vocab_size=11, embedding_size=8,
                         context_size=8)
    EncoderDecoderModule(net, torch.optim.Adam)  # a bidirectional encoder reads the whole source: fine
    with pytest.raises(ValueError, match="the task is causal"):
        EncoderDecoderModule(net, torch.optim.Adam, causal=True)
    net.decoder = network("all", bidirectional=True, input_size=16)
    with pytest.raises(ValueError, match="the decoder is teacher-forced .* a bidirectional model sees the future"):
        EncoderDecoderModule(net, torch.optim.Adam)
    net.decoder, net.encoder.readout = network("all", input_size=16), "all"
    with pytest.raises(ValueError, match="task.readout is the encoder's summary of the source"):
        EncoderDecoderModule(net, torch.optim.Adam)
