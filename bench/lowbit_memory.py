"""Memory of a GGUF transformer at the official sizes, on CPU: a file of random K-quant blocks with sane scales (the
official state-dict keys and shapes from tests/contracts) is loaded with qimg's GGUF path in a fresh process.

    python bench/lowbit_memory.py [--model 2.1|v1] [--kind Q4_K] [--keep DIR]

Reports the weights' bytes as they sit in memory (quantised blocks + the other tensors in bfloat16), the process's
RSS after loading (blocks are memory-mapped: only what is touched is resident) and its peak RSS after every block has
been read once (what a full denoising step touches). Linear weights whose rows a K-quant block cannot tile stay
F16. Prints a table and writes bench/results/lowbit_memory-<model>-<kind>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONTRACTS = {"2.1": "keys_QwenImage21Transformer2DModel.txt", "v1": "keys_QwenImageTransformer2DModel.txt"}
SCALE_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,), "Q4_0": (0,)}


def write_random_gguf(model: str, kind: str, path: Path) -> dict:
    import gguf

    from tests.contracts import read_contract

    _, keys = read_contract(CONTRACTS[model])
    qtype = gguf.GGMLQuantizationType[kind]
    elements, nbytes = gguf.constants.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "qwen_image", use_temp_file=True)
    counts = {"quantised": 0, "other": 0}
    for key, (shape, _) in keys.items():
        if len(shape) == 2 and key.endswith(".weight") and shape[1] % elements == 0:
            blocks = rng.integers(0, 256, (shape[0], shape[1] // elements * nbytes), dtype=np.uint8)
            for k, offset in enumerate(SCALE_FIELDS[kind]):
                view = blocks.reshape(-1, nbytes)
                view[:, offset:offset + 2] = np.full(view.shape[0], 0.01 if not k else -0.01,
                                                     np.float16).view(np.uint8).reshape(-1, 2)
            writer.add_tensor(key, blocks, raw_dtype=qtype)
            counts["quantised"] += shape[0] * shape[1]
        else:
            writer.add_tensor(key, (rng.standard_normal(shape) * 0.02).astype(np.float16))
            counts["other"] += int(np.prod(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return counts


CHILD = r"""
import json, resource, sys, torch
import psutil
from qimg.lowbit.load import load_gguf_module
from qimg.lowbit.layers import QuantLinear
from tests.contracts import read_contract
model, path, contract = sys.argv[1], sys.argv[2], sys.argv[3]
config, _ = read_contract(contract)
config = {k: v for k, v in config.items() if not k.startswith("_")}
if model == "2.1":
    from qimg.models.qwenimage21 import QwenImage21Config as C, QwenImage21Transformer as M
else:
    from qimg.models.qwenimage import QwenImageConfig as C, QwenImageTransformer as M
before = psutil.Process().memory_info().rss
module = load_gguf_module(lambda: M(C.from_dict(config)), path, dtype=torch.bfloat16, device="cpu")
loaded = psutil.Process().memory_info().rss
blocks = sum(m.blocks.numel() for m in module.modules() if isinstance(m, QuantLinear))
others = sum(t.numel() * t.element_size() for n, t in [*module.named_parameters(), *module.named_buffers()]
             if not n.endswith(".blocks"))
for m in module.modules():  # read every block once, as a denoising step does
    if isinstance(m, QuantLinear):
        m.blocks.sum(dtype=torch.int64)
touched = psutil.Process().memory_info().rss
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"weights_bytes": blocks + others, "quantised_bytes": blocks, "other_bytes": others,
                  "rss_before": before, "rss_loaded": loaded, "rss_all_blocks_read": touched, "peak_rss": peak}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(CONTRACTS), default="2.1")
    p.add_argument("--kind", default="Q4_K", choices=sorted(SCALE_FIELDS))
    p.add_argument("--keep", default=None, help="folder to write the GGUF into (default: a temporary one, removed)")
    args = p.parse_args(argv)
    folder = Path(args.keep or tempfile.mkdtemp(prefix="qimg-lowbit-mem-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{args.model}-{args.kind}.gguf"
    start = time.perf_counter()
    counts = write_random_gguf(args.model, args.kind, path)
    written = time.perf_counter() - start
    child = subprocess.run([sys.executable, "-c", CHILD, args.model, str(path), CONTRACTS[args.model]], cwd=ROOT,
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if child.returncode:
        print(child.stderr[-3000:])
        return 1
    result = json.loads(child.stdout.strip().splitlines()[-1])
    gib = 1024**3
    print(f"{args.model} transformer, {args.kind} Linear weights ({counts['quantised'] / 1e9:.2f} B weights; "
          f"{counts['other'] / 1e6:.1f} M other), file {path.stat().st_size / gib:.2f} GiB written in {written:.0f} s")
    for name in ("weights_bytes", "quantised_bytes", "other_bytes", "rss_before", "rss_loaded", "rss_all_blocks_read",
                 "peak_rss"):
        print(f"  {name:<22} {result[name] / gib:8.2f} GiB  {result[name] / 1e9:8.2f} GB")
    out = ROOT / "bench" / "results" / f"lowbit_memory-{args.model}-{args.kind}.json"
    from qimg.atomic import atomic_write

    with atomic_write(out, "w") as handle:
        json.dump({"model": args.model, "kind": args.kind, **counts, "file_bytes": path.stat().st_size, **result,
                   "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                               "platform": platform.platform()}, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                  handle, indent=2)
    print(f"wrote {out}")
    if not args.keep:
        path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
