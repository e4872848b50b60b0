"""Sequential, permuted and row-by-row MNIST (IRNN, uRNN, IndRNN and TCN papers).

A 28x28 digit is read as a sequence: layout ``pixels`` gives T=784 steps of one pixel (sequential
MNIST; with ``permute=True``, the pixels in one fixed random order: permuted MNIST), layout ``rows``
gives T=28 steps of one 28-pixel row. The label is the digit (10 classes).

The four official IDX files are downloaded into ``<data_dir>/mnist`` from mirrors, checked by MD5.
Each split is held as one uint8 tensor (N, 784) and batches are built by tensor indexing
(``__getitems__``), with no Python work per sample or pixel (measured on 2 CPU cores, permuted
pixels, batch 32: about 290k sequences/s, 9x more than per-sample ``__getitem__`` + default collation).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.download import DataError, ensure_files
from datamodules.idx import read_idx
from datamodules.splits import SplitDataModule, collate_batched
from src.checks import check_choice, check_fraction, check_int

log = logging.getLogger(__name__)

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
FILES = {"train": (TRAIN_IMAGES, TRAIN_LABELS), "test": (TEST_IMAGES, TEST_LABELS)}
ALL_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
# Checksums of the files as published (identical on both mirrors).
MD5 = {
    TRAIN_IMAGES: "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    TRAIN_LABELS: "d53e105ee54ea40749a09fcbcd1e9432",
    TEST_IMAGES: "9fb629c4189551a2d022fa330f9573f3",
    TEST_LABELS: "ec29112dd5afa0611ce80d1b7f02629c",
}
DEFAULT_MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist", "http://yann.lecun.com/exdb/mnist"]

ROWS = COLS = 28
PIXELS = ROWS * COLS
NUM_CLASSES = 10
LAYOUTS = {"pixels": (PIXELS, 1), "rows": (ROWS, COLS)}  # layout -> (T, features per step)
# Pixel value x in 0..255 -> (x - center) / scale, the formula in the comment rewritten so that one
# float32 subtraction and division give its correctly rounded value (exactly so where center and
# scale are exact floats: all but mean_std). "official" divides by 256, as the official IndRNN code does.
NORMALIZATIONS = {
    "official": (128.0, 128.0),                  # (x/256 - 0.5) * 2, in [-1, 0.9921875]
    "symmetric": (127.5, 127.5),                 # (x/255 - 0.5) * 2, in [-1, 1]
    "mean_std": (0.1307 * 255, 0.3081 * 255),    # (x/255 - 0.1307) / 0.3081, MNIST's mean and std
    "none": (0.0, 255.0),                        # x/255, in [0, 1]
}


def make_permutation(seed: int) -> torch.Tensor:
    """The permuted-MNIST pixel order for ``seed``: LongTensor (784,); step t reads pixel perm[t]."""
    return torch.randperm(PIXELS, generator=torch.Generator().manual_seed(seed))


class MNISTSequences(Dataset):
    """One split of MNIST as sequences, built a batch at a time by tensor indexing.

    Args:
        images: uint8 (N, 784), the pixels row by row.
        labels: int64 (N,), digits 0-9.
        layout: "pixels" -> inputs (T=784, 1); "rows" -> inputs (T=28, 28).
        normalization: a key of NORMALIZATIONS.
        permutation: LongTensor (784,) or None; step t of a permuted sequence is pixel permutation[t].

    ``dataset.__getitems__(indices)`` returns ``(inputs (B, T, I) float32, labels (B,) int64)``;
    ``dataset[i]`` returns ``(inputs (T, I) float32, label () int64)``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, layout: str = "pixels",
                 normalization: str = "official", permutation: torch.Tensor | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 2 or images.shape[1] != PIXELS:
            raise ValueError(f"MNIST sequences: images must be uint8 (N, {PIXELS}), got {images.dtype} {tuple(images.shape)}")
        if layout not in LAYOUTS or normalization not in NORMALIZATIONS:
            raise ValueError(f"MNIST sequences: layout must be one of {tuple(LAYOUTS)} and normalization one of "
                             f"{tuple(NORMALIZATIONS)}, got {layout!r} and {normalization!r}")
        if labels.shape != (len(images),):
            raise ValueError(f"MNIST sequences: {len(images)} images but labels of shape {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.shape = LAYOUTS[layout]
        self.center, self.scale = NORMALIZATIONS[normalization]
        self.permutation = None if permutation is None else permutation.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        # Gather in uint8 (4x less to move than float32), rows then columns, with index_select:
        # advanced indexing (images[rows]) measured ~2000x slower on CPU (8 ms vs 4 us per batch).
        pixels = self.images.index_select(0, rows)
        if self.permutation is not None:
            pixels = pixels.index_select(1, self.permutation)
        inputs = pixels.float().sub_(self.center).div_(self.scale)
        return inputs.view(len(rows), *self.shape), self.labels.index_select(0, rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        inputs, labels = self.__getitems__([index])
        return inputs[0], labels[0]


class MNISTDataModule(SplitDataModule):
    """Train/val/test splits of MNIST as pixel or row sequences; downloads the files on first use.

    Validation is a seeded ``val_fraction`` of the 60k training images (the official IndRNN code
    holds out 5%); test is the official 10k set.

    Args:
        data_dir: the files live in ``data_dir/mnist``.
        layout: "pixels" (T=784 x 1, sequential MNIST) or "rows" (T=28 x 28).
        permute: read the pixels in a fixed random order (permuted MNIST); layout "pixels" only.
        permutation_seed: seed of that order; the same seed gives the same order in every instance,
            DataLoader worker, DDP rank and resumed run (and it is saved in checkpoints).
        normalization: "official" (x/256 - 0.5) * 2, "symmetric" (x/255 - 0.5) * 2,
            "mean_std" (x/255 - 0.1307) / 0.3081 or "none" x/255, for pixel values x in 0..255.
        val_fraction: share of the training images held out for validation, in (0, 1).
        split_seed: seed of that hold-out.
        batch_size: sequences per batch.
        num_workers: DataLoader worker processes (0: build batches in the training process).
        mirrors: base URLs to download from, in order (None: DEFAULT_MIRRORS).
        md5: per-file checksum overrides, {file name: md5 or None (no check)}; others keep MD5.
        download: fetch missing files; False: fail if they are not already in ``data_dir/mnist``.
        drop_last: drop each epoch's last, short training batch (the official loader cycles: every batch full).
    """

    benchmark = "MNIST"
    collate_fn = staticmethod(collate_batched)  # the dataset returns whole batches

    def __init__(self, data_dir: str, layout: str = "pixels", permute: bool = False, permutation_seed: int = 0,
                 normalization: str = "official", val_fraction: float = 0.05, split_seed: int = 0,
                 batch_size: int = 32, num_workers: int = 0, mirrors: list[str] | None = None,
                 md5: dict[str, str] | None = None, download: bool = True, drop_last: bool = False) -> None:
        super().__init__(batch_size, num_workers, drop_last)
        if data_dir is None or str(data_dir) == "":
            raise ValueError("MNIST: data_dir must be a folder path; the files go to <data_dir>/mnist")
        check_choice("layout", layout, tuple(LAYOUTS))
        if not isinstance(permute, bool):
            raise ValueError(f"MNIST: permute must be true or false, got {permute!r}")
        if permute and layout != "pixels":
            raise ValueError(f"MNIST: permute=true needs layout='pixels' (permuted MNIST shuffles the 784 pixels), "
                             f"got layout={layout!r}")
        check_int("MNIST: permutation_seed", permutation_seed)
        check_choice("normalization", normalization, tuple(NORMALIZATIONS))
        check_fraction("MNIST: val_fraction", val_fraction, closed_low=False)
        check_int("MNIST: split_seed", split_seed)
        if not isinstance(download, bool):
            raise ValueError(f"MNIST: download must be true or false, got {download!r}")
        # Hydra hands over ListConfig/DictConfig: accept any sequence / mapping, but not a bare string.
        if mirrors is None:
            mirrors = DEFAULT_MIRRORS
        if isinstance(mirrors, (str, bytes)) or not all(isinstance(m, str) and m for m in mirrors) or not len(mirrors):
            raise ValueError(f"MNIST: mirrors must be a non-empty list of URLs (or null for the defaults), got {mirrors!r}")
        overrides = dict(md5.items()) if md5 is not None else {}
        unknown = sorted(set(overrides) - set(ALL_FILES))
        if unknown:
            raise ValueError(f"MNIST: md5 has unknown file names {unknown}; valid names are {list(ALL_FILES)}")
        self.data_dir, self.layout, self.permute, self.permutation_seed = data_dir, layout, permute, permutation_seed
        self.normalization, self.val_fraction, self.split_seed = normalization, float(val_fraction), split_seed
        self.download = download
        self.mirrors = [str(m) for m in mirrors]
        self.md5 = {**MD5, **overrides}
        # Generated here, once, from the seed alone: every copy of the module (workers, ranks,
        # a resumed run) computes the same order without any communication.
        self.permutation = make_permutation(permutation_seed) if permute else None
        self.splits: dict[str, MNISTSequences] = {}

    # Sizes a network needs -------------------------------------------------------------------------

    @property
    def folder(self) -> Path:
        """Where the four IDX files live: ``data_dir/mnist``."""
        return Path(self.data_dir) / "mnist"

    @property
    def seq_len(self) -> int:
        """T: 784 (pixels) or 28 (rows)."""
        return LAYOUTS[self.layout][0]

    @property
    def input_size(self) -> int:
        """Features per step: 1 (pixels) or 28 (rows)."""
        return LAYOUTS[self.layout][1]

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    # Files ----------------------------------------------------------------------------------------

    def _where_from(self) -> str:
        return f"from any of {', '.join(self.mirrors)}"

    def prepare_data(self) -> None:
        """Download the missing (or corrupt) files. Lightning runs this on one process per node."""
        where = self._where_from()
        if self.download:
            ensure_files(self.folder, self.md5, self.mirrors, dataset="MNIST",
                         remedy=f"with no network, put them in {self.folder} ({where})")
        else:
            ensure_files(self.folder, self.md5, dataset="MNIST",
                         remedy=f"download=false: put them there ({where}) or set download=true")

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Read one split's files: images uint8 (N, 784), labels int64 (N,)."""
        images_name, labels_name = FILES[split]
        # Presence only: prepare_data checked the checksums once, on one process.
        ensure_files(self.folder, {images_name: None, labels_name: None}, dataset="MNIST",
                     remedy=f"call prepare_data() first (the Trainer does) or put them there ({self._where_from()})")
        images, labels = read_idx(self.folder / images_name), read_idx(self.folder / labels_name)
        # DataError: the files are damaged (one line for the driver), not a programming error.
        if images.dtype != np.uint8 or images.shape[1:] != (ROWS, COLS):
            raise DataError(f"{self.folder / images_name}: expected uint8 images (N, {ROWS}, {COLS}), "
                            f"got {images.dtype} {images.shape}; delete the file to fetch it again")
        if labels.dtype != np.uint8 or labels.shape != (len(images),):
            raise DataError(f"{self.folder / labels_name}: {labels.shape[0] if labels.ndim else 0} {labels.dtype} "
                            f"labels for the {len(images)} images of {images_name} (expected {len(images)} uint8 "
                            f"labels); the files do not belong together: delete both to fetch them again")
        if len(labels) and labels.max() >= NUM_CLASSES:
            raise DataError(f"{self.folder / labels_name}: label {labels.max()} is not a digit 0-9; "
                            f"delete the file to fetch it again")
        return torch.from_numpy(images.reshape(len(images), PIXELS)), torch.from_numpy(labels.astype(np.int64))

    def _split(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> MNISTSequences:
        return MNISTSequences(images[indices], labels[indices], self.layout, self.normalization, self.permutation)

    def setup(self, stage: str | None = None) -> None:
        """Read the files this stage needs (every process); cheap to call again."""
        wants_train = stage in (None, "fit", "validate") and not {"train", "val"} <= set(self.splits)
        wants_test = stage in (None, "test", "predict") and "test" not in self.splits
        if wants_train:
            images, labels = self._load("train")
            count = len(images)
            val_count = round(self.val_fraction * count)
            if not 0 < val_count < count:
                raise ValueError(f"MNIST: val_fraction={self.val_fraction} of {count} training images leaves "
                                 f"{val_count} for validation; choose a fraction that keeps both splits non-empty")
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.split_seed))
            # Sorted: each split keeps the files' order, so an unshuffled loader reads it in sequence.
            self.splits["val"] = self._split(images, labels, order[:val_count].sort().values)
            self.splits["train"] = self._split(images, labels, order[val_count:].sort().values)
        if wants_test:
            self.splits["test"] = MNISTSequences(*self._load("test"), self.layout, self.normalization, self.permutation)
        if wants_train or wants_test:
            log.info("MNIST %s: %s", self.layout + (" permuted" if self.permute else ""),
                     ", ".join(f"{name} {len(split)}" for name, split in self.splits.items()))

    # Loaders --------------------------------------------------------------------------------------

    def split(self, name: str) -> Dataset:
        if name not in self.splits:  # loaders asked for before setup (e.g. by hand): load on demand
            self.setup("test" if name == "test" else "fit")
        return self.splits[name]

    # Checkpoints ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Saved in checkpoints: the pixel order, so a resumed or evaluated run can check it reads the same."""
        return {"permutation_seed": self.permutation_seed, "permutation": self.permutation}

    def load_state_dict(self, state_dict: dict) -> None:
        """Check that the checkpoint's pixel order is the one this config gives (the order is not adopted:
        the config stays the single source of truth)."""
        if "permutation" not in state_dict:
            return
        stored, stored_seed = state_dict["permutation"], state_dict.get("permutation_seed")
        if stored is None and self.permutation is None:
            return
        if stored is None:
            raise ValueError(f"MNIST: the checkpoint was trained on unpermuted pixels but this config has "
                             f"permute=true (permutation_seed={self.permutation_seed}); set permute=false")
        if self.permutation is None:
            raise ValueError(f"MNIST: the checkpoint was trained on permuted pixels (permutation_seed={stored_seed}) "
                             f"but this config has permute=false; set permute=true permutation_seed={stored_seed}")
        if not torch.equal(torch.as_tensor(stored).long(), self.permutation):
            same = (" (the same seed: this torch version's randperm gives another order than the one that "
                    "saved the checkpoint)" if stored_seed == self.permutation_seed else "")
            raise ValueError(f"MNIST: the checkpoint's pixel order differs from the one permutation_seed="
                             f"{self.permutation_seed} gives{same}; set permutation_seed={stored_seed}")
