"""How fast the tiny world renders scenes (it feeds training and evaluation).

    python bench/world_speed.py [--scenes 200]

Prints the mean milliseconds per scene for whole pictures and for RGBA layer stacks, and writes
bench/results/world_speed.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from qimg.tiny import world


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenes", type=int, default=200)
    args = parser.parse_args()
    rng = random.Random(19)
    scenes = [world.random_scene(rng, word_prob=0.3) for _ in range(args.scenes)]
    world.render(scenes[0])  # caches warm up as training's would
    rows = {}
    for name, fn in (("render", world.render), ("render_layers", world.render_layers)):
        start = time.perf_counter()
        for scene in scenes:
            fn(scene)
        rows[name] = (time.perf_counter() - start) / len(scenes) * 1000
        print(f"{name:<14} {rows[name]:.3f} ms per scene ({len(scenes)} scenes)")
    out = Path(__file__).parent / "results" / "world_speed.json"
    out.write_text(json.dumps({"scenes": len(scenes), "ms_per_scene": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
