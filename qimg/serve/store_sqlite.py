"""`JobStore` on SQLite (stdlib sqlite3, WAL journal): one connection shared by the threads, behind a lock."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from qimg.serve.store import (CANCELLED, FAILED, QUEUED, RUNNING, TERMINAL, FileRecord, Job, JobStore, storable)

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    params TEXT NOT NULL,
    result TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    error_type TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    job_id TEXT,
    role TEXT NOT NULL,
    name TEXT NOT NULL UNIQUE,
    mime TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    idx INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_job ON files(job_id);
"""

RESTART_RUNNING = "the server stopped while this job was running (it was marked failed when the server started again)"
RESTART_QUEUED = "the server stopped before this job started (it was marked failed when the server started again)"


class SQLiteJobStore(JobStore):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} was written by a newer qimg (schema {version} > {SCHEMA_VERSION})")
            self._db.executescript(SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # -- jobs --------------------------------------------------------------------------------------------------
    def create(self, job_id: str, kind: str, model: str, params: dict) -> Job:
        now = time.time()
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, kind, status, model, params, created_at) VALUES (?,?,?,?,?,?)",
                             (job_id, kind, QUEUED, model, json.dumps(params), now))
        return Job(job_id, kind, QUEUED, model, params, created_at=now)

    def _job(self, row) -> Job:
        files = [self._file(r) for r in self._db.execute(
            "SELECT * FROM files WHERE job_id=? ORDER BY role, idx", (row["id"],))]
        return Job(row["id"], row["kind"], row["status"], row["model"], storable(json.loads(row["params"])),
                   storable(json.loads(row["result"] or "{}")), storable(row["error"]), row["error_type"],
                   row["created_at"], row["started_at"], row["finished_at"], files)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            return self._job(row) if row else None

    def list(self, limit: int = 50, before: str | None = None) -> list[Job]:
        with self._lock:
            if before:
                seq = self._db.execute("SELECT seq FROM jobs WHERE id=?", (before,)).fetchone()
                if seq is None:
                    return []
                rows = self._db.execute("SELECT * FROM jobs WHERE seq<? ORDER BY seq DESC LIMIT ?",
                                        (seq[0], limit)).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
            return [self._job(r) for r in rows]

    def queued(self) -> list[Job]:
        with self._lock:
            return [self._job(r) for r in self._db.execute("SELECT * FROM jobs WHERE status=? ORDER BY seq",
                                                          (QUEUED,)).fetchall()]

    def mark_running(self, job_id: str) -> bool:
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET status=?, started_at=? WHERE id=? AND status=?",
                                   (RUNNING, time.time(), job_id, QUEUED))
            return cur.rowcount == 1

    def finish(self, job_id: str, status: str, *, result: dict | None = None, error: str | None = None,
               error_type: str | None = None) -> bool:
        assert status in TERMINAL, status
        marks = ",".join("?" * len(TERMINAL))
        with self._lock:
            cur = self._db.execute(
                f"UPDATE jobs SET status=?, result=?, error=?, error_type=?, finished_at=? "
                f"WHERE id=? AND status NOT IN ({marks})",
                (status, json.dumps(result or {}), storable(error), error_type, time.time(), job_id, *TERMINAL))
            return cur.rowcount == 1

    def recover(self, keep_queued: bool = False) -> list[str]:
        now = time.time()
        stale = (RUNNING,) if keep_queued else (QUEUED, RUNNING)
        with self._lock:
            ids = [r[0] for r in self._db.execute(
                f"SELECT id FROM jobs WHERE status IN ({','.join('?' * len(stale))})", stale)]
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("UPDATE jobs SET status=?, error=?, error_type='server_restart', finished_at=? "
                                 "WHERE status=?", (FAILED, RESTART_RUNNING, now, RUNNING))
                if not keep_queued:
                    self._db.execute("UPDATE jobs SET status=?, error=?, error_type='server_restart', finished_at=? "
                                     "WHERE status=?", (FAILED, RESTART_QUEUED, now, QUEUED))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return ids

    def cancel_queued(self, job_id: str, reason: str) -> bool:
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET status=?, error=?, error_type='cancelled', finished_at=? "
                                   "WHERE id=? AND status=?", (CANCELLED, reason, time.time(), job_id, QUEUED))
            return cur.rowcount == 1

    # -- files -------------------------------------------------------------------------------------------------
    @staticmethod
    def _file(row) -> FileRecord:
        return FileRecord(row["id"], row["job_id"], row["role"], row["name"], row["mime"], row["bytes"], row["idx"],
                          row["created_at"])

    def add_file(self, record: FileRecord) -> None:
        with self._lock:
            self._db.execute("INSERT INTO files (id, job_id, role, name, mime, bytes, idx, created_at) "
                             "VALUES (?,?,?,?,?,?,?,?)",
                             (record.id, record.job_id, record.role, record.name, record.mime, record.bytes,
                              record.index, record.created_at or time.time()))

    def get_file(self, file_id: str) -> FileRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM files WHERE id=?", (file_id,)).fetchone()
            return self._file(row) if row else None

    def delete_files(self, file_ids: list[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM files WHERE id=?", [(i,) for i in file_ids])

    def files_of_jobs(self, job_ids: list[str], roles: tuple[str, ...]) -> list[FileRecord]:
        out = []
        with self._lock:
            for job_id in job_ids:
                out += [self._file(r) for r in self._db.execute(
                    f"SELECT * FROM files WHERE job_id=? AND role IN ({','.join('?' * len(roles))})",
                    (job_id, *roles))]
        return out

    def all_file_names(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT name FROM files")}

    def close(self) -> None:
        with self._lock:
            self._db.close()
