"""`FileStore` on a local folder: `<root>/<file id>.<ext>`, written with `qimg.atomic.atomic_write`.

Names on disk are made here from a server-generated id and a fixed extension; a client's text never reaches a path.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

from qimg.atomic import atomic_write
from qimg.serve.store import FILE_ID, OUTPUT_ROLES, FileRecord, FileStore, JobStore, new_file_id

log = logging.getLogger("qimg.serve")

EXTENSIONS = {".png", ".jpg", ".webp", ".psd", ".ora", ".pptx", ".zip", ".json"}


def new_stored_name(ext: str) -> tuple[str, str]:
    """A new file id and its name on disk (`<id><ext>`, from the fixed extension list)."""
    if ext not in EXTENSIONS:
        raise ValueError(f"unsupported stored file extension {ext!r}")
    file_id = new_file_id()
    return file_id, file_id + ext


def indexed_record(index: JobStore, file_id) -> FileRecord | None:
    """The index row of a well-formed file id; None for anything else."""
    if not isinstance(file_id, str) or not FILE_ID.fullmatch(file_id):
        return None
    return index.get_file(file_id)


def drop_outputs(index: JobStore, job_ids: list[str]) -> None:
    """Forget the files `job_ids` made (their rows; a store that holds the bytes in its rows drops those too)."""
    if job_ids:
        index.delete_files([r.id for r in index.files_of_jobs(list(job_ids), OUTPUT_ROLES)])


def made_folder(root: str | Path) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


class DiskFileStore(FileStore):
    def __init__(self, root: str | Path, index: JobStore):
        self.root, self.index = made_folder(root), index

    def _record(self, file_id, name, mime, job_id, role, index) -> FileRecord:
        record = FileRecord(file_id, job_id, role, name, mime, (self.root / name).stat().st_size, index, time.time())
        self.index.add_file(record)
        return record

    def put_bytes(self, data: bytes, *, ext: str, mime: str, job_id: str | None, role: str,
                  index: int = 0) -> FileRecord:
        file_id, name = new_stored_name(ext)
        with atomic_write(self.root / name) as handle:
            handle.write(data)
        return self._record(file_id, name, mime, job_id, role, index)

    def put_with(self, write: Callable[[Path], None], *, ext: str, mime: str, job_id: str | None, role: str,
                 index: int = 0) -> FileRecord:
        file_id, name = new_stored_name(ext)
        write(self.root / name)
        return self._record(file_id, name, mime, job_id, role, index)

    def path(self, file_id: str) -> tuple[FileRecord, Path] | None:
        record = indexed_record(self.index, file_id)
        if record is None:
            return None
        path = (self.root / record.name)
        if path.is_symlink() or not path.is_file() or path.resolve().parent != self.root:
            return None
        return record, path

    def sweep(self, drop_jobs: list[str] = ()) -> int:
        removed = 0
        drop_outputs(self.index, drop_jobs)
        known = self.index.all_file_names()
        for entry in os.scandir(self.root):
            if entry.is_file(follow_symlinks=False) and entry.name not in known:
                # temporaries of interrupted atomic writes (".<name>.*.tmp") and files whose row was never written
                try:
                    os.unlink(entry.path)
                    removed += 1
                except OSError as err:
                    log.warning("could not remove %s: %s", entry.path, err)
        return removed
