"""The objectives that carry a state across batches restart single streams through the state contract
(:func:`src.state.reset_streams`), right for every state format: a restarted stream continues as if it
started afresh, the others as if nothing happened. The language model's reset probability can act per
stream. Objectives with their own steps refuse test-time samplings (``SequenceBatch.groups``) in one line."""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_modules.language_model import LanguageModel
from lightning_modules.seq2seq import EncoderDecoderModule
from lightning_modules.stream_regression import StreamRegressionModule
from src.batch import SequenceBatch, repeat_samplings
from src.networks import EncoderDecoder, RecurrentNetwork
from src.state import state_tensors
from tests.conftest import CONF

# LSTM (h, c), Clockwork (h, phase counter), a TDNN's window of past inputs, IndRNN h.
MODELS = ["lstm", "cwrnn", "tdnn", "indrnn"]
SMALL = {"hidden_size": 8, "num_layers": 2}


def network(model: str, input_size: int, output_size: int) -> torch.nn.Module:
    """conf/model/<model>.yaml at a small size, readout "all", float64, evaluation mode."""
    cfg = OmegaConf.merge({"task": {"input_size": input_size, "output_size": output_size, "readout": "all",
                                    "seq_len": 12}},
                          {"model": OmegaConf.load(CONF / "model" / f"{model}.yaml")})
    for key, value in SMALL.items():
        if key in cfg.model and not (model == "cwrnn" and key == "hidden_size"):
            cfg.model[key] = value
    if "batch_norm" in cfg.model.get("layer", {}):
        cfg.model.layer.batch_norm = "none"
    torch.manual_seed(0)
    return instantiate(cfg.model).double().eval()


def assert_streams_restarted(outputs: torch.Tensor, whole: torch.Tensor, fresh: torch.Tensor,
                             restart: torch.Tensor) -> None:
    """outputs (B, T, O) of the second segment: rows with ``restart`` equal ``fresh`` (that segment run
    alone), the others the second half of ``whole`` (both segments in one pass)."""
    steps = outputs.shape[1]
    for row, restarted in enumerate(restart.tolist()):
        expected = fresh[row] if restarted else whole[row, -steps:]
        torch.testing.assert_close(outputs[row], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("model", MODELS)
def test_the_stream_objective_restarts_single_streams_of_any_state_format(model):
    module = StreamRegressionModule(network(model, 2, 1), torch.optim.Adam).double()
    generator = torch.Generator().manual_seed(1)
    first, second = torch.randn(3, 12, 2, generator=generator, dtype=torch.float64).split(6, dim=1)
    restart = torch.tensor([False, True, False])
    _, state = module.net(first)
    module.carried["val"] = state
    start = module._carried_state(SequenceBatch(second, torch.zeros(3, 6, 1), reset=restart), "val")
    outputs, _ = module.net(second, start)
    whole, _ = module.net(torch.cat([first, second], dim=1))
    assert_streams_restarted(outputs, whole, module.net(second)[0], restart)
    # A batch without reset flags holds new sequences: every stream starts afresh.
    assert module._carried_state(SequenceBatch(second, torch.zeros(3, 6, 1)), "val") is None


def language_model(model: str, **kwargs) -> LanguageModel:
    return LanguageModel(network(model, 8, 11), optimizer=None, vocab_size=11, embedding_size=8, **kwargs).double()


@pytest.mark.parametrize("model", ["lstm", "cwrnn"])
def test_the_language_model_restarts_the_streams_a_batch_resets(model):
    lm = language_model(model).eval()
    tokens = torch.randint(0, 11, (3, 12), generator=torch.Generator().manual_seed(2))
    restart = torch.tensor([True, False, True])
    _, lm.train_state = lm(tokens[:, :6])
    start = lm.training_state(SequenceBatch(tokens[:, 6:], tokens[:, 6:], reset=restart))
    outputs, _ = lm(tokens[:, 6:], start)
    assert_streams_restarted(outputs, lm(tokens)[0], lm(tokens[:, 6:])[0], restart)


def test_the_reset_probability_acts_on_single_streams_with_reset_per_stream():
    lm = language_model("lstm", reset_probability=0.25, reset_per_stream=True)
    streams = 8
    _, carried = lm(torch.randint(0, 11, (streams, 5), generator=torch.Generator().manual_seed(3)))
    lm.train_state = carried
    batch = SequenceBatch(torch.zeros(streams, 5, dtype=torch.long), torch.zeros(streams, 5, dtype=torch.long))
    torch.manual_seed(0)
    restarted = []
    for _ in range(200):
        hidden = state_tensors(lm.training_state(batch))[0]  # LSTM h of the first layer, (1, B, H)
        restarted.append((hidden == 0).all(dim=-1).flatten())  # a fresh LSTM state is zeros
    restarted = torch.stack(restarted)                          # (steps, B)
    assert 0.20 < restarted.double().mean() < 0.30               # binomial(1600, 0.25): sd 0.011
    per_step = restarted.sum(dim=1)
    assert ((per_step > 0) & (per_step < streams)).double().mean() > 0.8  # mostly some streams, not all or none
    official = language_model("lstm", reset_probability=0.25)
    official.train_state = carried
    starts = [official.training_state(batch) for _ in range(40)]
    assert all(start is None or start is carried for start in starts)  # the official rule: all streams or none
    assert any(start is None for start in starts) and any(start is carried for start in starts)


def grouped(batch: SequenceBatch) -> SequenceBatch:
    """``batch`` as two samplings of each of its B / 2 examples."""
    return batch._replace(groups=repeat_samplings(batch.inputs.shape[0] // 2, 2))


def encoder_decoder() -> EncoderDecoderModule:
    def gru(readout, input_size, output_size):
        return RecurrentNetwork(torch.nn.GRU, input_size=input_size, output_size=output_size, hidden_size=8,
                                readout=readout)
    net = EncoderDecoder(encoder=gru("last", 8, 8), decoder=gru("all", 16, 11), vocab_size=11, embedding_size=8,
                         context_size=8)
    return EncoderDecoderModule(net, torch.optim.Adam)


TOKENS = torch.randint(3, 11, (4, 6), generator=torch.Generator().manual_seed(4))
OBJECTIVES = {
    "StreamRegressionModule": (lambda: StreamRegressionModule(network("indrnn", 2, 1), torch.optim.Adam),
                               SequenceBatch(torch.randn(4, 6, 2, dtype=torch.float64), torch.zeros(4, 6, 1))),
    "LanguageModel": (lambda: language_model("lstm"), SequenceBatch(TOKENS, TOKENS)),
    "EncoderDecoderModule": (encoder_decoder, SequenceBatch(TOKENS, TOKENS)),
}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("stage", ["validation_step", "test_step"])
def test_objectives_with_their_own_steps_refuse_test_time_samplings(objective, stage):
    make, batch = OBJECTIVES[objective]
    module = make()
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    getattr(module.double() if objective == "StreamRegressionModule" else module, stage)(batch, 0)  # plain: fine
    with pytest.raises(ValueError) as refused:
        getattr(module, stage)(grouped(batch), 0)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{objective}: the batch has groups (test-time samplings")
    assert message.endswith("give it batches without groups (a DataModule without test samplings, test_samplings=1)")
