"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one. The new file gets
the mode any other file of this process would (0666 less the umask), not the temporary file's private 0600.

Temporaries are named `.<name>.<pid>.<random>.tmp`; a process killed mid-write leaves one behind, and the next write
of the same name removes those whose process is gone."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once, at import, while nothing else runs
FILE_MODE = 0o666 & ~_UMASK


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process (or no way to tell): leave its file alone
    return True


def remove_stale_temporaries(path: Path) -> int:
    """Remove `path`'s temporaries left by processes that no longer run; returns how many."""
    removed = 0
    prefix = f".{path.name}."
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return 0
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid = name[len(prefix):-len(".tmp")].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed += 1
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on success it is synced and renamed over `path`, on error
    removed."""
    path = Path(path)
    if not path.parent.exists():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """An open file beside `path`; on success it is synced and renamed over `path`, on error removed."""
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        yield handle
        handle.flush()
