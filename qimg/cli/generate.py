"""`qimg generate`, `qimg edit` and `qimg info`."""

from __future__ import annotations

import sys

from qimg.cli.common import (ProgressBar, check_output, describe_loras, load_options, main_rank, model_args,
                             open_image, parallel_args, parse_size, sampling_args, sampling_fields)


def register(sub) -> None:
    gen = sub.add_parser("generate", help="text-to-image, or image-conditioned generation with --image")
    gen.add_argument("prompt", help="what to draw (the embedded qimg-tiny knows coloured shapes; see qimg info)")
    gen.add_argument("--image", action="append", default=[], metavar="IN.png", help="condition image (repeatable)")
    picture_args(gen)
    gen.set_defaults(handler=lambda args: run_generate(args, args.prompt, args.image))
    edit = sub.add_parser("edit", help="edit an image by instruction")
    edit.add_argument("image", help="the picture to edit")
    edit.add_argument("instruction", help="what to change, in words")
    edit.add_argument("--image", dest="extra_images", action="append", default=[], metavar="IN.png",
                      help="further reference images")
    picture_args(edit)
    edit.set_defaults(handler=lambda args: run_generate(args, args.instruction, [args.image, *args.extra_images]))
    info = sub.add_parser("info", help="components, classes, parameter counts, dtypes and bytes of a checkpoint")
    info.add_argument("model", nargs="?", default=None,
                      help="checkpoint folder, cached repo id or embedded model name (default: qimg-tiny)")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.set_defaults(handler=run_info)


def picture_args(p) -> None:
    p.add_argument("-o", "--output", default="qimg.png",
                   help="output image (.png keeps the parameters); with -n N: NAME-1.png ... NAME-N.png")
    p.add_argument("-n", "--num-images", type=int, default=1, metavar="N", help="pictures to make (1-16)")
    p.add_argument("--size", type=parse_size, default=None, metavar="WxH",
                   help="output size (default: the model's square, or an edit's input aspect)")
    p.add_argument("--resolution", type=int, default=None, metavar="N", help="target side length (area N*N)")
    p.add_argument("--background", choices=["transparent", "opaque"], default=None,
                   help="opaque flattens RGBA output onto white")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    sampling_args(p)
    model_args(p)
    parallel_args(p)


def run_generate(args, prompt: str, image_paths: list[str]) -> int:
    import qimg
    from qimg.export.picture import save_picture
    from qimg.options import GenerateOptions

    out = check_output(args.output)
    width, height = args.size if args.size else (None, None)
    main = main_rank(args)
    options = GenerateOptions(prompt=prompt, images=[open_image(p) for p in image_paths], width=width,
                              height=height, resolution=args.resolution, background=args.background,
                              n=args.num_images, progress=ProgressBar(args.quiet or not main), **sampling_fields(args))
    pipe = qimg.load(load_options(args))
    if not args.quiet and main:
        print(describe_loras(pipe), end="", file=sys.stderr)
    warning = embedded_model_warning(pipe, prompt, bool(image_paths))
    if warning and main:
        print(f"qimg: warning: {warning}", file=sys.stderr)
    result = pipe.generate(options)
    if not main:
        return 0
    paths = [out] if len(result) == 1 else [out.with_name(f"{out.stem}-{i + 1}{out.suffix}")
                                           for i in range(len(result))]
    for image, path in zip(result, paths):
        save_picture(image, path, image.info["qimg"])
    meta = result[0].info["qimg"]
    preset = f", preset {meta['preset']}" if meta.get("preset") else ""
    for path in paths:
        print(f"wrote {path.resolve()} ({meta['width']}x{meta['height']}, seed {meta['seed']}, {meta['steps']} "
              f"steps{preset}, {meta['seconds']:.2f} s on {ranks(pipe)}, {meta['dtype']})")
    return 0


def ranks(pipe) -> str:
    """Where a picture was made: "cpu", or "4 cuda ranks (ulysses=2,cfg=2)"."""
    if pipe.mesh is None:
        return pipe.info.device.type
    return f"{pipe.mesh.world} {pipe.info.device.type} ranks ({pipe.mesh.config})"


def embedded_model_warning(pipe, prompt: str, editing: bool) -> str | None:
    """For the embedded model only: a prompt its small world cannot parse is drawn anyway, with this warning."""
    from qimg.tiny.grammar import understands

    if pipe.describe().get("embedded") is None or understands(prompt, editing):
        return None
    return ("the embedded qimg-tiny only knows coloured circles, squares and triangles in a 3x3 grid on a plain "
            "background, with short words (see `qimg info qimg-tiny`); it will not draw this prompt well. Load a "
            "real checkpoint with --model (e.g. `qimg pull Qwen/Qwen-Image-2.1`)")


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
    if report.get("embedded"):
        from qimg.tiny.grammar import EXAMPLES, grammar

        print(f"\n{grammar()}\nExamples:")
        for task, prompts in EXAMPLES.items():
            print("".join(f"  qimg {'generate' if task == 'generate' else 'edit IN.png'} {p!r}\n" for p in prompts),
                  end="")
    return 0
