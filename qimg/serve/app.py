"""The composition root: `create_app(settings)` builds every service once and wires the routes to them.

Data directory layout (`settings.data_dir`): `jobs.sqlite3` (+ WAL files) holds jobs and the file index; `files/`
holds the stored files as `<file id>.<ext>`; `.lock` keeps a second server off the same directory.

Start-up (the app's lifespan) is a restart as far as jobs go: jobs a previous process left `running` are marked
`failed` with the reason (error_type "server_restart") and their outputs are deleted, and so are temporaries of
interrupted writes and files with no index row; finished jobs and their files are kept and served. Jobs left
`queued` are queued again, oldest first, rebuilt from their recorded parameters and input files (with
`requeue=False` they are marked failed too).
Then the worker thread starts (and loads the models first unless `preload` is off).

With a shared store (`store=postgresql://...`) the data folder holds only a cache of files whose bytes live in the
database, so several processes may share it (no lock); queued jobs are not re-queued at start-up, since any worker
on the database claims them, and a process's recovery touches only its own jobs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

import qimg
from qimg.serve import api_images, api_jobs, errors
from qimg.serve.events import EventBus
from qimg.serve.models import ModelRegistry
from qimg.serve.security import GuardMiddleware
from qimg.serve.settings import Settings
from qimg.serve.store import FileStore, JobStore, SharedJobStore
from qimg.serve.store_disk import DiskFileStore
from qimg.serve.store_sqlite import SQLiteJobStore
from qimg.serve.worker import Worker

log = logging.getLogger("qimg.serve")


@dataclass
class Services:
    settings: Settings
    store: JobStore
    files: FileStore
    models: ModelRegistry
    bus: EventBus
    worker: Worker
    lock: "DataDirLock"

    @property
    def loras(self):
        return self.worker.loras

    def start(self) -> None:
        """Start-up recovery (see the module's text), then the worker."""
        settings, store, worker = self.settings, self.store, self.worker
        failed = store.recover(keep_queued=settings.requeue or worker.shared)
        removed = self.files.sweep(drop_jobs=failed)
        if failed or removed:
            log.warning("restart: %d unfinished job(s) marked failed, %d stray file(s) removed", len(failed), removed)
        if settings.requeue and not worker.shared and (requeued := worker.requeue(store.queued())):
            log.warning("restart: %d job(s) left queued were queued again", requeued)
        worker.start()

    def stop(self) -> None:
        try:
            self.worker.stop()
            self.store.close()
        finally:
            self.lock.release()


class DataDirLock:
    """An exclusive advisory lock on `<data dir>/.lock` (released by the OS when the process dies)."""

    def __init__(self, folder):
        self.path = folder / ".lock"
        self.handle = None

    def acquire(self) -> None:
        self.handle = open(self.path, "a+")
        try:
            import fcntl

            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            self.handle.close()
            self.handle = None
            raise RuntimeError(f"the data directory {self.path.parent} is in use by another qimg server") from None

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def open_store(settings: Settings) -> JobStore:
    """The job store the settings name: PostgreSQL for a postgresql:// URL, else SQLite in the data folder."""
    if settings.store:
        from qimg.serve.store_postgres import PostgresJobStore

        return PostgresJobStore(settings.store, owner=settings.owner)
    return SQLiteJobStore(settings.data_dir / "jobs.sqlite3")


def open_files(settings: Settings, store: JobStore) -> FileStore:
    """File bytes in the shared store's database (cached in the data folder), else under the data folder."""
    if isinstance(store, SharedJobStore):
        from qimg.serve.store_dbfiles import DatabaseFileStore

        return DatabaseFileStore(settings.data_dir / "cache", store)
    return DiskFileStore(settings.data_dir / "files", store)


def build_services(settings: Settings, pipelines: dict[str, object] | None = None) -> Services:
    """Every service, wired once; `start()` / `stop()` run the start-up recovery and the worker."""
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = DataDirLock(data_dir)
    if not settings.store:
        lock.acquire()
    try:
        store = open_store(settings)
        models = ModelRegistry(settings.models, load=settings.load, pipelines=pipelines)
        files = open_files(settings, store)
    except BaseException:
        lock.release()
        raise
    bus = EventBus()
    worker = Worker(settings, store, files, models, bus)
    return Services(settings, store, files, models, bus, worker, lock)


def create_app(settings: Settings, *, pipelines: dict[str, object] | None = None) -> FastAPI:
    """The ASGI app. `pipelines` adds ready-made pipeline objects by name (embedding qimg, tests)."""
    services = build_services(settings, pipelines)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        services.start()
        try:
            yield
        finally:
            services.stop()

    app = FastAPI(title="qimg", version=qimg.__version__, lifespan=lifespan,
                  default_response_class=errors.SafeJSONResponse,
                  description="Qwen-Image family server: OpenAI Images API, layers, jobs.")
    app.state.services = services
    errors.install(app)
    app.include_router(api_images.router)
    app.include_router(api_jobs.router)
    app.mount("/static", StaticFiles(directory=os.fspath(api_jobs.STATIC)), name="static")
    app.add_middleware(GuardMiddleware, api_keys=settings.api_keys,
                       max_form_bytes=settings.limits.max_form_bytes(),
                       max_json_bytes=min(settings.limits.max_json_bytes, settings.limits.max_request_bytes))
    if settings.cors_origins:  # added last: outermost, so preflights and 401s carry CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["x-qimg-job-id", "retry-after"])
    return app
