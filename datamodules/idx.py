"""Reading and writing IDX files (the MNIST format), gzipped or raw, with numpy alone.

Layout: a 4-byte big-endian magic ``0x0000TTDD`` (two zero bytes, the type byte TT, the number of
dimensions DD), then DD big-endian uint32 sizes, then the values in C order, big-endian.
MNIST uses type 0x08 (uint8): labels are ``0x00000801`` (N,), images ``0x00000803`` (N, 28, 28).
"""
from __future__ import annotations

import gzip as gzip_module
import os
import zlib
from pathlib import Path

import numpy as np

from datamodules.download import DataError

GZIP_MAGIC = b"\x1f\x8b"

# IDX type byte -> big-endian element type.
IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _shape_text(dims: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in dims)


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it starts with the gzip magic (whatever its name)."""
    with open(path, "rb") as file:
        data = file.read()
    if data[:2] != GZIP_MAGIC:
        return data
    try:
        return gzip_module.decompress(data)
    except EOFError:
        raise DataError(f"{path}: truncated gzip stream (the download was probably cut short); "
                         f"delete the file to fetch it again") from None
    except (OSError, zlib.error) as error:
        raise DataError(f"{path}: corrupt gzip data ({error}); delete the file to fetch it again") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Load an IDX file as a native-endian, writable array of the shape its header gives.

    Returns e.g. uint8 (N,) for MNIST labels, uint8 (N, 28, 28) for MNIST images.

    Raises:
        ValueError: not an IDX file (wrong magic or unknown type), a truncated file, or a size that
            does not match the header.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(data)} bytes, shorter than the 4-byte magic)")
    magic = int.from_bytes(data[:4], "big")
    type_code, ndim = data[2], data[3]
    if data[:2] != b"\x00\x00" or type_code not in IDX_TYPES or ndim == 0:
        raise DataError(f"{path}: not an IDX file (magic 0x{magic:08x}; expected 0x00000801 for labels, "
                         f"0x00000803 for images, or 0x0000TTDD with a known type byte TT)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated: the header needs {header} bytes for {ndim} dimensions "
                         f"but the file has {len(data)}")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_TYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    available = len(data) - header
    if available < expected:
        raise DataError(f"{path}: truncated: header says {_shape_text(dims)} ({expected} bytes) "
                         f"but {available} bytes follow")
    if available > expected:
        raise DataError(f"{path}: size mismatch: header says {_shape_text(dims)} ({expected} bytes) "
                         f"but {available} bytes follow")
    array = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header).reshape(dims)
    # astype copies: the result is native-endian and writable (torch.from_numpy warns on read-only).
    return array.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray, gzip: bool) -> Path:
    """Write ``array`` (any shape, 1 to 255 dimensions, a type IDX knows, e.g. uint8) as an IDX file.

    Args:
        path: the file to write (the name is not used to decide compression).
        array: e.g. uint8 (N,) labels or uint8 (N, rows, cols) images.
        gzip: compress the file (as the MNIST files are distributed).
    """
    array = np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in IDX_TYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"write_idx {path}: dtype {array.dtype} has no IDX type; use one of "
                         f"{sorted(str(d.newbyteorder('=')) for d in IDX_TYPES.values())}")
    if not 1 <= array.ndim <= 255 or any(size >= 2 ** 32 for size in array.shape):
        raise ValueError(f"write_idx {path}: shape {array.shape} does not fit IDX (1-255 dimensions, sizes < 2**32)")
    code = codes[native]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=IDX_TYPES[code]).tobytes()
    path = Path(path)
    if gzip:
        # mtime=0: the same array gives the same bytes (and md5) every time.
        payload = gzip_module.compress(payload, compresslevel=6, mtime=0)
    path.write_bytes(payload)
    return path
