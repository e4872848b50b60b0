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

__all__ = ["Bidirectional", "ClockworkRNN", "IRNN", "IndRNN", "IndRNNRecurrence", "TimeBatchNorm", "apply_constraints"]
