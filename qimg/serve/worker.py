"""The worker: one thread that runs jobs one at a time (one accelerator, one job), in arrival order.

With a shared store (PostgreSQL) the worker takes its jobs from the database instead of a local queue: any
process on that database may run any job (`SharedJobStore.claim`), this process's own first; admission counts the
jobs queued in the database; cancels, heartbeats, the take-over of jobs whose worker died and the answers to
requests whose job ran elsewhere go through `qimg.serve.shared.SharedDuties`. A process with `run_jobs` off
serves the API only.

Admission is bounded: at most `max_queue` jobs wait (the running one not counted); `submit` raises HTTP 429 with
a Retry-After estimate beyond that. Cancelling a queued job drops it; cancelling a running one (by request, or
because the client of a synchronous request went away) stops it through its `JobControl`, which the pipeline polls
between denoising steps (its options' `cancel`), so it ends with status "cancelled". The same control stops a job
that runs past `Settings.job_timeout` (status "failed", error type "job_timeout").
A queued job holds its parameters and its input pictures' bytes (on disk once submitted), never decoded pixels:
they are decoded when it runs, as after a restart.
"""

from __future__ import annotations

import base64
import collections
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

from qimg.errors import Cancelled
from qimg.serve import runner
from qimg.serve.batches import companions
from qimg.serve.budget import check_cost
from qimg.serve.errors import ApiError, from_exception
from qimg.serve.events import EventBus
from qimg.serve.loras import LoraLibrary
from qimg.serve.models import ModelRegistry
from qimg.serve.settings import Settings
from qimg.serve.store import CANCELLED, FAILED, RUNNING, SUCCEEDED, FileStore, JobStore, SharedJobStore
from qimg.serve.uploads import queue_full

log = logging.getLogger("qimg.serve")

STOPPED_RUNNING = "the server shut down while this job was running"
STOPPED_QUEUED = "the server shut down before this job started"
STOPPED_KEPT = "the server shut down before this job started; it stays queued and runs when the server starts again"
TIMED_OUT = "timeout"


@dataclass
class Task:
    """A queued job: its recorded parameters and, until they are stored, its input pictures' encoded bytes.
    It holds no decoded pixels: the worker decodes the stored inputs and builds the options when the job runs."""

    job_id: str
    kind: str  # "generate", "edit", "layers"
    model: str
    params: dict  # what is recorded in the job row
    inputs: list = None  # uploads.Encoded pictures, stored as the job's "input" files by `submit`
    pixels: int | None = None  # output pixels (n x width x height) when the route settled it


class JobControl:
    """What stops a running job between steps: a cancel (`stop`) or the per-job time limit."""

    def __init__(self, timeout: float | None):
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.reason: str | None = None
        self._event = threading.Event()

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self._event.set()

    @property
    def timed_out(self) -> bool:
        return self.reason == TIMED_OUT

    def __call__(self) -> bool:
        if self._event.is_set():
            return True
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.stop(TIMED_OUT)
            return True
        return False


class Worker:
    def __init__(self, settings: Settings, store: JobStore, files: FileStore, models: ModelRegistry, bus: EventBus,
                 loras: LoraLibrary | None = None):
        self.settings, self.store, self.files, self.models, self.bus = settings, store, files, models, bus
        self.loras = loras or LoraLibrary(settings.lora_dir)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pending: dict[str, Task] = {}
        self._lock = threading.Lock()
        self._running: str | None = None
        self._controls: dict[str, JobControl] = {}
        self._stopping = threading.Event()
        self._durations: collections.deque[float] = collections.deque(maxlen=20)
        self._thread: threading.Thread | None = None
        self.loading = False
        self.shared = isinstance(store, SharedJobStore)
        self.dispatch = None  # set where another service runs the jobs (Ray replicas): called with each new job id
        self.duties = None
        if self.shared:
            from qimg.serve.shared import SharedDuties

            self.duties = SharedDuties(self)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.settings.run_jobs:
            self._thread = threading.Thread(target=self._loop, name="qimg-worker", daemon=True)
            self._thread.start()
        if self.duties is not None:
            self.duties.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        with self._lock:
            waiting = list(self._pending)
            self._pending.clear()
            for control in self._controls.values():
                control.stop("the server is shutting down")
        keep = self.settings.requeue
        for job_id in waiting:
            if not keep:
                self.store.finish(job_id, FAILED, error=STOPPED_QUEUED, error_type="server_shutdown")
            self.bus.publish(job_id, {"type": "done", "job_id": job_id, "status": FAILED, "outcome": ApiError(
                503, STOPPED_KEPT if keep else STOPPED_QUEUED, code="server_shutdown")})
        self._queue.put(None)
        if self.duties is not None:
            self.duties.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- admission ---------------------------------------------------------------------------------------------
    def submit(self, task: Task):
        """Create the job row and queue it; raises HTTP 429 (with Retry-After) when the queue is full."""
        if self._stopping.is_set():
            raise ApiError(503, "the server is shutting down", code="server_shutdown")
        if self.shared:
            return self._submit_shared(task)
        with self._lock:
            if len(self._pending) >= self.settings.max_queue:
                raise queue_full(self._retry_after())
            job = self.store.create(task.job_id, task.kind, task.model, task.params)
            try:
                for i, upload in enumerate(task.inputs or []):
                    self.files.put_bytes(upload.data, ext=upload.ext, mime=upload.mime, job_id=task.job_id,
                                         role="input", index=i)
            except BaseException as err:
                self.store.finish(task.job_id, FAILED, error=f"could not store the inputs: {err}",
                                  error_type="server_error")
                raise
            task.inputs = None  # on disk now; read back when the job runs
            self._pending[task.job_id] = task
        self._queue.put(task.job_id)
        return job

    def _submit_shared(self, task: Task):
        """Into the shared store: the input pictures first, then the queued row (another process may claim it at
        once), then a nudge to this process's worker."""
        queued = self.store.count_queued()
        if queued >= self.settings.max_queue:
            raise queue_full(self._retry_after(queued))
        stored = []
        try:
            for i, upload in enumerate(task.inputs or []):
                stored.append(self.files.put_bytes(upload.data, ext=upload.ext, mime=upload.mime, job_id=task.job_id,
                                                   role="input", index=i).id)
            job = self.store.create(task.job_id, task.kind, task.model, task.params)
        except BaseException:
            self.store.delete_files(stored)
            raise
        task.inputs = None
        if self.dispatch is not None:
            self.dispatch(task.job_id)
        else:
            self.nudge()
        return job

    def requeue(self, jobs: list) -> int:
        """At start-up, before `start`: queue again the jobs a previous process left queued (store rows, oldest
        first); each must still rebuild from its recorded parameters and stored input pictures (checked here, and
        again when it runs). A job that cannot be rebuilt is failed with the reason. Returns how many were queued."""
        queued = 0
        for job in jobs:
            task = Task(job.id, job.kind, job.model, job.params)
            try:
                self.spec(task)
            except Exception as err:  # noqa: BLE001 - the job fails with the reason; the others still run
                message = err.message if isinstance(err, ApiError) else str(err)
                self.store.finish(job.id, FAILED, error=f"could not be queued again after a restart: {message}",
                                  error_type="server_restart")
                continue
            with self._lock:
                self._pending[job.id] = task
            self._queue.put(job.id)
            queued += 1
        return queued

    def spec(self, task: Task) -> runner.Spec:
        """The job's options, rebuilt from its row's parameters and its stored input pictures (decoded now)."""
        records = sorted(self.store.files_of_jobs([task.job_id], ("input",)), key=lambda r: r.index)
        images = [self._input_image(record) for record in records]
        recorded = task.params.get("images", len(images))
        if len(images) != recorded:
            raise ValueError(f"{recorded} input pictures were recorded, {len(images)} are stored")
        return runner.spec_from_params(task.kind, task.params, images)

    def _input_image(self, record):
        from qimg.serve.uploads import decode_image

        found = self.files.path(record.id)
        if found is None:
            raise ValueError(f"its input file {record.id} is missing")
        return decode_image(found[1].read_bytes(), f"input {record.index + 1}", self.settings.limits).image

    def _retry_after(self, waiting: int | None = None) -> int:
        """Seconds until a slot is likely free: the mean recent job time (5 s before any) times the jobs ahead (this
        process's queue, or `waiting` in a shared store; several workers may share those)."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 5.0
        ahead = len(self._pending) if waiting is None else waiting
        return max(1, min(3600, math.ceil(mean * max(1, ahead))))

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> str:
        """'cancelled' (it was queued), 'stopping' (it is running: it stops before its next step) or its status."""
        with self._lock:
            if (job_id in self._pending or self.shared) and self.store.cancel_queued(job_id, reason):
                self._pending.pop(job_id, None)
                self.bus.publish(job_id, {"type": "done", "job_id": job_id, "status": CANCELLED,
                                          "outcome": Cancelled(reason)})
                return CANCELLED
            control = self._controls.get(job_id)
            if control is not None:
                control.stop(reason)
                return "stopping"
        if self.shared and self.store.request_cancel(job_id, reason):  # running in another process
            return "stopping"
        job = self.store.get(job_id)
        return job.status if job else "unknown"

    def state(self) -> dict:
        waiting = self.store.count_queued() if self.shared else None
        with self._lock:
            return {"waiting": len(self._pending) if waiting is None else waiting, "running": self._running,
                    "max_queue": self.settings.max_queue, "loading_models": self.loading}

    def nudge(self) -> None:
        """Wake the loop to claim a job now (one was queued or queued again)."""
        self._queue.put("")

    def running(self) -> list[str]:
        with self._lock:
            return list(self._controls)

    def stop_running(self, job_id: str, reason: str) -> None:
        with self._lock:
            control = self._controls.get(job_id)
        if control is not None:
            control.stop(reason)

    # -- the loop ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.settings.preload:
            self.loading = True
            for entry in self.models.entries():
                if self._stopping.is_set():
                    break
                try:
                    self.models.load(entry.name)
                except Exception as err:  # reported by /health and /v1/models; jobs using it fail with it
                    log.error("model %s could not be loaded: %s", entry.name, err)
            self.loading = False
        while not self._stopping.is_set():
            task = self._claim() if self.shared else self._next_local()
            if task is None:
                continue
            if self.shared:
                self.execute([task])
                continue
            with self._lock:
                batch = [t for t in [task, *self._companions(task)] if self.store.mark_running(t.job_id)]
            if batch:
                self.execute(batch)

    def execute(self, batch: list[Task]) -> None:
        """Run jobs already marked running (one, or a batch of compatible generations) to their end."""
        job_id = batch[0].job_id
        with self._lock:
            self._running = job_id
            controls = {t.job_id: JobControl(self.settings.job_timeout) for t in batch}
            self._controls.update(controls)
        try:
            if len(batch) == 1:
                self._run(batch[0], controls[job_id])
            else:
                self._run_batch(batch, controls)
        except Exception:  # never let the loop die
            log.exception("job %s crashed the worker loop", job_id)
        finally:
            with self._lock:
                self._running = None
                for t in batch:
                    self._controls.pop(t.job_id, None)

    def _next_local(self) -> Task | None:
        job_id = self._queue.get()
        if job_id is None or self._stopping.is_set():
            return None
        with self._lock:
            return self._pending.pop(job_id, None)  # None: cancelled while queued

    def _claim(self) -> Task | None:
        """The next job from the shared store (marked running for this worker), or None after waiting for a nudge
        (a job submitted here) or the poll interval."""
        try:
            job = self.store.claim(self.store.owner)
        except Exception as err:  # noqa: BLE001 - the database is away: keep trying, never end the loop
            log.error("could not claim a job from the shared store: %s", err)
            self._stopping.wait(self.settings.poll_s)
            return None
        if job is not None:
            return Task(job.id, job.kind, job.model, job.params)
        try:
            self._queue.get(timeout=self.settings.poll_s)
        except queue.Empty:
            pass
        return None

    def _run(self, task: Task, control: JobControl) -> None:
        job_id = task.job_id
        self.bus.publish(job_id, {"type": "status", "job_id": job_id, "status": RUNNING})
        started = time.perf_counter()
        try:
            spec = self.spec(task)
            pipe = self.models.load(task.model)
            self._check(task, pipe, spec)
            self._use_loras(pipe, task.model, spec)
            progress = Progress(self, task, spec)
            run = runner.run_layers if task.kind == "layers" else runner.run_images
            result = run(pipe, spec, job_id=job_id, files=self.files, progress=progress, cancel=control)
        except BaseException as err:  # noqa: BLE001 - every failure becomes the job's status
            outcome = self._fail(job_id, err, control)
            if not isinstance(outcome, Exception):
                raise
            return
        self._durations.append(time.perf_counter() - started)
        self._succeed(job_id, result)

    def _check(self, task: Task, pipe, spec: runner.Spec) -> None:
        """What the route could not check when the model was not loaded: the model does the task, and the job's
        settled plan is within the cost budget."""
        tasks = self.models.get(task.model).tasks
        if tasks is not None and task.kind not in tasks:
            raise ApiError(400, f"model {task.model!r} does not do {task.kind!r} "
                                f"(it does: {', '.join(tasks) or 'nothing'})", param="model")
        if hasattr(pipe, "plan"):
            check_cost(task.kind, pipe.plan(spec.options), self.settings.limits)

    def _fail(self, job_id: str, err: BaseException, control: JobControl) -> BaseException:
        """End the job with the status `err` means; returns what waiting clients got. On a shared store a job this
        process stops because it shuts down is handed back for another worker (while it has attempts left)."""
        status, message, kind, outcome = self._failure(job_id, err, control)
        if (self.shared and kind == "server_shutdown"
                and self.store.take_back(job_id, "was shut down", self.settings.max_attempts)):
            self.bus.publish(job_id, {"type": "done", "job_id": job_id, "status": FAILED, "outcome": outcome})
            return outcome
        self.store.finish(job_id, status, error=message, error_type=kind)
        self.bus.publish(job_id, {"type": "done", "job_id": job_id, "status": status, "outcome": outcome})
        return outcome

    def _succeed(self, job_id: str, result) -> None:
        self.store.finish(job_id, SUCCEEDED, result=result.summary())
        self.bus.publish(job_id, {"type": "done", "job_id": job_id, "status": SUCCEEDED, "outcome": result})

    def _companions(self, task: Task) -> list[Task]:
        """Queued tasks that join `task`'s denoising batch (lock held; they leave the pending set)."""
        return companions(task, self._pending, self.settings)

    def _run_batch(self, tasks: list[Task], controls: dict[str, JobControl]) -> None:
        """Compatible jobs as one `generate_batch` call: each job's own options, progress, cancel and time limit;
        each ends on its own (a cancelled one at once, the others when the batch is done)."""
        ended: set[str] = set()

        def end(task: Task, err: BaseException) -> None:
            if task.job_id not in ended:
                ended.add(task.job_id)
                self._fail(task.job_id, err, controls[task.job_id])

        for task in tasks:
            self.bus.publish(task.job_id, {"type": "status", "job_id": task.job_id, "status": RUNNING})
        started = time.perf_counter()
        members = []
        try:
            pipe = self.models.load(tasks[0].model)
            if not hasattr(pipe, "generate_batch"):
                for task in tasks:
                    self._run(task, controls[task.job_id])
                return
            for task in tasks:
                try:
                    spec = self.spec(task)
                    self._check(task, pipe, spec)
                    members.append((task, spec))
                except Exception as err:  # noqa: BLE001 - this job's own failure
                    end(task, err)
            if not members:
                return
            self._use_loras(pipe, tasks[0].model, members[0][1])
        except BaseException as err:  # noqa: BLE001 - the model or its LoRAs failed every job
            for task in tasks:
                end(task, err)
            if not isinstance(err, Exception):
                raise
            return

        def cancel_of(task: Task):
            def cancel() -> bool:
                stopped = controls[task.job_id]()
                if stopped and task.job_id not in ended:  # tell the client now, not when the batch ends
                    end(task, Cancelled("stopped in a batch"))
                return stopped
            return cancel

        requests = [spec.options.with_runtime(progress=Progress(self, task, spec), cancel=cancel_of(task))
                    for task, spec in members]
        try:
            outcomes = pipe.generate_batch(requests)
        except BaseException as err:  # noqa: BLE001 - the batch as a whole failed (every job cancelled, ...)
            for task, _ in members:
                end(task, err)
            if not isinstance(err, Exception):
                raise
            return
        for (task, spec), outcome in zip(members, outcomes):
            if isinstance(outcome, BaseException):
                end(task, outcome)
                continue
            if task.job_id in ended:
                continue
            try:
                result = runner.store_images(outcome, spec, job_id=task.job_id, files=self.files)
            except Exception as err:  # noqa: BLE001
                end(task, err)
                continue
            ended.add(task.job_id)
            self._succeed(task.job_id, result)
        each = (time.perf_counter() - started) / len(tasks)
        self._durations.extend([each] * len(tasks))

    def _failure(self, job_id: str, err: BaseException, control: JobControl):
        """(status, message, error type, what waiting clients get) for a job that raised `err`."""
        if isinstance(err, Cancelled) and control.timed_out:
            message = (f"the job ran past this server's limit of {control.timeout:g} s per job (--job-timeout) "
                       f"and was stopped ({err})")
            return FAILED, message, "job_timeout", ApiError(408, message, code="job_timeout")
        if isinstance(err, Cancelled) and self._stopping.is_set():
            return FAILED, STOPPED_RUNNING, "server_shutdown", ApiError(503, STOPPED_RUNNING, code="server_shutdown")
        if isinstance(err, Cancelled):
            return CANCELLED, f"{control.reason or 'cancelled by request'} ({err})", "cancelled", err
        api = from_exception(err)
        if api.status >= 500:
            log.error("job %s failed", job_id, exc_info=err)
        return FAILED, api.message, api.type, err

    def _use_loras(self, pipe, model: str, spec: runner.Spec) -> None:
        """The model's LoRAs for this job: the server's own (`--lora`) and the request's, unfused unless the server
        was started with `--lora-mode fused` (then each change of set re-fuses); the loaded model is reused either
        way, and nothing changes when the set is the one already active."""
        if not hasattr(pipe, "set_loras"):
            if spec.loras:
                raise ApiError(400, f"model {model!r} takes no LoRAs", param="loras")
            return
        from qimg.adapters.manager import LoraSpec

        wanted = list(self.settings.load.loras) + [LoraSpec(str(self.loras.path(item["name"])), item["scale"],
                                                            name=item["name"]) for item in spec.loras]
        fused = self.settings.load.lora_mode == "fused" and bool(wanted)
        active = [(a["path"], a["scale"]) for a in pipe.adapters.describe()]
        if active != [(w.path, w.scale) for w in wanted] or pipe.adapters.fused != fused:
            pipe.set_loras(wanted, fused=fused, partial=self.settings.load.lora_partial)


class Progress:
    """The pipeline's progress callback for one job: publishes step events, previews and partial images."""

    def __init__(self, worker: Worker, task: Task, spec: runner.Spec):
        self.worker, self.task, self.spec, self.bus = worker, task, spec, worker.bus
        self.settings = worker.settings
        self.last_preview = 0.0
        self.partial_steps: list[int] | None = None
        self.partial_index = 0

    def _partials(self, total: int) -> list[int]:
        k = min(self.bus.partials_wanted(self.task.job_id), 3, max(total - 1, 0))
        # evenly spaced steps before the last one (the last one's image is the result itself)
        return sorted({max(1, round(total * (i + 1) / (k + 1))) for i in range(k)} - {total})

    def __call__(self, event) -> None:
        job_id = self.task.job_id
        payload = {"type": "progress", "job_id": job_id, "stage": event.stage, "step": event.step,
                   "total": event.total, "elapsed": round(event.elapsed, 3),
                   "eta": None if event.eta is None else round(event.eta, 3),
                   "cache_skipped": getattr(event, "skipped", 0)}
        if event.stage == "denoise":
            if self.partial_steps is None:
                self.partial_steps = self._partials(event.total)
            now = time.perf_counter()
            want_partial = event.step in self.partial_steps
            want_preview = (self.bus.wants_previews(job_id) and event.step < event.total
                            and now - self.last_preview >= self.settings.preview_interval)
            image = None
            if (want_partial or want_preview) and event.preview is not None:
                try:
                    image = event.preview()
                except Exception as err:  # a preview must never fail the job
                    log.warning("preview failed for %s: %s", job_id, err)
            if image is not None and want_preview:
                payload["preview"] = runner.preview_b64(image, self.settings.preview_side)
                self.last_preview = now
            self.bus.publish(job_id, payload)
            if image is not None and want_partial:
                data = runner.encode_image(image, self.spec.output)
                self.bus.publish(job_id, {"type": "partial", "job_id": job_id, "index": self.partial_index,
                                          "b64_json": base64.b64encode(data).decode("ascii"),
                                          "size": f"{image.width}x{image.height}"})
                self.partial_index += 1
            return
        self.bus.publish(job_id, payload)
