"""Storage interfaces of the service and their records: jobs (`JobStore`) and output files (`FileStore`).

Implementations: `store_sqlite.SQLiteJobStore` (jobs and the file index in one SQLite database, WAL mode) and
`store_disk.DiskFileStore` (file bytes under a folder, written atomically). `create_app` wires them together.
"""

from __future__ import annotations

import math
import re
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
STATUSES = (QUEUED, RUNNING, *TERMINAL)

OUTPUT_ROLES = ("output", "layer", "export")  # the files a job makes (its "input" files are what it was given)

JOB_ID = re.compile(r"^job_[0-9a-f]{32}$")
FILE_ID = re.compile(r"^file_[0-9a-f]{32}$")


def storable(value):
    """`value` with every string UTF-8 can encode: a lone UTF-16 surrogate (which JSON's escapes can carry in) is
    written out as the text `\\udXXX`. Rows stored before requests were checked are read back through this."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, float) and not math.isfinite(value):  # NaN / Infinity: not JSON
        return repr(value)
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    return value


def new_job_id() -> str:
    return "job_" + secrets.token_hex(16)


def new_file_id() -> str:
    return "file_" + secrets.token_hex(16)


@dataclass
class FileRecord:
    """One stored file: `name` is the server-made name on disk (`<id>.<ext>`), never a client's."""

    id: str
    job_id: str | None
    role: str  # "input", "output", "layer", "export"
    name: str
    mime: str
    bytes: int
    index: int = 0
    created_at: float = 0.0

    def to_json(self, base_url: str = "") -> dict:
        return {"id": self.id, "object": "file", "role": self.role, "mime": self.mime, "bytes": self.bytes,
                "index": self.index, "filename": f"qimg-{self.id}{Path(self.name).suffix}",
                "url": f"{base_url}/v1/files/{self.id}"}


@dataclass
class Job:
    id: str
    kind: str  # "generate", "edit", "layers"
    status: str
    model: str
    params: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)
    error: str | None = None
    error_type: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    files: list[FileRecord] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_json(self, base_url: str = "", progress: dict | None = None) -> dict:
        timings = {"queued_s": None, "run_s": None}
        if self.started_at is not None:
            timings["queued_s"] = round(self.started_at - self.created_at, 3)
            if self.finished_at is not None:
                timings["run_s"] = round(self.finished_at - self.started_at, 3)
        by_role: dict[str, list] = {}
        for f in self.files:
            by_role.setdefault(f.role, []).append(f.to_json(base_url))
        return {"id": self.id, "object": "job", "kind": self.kind, "status": self.status, "model": self.model,
                "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at,
                "timings": timings, "params": self.params, "result": self.result,
                "error": {"message": self.error, "type": self.error_type} if self.error else None,
                "inputs": by_role.get("input", []), "outputs": by_role.get("output", []) + by_role.get("layer", []),
                "export": (by_role.get("export") or [None])[0],
                "progress": progress if self.status == RUNNING else None}


class JobStore(ABC):
    """Job rows (queued -> running -> succeeded|failed|cancelled) and the index of stored files."""

    @abstractmethod
    def create(self, job_id: str, kind: str, model: str, params: dict) -> Job: ...

    @abstractmethod
    def get(self, job_id: str) -> Job | None: ...

    @abstractmethod
    def list(self, limit: int = 50, before: str | None = None) -> list[Job]:
        """Newest first; `before` is a job id to page from (exclusive)."""

    @abstractmethod
    def mark_running(self, job_id: str) -> bool:
        """queued -> running; False if the job was not queued (e.g. cancelled meanwhile)."""

    @abstractmethod
    def finish(self, job_id: str, status: str, *, result: dict | None = None, error: str | None = None,
               error_type: str | None = None) -> bool:
        """-> a terminal status; False if the job was already terminal."""

    @abstractmethod
    def cancel_queued(self, job_id: str, reason: str) -> bool:
        """queued -> cancelled; False if the job was not queued."""

    @abstractmethod
    def recover(self, keep_queued: bool = False) -> list[str]:
        """At start-up: jobs a previous process left running (and, unless `keep_queued`, queued) are marked failed;
        returns their ids."""

    @abstractmethod
    def queued(self) -> list[Job]:
        """Jobs waiting to run, oldest first."""

    @abstractmethod
    def add_file(self, record: FileRecord) -> None: ...

    @abstractmethod
    def get_file(self, file_id: str) -> FileRecord | None: ...

    @abstractmethod
    def delete_files(self, file_ids: list[str]) -> None: ...

    @abstractmethod
    def files_of_jobs(self, job_ids: list[str], roles: tuple[str, ...]) -> list[FileRecord]: ...

    @abstractmethod
    def all_file_names(self) -> set[str]: ...

    @abstractmethod
    def close(self) -> None: ...


class SharedJobStore(JobStore):
    """A job store several worker processes (on one or many machines) share. Any worker may run any queued job: it
    claims it with a row lock, so no job runs twice; while it runs a job it sends heartbeats, which also carry
    cancel requests made through other processes; a job whose worker stopped sending them (killed, machine lost)
    is taken back by `reap` and queued again, or failed once it has been tried `max_attempts` times."""

    owner: str  # this process's name: the jobs it accepts and runs carry it

    @abstractmethod
    def claim(self, worker: str, job_id: str | None = None) -> Job | None:
        """Mark a queued job running for `worker` and return it: `job_id`, else the oldest, this process's own jobs
        first; None when there is none (or `job_id` is not queued)."""

    @abstractmethod
    def heartbeat(self, worker: str, job_ids: list[str]) -> dict[str, str]:
        """`worker` is alive and still running `job_ids`; returns {job id: reason} for those a cancel was requested
        for."""

    @abstractmethod
    def request_cancel(self, job_id: str, reason: str) -> bool:
        """Ask the worker running `job_id` to stop it (at its next heartbeat); False if it is not running."""

    @abstractmethod
    def reap(self, stale_after: float, max_attempts: int) -> tuple[list[str], list[str]]:
        """Running jobs with no heartbeat for `stale_after` seconds: queued again (their partial outputs dropped)
        while they have been tried fewer than `max_attempts` times, else failed; cancelled when a cancel was asked
        for. Returns (requeued, ended) ids."""

    @abstractmethod
    def take_back(self, job_id: str, why: str, max_attempts: int) -> bool:
        """As `reap` for one running job whose worker is known to be gone (`why` says how): True if it was queued
        again."""

    @abstractmethod
    def orphans(self, older_than: float) -> list[Job]:
        """Jobs queued longer than `older_than` seconds, whichever process accepted them, oldest first."""

    @abstractmethod
    def count_queued(self) -> int: ...

    @abstractmethod
    def add_file_data(self, record: FileRecord, data: bytes) -> None:
        """The file's index row and its bytes, in one transaction."""

    @abstractmethod
    def file_data(self, file_id: str) -> bytes | None: ...


class FileStore(ABC):
    """File bytes by server-generated id; every write is atomic (a reader never sees a partial file)."""

    @abstractmethod
    def put_bytes(self, data: bytes, *, ext: str, mime: str, job_id: str | None, role: str,
                  index: int = 0) -> FileRecord: ...

    @abstractmethod
    def put_with(self, write: Callable[[Path], None], *, ext: str, mime: str, job_id: str | None, role: str,
                 index: int = 0) -> FileRecord:
        """`write(path)` must write `path` atomically (as `qimg.export` writers do)."""

    @abstractmethod
    def path(self, file_id: str) -> tuple[FileRecord, Path] | None:
        """The record and the on-disk path of a stored file; None for an unknown id or missing content."""

    @abstractmethod
    def sweep(self, drop_jobs: list[str] = ()) -> int:
        """Start-up clean-up: temporary files, files with no index row, and the outputs of `drop_jobs`."""
