"""The atomic write: a file appears under its name whole or not at all, never half written.

Every file the project must not leave broken is written through here: results.json, checkpoints,
downloads, files taken out of an archive (PTB, UEA), the NTU HDF5 file. The bytes go into a
temporary file in the target's folder (a rename is atomic only within one file system), which is
flushed to the disk (``fsync``), given the permissions a new file gets (``mkstemp`` makes it 0600;
the umask decides) and renamed over the target with ``os.replace``; the folder is then fsynced so
the rename itself survives a power cut. On any failure (``ENOSPC``, a read-only mount, a checksum
that does not match, Ctrl-C) the temporary file is removed and the previous target is left as it
was; the error propagates.

    with replace_atomically(path) as part:     # part: a new empty file next to path (.<name>.part-XXXX)
        write_into(part)                        # anything that writes a path: open(), h5py, torch.save
    # here path holds the new bytes; after an error in the block it holds the old ones, and part is gone

    write_text_atomically(path, text)           # the same for a string or bytes
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems refuse to fsync a folder)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def temporary_path(target: str | os.PathLike) -> Path:
    """A new, empty, hidden file next to ``target`` (``.<name>.part-XXXXXXXX``) to write it through.

    Raises OSError when the folder cannot be written (missing, read-only, full)."""
    target = Path(target)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.part-", dir=target.parent)
    os.close(handle)
    return Path(name)


def commit(temporary: str | os.PathLike, target: str | os.PathLike, durable: bool = True) -> Path:
    """Rename the finished ``temporary`` over ``target`` (same folder): its bytes are fsynced first and
    the folder after (``durable``), and it gets the permissions of a new file under the umask.

    On failure ``temporary`` is left for the caller to remove (:func:`replace_atomically` does)."""
    temporary, target = Path(temporary), Path(target)
    if durable:
        with open(temporary, "rb") as stream:  # on disk before it replaces the previous file
            os.fsync(stream.fileno())
    os.chmod(temporary, 0o666 & ~current_umask())
    os.replace(temporary, target)
    if durable:
        fsync_folder(target.parent)
    return target


@contextmanager
def replace_atomically(target: str | os.PathLike, temporary: str | os.PathLike | None = None,
                       durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; when the block ends normally, rename it over
    ``target`` (:func:`commit`); when it raises (anything, KeyboardInterrupt included), remove it.

    Args:
        target: the file to (re)place; its folder must exist.
        temporary: where to write instead of a fresh ``.<name>.part-XXXXXXXX`` (a fixed name lets a
            later run find a leftover, as the NTU converter does); it must be in ``target``'s folder.
        durable: fsync the file and the folder (off only for files cheap to make again).
    """
    target = Path(target)
    temporary = temporary_path(target) if temporary is None else Path(temporary)
    if temporary.parent.resolve() != target.parent.resolve():
        raise ValueError(f"the temporary file {temporary} must be in {target.parent}: a rename across folders "
                         f"may cross file systems and is not atomic")
    try:
        yield temporary
        commit(temporary, target, durable=durable)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomically(target: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``target`` atomically (see the module); return ``target`` as a Path."""
    target = Path(target)
    with replace_atomically(target, durable=durable) as temporary:
        with open(temporary, "wb") as stream:
            stream.write(data)
    return target


def write_text_atomically(target: str | os.PathLike, text: str, encoding: str = "utf-8",
                          durable: bool = True) -> Path:
    """Write ``text`` to ``target`` atomically (see the module); return ``target`` as a Path."""
    return write_bytes_atomically(target, text.encode(encoding), durable=durable)
