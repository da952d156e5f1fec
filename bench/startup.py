"""Start-up: whole-process wall time of the commands a newcomer runs first, median of several runs, optionally
side by side with another commit of qimg (a git worktree of it on PYTHONPATH).

    python bench/startup.py [--repeats 5] [--baseline REV]

Commands: `python -c "import qimg"`, `qimg --help`, `qimg info qimg-tiny` and `qimg generate PROMPT` on the
embedded model (128x128, its default 3 steps). Prints a table and writes bench/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a large red circle in the center and a small blue square in the top left corner on a yellow background"


def commands(out: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "qimg.cli"]
    return {"import qimg": [sys.executable, "-c", "import qimg"], "qimg --help": [*cli, "--help"],
            "qimg info qimg-tiny": [*cli, "info", "qimg-tiny"],
            "qimg generate (embedded)": [*cli, "generate", PROMPT, "-o", str(out), "--seed", "0", "--quiet"]}


def timed(cmd: list[str], tree: Path, repeats: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", default=None, help="a git revision to time beside this tree")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp()) / "startup.png"
    trees = {"this tree": REPO}
    if args.baseline:
        base = Path(tempfile.mkdtemp()) / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(base), args.baseline],
                       check=True)
        trees[args.baseline] = base
    rows = {}
    try:
        for name, cmd in commands(out).items():
            rows[name] = {label: timed(cmd, tree, args.repeats) for label, tree in trees.items()}
    finally:
        if args.baseline:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(trees[args.baseline])])
    labels = list(trees)
    print(f"{'command':<28}" + "".join(f"{label:>16}" for label in labels) + f"   (median of {args.repeats} runs, s)")
    for name, row in rows.items():
        print(f"{name:<28}" + "".join(f"{row[label]:>16.2f}" for label in labels))
    path = Path(__file__).parent / "results" / "startup.json"
    path.write_text(json.dumps({"repeats": args.repeats, "baseline": args.baseline, "cpus": os.cpu_count(),
                                "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
