"""Speed of one recurrent layer at EigenWorms' length (T = 17,984): IndRNN beside the oscillator RNNs.

    python benchmarks/long_series.py                          # CPU, T17984_B8_I6_H64, the six layers
    python benchmarks/long_series.py --device cuda --json long.json
    python benchmarks/long_series.py --impls unicornn indrnn --repeats 5

The measurement, table and JSON are those of :mod:`benchmarks.recurrence` (fwd+bwd and fwd times,
peak memory; see its docstring): this script adds the coRNN, UnICORNN and LEM layers to its
registry of implementations, with the time steps of the EigenWorms recipes (conf/experiment/
eigenworms_*.yaml), and runs it on the EigenWorms shape: B = 8 recordings (the papers' batch),
I = 6 channels, H = 64 units, one layer, batch first. Every argument of benchmarks/recurrence.py is
accepted; only the defaults of ``--shapes``, ``--impls``, ``--repeats`` and ``--warmup`` differ (at
this T a pass of the autograd loops, coRNN and LEM, takes seconds on a CPU).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `src` and `benchmarks` importable without installing
    sys.path.insert(0, str(ROOT))

from benchmarks import recurrence  # noqa: E402
from src.layers import LEM, CoRNN, UnICORNN  # noqa: E402

EIGENWORMS_SHAPE = "T17984_B8_I6_H64"
DEFAULT_IMPLS = ["indrnn", "unicornn", "cornn", "lem", "lstm", "gru"]
DEFAULT_REPEATS, DEFAULT_WARMUP = "3", "1"

# The time steps of the EigenWorms recipes; the speed does not depend on them.
OSCILLATORS = {
    "unicornn": lambda i, h, device: UnICORNN(i, h, dt=0.0343, alpha=0.0, batch_first=True, backend="auto").to(device),
    "unicornn_reference": lambda i, h, device: UnICORNN(i, h, dt=0.0343, alpha=0.0, batch_first=True,
                                                        backend="reference").to(device),
    "cornn": lambda i, h, device: CoRNN(i, h, dt=0.01, gamma=1.0, epsilon=1.0, batch_first=True).to(device),
    "lem": lambda i, h, device: LEM(i, h, dt=0.00017, batch_first=True).to(device),
}


@contextlib.contextmanager
def registered() -> Iterator[None]:
    """benchmarks.recurrence's registry with the oscillator layers added, for the duration of a run
    (restored afterwards, so that other users of the module in the process see it unchanged)."""
    before = dict(recurrence.IMPLS)
    recurrence.IMPLS.update({name: factory for name, factory in OSCILLATORS.items() if name not in before})
    try:
        yield
    finally:
        recurrence.IMPLS.clear()
        recurrence.IMPLS.update(before)


def main(argv: list[str] | None = None) -> dict:
    """Run benchmarks/recurrence.py's measurement with the oscillators and this script's defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = {"--shapes": [EIGENWORMS_SHAPE], "--impls": DEFAULT_IMPLS, "--repeats": [DEFAULT_REPEATS],
                "--warmup": [DEFAULT_WARMUP]}
    for flag, values in defaults.items():
        if flag not in argv:
            argv += [flag, *values]
    with registered():
        return recurrence.main(argv)


if __name__ == "__main__":
    main()
