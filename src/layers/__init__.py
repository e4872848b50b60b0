"""Recurrent layers, each keeping the state contract (:mod:`src.state`): ``forward(input, state=None)
-> (output, state)``, where the returned state holds everything needed to continue the sequence, so
one call over T steps equals chunks of any length with the state passed back.

States: IndRNN, IRNN, Leaky, the diagonal leaky unit, Jordan and torch.nn.RNN/GRU a tensor (1, B, H) (torch.nn.RNN's hx, also
accepted positionally); LSTM (h, c); IndRNN with a conv1d projection or per-step batch norm an
:class:`IndRNNState` (h, last inputs, step); Clockwork a :class:`ClockworkState` (h, step); SkipRNN the
last max(delays) states (D, B, H); TDNN the last receptive_field - 1 inputs; NARX (y_past, x_past).
Every tensor of a state has the streams at dim 1 and a step counter is an int or a (B,) int64 tensor, one
step per stream; each layer defines ``initial_state(batch_size, like=None)``, and :func:`src.state.reset_streams`
restarts single streams of any of them. :class:`Bidirectional` wraps any of them and refuses a carried state.
Elman (``torch.nn.RNN``), LSTM and GRU are torch's own fused modules; the layers here add the architectures
torch lacks.
"""
from src.layers.batch_norm import TimeBatchNorm
from src.layers.bidirectional import Bidirectional
from src.layers.clockwork import ClockworkRNN, ClockworkState
from src.layers.common import apply_constraints
from src.layers.cornn import CoRNN
from src.layers.diagonal_leaky import DiagonalLeakyRNN
from src.layers.indrnn import IndRNN, IndRNNRecurrence, IndRNNState
from src.layers.irnn import IRNN
from src.layers.jordan import JordanRNN
from src.layers.leaky import LeakyRNN
from src.layers.lem import LEM
from src.layers.narx import NARX
from src.layers.skip import SkipRNN
from src.layers.tdnn import TDNN
from src.layers.unicornn import UnICORNN

__all__ = ["LEM", "NARX", "TDNN", "Bidirectional", "ClockworkRNN", "ClockworkState", "CoRNN", "DiagonalLeakyRNN", "IRNN", "IndRNN",
           "IndRNNRecurrence", "IndRNNState", "JordanRNN", "LeakyRNN", "SkipRNN", "TimeBatchNorm", "UnICORNN",
           "apply_constraints"]
