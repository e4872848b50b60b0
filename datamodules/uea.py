"""Any classification dataset of the UEA/UCR time-series archive (timeseriesclassification.com).

``task=uea task.dataset=EigenWorms``: multivariate series of C channels (one step = the C values at
one time), one class label per series. Series may differ in length (JapaneseVowels: 7-29 steps):
batches are padded on the right and carry ``lengths`` (the batch contract), so readouts and losses
see each series' own steps. Every channel is normalised with the mean and standard deviation of the
training split (over all its valid steps); missing values (``?``) are then set to 0, the mean.

Where the files come from, first found wins:

1. ``<data_dir>/uea/<Name>/<Name>_TRAIN.ts`` and ``_TEST.ts`` (put there by hand, or extracted earlier);
2. the copy inside the ``aeon`` wheel (``pip install .[uea]``, part of the dev extra), which carries
   ACSF1, ArrowHead, BasicMotions, GunPoint, ItalyPowerDemand, JapaneseVowels, OSULeaf and
   PickupGestureWiimoteZ: these load with no network (tests and CI train on them);
3. the archive's ``<Name>.zip`` from the mirrors, through :mod:`datamodules.download` (temporary file,
   checks, atomic rename), then its two ``.ts`` files extracted the same way (temporary file, rename).

Checksums: the archive publishes none; every member of the zip carries a CRC-32 that extraction checks
(a corrupt or truncated zip is refused in one line), and ``md5`` pins the zip's MD5 where one is known.

Splits (``split``):

* ``archive``: the archive's own train and test files; validation is a seeded ``val_fraction`` of the
  training file (``split_seed``).
* ``pooled``: the split of the coRNN/UnICORNN/LEM EigenWorms experiments: train and test files pooled
  (train cases first, in file order), then 30% held out and that held-out part halved into validation
  and test, exactly as scikit-learn's ``train_test_split(test_size=0.3, random_state=s1)`` then
  ``train_test_split(rest, test_size=0.5, random_state=s2)`` (no stratification): with
  ``pooled_seeds: [s1, s2]``. EigenWorms: 181 train, 39 validation, 39 test. LEM's code
  (tk-rusch/LEM, src/eigenWorms/data.py) uses 1234 for both.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.download import DataError, ensure_files
from datamodules.splits import SplitDataModule
from datamodules.ts_format import TSData, read_ts
from src.checks import check_choice, check_fraction, check_int
from storage.atomic import replace_atomically

log = logging.getLogger(__name__)

SPLITS = ("archive", "pooled")
PARTS = ("TRAIN", "TEST")
# Base URLs of the archive's zips, tried in order; "{zenodo}" is the dataset's Zenodo record (tsml
# community), used where ZENODO_RECORDS knows it.
DEFAULT_MIRRORS = [
    "https://timeseriesclassification.com/aeon-toolkit",
    "https://www.timeseriesclassification.com/Downloads",
    "https://zenodo.org/records/{zenodo}/files",
]
ZENODO_RECORDS = {"EigenWorms": 11206196}


def bundled_folder() -> Path | None:
    """The folder of the UEA/UCR files inside the installed aeon wheel (``aeon/datasets/data``), or None.

    Found without importing aeon (which would load numba-compiled modules and pandas: seconds)."""
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return folder if folder.is_dir() else None


def file_names(dataset: str) -> tuple[str, str]:
    """``(<Name>_TRAIN.ts, <Name>_TEST.ts)``."""
    return tuple(f"{dataset}_{part}.ts" for part in PARTS)


def pooled_split(count: int, fractions: tuple[float, float], seeds: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Indices (train, val, test) into ``count`` pooled cases, as scikit-learn's ``train_test_split``
    (no stratification) called twice: first ``test_size=fractions[0], random_state=seeds[0]`` on all
    cases, then ``test_size=fractions[1], random_state=seeds[1]`` on the held-out ones, whose
    "train" part is validation and "test" part is test.

    scikit-learn's ShuffleSplit draws ``RandomState(seed).permutation(n)``, takes the first
    ceil(fraction * n) indices as test and the rest as train, in permutation order; this repeats that
    with numpy alone (tests/test_uea.py checks it against scikit-learn)."""
    def split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.RandomState(seed).permutation(n)
        held_out = math.ceil(fraction * n)
        return order[held_out:], order[:held_out]

    train, rest = split(count, fractions[0], seeds[0])
    val_positions, test_positions = split(len(rest), fractions[1], seeds[1])
    return train, rest[val_positions], rest[test_positions]


class UEASequences(Dataset):
    """One split: ``dataset[i] -> (inputs (T_i, C) float32, label () int64)``.

    Args:
        series: one float32 tensor (T_i, C) per case, already normalised.
        labels: int64 (N,), class indices.
    """

    def __init__(self, series: list[torch.Tensor], labels: torch.Tensor) -> None:
        if len(series) != len(labels):
            raise ValueError(f"UEA sequences: {len(series)} series but {len(labels)} labels")
        self.series, self.labels = series, labels

    def __len__(self) -> int:
        return len(self.series)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.series[index], self.labels[index]


class UEADataModule(SplitDataModule):
    """Train/val/test splits of one UEA/UCR classification dataset (see the module docstring).

    Args:
        data_dir: files live in ``data_dir/uea`` (zips) and ``data_dir/uea/<Name>`` (the .ts files).
        dataset: the archive's name, e.g. "EigenWorms", "BasicMotions", "JapaneseVowels".
        split: "archive" (the archive's train/test, validation carved from train) or "pooled".
        val_fraction: "archive": share of the training file held out for validation, in (0, 1).
        split_seed: "archive": seed of that hold-out.
        pooled_fractions: "pooled": (held out of all, test share of the held-out part); default (0.3, 0.5).
        pooled_seeds: "pooled": the two ``random_state`` values; default (1234, 1234) as LEM's code.
        input_size, output_size, seq_len: what the task config says (C, classes, longest series);
            checked against the files, so that a network built from the config fits the data. None:
            not checked.
        normalize: per-channel standardisation with the training split's statistics.
        batch_size: series per batch.
        num_workers: DataLoader worker processes.
        mirrors: base URLs of the archive's zips (None: DEFAULT_MIRRORS).
        md5: the MD5 of ``<Name>.zip`` to check the download against (None: the zip's CRC-32s only).
        download: fetch the zip when the files are neither in ``data_dir/uea/<Name>`` nor bundled.
        use_bundled: read the aeon wheel's copy where it has the dataset.
        sizes_required: a None size is an error naming the values to set (the task config: a dataset
            missing from its table of shapes).
    """

    benchmark = "UEA"

    def __init__(self, data_dir: str, dataset: str, split: str = "archive", val_fraction: float = 0.2,
                 split_seed: int = 0, pooled_fractions=(0.3, 0.5), pooled_seeds=(1234, 1234),
                 input_size: int | None = None, output_size: int | None = None, seq_len: int | None = None,
                 normalize: bool = True, batch_size: int = 32, num_workers: int = 0,
                 mirrors: list[str] | None = None, md5: str | None = None, download: bool = True,
                 use_bundled: bool = True, sizes_required: bool = False) -> None:
        super().__init__(batch_size, num_workers)
        if data_dir is None or str(data_dir) == "":
            raise ValueError("UEA: data_dir must be a folder path; the files go to <data_dir>/uea")
        if not isinstance(dataset, str) or not dataset or "/" in dataset or dataset.startswith("."):
            raise ValueError(f"UEA: dataset must be an archive name such as EigenWorms or BasicMotions, got {dataset!r}")
        self.split_kind = check_choice("UEA split", split, SPLITS)
        check_fraction("UEA: val_fraction", val_fraction, closed_low=False)
        check_int("UEA: split_seed", split_seed)
        fractions, seeds = tuple(pooled_fractions), tuple(pooled_seeds)
        if len(fractions) != 2 or len(seeds) != 2:
            raise ValueError(f"UEA: pooled_fractions and pooled_seeds need two entries each, got {list(fractions)} "
                             f"and {list(seeds)}")
        for fraction in fractions:
            check_fraction("UEA: pooled_fractions", fraction, closed_low=False)
        for seed in seeds:
            check_int("UEA: pooled_seeds", seed)
        if mirrors is None:
            mirrors = DEFAULT_MIRRORS
        if isinstance(mirrors, (str, bytes)) or not len(mirrors) or not all(isinstance(m, str) and m for m in mirrors):
            raise ValueError(f"UEA: mirrors must be a non-empty list of URLs (or null for the defaults), got {mirrors!r}")
        self.data_dir, self.dataset = str(data_dir), dataset
        self.val_fraction, self.split_seed = float(val_fraction), split_seed
        self.pooled_fractions, self.pooled_seeds = tuple(float(f) for f in fractions), tuple(int(s) for s in seeds)
        self.expected = {"input_size": input_size, "output_size": output_size, "seq_len": seq_len}
        self.normalize, self.download, self.use_bundled = bool(normalize), bool(download), bool(use_bundled)
        self.md5 = md5
        zenodo = ZENODO_RECORDS.get(dataset)
        self.mirrors = [m.format(zenodo=zenodo) for m in mirrors if "{zenodo}" not in m or zenodo is not None]
        self.stats: dict[str, torch.Tensor] = {}
        self.sizes: dict[str, int] = {}
        if sizes_required and any(value is None for value in self.expected.values()):
            self._missing_sizes()

    # Files ----------------------------------------------------------------------------------------

    @property
    def folder(self) -> Path:
        """Where this dataset's .ts files are extracted or put by hand: ``data_dir/uea/<Name>``."""
        return Path(self.data_dir) / "uea" / self.dataset

    @property
    def zip_name(self) -> str:
        return f"{self.dataset}.zip"

    def local_files(self) -> tuple[Path, Path] | None:
        """The (train, test) .ts files already on this machine: our folder first, then aeon's copy; or None."""
        candidates = [self.folder]
        bundled = bundled_folder() if self.use_bundled else None
        if bundled is not None:
            candidates.append(bundled / self.dataset)
        for folder in candidates:
            paths = tuple(folder / name for name in file_names(self.dataset))
            if all(path.is_file() for path in paths):
                return paths
        return None

    def _remedy(self) -> str:
        train, test = file_names(self.dataset)
        return f"with no network, put {train} and {test} (or {self.zip_name}) in {self.folder}"

    def prepare_data(self) -> None:
        """Download and extract the dataset unless its files are already here (or bundled)."""
        if self.local_files() is not None:
            return
        zips = self.folder.parent
        if (zips / self.zip_name).is_file() or self.download:
            # Missing or wrong md5: fetched again (atomic); then the .ts files are extracted from it.
            ensure_files(zips, {self.zip_name: self.md5}, self.mirrors if self.download else None,
                         dataset=f"UEA {self.dataset}", remedy=self._remedy())
            self._extract(zips / self.zip_name)
        else:
            train, test = file_names(self.dataset)
            raise DataError(f"UEA {self.dataset}: {train} and {test} are not in {self.folder} and download=false; "
                            f"put them (or {self.zip_name}) there, or set task.datamodule.download=true")

    def _extract(self, archive: Path) -> None:
        """Write the zip's ``<Name>_TRAIN.ts`` and ``<Name>_TEST.ts`` into :attr:`folder`, each through a
        temporary file and an atomic rename (storage/atomic.py), after the zip's CRC-32 check."""
        try:
            with zipfile.ZipFile(archive) as bundle:
                members = {Path(info.filename).name: info for info in bundle.infolist() if not info.is_dir()}
                wanted = file_names(self.dataset)
                missing = [name for name in wanted if name not in members]
                if missing:
                    raise DataError(f"{archive}: no {' or '.join(missing)} inside (it holds "
                                    f"{', '.join(sorted(members)[:6]) or 'nothing'}); delete it and check task.dataset")
                self.folder.mkdir(parents=True, exist_ok=True)
                for name in wanted:
                    with replace_atomically(self.folder / name) as part:
                        with open(part, "wb") as out, bundle.open(members[name]) as source:
                            shutil.copyfileobj(source, out)  # reading to the end checks the member's CRC-32
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
            raise DataError(f"{archive}: not a valid zip ({error}); delete it to fetch it again") from None

    # Loading --------------------------------------------------------------------------------------

    def _read(self) -> tuple[TSData, TSData]:
        paths = self.local_files()
        if paths is None:
            train, test = file_names(self.dataset)
            raise DataError(f"UEA {self.dataset}: {train} and {test} are not in {self.folder}; call prepare_data() "
                            f"first (the Trainer does), or {self._remedy()}")
        train, test = (read_ts(path) for path in paths)
        if train.channels != test.channels:
            raise DataError(f"{paths[1]}: {test.channels} dimensions but {paths[0].name} has {train.channels}")
        unknown = sorted(set(test.labels) - set(train.class_labels))
        if unknown:
            raise DataError(f"{paths[1]}: class labels {unknown} are not declared in {paths[0].name}")
        return train, test

    def _missing_sizes(self) -> None:
        """A task config without this dataset's sizes: one line with the values to set (read from the
        headers and series when the files are here)."""
        paths = self.local_files()
        names = ("task.input_size", "task.output_size", "task.seq_len")
        if paths is None:
            raise ValueError(f"UEA {self.dataset}: not in conf/task/uea.yaml's shapes; set {', '.join(names)} "
                             "(channels, classes, longest series) on the command line")
        sizes = self._sizes(*self._read())
        values = " ".join(f"{name}={sizes[key]}" for name, key in zip(names, self.expected))
        raise ValueError(f"UEA {self.dataset}: not in conf/task/uea.yaml's shapes; set {values}")

    @staticmethod
    def _sizes(train: TSData, test: TSData) -> dict[str, int]:
        return {"input_size": train.channels, "output_size": len(train.class_labels),
                "seq_len": int(max(train.lengths.max(), test.lengths.max()))}

    def _check_sizes(self) -> None:
        wrong = {key: value for key, value in self.expected.items()
                 if value is not None and value != self.sizes[key]}
        if wrong:
            given = " ".join(f"task.{key}={value}" for key, value in wrong.items())
            fix = " ".join(f"task.{key}={self.sizes[key]}" for key in wrong)
            raise DataError(f"UEA {self.dataset}: the files have {self.sizes['input_size']} channels, "
                            f"{self.sizes['output_size']} classes and series of up to {self.sizes['seq_len']} steps, "
                            f"but the config says {given}; set {fix}")

    def _partition(self, train_count: int, test_count: int) -> dict[str, np.ndarray]:
        """Indices of each split into the cases of the training file followed by those of the test file."""
        if self.split_kind == "pooled":
            train, val, test = pooled_split(train_count + test_count, self.pooled_fractions, self.pooled_seeds)
        else:
            val_count = round(self.val_fraction * train_count)
            if not 0 < val_count < train_count:
                raise ValueError(f"UEA {self.dataset}: val_fraction={self.val_fraction} of {train_count} training "
                                 f"series leaves {val_count} for validation; choose one that keeps both splits non-empty")
            order = np.random.default_rng(self.split_seed).permutation(train_count)
            val, train = np.sort(order[:val_count]), np.sort(order[val_count:])
            test = np.arange(train_count, train_count + test_count)
        for name, indices in (("train", train), ("val", val), ("test", test)):
            if len(indices) == 0:
                raise ValueError(f"UEA {self.dataset}: the {self.split_kind} split leaves no {name} series; "
                                 "change pooled_fractions")
        return {"train": train, "val": val, "test": test}

    def setup(self, stage: str | None = None) -> None:
        """Read the files, split, normalise (every process; done once)."""
        if self.splits:
            return
        train_file, test_file = self._read()
        self.sizes = self._sizes(train_file, test_file)
        self._check_sizes()
        classes = {label: index for index, label in enumerate(train_file.class_labels)}
        series = train_file.series + test_file.series
        labels = np.array([classes[label] for label in train_file.labels + test_file.labels], dtype=np.int64)
        parts = self._partition(len(train_file.series), len(test_file.series))
        train_steps = np.concatenate([series[i] for i in parts["train"]])  # (sum T_i, C)
        if self.normalize:
            with np.errstate(invalid="ignore"):  # an all-missing channel: mean NaN, handled below
                mean, std = np.nanmean(train_steps, axis=0), np.nanstd(train_steps, axis=0)
            mean = np.nan_to_num(mean)
            std = np.where(np.isfinite(std) & (std > 0), std, 1.0)  # a constant channel is only centred
        else:
            mean, std = np.zeros(train_file.channels), np.ones(train_file.channels)
        self.stats = {"mean": torch.from_numpy(mean), "std": torch.from_numpy(std)}
        cases = [torch.from_numpy(np.nan_to_num((s - mean) / std, nan=0.0).astype(np.float32)) for s in series]
        for name, indices in parts.items():
            self.splits[name] = UEASequences([cases[i] for i in indices], torch.from_numpy(labels[indices]))
        log.info("UEA %s (%s split): %s; %d channels, %d classes, %d-%d steps", self.dataset, self.split_kind,
                 ", ".join(f"{name} {len(split)}" for name, split in self.splits.items()), train_file.channels,
                 len(classes), min(len(s) for s in series), self.sizes["seq_len"])

    def split(self, name: str) -> Dataset:
        if name not in self.splits:  # loaders asked for before setup (e.g. by hand)
            self.setup()
        return self.splits[name]
