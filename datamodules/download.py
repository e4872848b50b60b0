"""Fetching a dataset file from a list of mirrors, with a checksum and an atomic rename.

Shared by every datamodule that downloads (MNIST, PTB, NTU). A file only ever appears under its
final name complete and verified: it is streamed into a hidden temporary file in the same folder
(``.{filename}.part-XXXX``) and renamed with ``os.replace``, which is atomic on one file system
(storage/atomic.py, the project's one atomic write). So
an interrupted or corrupt download never looks like a good file, and concurrent readers see either
no file or the whole file.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence

from storage.atomic import replace_atomically, temporary_path

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # streaming block: bounded memory whatever the file size


class DataError(ValueError):
    """A data file is corrupt, truncated or not in its format. The message is one line naming the file
    and the fix; the run driver reports it without a traceback.

    Raised in a DataLoader worker, it reaches the main process re-built by torch with the worker's
    traceback as its message (``"Caught DataError in DataLoader worker process 0.\nOriginal Traceback
    ..."``); the constructor recovers the original one-line message from that text, so the driver
    still prints one line."""

    def __init__(self, message: str = "") -> None:
        super().__init__(_worker_message(str(message)))


def _worker_message(text: str) -> str:
    """The original message of a DataError re-raised from a DataLoader worker (torch's
    ``ExceptionWrapper.reraise`` text: header, traceback, then ``module.DataError: message``); any
    other text unchanged."""
    if not text.startswith("Caught ") or "\nOriginal Traceback" not in text:
        return text
    marker = f"{__name__}.DataError: "
    position = text.rfind(marker)
    if position < 0:
        marker = "DataError: "
        position = text.rfind(marker)
    return text[position + len(marker):].strip() if position >= 0 else text


class DownloadError(RuntimeError):
    """Files are missing or corrupt and could not be fetched. The message is one line; the parts are
    kept as attributes.

    Attributes:
        filename: the (first) file that could not be fetched.
        filenames: every file still missing or corrupt (``[filename]`` unless :func:`ensure_files` says more).
        folder: where the files should go (put them there by hand when offline).
        attempts: ``(url, reason)`` for each mirror tried for ``filename``, in order.
        corrupt: True when a file with a wrong checksum sits under the final name of ``filename``.
    """

    def __init__(self, filename: str, folder: Path, attempts: list[tuple[str, str]], corrupt: bool = False,
                 message: str | None = None, filenames: Sequence[str] | None = None) -> None:
        self.filename, self.folder, self.attempts, self.corrupt = filename, Path(folder), list(attempts), corrupt
        self.filenames = list(filenames) if filenames is not None else [filename]
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
        part = temporary_path(target)  # a folder that cannot be written is an OSError for the caller
        try:
            log.info("downloading %s", url)
            # The final name only ever holds a verified file; a failure or Ctrl-C removes the part file.
            with replace_atomically(target, temporary=part):
                _fetch(url, part, md5, timeout)
            log.info("saved %s", target)
            return target
        except (OSError, ValueError, http.client.HTTPException) as error:
            # OSError covers URLError/HTTPError, refused connections and timeouts; ValueError covers
            # malformed URLs and our own size/checksum checks.
            attempts.append((url, _reason(error)))
            log.warning("mirror %s failed for %s: %s", mirror, filename, attempts[-1][1])
    raise DownloadError(filename, destination_dir, attempts, corrupt=corrupt)


def _file_problem(path: Path, md5: str | None) -> str | None:
    """Why ``path`` is not usable ("missing", "corrupt: wrong md5"), or None when it is."""
    if not path.is_file():
        return "missing"
    if md5 is not None and md5sum(path) != md5.lower():
        return "corrupt: wrong md5"
    return None


def ensure_files(folder: str | os.PathLike, files: Mapping[str, str | None], mirrors: Sequence[str] | None = None,
                 dataset: str = "dataset", remedy: str | None = None, timeout: float = 30) -> dict[str, Path]:
    """Make sure every file of ``files`` is in ``folder`` with its checksum; return ``{name: path}``.

    The one check every downloading DataModule (MNIST, PTB, NTU) runs before reading its files: it
    looks at all of them first, so that the error names *every* file that is missing or corrupt,
    not just the first one.

    Args:
        folder: where the files live (created when something is downloaded into it).
        files: ``{file name: expected hex md5}``; an md5 of None accepts any content.
        mirrors: base URLs to fetch missing or corrupt files from, tried in order for each file
            (see :func:`download_file`). None: only check, never touch the network (e.g. a
            ``download=false`` setting, or reading files that ``prepare_data`` fetched earlier).
        dataset: names the data in the message, e.g. "MNIST".
        remedy: what the user can do, ending the message (default: put the files in ``folder``),
            e.g. "put them there (from https://...) or set download=true".
        timeout: seconds per connection or read before the next mirror is tried.

    Raises:
        DownloadError: one line. Without mirrors: "<dataset> files not available in <folder>:
            a (missing), b (corrupt: wrong md5); <remedy>". With mirrors, at the first file that no
            mirror serves (without network the others would fail too, each after its own timeouts):
            "cannot download the <dataset> files a (missing), b (...) (tried <url> [<reason>], ...);
            <remedy>", naming that file and every other file still not in place.
            ``error.filenames`` lists them.
    """
    folder = Path(folder)
    files = dict(files.items())  # Hydra passes a DictConfig: read it as a plain mapping
    problems = {name: problem for name, md5 in files.items()
                if (problem := _file_problem(folder / name, md5)) is not None}
    if problems and mirrors is None:
        listed = ", ".join(f"{name} ({problem})" for name, problem in problems.items())
        raise DownloadError(next(iter(problems)), folder, [], filenames=list(problems), message=(
            f"{dataset} files not available in {folder}: {listed}; {remedy or f'put them in {folder}'}"))
    for position, name in enumerate(list(problems)):
        try:
            download_file(name, mirrors, files[name], folder, timeout=timeout)
        except DownloadError as error:
            still = list(problems)[position:]
            listed = ", ".join(f"{n} ({problems[n]})" for n in still)
            tried = ", ".join(f"{url} [{reason}]" for url, reason in error.attempts) or "no mirrors given"
            raise DownloadError(name, folder, error.attempts, corrupt=error.corrupt, filenames=still, message=(
                f"cannot download the {dataset} files {listed} (tried {tried}); "
                f"{remedy or f'with no network, put them in {folder}'}")) from None
    return {name: folder / name for name in files}
