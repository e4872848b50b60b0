"""Test helpers for NTU RGB+D: a learnable set of synthetic ``.skeleton`` files in the exact Kinect
layout (datamodules/ntu_synthetic.py), spread over the performers and cameras of the NTU-60 splits."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.ntu_convert import convert
from datamodules.ntu_synthetic import sample_name, sample_text

ACTIONS = (1, 2, 3, 4, 50)           # 50 ("punch/slap") is a two-person action: a second body
PERFORMERS = (1, 2, 4, 3)            # 1, 2, 4 train (cross-subject), 3 tests
CAMERAS = (1, 2)                     # 2 trains (cross-view), 1 tests


def write_learnable_set(folder: Path, seed: int = 0, replications: tuple[int, ...] = (1, 2)) -> list[str]:
    """5 actions x 4 performers x 2 cameras x 2 replications = 80 .skeleton files of 10-59 frames
    (fewer with fewer ``replications``); returns their sample names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for action in ACTIONS:
        for performer in PERFORMERS:
            for camera in CAMERAS:
                for replication in replications:
                    name = sample_name(1, camera, performer, replication, action)
                    length = int(rng.integers(10, 60))
                    (folder / f"{name}.skeleton").write_text(sample_text(action, length, performer, camera,
                                                                         seed=replication))
                    names.append(name)
    return names


def converted_learnable_set(root: Path, replications: tuple[int, ...] = (1, 2), workers: int = 2) -> tuple[Path, Path]:
    """The learnable set written into ``root/raw`` and converted into ``root/ntu60.h5``: (raw folder, HDF5 path)."""
    write_learnable_set(root / "raw", replications=replications)
    out = root / "ntu60.h5"
    convert(root / "raw", out, workers=workers, progress=False)
    return root / "raw", out
