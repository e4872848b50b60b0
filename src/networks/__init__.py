"""Networks: the plain stack of any recurrent layer, the residual and dense IndRNNs, and the encoder-decoder."""
from src.networks.base import READOUTS, RecurrentNetwork, SequenceNetwork, TimeSharedDropout
from src.networks.dense import DenseIndRNN
from src.networks.residual import ResidualIndRNN
from src.networks.seq2seq import EncoderDecoder

__all__ = ["READOUTS", "DenseIndRNN", "EncoderDecoder", "RecurrentNetwork", "ResidualIndRNN", "SequenceNetwork",
           "TimeSharedDropout"]
