"""`--gpus N`: start the N ranks of a parallel run on this machine, each the same command with `--parallel`."""

from __future__ import annotations

import os

from qimg.errors import InputError


def without_launch_flags(argv: list[str]) -> list[str]:
    """`argv` without `--gpus N` and `--parallel SPEC` (either spelling: `--flag value` or `--flag=value`)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item in ("--gpus", "--parallel"):
            skip = True
            continue
        if item.startswith(("--gpus=", "--parallel=")):
            continue
        out.append(item)
    return out


def run_on_ranks(args, argv: list[str]) -> int:
    import torch

    from qimg.parallel.config import ParallelConfig
    from qimg.parallel.launch import launch

    n = args.gpus
    if n < 1:
        raise InputError(f"--gpus must be at least 1, got {n}")
    on_cpu = args.device == "cpu"
    if not on_cpu:
        found = torch.cuda.device_count()
        if found < n:
            raise InputError(f"--gpus {n} needs {n} CUDA devices; torch sees {found} (add --device cpu to run {n} "
                             f"CPU processes instead)")
    config = ParallelConfig.parse(args.parallel) or ParallelConfig.for_processes(n)
    if config.world != n:
        raise InputError(f"--parallel {config} needs {config.world} ranks (ulysses {config.ulysses} x cfg "
                         f"{config.cfg}) but --gpus asks for {n}")
    if n == 1:
        args.parallel = None
        return args.handler(args)
    threads = max(1, (os.cpu_count() or 1) // n) if on_cpu else 1
    return launch(["-m", "qimg.cli", *without_launch_flags(argv), "--parallel", str(config)], n, threads=threads)
