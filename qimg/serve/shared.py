"""What a process on a shared job store does besides running jobs, on a clock (`Settings.heartbeat_s`):

- heartbeats for the jobs this worker runs, and the cancels other processes asked for them;
- `reap`: jobs whose worker stopped sending heartbeats for `Settings.stale_after_s` (killed, machine lost) are
  queued again for another worker, or failed once tried `Settings.max_attempts` times;
- answers for this process's waiting requests whose job ended in another process: the `done` event the routes
  wait for, rebuilt from the job's row and stored files (progress events and partial images stay in the process
  that runs the job).
"""

from __future__ import annotations

import logging
import threading

from qimg.errors import Cancelled
from qimg.serve.errors import ApiError
from qimg.serve.runner import stored_result
from qimg.serve.store import CANCELLED, SUCCEEDED, Job

log = logging.getLogger("qimg.serve")

ERROR_STATUS = {"job_timeout": 408, "server_shutdown": 503, "server_restart": 503, "worker_lost": 503,
                "invalid_request_error": 400, "not_found_error": 404}


def outcome_of(job: Job, files) -> object:
    """What a waiting request gets for a job that ended elsewhere: its result, or the error it ended with."""
    if job.status == SUCCEEDED:
        return stored_result(job, files)
    if job.status == CANCELLED:
        return Cancelled(job.error or "cancelled")
    return ApiError(ERROR_STATUS.get(job.error_type, 500), job.error or "the job failed", code=job.error_type)


class SharedDuties:
    def __init__(self, worker):
        self.worker, self.store, self.settings = worker, worker.store, worker.settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="qimg-shared", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                self.tick()
            except Exception as err:  # noqa: BLE001 - the database may be away for a while; try again next tick
                log.error("shared job store: %s", err)

    def tick(self) -> None:
        worker = self.worker
        cancels = self.store.heartbeat(self.store.owner, worker.running())
        for job_id, reason in cancels.items():
            worker.stop_running(job_id, reason)
        requeued, ended = self.store.reap(self.settings.stale_after_s, self.settings.max_attempts)
        if requeued or ended:
            log.warning("took back %d job(s) of stopped workers: %d queued again, %d ended", len(requeued) +
                        len(ended), len(requeued), len(ended))
            worker.nudge()
        if worker.dispatch is not None:
            worker.dispatch.orphans()
        self.answer_waiting()

    def answer_waiting(self) -> None:
        """`done` events for the jobs this process's requests wait for that ended in another process."""
        running_here = set(self.worker.running())
        for job_id in self.worker.bus.subscribed():
            if job_id in running_here:
                continue
            job = self.store.get(job_id)
            if job is None or not job.terminal:
                continue
            try:
                outcome = outcome_of(job, self.worker.files)
            except Exception as err:  # noqa: BLE001 - e.g. an output file went missing
                outcome = ApiError(500, f"the job ended in another process but its result could not be read: {err}")
            self.worker.bus.publish(job_id, {"type": "done", "job_id": job_id, "status": job.status,
                                             "outcome": outcome})
