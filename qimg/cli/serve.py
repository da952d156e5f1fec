"""`qimg serve`: the HTTP server (FastAPI + uvicorn)."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from qimg.cli.common import add_compile_flag, lora_args
from qimg.errors import InputError

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def parse_models(values: list[str]) -> dict[str, str | None]:
    """`--model PATH|REPO_ID|NAME=PATH` (repeatable) -> {name: source}; none -> the embedded tiny model."""
    from qimg.serve.settings import DEFAULT_MODEL_NAME, default_models

    if not values:
        return default_models()
    models: dict[str, str | None] = {}
    for value in values:
        name, sep, source = value.partition("=")
        if not sep:
            source = value
            path = Path(value).expanduser()
            name = path.name if path.exists() else value
        name, source = name.strip(), source.strip()
        if not name or not source:
            raise InputError(f"--model {value!r}: expected PATH, REPO_ID or NAME=PATH")
        if name in models:
            raise InputError(f"--model: the name {name!r} is used twice; name them with NAME=PATH")
        models[name] = None if source in ("tiny", DEFAULT_MODEL_NAME) and not Path(source).exists() else source
    return models


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_keys(args) -> tuple[str, ...]:
    keys = list(args.api_key or [])
    if os.environ.get("QIMG_API_KEYS"):
        keys += [k.strip() for k in os.environ["QIMG_API_KEYS"].split(",")]
    for path in args.api_key_file or []:
        try:
            keys += [line.strip() for line in Path(path).read_text().splitlines()]
        except OSError as err:
            raise InputError(f"--api-key-file {path}: {err}") from None
    return tuple(k for k in keys if k and not k.startswith("#"))


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the HTTP server (OpenAI Images API, layers, jobs, web page)",
                       description="Serve models over HTTP: OpenAI-compatible /v1/images/generations and "
                                   "/v1/images/edits, /v1/images/layers, /v1/jobs, and a web page at /.")
    server_args(p)
    p.add_argument("--no-worker", action="store_true",
                   help="serve the API only: `qimg worker` processes on the same --store run the jobs")
    from qimg.cli.ray_serve import ray_args

    ray_args(p)
    p.set_defaults(handler=run)
    w = sub.add_parser("worker", help="run jobs from a shared job store (--store postgresql://...), no HTTP",
                       description="A worker process: claims queued jobs from the PostgreSQL job store that `qimg "
                                   "serve --store` processes share, runs them on this machine's device and stores "
                                   "the results there. Start as many as there are devices.")
    server_args(p=w)
    w.set_defaults(handler=run_worker)


def server_args(p) -> None:
    """The options `qimg serve` and `qimg worker` share."""
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                   help="checkpoint folder or cached repo id, optionally named (repeatable; default: the embedded "
                        "qimg-tiny and qimg-tiny-layered). The first model that does a task is the default for it")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--data-dir", default=None,
                   help="jobs database and stored files (default $QIMG_DATA_DIR or ~/.local/share/qimg/serve)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (repeatable; also $QIMG_API_KEYS, comma-separated)")
    p.add_argument("--api-key-file", action="append", default=[], metavar="FILE", help="keys, one per line")
    p.add_argument("--max-queue", type=int, default=16, metavar="N",
                   help="jobs that may wait behind the running one; more get HTTP 429 (default 16)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from this origin (repeatable; default: same origin only)")
    p.add_argument("--lazy", action="store_true", help="load each model on its first job instead of at start")
    p.add_argument("--no-requeue", action="store_true",
                   help="mark jobs still queued at shutdown failed instead of running them on the next start")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights and compute (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], default=None,
                   help="where to run (default: CUDA when torch sees a GPU, else the CPU)")
    p.add_argument("--offload", action="store_true",
                   help="keep the encoders and transformers in CPU memory, each moved to the GPU for its phase")
    p.add_argument("--attention", default="sdpa", metavar="NAME",
                   help="attention backend: sdpa (default), math (explicit softmax, a check on the fused kernels), "
                        "flash (FlashAttention) or sage (SageAttention) on a CUDA GPU with that package installed")
    lora_args(p, default_mode="unfused")
    p.add_argument("--quantize", choices=["int8", "fp8"], default=None,
                   help="store every model's transformer Linear weights in 8 bits (weight-only, per-row scales)")
    p.add_argument("--transformer", default=None, metavar="FILE",
                   help="a .gguf or .safetensors file replacing the transformer weights (one --model only)")
    p.add_argument("--quantize-encoder", choices=["int8", "fp8"], default=None,
                   help="store every model's condition encoder Linear weights in 8 bits (weight-only)")
    p.add_argument("--store", default=None, metavar="postgresql://...",
                   help="keep the job rows in PostgreSQL (a database several servers can share; qimg creates the "
                        "schema) instead of SQLite in the data folder")
    p.add_argument("--owner", default=None, metavar="NAME",
                   help="this process's name in a shared store (default: host name and process id); a restart "
                        "under the same name fails the jobs it left running at once")
    p.add_argument("--stale-after", type=float, default=30.0, metavar="SECONDS",
                   help="shared store: a running job whose worker sent no heartbeat (every 2 s) for this long is "
                        "queued again for another worker, or failed once tried --max-attempts times (default 30)")
    p.add_argument("--max-attempts", type=int, default=2, metavar="N",
                   help="shared store: times a job is started before a worker's death fails it (default 2)")
    add_compile_flag(p, "job")
    p.add_argument("--download", action="store_true",
                   help="fetch each --model from the Hugging Face Hub first when it is not cached")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="LoRAs requests may name ('loras': [{'name', 'scale'}]; listed at /v1/loras)")
    p.add_argument("--max-upload-mb", type=float, default=32, help="largest uploaded image file (default 32)")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="most pixels in an uploaded image")
    p.add_argument("--max-prompt-chars", type=int, default=32000, help="longest prompt accepted (default 32000)")
    p.add_argument("--job-timeout", type=float, default=600, metavar="SECONDS",
                   help="stop a job that runs longer than this (default 600; 0: no limit)")
    p.add_argument("--max-job-cost", type=float, default=1000, metavar="MPX_STEPS",
                   help="refuse a job costing more megapixel-steps (steps x output megapixels x pictures x frames: "
                        "the output and each condition image) than this (default 1000, e.g. 50 steps at 2048x2048 "
                        "with 3 condition images; 0: no limit)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="denoise up to N compatible queued generations together (same model, size, steps, sampler, "
                        "guidance and LoRAs; each gets the picture it would get alone); 1 turns batching off "
                        "(default 8)")
    p.add_argument("--batch-megapixels", type=float, default=4.0, metavar="MPX",
                   help="output pixels one batch may hold, n x width x height summed (default 4.0)")
    p.add_argument("--allow-remote-without-key", action="store_true",
                   help="allow a non-loopback --host with no API key (refused otherwise)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log detail (default info; debug also logs every request)")


def settings_from_args(args):
    from qimg.options import LoadOptions
    from qimg.serve.settings import Limits, Settings, default_data_dir

    if args.lora_dir and not Path(args.lora_dir).expanduser().is_dir():
        raise InputError(f"--lora-dir {args.lora_dir} is not a folder")
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be 1..65535, got {args.port}")
    if args.max_queue < 0:
        raise InputError(f"--max-queue must be >= 0, got {args.max_queue}")
    keys = read_keys(args)
    if not keys and not is_loopback(args.host) and not args.allow_remote_without_key:
        raise InputError(f"--host {args.host} is reachable from other machines: set --api-key (or "
                         f"$QIMG_API_KEYS), or pass --allow-remote-without-key")
    if args.transformer and len(args.model) != 1:
        raise InputError(f"--transformer replaces one model's transformer: give exactly one --model (got "
                         f"{len(args.model)})")
    if args.max_batch < 1 or not args.batch_megapixels > 0:
        raise InputError(f"--max-batch must be >= 1 and --batch-megapixels > 0, got {args.max_batch} and "
                         f"{args.batch_megapixels}")
    if getattr(args, "no_worker", False) and not args.store:
        raise InputError("--no-worker serves the API only: give --store postgresql://... for the workers to share")
    if args.stale_after <= 2 or args.max_attempts < 1:
        raise InputError(f"--stale-after must be > 2 seconds (heartbeats come every 2 s) and --max-attempts >= 1, "
                         f"got {args.stale_after} and {args.max_attempts}")
    if args.job_timeout < 0 or args.max_job_cost < 0:
        raise InputError(f"--job-timeout and --max-job-cost must be >= 0 (0: no limit), got {args.job_timeout} "
                         f"and {args.max_job_cost}")
    max_upload = int(args.max_upload_mb * 1024 * 1024)
    limits = Limits(max_image_bytes=max_upload, max_request_bytes=max(max_upload * 11, 16 * 1024 * 1024),
                    max_image_pixels=args.max_pixels, max_prompt_chars=args.max_prompt_chars,
                    max_job_cost=args.max_job_cost or None)
    return Settings(models=parse_models(args.model), host=args.host, port=args.port,
                    data_dir=Path(args.data_dir).expanduser() if args.data_dir else default_data_dir(),
                    api_keys=keys, max_queue=args.max_queue, cors_origins=tuple(args.cors_origin),
                    preload=not args.lazy, requeue=not args.no_requeue, limits=limits,
                    job_timeout=args.job_timeout or None, max_batch=args.max_batch,
                    batch_megapixels=args.batch_megapixels, store=args.store, owner=args.owner,
                    run_jobs=not getattr(args, "no_worker", False), stale_after_s=args.stale_after,
                    max_attempts=args.max_attempts,
                    load=LoadOptions(dtype=args.dtype, device=args.device, offload=args.offload,
                                     attention=args.attention, loras=tuple(args.lora), lora_mode=args.lora_mode,
                                     lora_partial=args.lora_partial, download=args.download,
                                     quantize=args.quantize, transformer=args.transformer,
                                     quantize_encoder=args.quantize_encoder, compile=args.compile),
                    lora_dir=Path(args.lora_dir).expanduser() if args.lora_dir else None)


def run(args) -> int:
    if args.ray:
        from qimg.cli.ray_serve import run_ray

        return run_ray(args, settings_or_error(args))
    try:
        import uvicorn

        from qimg.serve.app import create_app
    except ModuleNotFoundError as err:
        raise InputError(f"qimg serve needs {err.name!r}: pip install 'qimg[serve]'") from None
    settings = settings_or_error(args)
    try:
        app = create_app(settings)
    except RuntimeError as err:
        raise InputError(str(err)) from None
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"qimg serve: http://{shown}:{settings.port}/  models: {', '.join(settings.models)}  "
          f"data: {settings.data_dir}  auth: {'on' if settings.api_keys else 'off'}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level,
                timeout_graceful_shutdown=5, access_log=args.log_level == "debug")
    return 0


def settings_or_error(args):
    try:
        return settings_from_args(args)
    except ValueError as err:
        raise InputError(str(err)) from None


def run_worker(args) -> int:
    """`qimg worker`: the services without HTTP, until SIGINT or SIGTERM."""
    import signal
    import threading

    from qimg.serve.app import build_services

    if not args.store:
        raise InputError("qimg worker takes its jobs from a shared store: give --store postgresql://...")
    settings = settings_or_error(args)
    try:
        services = build_services(settings)
    except RuntimeError as err:
        raise InputError(str(err)) from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    services.start()
    print(f"qimg worker {services.store.owner}: models {', '.join(settings.models)}, jobs from "
          f"{settings.store.split('@')[-1]}", file=sys.stderr, flush=True)
    try:
        stop.wait()
    finally:
        services.stop()
    return 0
