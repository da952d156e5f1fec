"""`qimg serve --ray`: the same server as Ray Serve replicas (see `qimg.serve.ray_app`)."""

from __future__ import annotations

import sys

from qimg.errors import InputError


def ray_args(p) -> None:
    g = p.add_argument_group("Ray Serve (replicas on one or many machines)")
    g.add_argument("--ray", action="store_true",
                   help="run on Ray Serve: an HTTP ingress and replicas that each load the models once and run "
                        "jobs, sharing the --store (PostgreSQL, required)")
    g.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas (default 1)")
    g.add_argument("--min-replicas", type=int, default=None, metavar="A",
                   help="autoscale between A and --max-replicas from each replica's requests in flight")
    g.add_argument("--max-replicas", type=int, default=None, metavar="B", help="upper bound when autoscaling")
    g.add_argument("--gpus-per-replica", type=float, default=0.0, metavar="K",
                   help="GPUs Ray reserves for each replica (default 0: CPU replicas; 1 for one GPU each)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="C",
                   help="CPUs Ray reserves for each replica (default 1)")
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="an existing Ray cluster (default: $RAY_ADDRESS, else a local Ray started here)")


def run_ray(args, settings) -> int:
    import signal

    try:
        from qimg.serve.ray_app import RayOptions, run
        import ray  # noqa: F401
    except ModuleNotFoundError as err:
        raise InputError(f"qimg serve --ray needs {err.name!r}: pip install 'qimg[serve,ray]'") from None

    try:
        options = RayOptions(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                             gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica)
        options.check(settings)
    except ValueError as err:
        raise InputError(str(err)) from None
    print(f"qimg serve --ray: http://{settings.host}:{settings.port}/  {options.describe()}  models: "
          f"{', '.join(settings.models)}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM: stop like Ctrl-C, Ray shut down on exit
    try:
        run(settings, options, address=args.ray_address)
    except KeyboardInterrupt:
        pass
    return 0
