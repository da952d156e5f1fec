"""Start N ranks of one command on this machine (what `qimg generate --gpus N` does instead of torchrun).

Each rank is the same command in its own process with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); the process group itself is `torch.distributed`'s. When a rank fails,
the others are stopped (a rank waiting in a collective for a dead peer would wait for ever), and the launch returns
the first failing rank's exit code.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(rank: int, world: int, port: int, threads: int | None) -> dict:
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


TIMED_OUT = 124


def launch(argv: list[str], world: int, *, threads: int | None = None, timeout: float | None = None,
           poll: float = 0.2) -> int:
    """Run `python argv...` as ranks 0..world-1; 0 when every rank succeeds. `threads`: OMP_NUM_THREADS per rank
    (CPU ranks share the machine's cores); `timeout`: seconds after which every rank is stopped (exit 124)."""
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, *argv], env=rank_environment(r, world, port, threads))
             for r in range(world)]
    failed = None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in ranks):
            failed = next((p for p in ranks if p.returncode not in (None, 0)), None)
            if failed is not None:
                break
            if deadline is not None and time.monotonic() > deadline:
                _stop(ranks)
                return TIMED_OUT
            time.sleep(poll)
    except KeyboardInterrupt:
        failed = None
        _stop(ranks)
        raise
    if failed is not None:
        _stop(ranks)
        return failed.returncode
    codes = [p.returncode for p in ranks]
    return next((c for c in codes if c != 0), 0)


def _stop(ranks: list[subprocess.Popen], grace: float = 5.0) -> None:
    for p in ranks:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in ranks:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
