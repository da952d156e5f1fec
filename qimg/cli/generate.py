"""`qimg generate`, `qimg edit` and `qimg info`."""

from __future__ import annotations

import sys

from qimg.cli.common import (ProgressBar, check_output, describe_loras, load_options, model_args, open_image,
                             parse_size, sampling_args, sampling_fields)


def register(sub) -> None:
    gen = sub.add_parser("generate", help="text-to-image, or image-conditioned generation with --image")
    gen.add_argument("prompt")
    gen.add_argument("--image", action="append", default=[], metavar="IN.png", help="condition image (repeatable)")
    picture_args(gen)
    gen.set_defaults(handler=lambda args: run_generate(args, args.prompt, args.image))
    edit = sub.add_parser("edit", help="edit an image by instruction")
    edit.add_argument("image")
    edit.add_argument("instruction")
    edit.add_argument("--image", dest="extra_images", action="append", default=[], metavar="IN.png",
                      help="further reference images")
    picture_args(edit)
    edit.set_defaults(handler=lambda args: run_generate(args, args.instruction, [args.image, *args.extra_images]))
    info = sub.add_parser("info", help="components, classes, parameter counts, dtypes and bytes of a checkpoint")
    info.add_argument("model", nargs="?", default=None)
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=run_info)


def picture_args(p) -> None:
    p.add_argument("-o", "--output", default="qimg.png", help="output image (.png keeps the parameters)")
    p.add_argument("--size", type=parse_size, default=None, metavar="WxH",
                   help="output size (default: the model's square, or an edit's input aspect)")
    p.add_argument("--resolution", type=int, default=None, metavar="N", help="target side length (area N*N)")
    p.add_argument("--background", choices=["transparent", "opaque"], default=None,
                   help="opaque flattens RGBA output onto white")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    sampling_args(p)
    model_args(p)


def run_generate(args, prompt: str, image_paths: list[str]) -> int:
    import qimg
    from qimg.export.picture import save_picture
    from qimg.options import GenerateOptions

    out = check_output(args.output)
    width, height = args.size if args.size else (None, None)
    options = GenerateOptions(prompt=prompt, images=[open_image(p) for p in image_paths], width=width,
                              height=height, resolution=args.resolution, background=args.background,
                              progress=ProgressBar(args.quiet), **sampling_fields(args))
    pipe = qimg.load(load_options(args))
    if not args.quiet:
        print(describe_loras(pipe), end="", file=sys.stderr)
    result = pipe.generate(options)
    meta = result[0].info["qimg"]
    save_picture(result[0], out, meta)
    preset = f", preset {meta['preset']}" if meta.get("preset") else ""
    print(f"wrote {out.resolve()} ({meta['width']}x{meta['height']}, seed {meta['seed']}, {meta['steps']} steps"
          f"{preset}, {meta['seconds']:.2f} s on {pipe.info.device.type}, {meta['dtype']})")
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
