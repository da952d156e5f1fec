"""The server on Ray Serve: two deployments sharing the PostgreSQL job store (`Settings.store`).

- `qimg` (the ingress, one replica, no models): the whole HTTP API and page (`create_app`) with no worker of its
  own. Each job it accepts is written to the store and handed to the replicas by `RayDispatcher`.
- `qimg-replicas` (N replicas, or autoscaled between bounds from the jobs queued and running per replica): each
  loads the models once and runs one job at a time (`Replica.run`), streaming the job's events (progress,
  previews, partial images) back to the ingress, which publishes them to the waiting requests as a one-process
  server does. Results are written to the shared store, so any process serves them.

Failures: Ray restarts a replica whose process dies. The call that was running a job there fails at the
ingress, which takes the job back (`SharedJobStore.take_back`): queued again and sent to another replica while it
has been started fewer than `Settings.max_attempts` times, else failed with the reason; the waiting request gets
the result or that error. A job whose ingress died is taken back by the heartbeat check (`reap`) and sent out again
by the next ingress (`orphans`). Admission: HTTP 429 with Retry-After once `max_queue` jobs wait in the store.

Started by `qimg serve --ray` or with Ray's tools and the application builder `build` (`serve run
qimg.serve.ray_app:build serve="--store postgresql://... --model ..." replicas=2`, or a config file: README).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shlex
import threading
from dataclasses import dataclass

from qimg.errors import first_line
from qimg.serve.settings import Settings

log = logging.getLogger("qimg.serve")
REPLICAS = "qimg-replicas"
TARGET_ONGOING = 2  # autoscaling aims at a running job and one waiting per replica


@dataclass(frozen=True)
class RayOptions:
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def check(self, settings: Settings) -> None:
        if self.autoscaling:
            if self.min_replicas is None or self.max_replicas is None:
                raise ValueError(f"autoscaling needs both --min-replicas and --max-replicas (got "
                                 f"{self.min_replicas} and {self.max_replicas})")
            if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
                raise ValueError(f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got "
                                 f"{self.min_replicas} and {self.max_replicas}")
        elif self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
        if self.gpus_per_replica < 0 or self.cpus_per_replica < 0:
            raise ValueError(f"--gpus-per-replica and --cpus-per-replica must be >= 0, got {self.gpus_per_replica} "
                             f"and {self.cpus_per_replica}")
        if not settings.store:
            raise ValueError("Ray replicas share their jobs and files through PostgreSQL: give --store "
                             "postgresql://... (qimg creates the schema)")
        if not settings.run_jobs:
            raise ValueError("Ray replicas run the jobs: drop --no-worker")

    def describe(self) -> str:
        scale = (f"autoscaling {self.min_replicas}-{self.max_replicas} replicas" if self.autoscaling
                 else f"{self.replicas} replica(s)")
        return f"{scale}, {self.gpus_per_replica:g} GPU(s) and {self.cpus_per_replica:g} CPU(s) each"

    def replica_options(self) -> dict:
        options = {"name": REPLICAS, "max_ongoing_requests": 1, "max_queued_requests": -1,
                   "ray_actor_options": {"num_gpus": self.gpus_per_replica, "num_cpus": self.cpus_per_replica},
                   "health_check_period_s": 5, "graceful_shutdown_timeout_s": 10}
        if self.autoscaling:
            options["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                             "target_ongoing_requests": TARGET_ONGOING}
        else:
            options["num_replicas"] = self.replicas
        return options


def role_settings(settings: Settings, role: str) -> Settings:
    """A process's settings: its own name in the shared store, and no worker loop (the ingress sends the jobs to
    the replicas, which run what they are sent)."""
    import os
    import socket

    return dataclasses.replace(settings, owner=f"{settings.owner or socket.gethostname()}-{role}-{os.getpid()}",
                               run_jobs=False)


class Replica:
    """One replica: the models, loaded once, and the job runner."""

    def __init__(self, settings: Settings):
        from qimg.serve.app import build_services

        self.services = build_services(role_settings(settings, "replica"))
        for entry in self.services.models.entries():
            try:
                self.services.models.load(entry.name)
            except Exception as err:  # noqa: BLE001 - jobs using it fail with the reason
                log.error("model %s could not be loaded: %s", entry.name, err)
        self.services.start()

    async def run(self, job_id: str, partials: int = 0, previews: bool = False):
        """Claim `job_id` and run it, yielding its events; the last is `done` with the status (the outcome stays in
        the store). Yields `skipped` when the job is no longer queued (cancelled, or another replica has it)."""
        from qimg.serve.worker import Task

        svc = self.services
        job = await asyncio.to_thread(svc.store.claim, svc.store.owner, job_id)
        if job is None:
            yield {"type": "skipped", "job_id": job_id}
            return
        sub = svc.bus.subscribe(job_id, previews=previews, partials=partials)
        try:
            running = asyncio.get_running_loop().run_in_executor(
                None, svc.worker.execute, [Task(job.id, job.kind, job.model, job.params)])
            while True:
                event = await sub.queue.get()
                if event["type"] == "done":
                    yield {"type": "done", "job_id": job_id, "status": event["status"]}
                    break
                yield event
            await running
        finally:
            svc.bus.unsubscribe(sub)

    def __del__(self):
        services = getattr(self, "services", None)
        if services is not None:
            services.stop()


class RayDispatcher:
    """Sends each job the ingress accepts to the replicas (one streaming call per job, on an event loop of its
    own) and publishes what comes back; see the module's text for failures."""

    def __init__(self, services, handle):
        self.svc, self.handle = services, handle
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="qimg-ray-dispatch", daemon=True).start()
        self._lock = threading.Lock()
        self._inflight: set[str] = set()

    def __call__(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._inflight:
                return
            self._inflight.add(job_id)
        asyncio.run_coroutine_threadsafe(self._send(job_id), self.loop)

    def orphans(self) -> None:
        """Queued jobs no ingress is sending (theirs died), older than the heartbeat limit: send them."""
        for job in self.svc.store.orphans(self.svc.settings.stale_after_s):
            self(job.id)

    async def _send(self, job_id: str) -> None:
        from qimg.serve.store import QUEUED

        svc, bus = self.svc, self.svc.bus
        tries = 0
        try:
            while True:
                tries += 1
                try:
                    stream = self.handle.options(stream=True).run.remote(
                        job_id, bus.partials_wanted(job_id), bus.wants_previews(job_id))
                    async for event in stream:
                        if event["type"] == "skipped":
                            return  # another process has it (or it was cancelled): SharedDuties answers
                        if event["type"] == "done":
                            self._answer(job_id)
                            return
                        bus.publish(job_id, event)
                    raise RuntimeError("the replica's event stream ended before the job did")
                except Exception as err:  # noqa: BLE001 - the replica died (RayActorError) or the call failed
                    log.warning("job %s: replica call failed: %s: %s", job_id, type(err).__name__, err)
                    why = f"stopped ({type(err).__name__}: {first_line(str(err))})"
                    again = await asyncio.to_thread(svc.store.take_back, job_id, why, svc.settings.max_attempts)
                    job = await asyncio.to_thread(svc.store.get, job_id)
                    if job is None or job.terminal:
                        self._answer(job_id)
                        return
                    if not again and job.status == QUEUED and tries >= 3:
                        return  # never reached a replica: `orphans` sends it again later
                    if not again and job.status != QUEUED:
                        return
                    await asyncio.sleep(0.5)
        finally:
            with self._lock:
                self._inflight.discard(job_id)

    def _answer(self, job_id: str) -> None:
        from qimg.serve.shared import outcome_of

        job = self.svc.store.get(job_id)
        if job is not None and job.terminal:
            self.svc.bus.publish(job_id, {"type": "done", "job_id": job_id, "status": job.status,
                                          "outcome": outcome_of(job, self.svc.files)})


def application(settings: Settings, options: RayOptions):
    """The Ray Serve application: the ingress (bound first, so it is the HTTP entry) and the replicas."""
    from ray import serve

    def make_app():
        from qimg.serve.app import create_app

        app = create_app(role_settings(settings, "ingress"))
        context = serve.get_replica_context()
        handle = serve.get_deployment_handle(REPLICAS, app_name=context.app_name)
        app.state.services.worker.dispatch = RayDispatcher(app.state.services, handle)
        return app

    replicas = serve.deployment(**options.replica_options())(Replica).bind(settings)
    ingress = serve.ingress(make_app)(type("QimgIngress", (), {"__init__": lambda self, replicas: None}))
    return serve.deployment(name="qimg", num_replicas=1, max_ongoing_requests=10_000,
                            ray_actor_options={"num_cpus": 0})(ingress).bind(replicas)


def build(args: dict):
    """Ray Serve application builder (`serve run qimg.serve.ray_app:build ...` or a config file's
    `import_path`): `args["serve"]` holds `qimg serve` options as one string; `replicas`, `min_replicas`,
    `max_replicas`, `gpus_per_replica`, `cpus_per_replica` as `qimg serve --ray` takes them."""
    import argparse

    from qimg.cli.serve import register, settings_from_args

    parser = argparse.ArgumentParser(prog="qimg")
    register(parser.add_subparsers(dest="command"))
    parsed = parser.parse_args(["serve", *shlex.split(str(args.get("serve", "")))])
    settings = settings_from_args(parsed)
    options = RayOptions(replicas=int(args.get("replicas", parsed.replicas)),
                         min_replicas=_int_or_none(args.get("min_replicas", parsed.min_replicas)),
                         max_replicas=_int_or_none(args.get("max_replicas", parsed.max_replicas)),
                         gpus_per_replica=float(args.get("gpus_per_replica", parsed.gpus_per_replica)),
                         cpus_per_replica=float(args.get("cpus_per_replica", parsed.cpus_per_replica)))
    options.check(settings)
    return application(settings, options)


def _int_or_none(value) -> int | None:
    return None if value is None else int(value)


def run(settings: Settings, options: RayOptions, address: str | None = None, blocking: bool = True):
    """Start (or join) Ray, start Serve's HTTP proxy on the settings' host and port, and deploy."""
    import ray
    from ray import serve

    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    return serve.run(application(settings, options), name="qimg", route_prefix="/", blocking=blocking)
