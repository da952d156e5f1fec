"""The composition root: `create_app(settings)` builds every service once and wires the routes to them.

Data directory layout (`settings.data_dir`): `jobs.sqlite3` (+ WAL files) holds jobs and the file index; `files/`
holds the stored files as `<file id>.<ext>`; `.lock` keeps a second server off the same directory.

Start-up (the app's lifespan) is a restart as far as jobs go: jobs a previous process left `running` are marked
`failed` with the reason (error_type "server_restart") and their outputs are deleted, and so are temporaries of
interrupted writes and files with no index row; finished jobs and their files are kept and served. Jobs left
`queued` are queued again, oldest first, rebuilt from their recorded parameters and input files (with
`requeue=False` they are marked failed too).
Then the worker thread starts (and loads the models first unless `preload` is off).
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
from qimg.serve.store import FileStore, JobStore
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

    @property
    def loras(self):
        return self.worker.loras


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


def create_app(settings: Settings, *, pipelines: dict[str, object] | None = None) -> FastAPI:
    """The ASGI app. `pipelines` adds ready-made pipeline objects by name (embedding qimg, tests)."""
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = DataDirLock(data_dir)
    lock.acquire()
    try:
        store = open_store(settings)
        models = ModelRegistry(settings.models, load=settings.load, pipelines=pipelines)
    except BaseException:
        lock.release()
        raise
    files = DiskFileStore(data_dir / "files", store)
    bus = EventBus()
    worker = Worker(settings, store, files, models, bus)
    services = Services(settings, store, files, models, bus, worker)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        failed = store.recover(keep_queued=settings.requeue)
        removed = files.sweep(drop_jobs=failed)
        if failed or removed:
            log.warning("restart: %d unfinished job(s) marked failed, %d stray file(s) removed", len(failed), removed)
        if settings.requeue and (requeued := worker.requeue(store.queued())):
            log.warning("restart: %d job(s) left queued were queued again", requeued)
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            store.close()
            lock.release()

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
