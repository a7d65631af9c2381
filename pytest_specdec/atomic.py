"""Files and folders written whole or not at all: a reader (another worker, the next
session, a user opening a report) sees the old version, none, or the new one, never a
half-written one. Everything the package writes to disk goes through here.

A temporary sibling is written first, then renamed over the target (``os.replace``
is atomic on one file system). ``mkstemp``/``mkdtemp`` create 0600/0700 entries; the
result is widened to what the umask allows, as an ordinary ``open`` would, because
reports, weights and caches are shared files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator


def umask() -> int:
    """The process's umask (reading it means setting it: it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_file(path: str | os.PathLike, content: str | bytes, *, durable: bool = False) -> None:
    """Write ``content`` (text as UTF-8) to ``path``, creating its folder. ``durable``:
    fsync the data before the rename (reports: the file survives a crash, not only a
    concurrent reader); the folder entry itself is :func:`fsync_folder`'s."""
    write_with(path, lambda temp: _write_bytes(temp, content, durable), suffix=".tmp")


def _write_bytes(temp: Path, content: str | bytes, durable: bool) -> None:
    data = content.encode("utf-8") if isinstance(content, str) else content
    with open(temp, "wb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())


def write_with(path: str | os.PathLike, write: Callable[[Path], None], *, suffix: str = "") -> None:
    """Have ``write(temp)`` write the file (a library that writes by file name, e.g.
    safetensors), then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(descriptor)
    temp = Path(name)
    try:
        write(temp)
        os.chmod(temp, 0o666 & ~umask())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def staging_folder(folder: Path, *, prefix: str | None = None) -> Path:
    """An empty temporary folder beside ``folder`` (created with its parents), to be
    filled and then swapped in with :func:`swap_in`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix or f".{folder.name}.", dir=folder.parent))
    os.chmod(staging, 0o777 & ~umask())
    return staging


def swap_in(staging: Path, folder: Path) -> None:
    """Replace ``folder`` (if any) by ``staging``; the old one is removed after."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(folder, old)
    os.replace(staging, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def new_folder(folder: Path) -> Iterator[Path]:
    """``with new_folder(f) as staging:`` fill ``staging``; on a clean exit it replaces
    ``f``, on an error it is removed and ``f`` is left as it was."""
    staging = staging_folder(folder)
    try:
        yield staging
        swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fsync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable; not possible everywhere (Windows), so
    best effort."""
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
