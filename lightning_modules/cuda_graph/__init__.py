"""CUDA-graph training steps: the network's forward and backward passes (:mod:`.forward`) and the
optimizer's parameter update (:mod:`.optimizer`) captured once and replayed at every training step,
installed for a fit by the Lightning callback :class:`CudaGraphs` (:mod:`.callback`; ``trainer=gpu``
includes it, ``trainer=gpu_eager`` is the same trainer without it). Whatever cannot replay runs
eagerly, each reason logged once; checkpoints are those of an eager run."""
from lightning_modules.cuda_graph.callback import CudaGraphs, scaler_refusal
from lightning_modules.cuda_graph.forward import GraphedForward
from lightning_modules.cuda_graph.optimizer import CudaGraph, OptimizerStepGraph, unsupported_optimizer

__all__ = ["CudaGraph", "CudaGraphs", "GraphedForward", "OptimizerStepGraph", "scaler_refusal",
           "unsupported_optimizer"]
