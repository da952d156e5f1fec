"""`qimg layers IMAGE -o OUT.psd`: split an image into RGBA layers with a Qwen-Image-Layered checkpoint.

Everything that can be checked without the model (output suffix and folder, the image, the layer count, the recurse
index, the resolution, the sampling options) is checked before loading it; the stack is written atomically, so an
error leaves no file.
"""

from __future__ import annotations

import argparse
import sys

from qimg.cli.common import (ProgressBar, check_output, describe_loras, load_options, main_rank, model_args,
                             open_image, parallel_args, sampling_args, sampling_fields)
from qimg.cli.generate import ranks
from qimg.errors import InputError


def parse_resolution(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must be 640, 1024 or a multiple of 32, got {text!r}") from None


def register(sub) -> None:
    p = sub.add_parser("layers", help="split an image into RGBA layers (Qwen-Image-Layered)",
                       description="Decompose IMAGE into RGBA layers (bottom to top) and write them as a layered "
                                   "file: .psd (Photoshop), .ora (OpenRaster), .pptx (PowerPoint) or .zip (PNGs).")
    p.add_argument("image", help="input picture (any mode; transparency is kept)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.{psd,ora,pptx,zip}",
                   help="the layered file to write; its suffix picks the format")
    p.add_argument("--layers", type=int, default=4, metavar="N", help="number of layers, 2-10 (default 4)")
    p.add_argument("--resolution", type=parse_resolution, default=None, metavar="640|1024|N",
                   help="working size: about N*N pixels (default 640; smaller multiples of 32 for previews)")
    p.add_argument("--prompt", default=None, help="description of the image (default: the model captions it)")
    p.add_argument("--recurse", type=int, default=None, metavar="INDEX",
                   help="split returned layer INDEX again and put its sub-layers in its place")
    p.add_argument("--caption-language", choices=["en", "zh"], default="en",
                   help="language of the automatic caption when no --prompt is given")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    sampling_args(p)
    model_args(p, default="qimg-tiny-layered")
    parallel_args(p)
    p.set_defaults(handler=run_layers)


def run_layers(args) -> int:
    import qimg
    from qimg.export import export_layers
    from qimg.export.layers import FORMATS
    from qimg.options import MAX_LAYERS_RANGE, LayersOptions
    from qimg.pipelines.layered import check_resolution

    out = check_output(args.output, tuple(FORMATS))
    low, high = MAX_LAYERS_RANGE
    if not low <= args.layers <= high:
        raise InputError(f"--layers must be from {low} to {high}, got {args.layers}")
    if args.recurse is not None and not 0 <= args.recurse < args.layers:
        raise InputError(f"--recurse must be the index of a returned layer, 0 to {args.layers - 1}, "
                         f"got {args.recurse}")
    if args.resolution is not None:
        check_resolution(args.resolution)
    bars = []
    main = main_rank(args)

    def progress(event):  # one bar per decomposition pass (two with --recurse)
        if event.stage == "encode" and event.step == 0:
            bars.append(ProgressBar(args.quiet or not main, "layers" if not bars else f"layer {args.recurse}"))
        bars[-1](event)

    options = LayersOptions(image=open_image(args.image), layers=args.layers, resolution=args.resolution,
                            prompt=args.prompt, recurse=args.recurse, caption_language=args.caption_language,
                            progress=progress, **sampling_fields(args))
    pipe = qimg.load(load_options(args, task="layers"))
    if "layers" not in pipe.describe().get("tasks", []):
        raise InputError(f"the model {pipe.info.folder} ({pipe.describe()['pipeline']}) does not split images into "
                         f"layers; use a Qwen-Image-Layered checkpoint (--model)")
    if not args.quiet and main:
        print(describe_loras(pipe), end="", file=sys.stderr)
    layers = pipe.layers(options)
    if not main:
        return 0
    export_layers(layers, out)
    meta = layers[0].info["qimg"]
    print(f"wrote {out.resolve()} ({len(layers)} layers, {meta['width']}x{meta['height']}, seed {meta['seed']}, "
          f"{meta['seconds']:.2f} s on {ranks(pipe)}, {meta['dtype']})")
    return 0
