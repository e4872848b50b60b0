"""Reading the ``.ts`` files of the UEA/UCR time-series classification archive.

The format (sktime/aeon's): ``#`` (or ``%``) comment lines, then ``@`` header lines (``@problemName``,
``@timeStamps``, ``@missing``, ``@univariate``, ``@dimensions``, ``@equalLength``, ``@seriesLength``,
``@classLabel true <labels...>``), then ``@data`` and one line per case::

    v,v,v,...:v,v,v,...:...:label

the dimensions (channels) separated by ``:``, each a ``,``-separated series of the same length, and
the class label last. ``?`` (or ``NaN``) marks a missing value; cases may differ in length
(``@equalLength false``, e.g. JapaneseVowels 7-29 steps). Timestamped series (``@timeStamps true``,
values written ``(t,v)``) are not supported: no classification dataset of the archive uses them.

Why our own reader and not aeon's ``load_from_ts_file``: the format is this simple, the core install
needs no pandas/scikit-learn/numba pin (aeon 1.6.0 pins numba < 0.64), importing aeon costs seconds,
and every problem of a file becomes one line naming the file, the line and the fix
(:class:`datamodules.download.DataError`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.download import DataError

TRUE, FALSE = "true", "false"


@dataclass
class TSData:
    """One ``.ts`` file.

    Attributes:
        series: one float64 array (T_i, C) per case, missing values as NaN.
        labels: the class label string of each case, in file order.
        class_labels: the labels declared by ``@classLabel``, in the header's order.
        name: ``@problemName``.
        channels: C, the dimensions of every case.
    """

    series: list[np.ndarray]
    labels: list[str]
    class_labels: list[str]
    name: str
    channels: int

    @property
    def lengths(self) -> np.ndarray:
        """int64 (N,): T_i of every case."""
        return np.array([len(s) for s in self.series], dtype=np.int64)


def _flag(value: str, key: str, path: Path, line: int) -> bool:
    lowered = value.lower()
    if lowered not in (TRUE, FALSE):
        raise DataError(f"{path}:{line}: @{key} must be true or false, got {value!r}; fix the header")
    return lowered == TRUE


def _values(text: str, path: Path, line: int, dimension: int) -> np.ndarray:
    """One dimension's ``,``-separated values as float64, ``?`` as NaN."""
    try:
        return np.array(text.replace("?", "nan").split(","), dtype=np.float64)
    except ValueError:
        bad = next(item for item in text.split(",") if not _is_number(item))
        raise DataError(f"{path}:{line}: dimension {dimension + 1} holds {bad.strip()[:30]!r}, not a number or ?; "
                        "the file is corrupt: delete it to fetch it again") from None


def _is_number(item: str) -> bool:
    try:
        float(item)
        return item.strip() != ""
    except ValueError:
        return item.strip() == "?"


def read_ts(path: str | Path) -> TSData:
    """Parse a classification ``.ts`` file (see the module docstring).

    Returns:
        :class:`TSData`: the series (T_i, C) float64 with NaN for missing values, and the labels.

    Raises:
        DataError: one line naming the file, the line and the problem (no ``@data``, a case with
            another number of dimensions, dimensions of different lengths, a label not declared,
            timestamps, regression files, values that are not numbers).
    """
    path = Path(path)
    header: dict[str, str] = {}
    class_labels: list[str] | None = None
    series: list[np.ndarray] = []
    labels: list[str] = []
    channels: int | None = None
    in_data = False
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, raw in enumerate(file, start=1):
            text = raw.strip()
            if not text or text.startswith(("#", "%")):
                continue
            if not in_data:
                if not text.startswith("@"):
                    raise DataError(f"{path}:{number}: expected an @ header line or @data before the values, got "
                                    f"{text[:40]!r}; is this a .ts file?")
                key, _, value = text[1:].partition(" ")
                key, value = key.lower(), value.strip()
                if key == "data":
                    in_data = True
                    if class_labels is None:
                        raise DataError(f"{path}: no '@classLabel true <labels>' header before @data; "
                                        "only classification files are supported")
                elif key == "classlabel":
                    words = value.split()
                    if not words or not _flag(words[0], "classLabel", path, number) or len(words) < 2:
                        raise DataError(f"{path}:{number}: '@classLabel {value}' declares no class labels; "
                                        "only classification files (@classLabel true <labels>) are supported")
                    class_labels = words[1:]
                elif key == "targetlabel":
                    raise DataError(f"{path}:{number}: a regression file (@targetLabel); task=uea reads "
                                    "classification files (@classLabel true <labels>)")
                elif key == "timestamps" and _flag(value, "timeStamps", path, number):
                    raise DataError(f"{path}:{number}: @timeStamps true is not supported; "
                                    "use the archive's file without timestamps")
                else:
                    header[key] = value
                continue
            *dimensions, label = text.split(":")
            if not dimensions:
                raise DataError(f"{path}:{number}: a case needs its values and a ':label' at the end, got "
                                f"{text[:40]!r}")
            label = label.strip()
            if label not in class_labels:
                raise DataError(f"{path}:{number}: class label {label!r} is not one of @classLabel "
                                f"{' '.join(class_labels)}; fix the header or the line")
            if channels is None:
                channels = len(dimensions)
            elif len(dimensions) != channels:
                raise DataError(f"{path}:{number}: {len(dimensions)} dimensions, but earlier cases have {channels}; "
                                "every case needs the same number")
            columns = [_values(d, path, number, i) for i, d in enumerate(dimensions)]
            if len({len(c) for c in columns}) != 1:
                raise DataError(f"{path}:{number}: dimensions of different lengths "
                                f"{sorted({len(c) for c in columns})}; each dimension of a case needs one length")
            series.append(np.stack(columns, axis=1))
            labels.append(label)
    if not in_data:
        raise DataError(f"{path}: no @data line; is this a .ts file? (delete it to fetch it again)")
    if not series:
        raise DataError(f"{path}: no cases after @data; the file is truncated: delete it to fetch it again")
    declared = header.get("dimensions")
    if declared is not None and declared.isdigit() and int(declared) != channels:
        raise DataError(f"{path}: @dimensions {declared} but the cases have {channels}; fix the header")
    return TSData(series, labels, class_labels, header.get("problemname", path.stem), channels)
