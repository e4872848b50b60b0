"""Networks: the plain stack of any recurrent layer, and the residual and dense IndRNNs."""
from src.networks.base import READOUTS, RecurrentNetwork, SequenceNetwork, TimeSharedDropout
from src.networks.dense import DenseIndRNN
from src.networks.residual import ResidualIndRNN

__all__ = ["READOUTS", "DenseIndRNN", "RecurrentNetwork", "ResidualIndRNN", "SequenceNetwork", "TimeSharedDropout"]
