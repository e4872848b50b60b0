"""Learning rules: how an objective's network learns from a training batch.

An objective (``lightning_modules/<objective>.py``) owns the loss, the metrics, validation and test; its
``learning_rule`` owns the training step. Every objective takes every rule its network allows:

* :class:`BPTT` (``learning=bptt``, the default): one forward pass over the batch and one backward
  pass, by the objective's own :meth:`~lightning_modules.base.SequenceObjective.bptt_training_step`.
  With an objective that carries its state across batches (the stream objective, the language model)
  this is truncated BPTT: the state goes on, detached, and no gradient crosses a batch boundary.
* :class:`RealTimeRecurrentLearning` (``learning=rtrl``): exact (or layer-local) gradients computed
  forward in time, optimizer steps inside a sequence, memory independent of its length.

A rule is chosen by the ``learning`` config group (conf/learning/), which sets
``objective.learning_rule``. Adding a rule is one module here (a :class:`LearningRule` subclass) and
one config file.
"""
from lightning_modules.learning.base import LearningRule
from lightning_modules.learning.bptt import BPTT
from lightning_modules.learning.rtrl import RealTimeRecurrentLearning

__all__ = ["BPTT", "LearningRule", "RealTimeRecurrentLearning"]
