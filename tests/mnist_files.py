"""Test helpers: tiny MNIST files in the real IDX format, and a local HTTP server to download them from."""
from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from datamodules.download import md5sum
from datamodules.idx import write_idx
from datamodules.mnist import ALL_FILES, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS


def tiny_digits(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Learnable stand-ins for digits: images uint8 (count, 28, 28), labels uint8 (count,).

    Class c lights the band of rows 4+2c and 5+2c (bright, 180-255) over faint noise (0-60), so a
    row-by-row reader separates the classes easily and every image is still distinct.
    """
    labels = rng.permutation(np.arange(count) % 10).astype(np.uint8)  # balanced classes
    images = rng.integers(0, 61, size=(count, 28, 28), dtype=np.uint8)
    bands = 4 + 2 * labels.astype(np.int64)
    for offset in (0, 1):
        images[np.arange(count), bands + offset, :] = rng.integers(180, 256, size=(count, 28), dtype=np.uint8)
    return images, labels


def write_tiny_mnist(directory: Path, train: int = 200, test: int = 100, gzip: bool = True,
                     seed: int = 0) -> dict[str, str]:
    """Write the four MNIST files (official names, IDX magic 2049/2051) into ``directory``; return {name: md5}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for (images_name, labels_name), count in (((TRAIN_IMAGES, TRAIN_LABELS), train), ((TEST_IMAGES, TEST_LABELS), test)):
        images, labels = tiny_digits(count, rng)
        write_idx(directory / images_name, images, gzip=gzip)
        write_idx(directory / labels_name, labels, gzip=gzip)
    return {name: md5sum(directory / name) for name in ALL_FILES}


@contextlib.contextmanager
def serve_directory(directory: Path, requests: list[str] | None = None) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1 (a free port) in a daemon thread; yield its base URL.

    Args:
        directory: the folder whose files are served (missing files answer 404).
        requests: if given, the path of every request is appended to it (to check who was asked).
    """

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 (the base class's name)
            if requests is not None:
                requests.append(self.path)

    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
