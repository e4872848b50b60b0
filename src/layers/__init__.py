"""Recurrent layers, each following torch.nn.RNN's contract: ``forward(input, hx=None) -> (output, h_n)``.

Elman (``torch.nn.RNN``), LSTM and GRU are torch's own fused modules; the layers here add the
architectures torch lacks.
"""
from src.layers.batch_norm import TimeBatchNorm
from src.layers.bidirectional import Bidirectional
from src.layers.clockwork import ClockworkRNN
from src.layers.common import apply_constraints
from src.layers.indrnn import IndRNN, IndRNNRecurrence
from src.layers.irnn import IRNN
from src.layers.jordan import JordanRNN
from src.layers.leaky import LeakyRNN
from src.layers.narx import NARX
from src.layers.skip import SkipRNN
from src.layers.tdnn import TDNN

__all__ = ["NARX", "TDNN", "Bidirectional", "ClockworkRNN", "IRNN", "IndRNN", "IndRNNRecurrence", "JordanRNN",
           "LeakyRNN", "SkipRNN", "TimeBatchNorm", "apply_constraints"]
