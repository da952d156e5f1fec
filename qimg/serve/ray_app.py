"""The server as a Ray Serve deployment: each replica is the whole `qimg serve` app (its routes, page, worker and
models, loaded once per replica), built on the replica by Ray (`serve.ingress` with a builder). Ray's proxy
spreads HTTP requests over the replicas, at most `max_queue + 1` in flight per replica; Ray restarts a replica
whose process dies, and autoscales between bounds from the requests in flight per replica.

Replicas share their state through the PostgreSQL store (`Settings.store`): a job accepted by one replica is
listed, cancelled and downloaded through any other; any replica's worker may run it (its own first); admission
(HTTP 429 with Retry-After) counts the jobs queued in the database; and the jobs of a replica that died are taken
back by the others (`SharedJobStore.reap`): queued again once, then failed with the reason. A client whose request
was in flight on the dying replica gets Ray's error answer at once, never a hanging connection.

Started by `qimg serve --ray` or by Ray's own tools with the application builder `build` (`serve run
qimg.serve.ray_app:build serve="--store postgresql://... --model ..." replicas=2`, or a config file: docs).
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass

from qimg.serve.settings import Settings

TARGET_ONGOING = 2  # autoscaling aims at a running job and one waiting per replica


@dataclass(frozen=True)
class RayOptions:
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    gpus_per_replica: float = 0.0

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
        if self.gpus_per_replica < 0:
            raise ValueError(f"--gpus-per-replica must be >= 0, got {self.gpus_per_replica}")
        if (self.autoscaling or self.replicas > 1) and not settings.store:
            raise ValueError("several replicas share their jobs and files through PostgreSQL: give --store "
                             "postgresql://... (SQLite in a data folder serves one process)")
        if not settings.run_jobs:
            raise ValueError("Ray replicas run jobs: drop --no-worker")

    def describe(self) -> str:
        scale = (f"autoscaling {self.min_replicas}-{self.max_replicas} replicas" if self.autoscaling
                 else f"{self.replicas} replica(s)")
        return f"{scale}, {self.gpus_per_replica:g} GPU(s) each"

    def deployment_options(self, settings: Settings) -> dict:
        options = {"name": "qimg", "max_ongoing_requests": settings.max_queue + 1,
                   "max_queued_requests": max(1, settings.max_queue),
                   "ray_actor_options": {"num_gpus": self.gpus_per_replica},
                   "health_check_period_s": 5, "graceful_shutdown_timeout_s": 10}
        if self.autoscaling:
            options["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                             "target_ongoing_requests": TARGET_ONGOING}
        else:
            options["num_replicas"] = self.replicas
        return options


def replica_settings(settings: Settings) -> Settings:
    """One replica's settings: its own name in the shared store (jobs it runs carry it), and its Ray replica
    context's host and port are Ray's, not the settings'."""
    import os
    import socket

    owner = f"{settings.owner or socket.gethostname()}-ray-{os.getpid()}"
    return dataclasses.replace(settings, owner=owner)


def application(settings: Settings, options: RayOptions):
    """The Ray Serve application: a deployment whose replicas build the app on start."""
    from ray import serve

    def make_app():
        from qimg.serve.app import create_app

        return create_app(replica_settings(settings))

    ingress = serve.ingress(make_app)(type("QimgReplica", (), {"__doc__": "one qimg server replica"}))
    return serve.deployment(**options.deployment_options(settings))(ingress).bind()


def build(args: dict):
    """Ray Serve application builder (`serve run qimg.serve.ray_app:build ...` or a config file's
    `import_path`): `args["serve"]` holds `qimg serve` options as one string; `replicas`, `min_replicas`,
    `max_replicas`, `gpus_per_replica` as `qimg serve --ray` takes them."""
    import argparse

    from qimg.cli.serve import register, settings_from_args

    parser = argparse.ArgumentParser(prog="qimg")
    register(parser.add_subparsers(dest="command"))
    parsed = parser.parse_args(["serve", *shlex.split(str(args.get("serve", "")))])
    settings = settings_from_args(parsed)
    options = RayOptions(replicas=int(args.get("replicas", parsed.replicas)),
                         min_replicas=_int_or_none(args.get("min_replicas", parsed.min_replicas)),
                         max_replicas=_int_or_none(args.get("max_replicas", parsed.max_replicas)),
                         gpus_per_replica=float(args.get("gpus_per_replica", parsed.gpus_per_replica)))
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
