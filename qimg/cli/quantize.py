"""`qimg quantize`: write a model's transformer as one low-bit file for `--transformer`."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    from qimg.lowbit.convert import FORMATS

    p = sub.add_parser("quantize", help="write a model's transformer as one GGUF or fp8/int8 safetensors file",
                       description="Write the transformer of MODEL (a folder or cached repo id) as one file that "
                                   "`--transformer FILE` loads with the same model folder.")
    p.add_argument("model", help="checkpoint folder or cached repo id")
    p.add_argument("out", type=Path, help="the file to write (.gguf for gguf-* formats, else .safetensors)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="gguf-q8_0 ... gguf-q4_0, gguf-f16, gguf-bf16 (Linear weights; the rest F32), fp8 "
                        "(ComfyUI scaled fp8), int8 (per-row scales)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args) -> int:
    from qimg.loading.files import resolve_model
    from qimg.lowbit.convert import quantize_transformer

    folder = resolve_model(args.model)
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if args.quiet:
            return
        if bar is None:
            import sys

            from tqdm import tqdm

            bar = tqdm(total=total, desc="quantize", unit="tensor", file=sys.stderr)
        bar.update(done - bar.n)

    counts = quantize_transformer(folder, args.out, args.format, progress)
    if bar is not None:
        bar.close()
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB; " + ", ".join(f"{n} {k}" for k, n in counts.items()) + ")")
    return 0
