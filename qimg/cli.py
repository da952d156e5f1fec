"""The `qimg` command: parsing and printing only; the work is done by the pipelines."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qimg.errors import InputError, QimgError

OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1024x768, got {text!r}") from None
    return w, h


def model_args(p: argparse.ArgumentParser, default: str = "qimg-tiny") -> None:
    p.add_argument("--model", default=None, help=f"checkpoint folder, cached repo id or embedded model name "
                                                  f"(default: the embedded {default})")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], default=None)
    p.add_argument("--offload", action="store_true",
                   help="keep the encoder and the transformer in CPU memory, each moved to the GPU for its phase "
                        "(GPUs too small to hold both; slower)")


def sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="qimg.png", help="output image (.png keeps the parameters)")
    p.add_argument("--size", type=parse_size, default=None, metavar="WxH")
    p.add_argument("--resolution", type=int, default=None, metavar="N", help="target side length (area N*N)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--cfg", type=float, default=None, help="true CFG scale (>1 turns guidance on)")
    p.add_argument("--background", choices=["transparent", "opaque"], default=None,
                   help="opaque flattens RGBA output onto white")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    model_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qimg", description="Qwen-Image family engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text-to-image, or image-conditioned generation with --image")
    gen.add_argument("prompt")
    gen.add_argument("--image", action="append", default=[], metavar="IN.png", help="condition image (repeatable)")
    sampling_args(gen)
    edit = sub.add_parser("edit", help="edit an image by instruction")
    edit.add_argument("image")
    edit.add_argument("instruction")
    edit.add_argument("--image", dest="extra_images", action="append", default=[], metavar="IN.png",
                      help="further reference images")
    sampling_args(edit)
    info = sub.add_parser("info", help="components, classes, parameter counts, dtypes and bytes of a checkpoint")
    info.add_argument("model", nargs="?", default=None)
    info.add_argument("--json", action="store_true")
    from qimg.cli_extra import register

    register(sub)
    return parser


def open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise InputError(f"{path} is not a readable picture: {err}") from None


def check_output(path: str, suffixes=OUTPUT_SUFFIXES) -> Path:
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise InputError(f"output {path!r} has suffix {out.suffix or '(none)'!r}; use one of {list(suffixes)}")
    if not out.parent.exists():
        raise InputError(f"output folder does not exist: {out.parent}")
    return out


class ProgressBar:
    """A tqdm bar on stderr for the denoising stage."""

    def __init__(self, quiet: bool, desc: str = "denoise"):
        self.quiet, self.desc, self.bar = quiet, desc, None

    def __call__(self, event) -> None:
        if self.quiet or event.stage != "denoise":
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=event.total, desc=self.desc, unit="step", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(event.step - self.bar.n)
        if event.step >= event.total:
            self.bar.close()


def save_image(image, out: Path) -> None:
    from qimg.export.atomic import atomic_write
    from qimg.export.png import save_png

    if out.suffix.lower() == ".png":
        save_png(image, out, image.info.get("qimg"))
        return
    fmt = "JPEG" if out.suffix.lower() in (".jpg", ".jpeg") else "WEBP"
    if fmt == "JPEG" and image.mode != "RGB":
        from qimg.pipelines.images import flatten

        image = flatten(image)
    with atomic_write(out) as handle:
        image.save(handle, format=fmt, quality=95)


def run_generate(args, prompt: str, image_paths: list[str]) -> int:
    import qimg

    out = check_output(args.output)
    images = [open_image(p) for p in image_paths]
    width, height = args.size if args.size else (None, None)
    pipe = qimg.load(args.model, dtype=args.dtype, device=args.device, offload=args.offload)
    result = pipe.generate(prompt, images=images or None, width=width, height=height, resolution=args.resolution,
                           steps=args.steps, seed=args.seed, negative_prompt=args.negative_prompt, cfg=args.cfg,
                           background=args.background, progress=ProgressBar(args.quiet))
    save_image(result[0], out)
    meta = result[0].info["qimg"]
    print(f"wrote {out.resolve()} ({meta['width']}x{meta['height']}, seed {meta['seed']}, "
          f"{meta['steps']} steps, {meta['seconds']:.2f} s on {pipe.info.device.type}, {meta['dtype']})")
    return 0


def run_info(args) -> int:
    import json

    from qimg.loading.inspect import describe_checkpoint

    report = describe_checkpoint(args.model)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['folder']}\npipeline: {report['pipeline']}")
    for name, comp in report["components"].items():
        line = f"  {name:<13} {comp['class']}"
        if "parameters" in comp:
            dtypes = ", ".join(f"{k}: {v}" for k, v in comp["dtypes"].items())
            line += f"  {comp['parameters']:,} parameters, {comp['bytes'] / 1e6:,.1f} MB ({dtypes})"
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return run_generate(args, args.prompt, args.image)
        if args.command == "edit":
            return run_generate(args, args.instruction, [args.image, *args.extra_images])
        if args.command == "info":
            return run_info(args)
        return args.handler(args)
    except QimgError as err:
        print(f"qimg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qimg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
