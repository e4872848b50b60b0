"""Files on disk that must stay whole: the atomic write (:mod:`storage.atomic`) and the one-process lock
(:mod:`storage.lock`), each with one home.

Why a package of its own: both layers need them. ``datamodules/`` writes downloads, files taken out of
archives and the NTU HDF5 file; ``lightning_modules/run/`` writes results.json and checkpoints and
locks run directories; ``datamodules`` must not import ``lightning_modules``, and ``src/`` is pure
PyTorch (layers, networks, kernels), not file handling. So these sit beside them, import nothing of
the project, and every layer may import them.
"""
