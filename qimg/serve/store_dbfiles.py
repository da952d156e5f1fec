"""`FileStore` whose bytes live in a shared job store's database (`SharedJobStore.add_file_data`), so that every
process and machine on that database serves every file; a local folder caches what this process read or wrote.

Cached copies are named from the server-made file name (an id that is never reused) and written atomically, so
several processes may share one cache folder; it holds nothing the database does not and may be deleted at any
time (start-up only clears the temporaries of interrupted writes).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from qimg.atomic import atomic_write
from qimg.serve.store import FileRecord, FileStore, SharedJobStore
from qimg.serve.store_disk import drop_outputs, indexed_record, made_folder, new_stored_name


class DatabaseFileStore(FileStore):
    def __init__(self, cache: str | Path, index: SharedJobStore):
        self.root, self.index = made_folder(cache), index

    def _store(self, file_id: str, name: str, data: bytes, mime: str, job_id, role: str, index: int) -> FileRecord:
        record = FileRecord(file_id, job_id, role, name, mime, len(data), index, time.time())
        self.index.add_file_data(record, data)
        return record

    def put_bytes(self, data: bytes, *, ext: str, mime: str, job_id: str | None, role: str,
                  index: int = 0) -> FileRecord:
        file_id, name = new_stored_name(ext)
        return self._store(file_id, name, bytes(data), mime, job_id, role, index)

    def put_with(self, write: Callable[[Path], None], *, ext: str, mime: str, job_id: str | None, role: str,
                 index: int = 0) -> FileRecord:
        file_id, name = new_stored_name(ext)
        path = self.root / name
        write(path)  # atomically, into the cache; the database row follows
        try:
            return self._store(file_id, name, path.read_bytes(), mime, job_id, role, index)
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def path(self, file_id: str) -> tuple[FileRecord, Path] | None:
        record = indexed_record(self.index, file_id)
        if record is None:
            return None
        path = self.root / record.name
        if not path.is_file():
            data = self.index.file_data(file_id)
            if data is None:
                return None
            with atomic_write(path) as handle:
                handle.write(data)
        return record, path

    def sweep(self, drop_jobs: list[str] = ()) -> int:
        """Drops the outputs of `drop_jobs` from the database and the cache's temporaries of interrupted writes
        (those older than ten minutes: a younger one may be another process's write in progress)."""
        drop_outputs(self.index, drop_jobs)
        removed = 0
        for entry in os.scandir(self.root):
            if (entry.is_file(follow_symlinks=False) and entry.name.startswith(".") and entry.name.endswith(".tmp")
                    and entry.stat().st_mtime < time.time() - 600):
                try:
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:  # another process on this cache removed it
                    pass
        return removed
