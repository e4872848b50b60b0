"""NTU RGB+D skeleton action recognition (60 and 120 classes), read lazily from the converter's HDF5 file.

Make the file once with ``python prepare_ntu.py raw=PATH out=data/ntu/ntu60.h5`` (datamodules/ntu_convert.py).

Splits (the datasets' own protocols): NTU-60 ``cross_subject`` (20 training performers, listed in
:data:`NTU60_TRAIN_PERFORMERS`) and ``cross_view`` (cameras 2 and 3 train, camera 1 tests); NTU-120
``cross_subject120`` (53 training performers) and ``cross_setup120`` (even setups train). The NTU-60
splits use only setups 1-17 and actions 1-60, so they also work on an NTU-120 file. Validation is a
seeded ``val_fraction`` of the training samples (ceil, as the official code's 5%).

Sequences (datamodules/ntu_dataset.py): ``steps`` frames sampled per sample as the official IndRNN
code does, K seeded samplings per sample at evaluation. The file (datamodules/ntu_hdf5.py): setup
checks its layout and what the converter recorded (``verify="quick"``: 16 samples' CRC-32s,
``"full"``: every sample's); a damaged file is one line naming it and the fix, never a traceback.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from datamodules.download import DataError, DownloadError
from datamodules.ntu_dataset import FEATURES, NTUSkeletons
from datamodules.ntu_hdf5 import FORMAT, missing_file_message, open_hdf5, read_verified_metadata, remake_command
from datamodules.splits import SplitDataModule, collate_batched
from src.checks import check_choice, check_fraction, check_non_negative_int, check_positive_int

log = logging.getLogger(__name__)

NTU60_TRAIN_PERFORMERS = (1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38)
NTU120_TRAIN_PERFORMERS = NTU60_TRAIN_PERFORMERS + (
    45, 46, 47, 49, 50, 52, 53, 54, 55, 56, 57, 58, 59, 70, 74, 78, 80, 81, 82, 83, 84, 85, 86, 89, 91, 92, 93,
    94, 95, 97, 98, 100, 103)
NTU60_TRAIN_CAMERAS = (2, 3)
SPLITS = ("cross_subject", "cross_view", "cross_subject120", "cross_setup120")
NUM_CLASSES = {"cross_subject": 60, "cross_view": 60, "cross_subject120": 120, "cross_setup120": 120}
# Published (train, test) sizes, which count the 302 NTU-60 samples without a skeleton, and the sizes
# once those are gone (train includes validation; the official code's logs: 38086 + 2005 / 16487 and
# 35763 + 1883 / 18932).
PUBLISHED_SIZES = {"cross_subject": (40320, 16560), "cross_view": (37920, 18960)}
WITHOUT_MISSING_SIZES = {"cross_subject": (40091, 16487), "cross_view": (37646, 18932)}
VERIFY = ("quick", "full")


class NTUDataModule(SplitDataModule):
    """NTU RGB+D splits from the converter's HDF5 file, sampled as the official IndRNN code does.

    Args:
        path: the HDF5 file written by ``prepare_ntu.py``.
        split: "cross_subject", "cross_view" (NTU-60), "cross_subject120" or "cross_setup120" (NTU-120).
        steps: T, frames sampled per sequence (official: 20).
        val_fraction: share of the training samples held out for validation (official: 0.05).
        split_seed: seed of that hold-out and of the evaluation samplings.
        val_samplings: K for validation: logits averaged over K sampled sets (1: one set, as the
            official code's validation).
        test_samplings: K for testing (official: 20).
        center: subtract the first frame's spine joint (an option, off in the official recipe).
        rotate_degrees: random rotation about the vertical axis in training, U(-r, r) degrees (0: off).
        random_length: [low, high]: training T drawn per batch in [low, high] (the papers' 10-30); null: off.
        batch_size: sequences per batch (official: 128).
        num_workers: DataLoader worker processes; each opens the file itself.
        verify: how setup checks the file against the converter's manifest: "quick" (the layout, the
            recorded range and the CRC-32 of 16 samples: milliseconds) or "full" (every sample's CRC-32:
            reads the whole file once). Batches are always checked for impossible coordinates.
        drop_last: drop each epoch's last, short training batch (the official loader: every batch full).
    """

    benchmark = "NTU RGB+D"
    collate_fn = staticmethod(collate_batched)  # the dataset returns whole batches

    def __init__(self, path: str, split: str = "cross_subject", steps: int = 20, val_fraction: float = 0.05,
                 split_seed: int = 0, val_samplings: int = 1, test_samplings: int = 20, center: bool = False,
                 rotate_degrees: float = 0.0, random_length: list[int] | None = None, batch_size: int = 128,
                 num_workers: int = 4, verify: str = "quick", drop_last: bool = False) -> None:
        super().__init__(batch_size, num_workers, drop_last)
        if path is None or str(path) == "":
            raise ValueError(f"{self.benchmark}: path must name the HDF5 file; {missing_file_message('data/ntu/ntu60.h5')}")
        check_choice(f"{self.benchmark}: split", split, SPLITS)
        self.verify = check_choice(f"{self.benchmark}: verify", verify, VERIFY)
        check_positive_int(f"{self.benchmark}: steps", steps)
        check_fraction(f"{self.benchmark}: val_fraction", val_fraction, closed_low=False)
        check_non_negative_int(f"{self.benchmark}: split_seed", split_seed)
        check_positive_int(f"{self.benchmark}: val_samplings", val_samplings)
        check_positive_int(f"{self.benchmark}: test_samplings", test_samplings)
        if not isinstance(center, bool):
            raise ValueError(f"{self.benchmark}: center must be true or false, got {center!r}")
        check_fraction(f"{self.benchmark}: rotate_degrees", rotate_degrees, 0.0, 180.0, closed_high=True)
        if random_length is not None:
            bounds = list(random_length) if not isinstance(random_length, (str, bytes)) else []
            if len(bounds) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in bounds) \
                    or bounds[0] > bounds[1]:
                raise ValueError(f"{self.benchmark}: random_length must be [low, high] with 1 <= low <= high, or null, "
                                 f"got {random_length!r}")
            random_length = (bounds[0], bounds[1])
        self.path, self.split_name, self.steps = Path(path), split, steps
        self.val_fraction, self.split_seed = float(val_fraction), split_seed
        self.val_samplings, self.test_samplings = val_samplings, test_samplings
        self.center, self.rotate_degrees, self.random_length = center, float(rotate_degrees), random_length
        self.sizes: dict[str, int] = {}

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.split_name]

    @property
    def input_size(self) -> int:
        return FEATURES

    def prepare_data(self) -> None:
        """Nothing to download: check that the converted file is there (one line naming the command if not)."""
        self._check_file()

    @property
    def data_source(self) -> str:
        """The file the batches come from (named when a loss turns non-finite)."""
        return str(self.path)

    def _check_file(self) -> None:
        if not self.path.is_file() and not self.path.name.endswith(".partial"):
            raise DownloadError(self.path.name, self.path.parent, [], message=missing_file_message(self.path))
        with open_hdf5(self.path) as h5:
            if h5.attrs.get("format") != FORMAT or not h5.attrs.get("complete", False):
                raise DownloadError(self.path.name, self.path.parent, [], message=(
                    f"{self.path} is not a complete NTU skeleton file from prepare_ntu.py (format "
                    f"{h5.attrs.get('format')!r}, complete={h5.attrs.get('complete')}); convert again: "
                    f"{remake_command(self.path)}"))

    def read_metadata(self) -> dict[str, np.ndarray]:
        """The file's per-sample arrays (offset, length, label, setup, camera, performer, ...), all small,
        once the file passed the checks of :func:`read_verified_metadata` (``verify``)."""
        self._check_file()
        return read_verified_metadata(self.path, full=self.verify == "full")

    def split_rows(self, meta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows of the train, val and test splits (sorted), by the split's protocol and the seeded hold-out."""
        name = self.split_name
        if name in ("cross_subject", "cross_view"):
            usable = (meta["setup"] <= 17) & (meta["action"] <= 60)  # NTU-60 inside an NTU-120 file too
        else:
            usable = np.ones(len(meta["label"]), dtype=bool)
        if name == "cross_subject":
            training = np.isin(meta["performer"], NTU60_TRAIN_PERFORMERS)
        elif name == "cross_view":
            training = np.isin(meta["camera"], NTU60_TRAIN_CAMERAS)
        elif name == "cross_subject120":
            training = np.isin(meta["performer"], NTU120_TRAIN_PERFORMERS)
        else:
            training = meta["setup"] % 2 == 0
        train_rows = np.flatnonzero(usable & training)
        test_rows = np.flatnonzero(usable & ~training)
        val_count = math.ceil(self.val_fraction * len(train_rows))
        if not 0 < val_count < len(train_rows) or not len(test_rows):
            raise DataError(f"{self.benchmark} {name}: {self.path} gives {len(train_rows)} training and {len(test_rows)} "
                            f"test samples (validation {val_count}) of its {len(meta['label'])}; every split needs "
                            f"samples: is it the right file? Make it from all the skeletons: {remake_command(self.path)}")
        order = np.random.default_rng(self.split_seed).permutation(len(train_rows))
        return {"train": np.sort(train_rows[order[val_count:]]), "val": np.sort(train_rows[order[:val_count]]),
                "test": test_rows}

    def _log_sizes(self) -> None:
        sizes = self.sizes
        line = f"{self.benchmark} {self.split_name}: train {sizes['train']}, val {sizes['val']}, test {sizes['test']}"
        published = PUBLISHED_SIZES.get(self.split_name)
        if published is None:
            log.info("%s", line)
            return
        ours = (sizes["train"] + sizes["val"], sizes["test"])
        if ours == WITHOUT_MISSING_SIZES[self.split_name]:
            note = (f"as published ({published[0]} / {published[1]}) less the 302 samples without a skeleton "
                    f"({published[0] - ours[0]} / {published[1] - ours[1]})")
        elif ours == published:
            note = "as published"
        else:
            note = (f"differs from the published {published[0]} / {published[1]} (or {WITHOUT_MISSING_SIZES[self.split_name][0]}"
                    f" / {WITHOUT_MISSING_SIZES[self.split_name][1]} without the 302 samples that have no skeleton): "
                    f"a partial or synthetic file?")
        log.info("%s; train + val / test = %d / %d, %s", line, ours[0], ours[1], note)

    def setup(self, stage: str | None = None) -> None:
        """Read the small per-sample arrays and build the three splits (every process; cheap to repeat)."""
        if self.splits:
            return
        meta = self.read_metadata()
        if len(meta["label"]) and int(meta["label"].max()) >= self.num_classes:
            raise DataError(f"{self.benchmark} {self.split_name}: {self.path} has action {int(meta['label'].max()) + 1}, "
                            f"beyond the split's {self.num_classes} classes: an NTU-120 file; use an NTU-120 split "
                            f"(task=ntu120_csub or ntu120_cset)")
        rows = self.split_rows(meta)
        common = dict(offsets=meta["offset"], lengths=meta["length"], labels=meta["label"], steps=self.steps,
                      center=self.center, seed=self.split_seed)
        self.splits = {
            "train": NTUSkeletons(self.path, rows["train"], train=True, rotate_degrees=self.rotate_degrees,
                                  random_length=self.random_length, **common),
            "val": NTUSkeletons(self.path, rows["val"], train=False, samplings=self.val_samplings, **common),
            "test": NTUSkeletons(self.path, rows["test"], train=False, samplings=self.test_samplings, **common),
        }
        self.sizes = {name: len(split) for name, split in self.splits.items()}
        self._log_sizes()

    def split(self, name: str) -> Dataset:
        if not self.splits:  # loaders asked for before setup (e.g. by hand)
            self.setup()
        return self.splits[name]
