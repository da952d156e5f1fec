"""`qimg serve --ray`: the same server as Ray Serve replicas (see `qimg.serve.ray_app`)."""

from __future__ import annotations

import sys

from qimg.errors import InputError


def ray_args(p) -> None:
    g = p.add_argument_group("Ray Serve (replicas on one or many machines)")
    g.add_argument("--ray", action="store_true",
                   help="run the server as a Ray Serve deployment: each replica loads the models once and runs "
                        "jobs; replicas share the --store (PostgreSQL; required with more than one replica)")
    g.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas (default 1)")
    g.add_argument("--min-replicas", type=int, default=None, metavar="A",
                   help="autoscale between A and --max-replicas from each replica's requests in flight")
    g.add_argument("--max-replicas", type=int, default=None, metavar="B", help="upper bound when autoscaling")
    g.add_argument("--gpus-per-replica", type=float, default=0.0, metavar="K",
                   help="GPUs Ray reserves for each replica (default 0: CPU replicas; 1 for one GPU each)")
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="an existing Ray cluster (default: $RAY_ADDRESS, else a local Ray started here)")


def run_ray(args, settings) -> int:
    from qimg.serve.ray_app import RayOptions, run

    try:
        options = RayOptions(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                             gpus_per_replica=args.gpus_per_replica)
        options.check(settings)
    except ValueError as err:
        raise InputError(str(err)) from None
    print(f"qimg serve --ray: http://{settings.host}:{settings.port}/  {options.describe()}  models: "
          f"{', '.join(settings.models)}", file=sys.stderr, flush=True)
    run(settings, options, address=args.ray_address)
    return 0
