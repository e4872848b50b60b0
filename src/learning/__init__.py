"""Learning rules beyond backpropagation through time (pure PyTorch).

:class:`RTRL`: real-time recurrent learning, exact and online, for stacks of diagonal recurrent
layers (:class:`src.layers.IndRNN`, :class:`src.layers.DiagonalLeakyRNN`); see :mod:`src.learning.rtrl`.
"""
from src.learning.diagonal import diagonal_cell
from src.learning.rtrl import RTRL, RTRL_MODES

__all__ = ["RTRL", "RTRL_MODES", "diagonal_cell"]
