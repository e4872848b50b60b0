"""Synthetic NTU RGB+D data: ``.skeleton`` files in the exact Kinect layout (for the converter's tests) and
full-size HDF5 files (for loader throughput), with actions that a network can learn.

Each action moves one joint of a standing skeleton along one axis at its own frequency and displaces
another joint by 0.5 m; performers differ in height and position, cameras by a rotation
about the vertical axis, and mutual actions (NTU's 50-60, 106-120) have a second person. Measure the
loader on a full-size file (NTU-60's sample count and about its mean length, ~80 frames) with::

    python -m datamodules.ntu_synthetic /tmp/ntu_synthetic.h5 [samples=56578] [workers=4] [batches=300]
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

from datamodules.ntu_hdf5 import write_samples
from datamodules.ntu_skeleton import MAX_BODIES, NUM_JOINTS

MUTUAL_ACTIONS = set(range(50, 61)) | set(range(106, 121))  # two-person actions in NTU-60 / NTU-120
NTU60_SAMPLES = 56578        # NTU-60 samples with a skeleton (56,880 minus the 302 without)


def base_pose(rng: np.random.Generator) -> np.ndarray:
    """A rough standing skeleton: float64 (25, 3) in metres (x right, y up, z away from the camera)."""
    pose = np.zeros((NUM_JOINTS, 3))
    pose[:, 1] = np.linspace(-0.8, 0.6, NUM_JOINTS)   # feet ... head
    pose[:, 0] = np.sin(np.arange(NUM_JOINTS)) * 0.2  # limbs spread left and right
    return pose + rng.normal(0, 0.01, pose.shape)


def action_frames(action: int, num_frames: int, performer: int, camera: int, seed: int) -> list[np.ndarray]:
    """The bodies of one synthetic sample: a list of float64 (num_frames, 25, 3), one per person."""
    rng = np.random.default_rng((seed, action, performer, camera, num_frames))
    time_axis = np.linspace(0, 1, num_frames)[:, None]
    people = 2 if action in MUTUAL_ACTIONS else 1
    angle = (camera - 2) * math.pi / 4                 # cameras at -45, 0, +45 degrees
    rotation = np.array([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]])
    bodies = []
    for person in range(people):
        pose = base_pose(rng) * (1 + 0.05 * (performer % 5)) + np.array([0.6 * person - 0.3 * (people - 1), 0, 3.0])
        joint, axis = (3 * action + person) % NUM_JOINTS, action % 3
        frames = np.repeat(pose[None], num_frames, axis=0)
        frames[:, joint, axis] += 0.4 * np.sin(2 * math.pi * (1 + action % 4) * time_axis[:, 0])
        frames[:, (5 * action + 2) % NUM_JOINTS, (action + 1) % 3] += 0.5  # a class-specific pose
        frames += rng.normal(0, 0.005, frames.shape)
        bodies.append(frames @ rotation.T)
    return bodies


def skeleton_text(frames: list[list[tuple[int, np.ndarray]]]) -> str:
    """The text of a ``.skeleton`` file: ``frames`` is, per frame, a list of ``(body_id, joints (25, 3))``.

    Fields other than x, y, z get plausible values (depth/colour pixels, orientation, tracking state 2).
    Coordinates are written with 7 decimals, as NTU's files; parse back with float32 precision in mind.
    """
    lines = [str(len(frames))]
    for bodies in frames:
        lines.append(str(len(bodies)))
        for body_id, joints in bodies:
            lines.append(f"{body_id} 0 1 1 1 1 0 0.01 -0.2 2")
            lines.append(str(len(joints)))
            for x, y, z in joints:
                lines.append(f"{x:.7f} {y:.7f} {z:.7f} 250.1 200.2 950.3 540.4 0.1 0.2 0.3 0.9 2")
    return "\n".join(lines) + "\n"


def sample_text(action: int, num_frames: int, performer: int, camera: int, seed: int = 0,
                empty_frames: int = 0) -> str:
    """A whole synthetic ``.skeleton`` file; ``empty_frames`` frames with no body are put first."""
    bodies = action_frames(action, num_frames, performer, camera, seed)
    base_id = 72057594037900000 + 1000 * action + 10 * performer
    frames = [[] for _ in range(empty_frames)]
    frames += [[(base_id + p, body[t]) for p, body in enumerate(bodies)] for t in range(num_frames)]
    return skeleton_text(frames)


def sample_name(setup: int, camera: int, performer: int, replication: int, action: int) -> str:
    """NTU's file name stem, e.g. ``S001C002P003R001A013``."""
    return f"S{setup:03d}C{camera:03d}P{performer:03d}R{replication:03d}A{action:03d}"


def write_synthetic_hdf5(path: str | Path, samples: int = NTU60_SAMPLES, mean_frames: int = 80, seed: int = 0,
                         num_actions: int = 60, dtype: str = "float32") -> Path:
    """A full-size HDF5 file in the converter's layout, built from arrays (no text): for loader benchmarks.

    Lengths are drawn around ``mean_frames`` (clipped to 20-300 like NTU's); names cycle through the
    setups, cameras, performers and actions of NTU-60, so every split of ``task=ntu_cs``/``ntu_cv`` is filled.
    """
    import h5py
    import json

    path = Path(path)
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.normal(mean_frames, mean_frames / 3, samples).round(), 20, 300).astype(int)

    def results():
        for index, length in enumerate(lengths):
            action = index % num_actions + 1
            name = sample_name(index // 3400 % 17 + 1, index % 3 + 1, index // 60 % 40 + 1, index // 180 % 2 + 1,
                               action)
            array = np.zeros((length, MAX_BODIES, NUM_JOINTS, 3), dtype=np.float32)
            walk = np.cumsum(rng.normal(0, 0.01, (length, NUM_JOINTS, 3)), axis=0)  # smooth, like real motion
            array[:, 0] = walk + base_pose(rng)
            if action in MUTUAL_ACTIONS:
                array[:, 1] = array[:, 0] + 0.6
            yield name, array, "", ""

    path.parent.mkdir(parents=True, exist_ok=True)
    written, frames = write_samples(path, results(), samples, dtype=dtype, progress=sys.stderr.isatty())
    with h5py.File(path, "a") as h5:
        # As the converter's manifest: the counts and the content record that the DataModule verifies.
        h5.attrs["manifest"] = json.dumps({"source": "synthetic", "counts": {"samples": samples, "frames": frames},
                                           "content": written.content()})
        h5.attrs["complete"] = True
    return path


def measure_throughput(path: str | Path, workers: int = 4, batches: int = 300, batch_size: int = 128,
                       split: str = "cross_subject") -> float:
    """Training-loader samples/s of the NTU DataModule over ``path`` (after a warm-up of 10 batches)."""
    from datamodules.ntu import NTUDataModule

    datamodule = NTUDataModule(str(path), split=split, batch_size=batch_size, num_workers=workers)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    count, start = 0, None
    for index, batch in enumerate(loader):
        if index == 10:
            count, start = 0, time.perf_counter()
        count += batch.inputs.shape[0]
        if index == 10 + batches:
            break
    return count / (time.perf_counter() - start)


if __name__ == "__main__":
    arguments = dict(a.split("=", 1) for a in sys.argv[2:])
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ntu_synthetic.h5")
    if not target.exists():
        began = time.perf_counter()
        write_synthetic_hdf5(target, samples=int(arguments.get("samples", NTU60_SAMPLES)))
        print(f"wrote {target} ({target.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - began:.0f} s")
    rate = measure_throughput(target, workers=int(arguments.get("workers", 4)),
                              batches=int(arguments.get("batches", 300)))
    print(f"training loader: {rate:.0f} samples/s")
