"""`SharedJobStore` on PostgreSQL (`--store postgresql://...`, psycopg 3): the job rows, the file index and the
files' bytes in a database several processes and machines share. qimg creates the schema and migrates it
(`qimg_schema` holds the version). Each process has an `owner` name (host and process id, by default): the jobs it
accepts and runs carry it, and its start-up recovery touches only its own jobs. Workers take queued jobs with
`claim()`, a row lock that skips rows another worker holds (`FOR UPDATE SKIP LOCKED`), so no job is handed out
twice; a running job's worker sends heartbeats, and `reap()` takes back the jobs of workers that stopped."""

from __future__ import annotations

import json
import threading
import time

from qimg.errors import first_line
from qimg.serve.store import (CANCELLED, FAILED, OUTPUT_ROLES, QUEUED, RUNNING, TERMINAL, FileRecord, Job,
                              SharedJobStore, storable)
from qimg.serve.store_sqlite import RESTART_QUEUED, RESTART_RUNNING

SCHEMA_VERSION = 2
MIGRATIONS = {1: """
CREATE TABLE jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    owner TEXT NOT NULL,
    params JSONB NOT NULL,
    result JSONB NOT NULL DEFAULT '{}',
    error TEXT,
    error_type TEXT,
    worker TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION
);
CREATE INDEX jobs_status ON jobs(status, seq);
CREATE TABLE files (
    id TEXT PRIMARY KEY,
    job_id TEXT,
    role TEXT NOT NULL,
    name TEXT NOT NULL UNIQUE,
    mime TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    idx INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX files_job ON files(job_id);
""", 2: """
ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN heartbeat_at DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN cancel_reason TEXT;
CREATE TABLE file_data (id TEXT PRIMARY KEY REFERENCES files(id) ON DELETE CASCADE, data BYTEA NOT NULL);
"""}
JOB_COLUMNS = "id, kind, status, model, params, result, error, error_type, created_at, started_at, finished_at"
FILE_COLUMNS = "id, job_id, role, name, mime, bytes, idx, created_at"  # FileRecord's fields, in order


def pg_safe(value):
    """`value` as PostgreSQL stores it: text and JSONB take no NUL character (written out as the text `\\x00`)."""
    value = storable(value)
    if isinstance(value, str):
        return value.replace("\x00", "\\x00")
    if isinstance(value, dict):
        return {pg_safe(k): pg_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [pg_safe(v) for v in value]
    return value


def connect(url: str):
    try:
        import psycopg
    except ModuleNotFoundError:
        raise RuntimeError("a PostgreSQL store needs psycopg (pip install 'qimg[serve]')") from None
    try:
        return psycopg.connect(url, autocommit=True)
    except psycopg.Error as err:
        where = url.split("@")[-1]  # never the password
        raise RuntimeError(f"cannot open the job store at {where}: {first_line(err)}") from None


def default_owner() -> str:
    import os
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"


class PostgresJobStore(SharedJobStore):
    def __init__(self, url: str, owner: str | None = None):
        self.url, self.owner = url, owner or default_owner()
        self._lock = threading.RLock()
        self._db = connect(url)
        self.migrate()

    def migrate(self) -> None:
        """Create the schema or bring it to SCHEMA_VERSION, one transaction per step, under an advisory lock (two
        servers starting together do not both migrate)."""
        with self._lock, self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(7260161)")
            self._db.execute("CREATE TABLE IF NOT EXISTS qimg_schema (version INTEGER NOT NULL)")
            row = self._db.execute("SELECT version FROM qimg_schema").fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.url}: the database was written by a newer qimg (schema {version} > "
                                   f"{SCHEMA_VERSION})")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                self._db.execute(MIGRATIONS[step])
            if row is None:
                self._db.execute("INSERT INTO qimg_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
            else:
                self._db.execute("UPDATE qimg_schema SET version=%s", (SCHEMA_VERSION,))

    def _rows(self, sql: str, args=()) -> list:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _count(self, sql: str, args=()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    # -- jobs --------------------------------------------------------------------------------------------------
    def create(self, job_id: str, kind: str, model: str, params: dict) -> Job:
        now = time.time()
        self._count("INSERT INTO jobs (id, kind, status, model, owner, params, created_at) "
                    "VALUES (%s,%s,%s,%s,%s,%s,%s)", (job_id, kind, QUEUED, model, self.owner,
                                                     json.dumps(pg_safe(params)), now))
        return Job(job_id, kind, QUEUED, model, params, created_at=now)

    def _job(self, row) -> Job:
        (job_id, kind, status, model, params, result, error, error_type, created, started, finished) = row
        files = [self._file(r) for r in self._rows(f"SELECT {FILE_COLUMNS} FROM files WHERE job_id=%s "
                                                   f"ORDER BY role, idx", (job_id,))]
        return Job(job_id, kind, status, model, storable(params), storable(result or {}), storable(error),
                   error_type, created, started, finished, files)

    def get(self, job_id: str) -> Job | None:
        rows = self._rows(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=%s", (job_id,))
        return self._job(rows[0]) if rows else None

    def list(self, limit: int = 50, before: str | None = None) -> list[Job]:
        if before:
            rows = self._rows(f"SELECT {JOB_COLUMNS} FROM jobs WHERE seq < (SELECT seq FROM jobs WHERE id=%s) "
                              f"ORDER BY seq DESC LIMIT %s", (before, limit))
        else:
            rows = self._rows(f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY seq DESC LIMIT %s", (limit,))
        return [self._job(r) for r in rows]

    def queued(self) -> list[Job]:
        """This server's queued jobs, oldest first."""
        return [self._job(r) for r in self._rows(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE status=%s AND owner=%s ORDER BY seq", (QUEUED, self.owner))]

    def mark_running(self, job_id: str) -> bool:
        return self.claim(self.owner, job_id) is not None

    def claim(self, worker: str, job_id: str | None = None) -> Job | None:
        pick = ("SELECT seq FROM jobs WHERE id=%s AND status=%s FOR UPDATE SKIP LOCKED", (job_id, QUEUED)) if job_id \
            else ("SELECT seq FROM jobs WHERE status=%s ORDER BY (owner = %s) DESC, seq FOR UPDATE SKIP LOCKED LIMIT 1",
                  (QUEUED, self.owner))
        now = time.time()
        rows = self._rows(
            f"UPDATE jobs SET status=%s, started_at=%s, heartbeat_at=%s, worker=%s, attempts=attempts+1, "
            f"cancel_reason=NULL WHERE seq = ({pick[0]}) AND status=%s RETURNING {JOB_COLUMNS}",
            (RUNNING, now, now, worker, *pick[1], QUEUED))
        return self._job(rows[0]) if rows else None

    def heartbeat(self, worker: str, job_ids: list[str]) -> dict[str, str]:
        if not job_ids:
            return {}
        rows = self._rows("UPDATE jobs SET heartbeat_at=%s WHERE id = ANY(%s) AND worker=%s AND status=%s "
                          "RETURNING id, cancel_reason", (time.time(), list(job_ids), worker, RUNNING))
        return {job_id: reason for job_id, reason in rows if reason is not None}

    def request_cancel(self, job_id: str, reason: str) -> bool:
        return self._count("UPDATE jobs SET cancel_reason=%s WHERE id=%s AND status=%s",
                           (pg_safe(reason), job_id, RUNNING)) == 1

    def reap(self, stale_after: float, max_attempts: int) -> tuple[list[str], list[str]]:
        with self._lock, self._db.transaction():
            stale = self._db.execute(
                "SELECT id, attempts, worker, cancel_reason FROM jobs WHERE status=%s AND heartbeat_at < %s "
                "FOR UPDATE SKIP LOCKED", (RUNNING, time.time() - stale_after)).fetchall()
            return self._take_back(stale, f"stopped answering for {stale_after:g} s", max_attempts)

    def take_back(self, job_id: str, why: str, max_attempts: int) -> bool:
        with self._lock, self._db.transaction():
            rows = self._db.execute("SELECT id, attempts, worker, cancel_reason FROM jobs WHERE id=%s AND status=%s "
                                    "FOR UPDATE", (job_id, RUNNING)).fetchall()
            return bool(self._take_back(rows, why, max_attempts)[0])

    def _take_back(self, rows: list, why: str, max_attempts: int) -> tuple[list[str], list[str]]:
        """Running jobs (id, attempts, worker, cancel reason) whose worker is gone: queued again while tried fewer
        than `max_attempts` times, cancelled when a cancel was asked for, else failed (transaction held)."""
        now = time.time()
        again = [job_id for job_id, attempts, _, cancel in rows if attempts < max_attempts and cancel is None]
        lost = [row for row in rows if row[0] not in again]
        if again:
            self._db.execute("DELETE FROM files WHERE job_id = ANY(%s) AND role = ANY(%s)", (again, list(OUTPUT_ROLES)))
            self._db.execute("UPDATE jobs SET status=%s, started_at=NULL, heartbeat_at=NULL, worker=NULL "
                             "WHERE id = ANY(%s)", (QUEUED, again))
        for job_id, attempts, worker, cancel in lost:
            if cancel is not None:  # it was being cancelled: that is what it ends as
                status, kind, error = CANCELLED, "cancelled", f"{cancel} (its worker {worker} {why})"
            else:
                status, kind = FAILED, "worker_lost"
                error = (f"the worker running this job ({worker}) {why}; the job was tried {attempts} time(s) and is "
                         f"not tried again")
            self._db.execute("UPDATE jobs SET status=%s, error=%s, error_type=%s, finished_at=%s WHERE id=%s",
                             (status, pg_safe(error), kind, now, job_id))
        return again, [row[0] for row in lost]

    def orphans(self, older_than: float) -> list[Job]:
        return [self._job(r) for r in self._rows(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE status=%s AND created_at < %s ORDER BY seq",
            (QUEUED, time.time() - older_than))]

    def count_queued(self) -> int:
        return self._rows("SELECT count(*) FROM jobs WHERE status=%s", (QUEUED,))[0][0]

    def finish(self, job_id: str, status: str, *, result: dict | None = None, error: str | None = None,
               error_type: str | None = None) -> bool:
        assert status in TERMINAL, status
        return self._count(
            "UPDATE jobs SET status=%s, result=%s, error=%s, error_type=%s, finished_at=%s "
            "WHERE id=%s AND NOT (status = ANY(%s))",
            (status, json.dumps(pg_safe(result or {})), pg_safe(error), error_type, time.time(), job_id,
             list(TERMINAL))) == 1

    def recover(self, keep_queued: bool = False) -> list[str]:
        """At start-up: the jobs this server (its `owner`) left running and, unless `keep_queued`, queued are
        marked failed; other servers' jobs are theirs. Returns the ids."""
        now = time.time()
        with self._lock, self._db.transaction():
            ids = [r[0] for r in self._db.execute("SELECT id FROM jobs WHERE status=%s AND worker=%s",
                                                  (RUNNING, self.owner))]
            self._db.execute("UPDATE jobs SET status=%s, error=%s, error_type='server_restart', finished_at=%s "
                             "WHERE status=%s AND worker=%s", (FAILED, RESTART_RUNNING, now, RUNNING, self.owner))
            if not keep_queued:
                ids += [r[0] for r in self._db.execute("SELECT id FROM jobs WHERE status=%s AND owner=%s",
                                                       (QUEUED, self.owner))]
                self._db.execute("UPDATE jobs SET status=%s, error=%s, error_type='server_restart', finished_at=%s "
                                 "WHERE status=%s AND owner=%s", (FAILED, RESTART_QUEUED, now, QUEUED, self.owner))
        return ids

    def cancel_queued(self, job_id: str, reason: str) -> bool:
        return self._count("UPDATE jobs SET status=%s, error=%s, error_type='cancelled', finished_at=%s "
                           "WHERE id=%s AND status=%s",
                           (CANCELLED, pg_safe(reason), time.time(), job_id, QUEUED)) == 1

    # -- files -------------------------------------------------------------------------------------------------
    @staticmethod
    def _file(row) -> FileRecord:
        return FileRecord(*row)

    def add_file(self, record: FileRecord) -> None:
        with self._lock:
            self._insert_file(record)

    def _insert_file(self, record: FileRecord) -> None:
        self._db.execute(f"INSERT INTO files ({FILE_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                         (record.id, record.job_id, record.role, record.name, record.mime, record.bytes, record.index,
                          record.created_at or time.time()))

    def get_file(self, file_id: str) -> FileRecord | None:
        rows = self._rows(f"SELECT {FILE_COLUMNS} FROM files WHERE id=%s", (file_id,))
        return self._file(rows[0]) if rows else None

    def delete_files(self, file_ids: list[str]) -> None:
        if file_ids:
            self._count("DELETE FROM files WHERE id = ANY(%s)", (list(file_ids),))

    def files_of_jobs(self, job_ids: list[str], roles: tuple[str, ...]) -> list[FileRecord]:
        if not job_ids:
            return []
        return [self._file(r) for r in self._rows(
            f"SELECT {FILE_COLUMNS} FROM files WHERE job_id = ANY(%s) AND role = ANY(%s) ORDER BY job_id, role, idx",
            (list(job_ids), list(roles)))]

    def add_file_data(self, record: FileRecord, data: bytes) -> None:
        with self._lock, self._db.transaction():
            self._insert_file(record)
            self._db.execute("INSERT INTO file_data (id, data) VALUES (%s, %s)", (record.id, data))

    def file_data(self, file_id: str) -> bytes | None:
        rows = self._rows("SELECT data FROM file_data WHERE id=%s", (file_id,))
        return bytes(rows[0][0]) if rows else None

    def all_file_names(self) -> set[str]:
        return {r[0] for r in self._rows("SELECT name FROM files")}

    def close(self) -> None:
        with self._lock:
            self._db.close()

