"""Fetching a dataset file from a list of mirrors, with a checksum and an atomic rename.

Shared by every datamodule that downloads (MNIST, PTB, NTU). A file only ever appears under its
final name complete and verified: it is streamed into a hidden temporary file in the same folder
(``.{filename}.part-XXXX``) and renamed with ``os.replace``, which is atomic on one file system. So
an interrupted or corrupt download never looks like a good file, and concurrent readers see either
no file or the whole file.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # streaming block: bounded memory whatever the file size


class DownloadError(RuntimeError):
    """Every mirror failed for one file. The message is one line; the parts are kept as attributes.

    Attributes:
        filename: the file that could not be fetched.
        folder: where the file should go (put it there by hand when offline).
        attempts: ``(url, reason)`` for each mirror tried, in order.
        corrupt: True when a file with a wrong checksum sits under the final name.
    """

    def __init__(self, filename: str, folder: Path, attempts: list[tuple[str, str]], corrupt: bool = False,
                 message: str | None = None) -> None:
        self.filename, self.folder, self.attempts, self.corrupt = filename, Path(folder), list(attempts), corrupt
        if message is None:
            tried = ", ".join(f"{url} [{reason}]" for url, reason in attempts) or "no mirrors given"
            state = f"; the existing {folder / filename} is corrupt (wrong md5)" if corrupt else ""
            message = (f"cannot download {filename} (tried {tried}){state}; "
                       f"with no network, put the file in {folder}")
        super().__init__(message)


def md5sum(path: str | os.PathLike) -> str:
    """Hex MD5 digest of a file, read in blocks."""
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _reason(error: BaseException) -> str:
    """A short, single-line reason for a failed attempt (goes into warnings and DownloadError)."""
    if isinstance(error, urllib.error.HTTPError):
        return _one_line(f"HTTP {error.code} {error.reason}")
    if isinstance(error, urllib.error.URLError):
        return _one_line(error.reason)
    return _one_line(f"{type(error).__name__}: {error}")


def _fetch(url: str, part: Path, expected_md5: str | None, timeout: float) -> None:
    """Stream ``url`` into ``part``; raise ValueError if the bytes are incomplete or fail the checksum."""
    digest, received = hashlib.md5(), 0
    with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as file:
        # http.client returns a short body silently when the server closes early; compare with the header.
        announced = response.headers.get("Content-Length") if response.headers is not None else None
        for block in iter(lambda: response.read(CHUNK_BYTES), b""):
            digest.update(block)
            file.write(block)
            received += len(block)
    if announced is not None and announced.isdigit() and int(announced) != received:
        raise ValueError(f"incomplete: received {received} of {announced} bytes")
    if expected_md5 is not None and digest.hexdigest() != expected_md5.lower():
        raise ValueError(f"md5 mismatch: got {digest.hexdigest()}, expected {expected_md5.lower()}")


def download_file(filename: str, mirrors: list[str], md5: str | None, destination_dir: Path,
                  timeout: float = 30) -> Path:
    """Return ``destination_dir / filename``, downloading it from the first mirror that serves it intact.

    An existing file is returned without any network access when its MD5 matches ``md5`` (or ``md5``
    is None). One with the wrong MD5 is not trusted: it is fetched again and replaced.

    Args:
        filename: the file's name, appended to each mirror: ``mirror.rstrip('/') + '/' + filename``.
        mirrors: base URLs tried in order (``https://``, ``http://`` or ``file://``).
        md5: expected hex digest; None skips the check.
        destination_dir: the folder the file goes into (created if missing).
        timeout: seconds to wait on a connection or a read before moving to the next mirror.

    Raises:
        DownloadError: every mirror failed (unreachable, HTTP error, incomplete or wrong checksum).
    """
    if isinstance(mirrors, (str, bytes)):
        raise ValueError(f"download {filename}: mirrors must be a list of URLs, got the string {mirrors!r}")
    destination_dir = Path(destination_dir)
    target = destination_dir / filename
    corrupt = False
    if target.is_file():
        if md5 is None:
            return target
        actual = md5sum(target)
        if actual == md5.lower():
            return target
        corrupt = True
        log.warning("%s has md5 %s, expected %s: downloading it again", target, actual, md5.lower())
    destination_dir.mkdir(parents=True, exist_ok=True)
    attempts: list[tuple[str, str]] = []
    for mirror in mirrors:
        url = str(mirror).rstrip("/") + "/" + filename
        handle, part_name = tempfile.mkstemp(prefix=f".{filename}.part-", dir=destination_dir)
        os.close(handle)
        part = Path(part_name)
        try:
            log.info("downloading %s", url)
            _fetch(url, part, md5, timeout)
            os.replace(part, target)  # atomic: the final name only ever holds a verified file
            log.info("saved %s", target)
            return target
        except (OSError, ValueError, http.client.HTTPException) as error:
            # OSError covers URLError/HTTPError, refused connections and timeouts; ValueError covers
            # malformed URLs and our own size/checksum checks.
            attempts.append((url, _reason(error)))
            log.warning("mirror %s failed for %s: %s", mirror, filename, attempts[-1][1])
        finally:
            # Reached on failure and on interruption (KeyboardInterrupt); after os.replace it is gone.
            part.unlink(missing_ok=True)
    raise DownloadError(filename, destination_dir, attempts, corrupt=corrupt)
