"""Peak extra RAM of loading a ~1 GB transformer checkpoint: qimg's mmap loader vs diffusers' from_pretrained.

Writes a random diffusers `QwenImage21Transformer2DModel` (~264M params, float32, 4 shards) into a temp dir,
then measures each case in a fresh subprocess:

    qimg_native  load_module in the file's dtype (float32)   target: peak <= 0.25x file bytes
    qimg_bf16    load_module with dtype=bfloat16             target: peak <= 1.15x file bytes
    ref_native   diffusers from_pretrained (float32)
    ref_bf16     diffusers from_pretrained(torch_dtype=bfloat16)

"peak" is the process's high-water RSS during the load minus its RSS just before (VmHWM reset through
/proc/self/clear_refs; falls back to ru_maxrss). RSS counts mmap'd file pages once they are read, so the
table also shows RSS after one read of every weight ("touched"), split into anonymous and file-backed pages:
file-backed pages are clean page-cache pages the kernel can drop at any time.

    python bench/load_memory.py [--layers 8] [--heads 12] [--keep DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("qimg_native", "qimg_bf16", "ref_native", "ref_bf16")
TARGETS = {"qimg_native": 0.25, "qimg_bf16": 1.15}


# ---- child side ----------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _qimg_factory(folder: Path, spec):
    """qimg's own 2.x transformer built from the checkpoint's config.json."""
    from qimg.models.qwenimage21 import QwenImage21Config, QwenImage21Transformer

    config = QwenImage21Config.from_dict(json.loads((folder / "config.json").read_text()))
    return (lambda: QwenImage21Transformer(config)), "qimg.models.qwenimage21.QwenImage21Transformer"


def child(case: str, folder: Path) -> dict:
    import psutil  # noqa: F401  (imported so both sides pay the same import cost)
    import torch

    torch.set_num_threads(2)
    dtype = torch.bfloat16 if case.endswith("bf16") else None
    info: dict = {"case": case}
    if case.startswith("qimg"):
        from qimg.loading.weights import load_module, open_state_dict

        spec = {k: (tuple(t.shape), t.dtype) for k, t in open_state_dict(folder).items()}
        factory, info["factory"] = _qimg_factory(folder, spec)
        load = lambda: load_module(factory, folder, dtype=dtype)  # noqa: E731
    else:
        from diffusers import QwenImage21Transformer2DModel

        kwargs = {"torch_dtype": dtype} if dtype else {}
        info["factory"] = "diffusers QwenImage21Transformer2DModel.from_pretrained"
        load = lambda: QwenImage21Transformer2DModel.from_pretrained(folder, **kwargs)  # noqa: E731
    gc.collect()
    base = _status()
    ru_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hwm_ok = _reset_peak()
    t0 = time.perf_counter()
    model = load()
    info["load_s"] = time.perf_counter() - t0

    def measure(tag):
        now = _status()
        peak = now["VmHWM"] if hwm_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        info[f"{tag}_peak"] = peak - base["VmRSS"]
        info[f"{tag}_rss"] = now["VmRSS"] - base["VmRSS"]
        info[f"{tag}_anon"] = now["RssAnon"] - base["RssAnon"]
        info[f"{tag}_file"] = now["RssFile"] - base["RssFile"]

    measure("load")
    tensors = list(model.state_dict().values())
    with torch.no_grad():
        for t in tensors:
            t.sum()  # reads every page, no full-size temporary
    measure("touch")
    info["peak_method"] = "VmHWM reset" if hwm_ok else f"ru_maxrss (pre-load peak {ru_base})"
    info["dtype"] = str(tensors[0].dtype)
    state = model.state_dict()  # summed in key order: the two implementations list their modules differently
    info["checksum"] = float(sum(state[k].double().sum().item() for k in sorted(state) if state[k].is_floating_point()))
    return info


# ---- parent side ---------------------------------------------------------------------------------


def make_checkpoint(root: Path, layers: int, heads: int) -> Path:
    import torch
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(0)
    model = QwenImage21Transformer2DModel(
        num_layers=layers, num_attention_heads=heads, attention_head_dim=128, context_in_dim=1024
    )
    with torch.no_grad():  # small random values everywhere (default init leaves some zero tensors)
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(root / "transformer", max_shard_size="300MB")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    return root / "transformer"


def run_child(case: str, folder: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, "--folder", str(folder)],
        capture_output=True, text=True, env=env,
    )
    if out.returncode:
        return {"case": case, "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--keep", type=Path, help="write the checkpoint here and keep it")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load_memory.json")
    ap.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import load_memory; "
             f"load_memory.make_checkpoint(__import__('pathlib').Path({str(root)!r}), {args.layers}, {args.heads})"],
            check=True,
        )
        folder = root / "transformer"
        files = sorted(folder.glob("*.safetensors"))
        file_bytes = sum(f.stat().st_size for f in files)
        print(f"checkpoint: {len(files)} shard(s), {file_bytes / 1e9:.3f} GB, written in {time.perf_counter() - t0:.1f}s")
        results = [run_child(case, folder) for case in CASES]

    mb = lambda b: f"{b / 2**20:8.0f}"  # noqa: E731
    x = lambda b: f"{b / file_bytes:5.2f}x"  # noqa: E731
    head = (f"{'case':12} {'load s':>6}  {'peak MiB':>8} {'peak/file':>9}  {'rss MiB':>8} {'anon':>6} {'file':>6}  "
            f"|touched: {'peak':>6} {'anon':>6} {'file':>6}  target")
    print(head)
    print("-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['case']:12} ERROR {r['error']}")
            continue
        target = TARGETS.get(r["case"])
        verdict = "" if target is None else f"<= {target}x " + ("ok" if r["load_peak"] <= target * file_bytes else "FAIL")
        print(f"{r['case']:12} {r['load_s']:6.2f}  {mb(r['load_peak'])} {x(r['load_peak']):>9}  {mb(r['load_rss'])} "
              f"{mb(r['load_anon'])[2:]} {mb(r['load_file'])[2:]}  |touched: {mb(r['touch_peak'])[2:]} "
              f"{mb(r['touch_anon'])[2:]} {mb(r['touch_file'])[2:]}  {verdict}")
        r["peak_over_file"] = r["load_peak"] / file_bytes
        r["touch_peak_over_file"] = r["touch_peak"] / file_bytes
    sums = {r["case"]: r.get("checksum") for r in results}
    same = {"native": sums["qimg_native"] == sums["ref_native"], "bf16": sums["qimg_bf16"] == sums["ref_bf16"]}
    print(f"factory: {results[0].get('factory')}; values identical to diffusers: {same}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"file_bytes": file_bytes, "shards": len(files), "layers": args.layers, "heads": args.heads,
              "cpu_count": os.cpu_count(), "values_match_reference": same, "results": results}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
