"""Encoder-decoder (asynchronous sequence -> sequence): the reverse/sort data, teacher forcing that never
reads ahead, greedy decoding, sequence accuracy, and reversal learnt through train.py and re-scored by eval.py."""
import functools
import json

import pytest
import torch

from datamodules.transduction import EOS, FIRST_SYMBOL, PAD, TransductionDataModule, TransductionDataset
from hydra.utils import instantiate

from lightning_modules.run import UserError, train
from lightning_modules.seq2seq import EncoderDecoderModule, SequenceAccuracy
from src.layers.bidirectional import Bidirectional
from src.networks import EncoderDecoder, RecurrentNetwork
from tests.conftest import compose_train, run_script

QUICK_SEQ2SEQ = ["task.seq_len=4", "task.datamodule.train_size=16", "task.datamodule.val_size=8",
                 "task.datamodule.test_size=8", "task.datamodule.batch_size=8", "task.network.context_size=16", "task.network.embedding_size=8", "trainer=cpu",
                 "trainer.enable_model_summary=false", "callbacks.progress_bar.refresh_rate=0"]


@pytest.mark.parametrize("transform", ["reverse", "sort"])
def test_transduction_layout(transform):
    dataset = TransductionDataset(min_len=2, max_len=7, num_symbols=5, transform=transform, size=200, seed=3)
    lengths = set()
    for index in range(len(dataset)):
        source, target = dataset[index]
        assert source.shape == (7,) and target.shape == (8,)
        assert source.dtype == target.dtype == torch.int64
        symbols = source[source != PAD]
        length = len(symbols)
        lengths.add(length)
        assert (source[:7 - length] == PAD).all(), "sources are left-padded"
        assert ((symbols >= FIRST_SYMBOL) & (symbols < FIRST_SYMBOL + 5)).all()
        expected = symbols.flip(0) if transform == "reverse" else symbols.sort().values
        assert torch.equal(target[:length], expected)
        assert target[length] == EOS and (target[length + 1:] == PAD).all()
    assert lengths == set(range(2, 8))


def test_transduction_is_deterministic_and_split_dependent():
    first, second = TransductionDataModule(seed=5, max_len=6), TransductionDataModule(seed=5, max_len=6)
    for index in range(10):
        assert all(torch.equal(a, b) for a, b in zip(first.splits["val"][index], second.splits["val"][index]))
    assert not torch.equal(first.splits["train"][0][0], first.splits["val"][0][0])
    assert first.vocab_size == 8 + 3


@pytest.mark.parametrize("kwargs, message", [
    ({"transform": "shuffle"}, "unknown transform 'shuffle'"),
    ({"min_len": 5, "max_len": 3}, "min_len \\(5\\) must not exceed max_len \\(3\\)"),
    ({"num_symbols": 1}, "num_symbols must be an integer >= 2"),
    ({"max_len": 0}, "max_len must be a positive integer"),
])
def test_transduction_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransductionDataModule(**kwargs)


def test_sequence_accuracy_needs_the_end_token_in_place():
    metric = SequenceAccuracy(pad_id=PAD)
    target = torch.tensor([[5, 4, EOS, PAD], [5, 4, EOS, PAD], [5, 4, EOS, PAD], [3, EOS, PAD, PAD]])
    preds = torch.tensor([[5, 4, EOS, PAD],    # exact
                          [5, 4, 6, EOS],      # runs on past the end
                          [5, EOS, PAD, PAD],  # stops early
                          [3, EOS, 7, 7]])     # anything after the end is not scored
    metric.update(preds, target)
    assert metric.compute().item() == pytest.approx(0.5)


def small(model: str) -> list[str]:
    """Overrides choosing ``model`` at a test-sized width."""
    return [f"model={model}", "model.growth_rate=4" if model == "dense_indrnn" else "model.hidden_size=16"]


def make_objective(model_overrides=(), tmp_path=None, model="gru", task="reverse"):
    """The encoder-decoder objective around the network as the run driver builds it: the model config as
    a factory (``_partial_``) handed to EncoderDecoder, which builds its own encoder and causal decoder;
    the objective holds the token embeddings."""
    cfg = compose_train(tmp_path / "run", [f"task={task}", *small(model), *QUICK_SEQ2SEQ, *model_overrides])
    node = cfg.task.network
    return EncoderDecoderModule(instantiate(node, model=instantiate(cfg.model, _partial_=True)), torch.optim.Adam)


def rerun_prefix_decoding(module, source, max_length):
    """The earlier greedy decoding: re-run the decoder over the whole prefix at every step, O(L^2)."""
    net = module.net
    context = net.encode(module.source_embedding(source))
    tokens = source.new_full((source.shape[0], max_length + 1), net.pad_id)
    tokens[:, 0] = net.bos_id
    finished = torch.zeros(source.shape[0], dtype=torch.bool)
    for step in range(max_length):
        logits = net.decode(context, module.target_embedding(tokens[:, :step + 1]))[0]
        next_token = logits[:, -1].argmax(dim=-1).masked_fill(finished, net.pad_id)
        tokens[:, step + 1] = next_token
        finished |= next_token == net.eos_id
        if bool(finished.all()):
            break
    return tokens[:, 1:]


@pytest.mark.parametrize("model", ["gru", "indrnn", "cwrnn", "tdnn", "narx"])
def test_teacher_forcing_never_reads_ahead(tmp_path, model):
    torch.manual_seed(0)
    module = make_objective(tmp_path=tmp_path, model=model).eval()
    source = torch.randint(FIRST_SYMBOL, 11, (3, 4))
    target = torch.randint(FIRST_SYMBOL, 11, (3, 5))
    logits = module(source, target)
    assert logits.shape == (3, 5, 11) and module.net.encode(module.source_embedding(source)).shape == (3, 16)
    changed = target.clone()
    changed[:, 2] = (changed[:, 2] - FIRST_SYMBOL + 1) % 8 + FIRST_SYMBOL
    logits_changed = module(source, changed)
    # logits[:, j] predicts target[:, j] from target[:, :j]: a change at j=2 shows from step 3 on only.
    torch.testing.assert_close(logits_changed[:, :3], logits[:, :3], rtol=0, atol=0)
    assert not torch.allclose(logits_changed[:, 3], logits[:, 3])


@pytest.mark.parametrize("model", ["gru", "lstm", "indrnn", "cwrnn", "tdnn", "jordan", "narx", "skip_rnn", "leaky_rnn",
                                   "res_indrnn"])
def test_greedy_decoding_feeds_back_its_own_argmax(tmp_path, model):
    """generate() steps the decoder with its carried state: the same tokens as re-running the prefix,
    each the argmax of the teacher-forced logits given the tokens before it."""
    torch.manual_seed(1)
    module = make_objective(tmp_path=tmp_path, model=model).eval()
    # A large EOS bias makes some sequences end early, to check the padding after the end.
    with torch.no_grad():
        module.net.decoder.head.bias[EOS] += 0.3
    source = torch.randint(FIRST_SYMBOL, 11, (16, 4))
    tokens = module.generate(source, max_length=6)
    assert tokens.shape == (16, 6)
    assert torch.equal(tokens, rerun_prefix_decoding(module, source, 6))
    logits = module(source, tokens)
    for row, predicted in zip(tokens, logits.argmax(dim=-1)):
        ends = (row == EOS).nonzero()
        stop = int(ends[0]) + 1 if len(ends) else len(row)
        assert torch.equal(row[:stop], predicted[:stop]), "each token is the argmax given the tokens before it"
        assert (row[stop:] == PAD).all(), "nothing but padding after the end token"


@pytest.mark.parametrize("model, flag", [("gru", "model.bidirectional=true"), ("indrnn", "model.bidirectional=true"),
                                         ("indrnn", "model.layer.bidirectional=true")])
def test_bidirectional_model_gives_a_bidirectional_encoder_and_a_causal_decoder(tmp_path, model, flag):
    module = make_objective([flag], tmp_path=tmp_path, model=model)
    net = module.net
    assert all(isinstance(layer, Bidirectional) for layer in net.encoder.layers)
    assert not any(isinstance(m, Bidirectional) or getattr(m, "bidirectional", False) for m in net.decoder.modules())
    assert (net.encoder.readout, net.decoder.readout) == ("last", "all")
    assert net.encoder.head.out_features == 16 and net.decoder.head.out_features == 11  # context_size, vocab
    assert net.decoder.layers[0].input_size == 8 + 16  # embedding + context
    tokens = module.eval().generate(torch.randint(FIRST_SYMBOL, 11, (3, 4)), max_length=5)  # the decoder steps
    assert tokens.shape == (3, 5)


def test_bad_encoder_decoder_settings_are_rejected(tmp_path):
    gru = lambda readout: RecurrentNetwork(torch.nn.GRU, input_size=8, output_size=11, hidden_size=8, readout=readout)
    with pytest.raises(ValueError, match="the encoder must summarise the source"):
        EncoderDecoder(encoder=gru("all"), decoder=gru("all"), vocab_size=11, embedding_size=8)
    with pytest.raises(ValueError, match="the encoder must summarise the source"):
        EncoderDecoder(functools.partial(RecurrentNetwork, torch.nn.GRU, readout="all"), vocab_size=11)
    with pytest.raises(ValueError, match="the decoder must predict every step"):
        EncoderDecoder(encoder=gru("last"), decoder=gru("last"), vocab_size=11, embedding_size=8)
    with pytest.raises(ValueError, match="eos_id=20 is not a token id"):
        EncoderDecoder(encoder=gru("last"), decoder=gru("all"), vocab_size=11, eos_id=20)
    with pytest.raises(ValueError, match="give either model .* or both encoder and decoder"):
        EncoderDecoder(encoder=gru("last"), vocab_size=11)
    with pytest.raises(ValueError, match="needs a src.networks.EncoderDecoder network"):
        EncoderDecoderModule(net=gru("last"), optimizer=torch.optim.Adam)
    with pytest.raises(UserError, match="encoder must summarise the source \\(readout 'last' or 'mean'\\)"):
        train(compose_train(tmp_path / "run", ["task=reverse", "task.readout=all", *QUICK_SEQ2SEQ]))
    with pytest.raises(UserError, match="reverse: num_symbols must be an integer >= 2, got 1"):
        train(compose_train(tmp_path / "run", ["task=reverse", "task.datamodule.num_symbols=1", *QUICK_SEQ2SEQ]))


@pytest.mark.slow  # a real training to exact-match reversal, then eval.py: about a minute on 2 cores
def test_gru_encoder_decoder_learns_reversal_and_eval_rescores_it(tmp_path):
    """Short sequences (1-5 symbols of 8), a few hundred steps: greedy decoding gets most of them exactly."""
    overrides = ["task=reverse", "model=gru", "task.seq_len=5", "task.datamodule.train_size=4096",
                 "task.datamodule.val_size=512", "task.datamodule.test_size=512", "task.max_epochs=12",
                 "optimizer.lr=0.003",
                 "trainer=cpu", "trainer.enable_model_summary=false", "callbacks.progress_bar.refresh_rate=0"]
    best = train(compose_train(tmp_path / "run", overrides))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    # Chance is 8^-L per sequence (under 3% averaged over L = 1..5).
    assert results["test/seq_acc"] > 0.9, results
    assert best == pytest.approx(results["val/seq_acc_best"])
    completed = run_script("eval.py", [f"ckpt_path={results['best_checkpoint']}", "trainer=cpu",
                                       f"paths.log_dir={tmp_path}"])
    assert completed.returncode == 0, completed.stderr[-3000:]
    (evaluation,) = tmp_path.glob("eval/*/*/results.json")
    assert json.loads(evaluation.read_text())["test/seq_acc"] == pytest.approx(results["test/seq_acc"])
