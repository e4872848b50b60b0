"""Speed of one recurrent layer at EigenWorms' length (T = 17,984): IndRNN beside the oscillator RNNs.

    python benchmarks/long_series.py                          # CPU, T17984_B8_I6_H64, the six layers
    python benchmarks/long_series.py --device cuda --json long.json
    python benchmarks/long_series.py --impls unicornn indrnn --repeats 5

The measurement, table and JSON are those of :mod:`benchmarks.recurrence` (fwd+bwd and fwd times,
peak memory; see its docstring), with the layers of benchmarks/layers.py (coRNN, UnICORNN and LEM
with the time steps of the EigenWorms recipes), run on the EigenWorms shape: B = 8 recordings (the papers' batch),
I = 6 channels, H = 64 units, one layer, batch first. Every argument of benchmarks/recurrence.py is
accepted; only the defaults of ``--shapes``, ``--impls``, ``--repeats`` and ``--warmup`` differ (at
this T a pass of the autograd loops, coRNN and LEM, takes seconds on a CPU).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `src` and `benchmarks` importable without installing
    sys.path.insert(0, str(ROOT))

from benchmarks import recurrence  # noqa: E402

EIGENWORMS_SHAPE = "T17984_B8_I6_H64"
DEFAULT_IMPLS = ["indrnn", "unicornn", "cornn", "lem", "lstm", "gru"]
DEFAULT_REPEATS, DEFAULT_WARMUP = "3", "1"

def main(argv: list[str] | None = None) -> dict:
    """Run benchmarks/recurrence.py's measurement with the oscillators and this script's defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = {"--shapes": [EIGENWORMS_SHAPE], "--impls": DEFAULT_IMPLS, "--repeats": [DEFAULT_REPEATS],
                "--warmup": [DEFAULT_WARMUP]}
    for flag, values in defaults.items():
        if flag not in argv:
            argv += [flag, *values]
    return recurrence.main(argv)


if __name__ == "__main__":
    main()
