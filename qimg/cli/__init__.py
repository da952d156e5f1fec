"""The `qimg` command: parsing and printing only; the work is done by the library."""

from __future__ import annotations

import argparse
import sys

from qimg.cli.common import main_rank
from qimg.errors import QimgError


def build_parser() -> argparse.ArgumentParser:
    from qimg.cli import generate, layers, lora, pull, quantize, serve, tiny

    import qimg

    parser = argparse.ArgumentParser(prog="qimg", description="Qwen-Image family engine")
    parser.add_argument("--version", action="version", version=f"qimg {qimg.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (generate, layers, lora, pull, quantize, tiny, serve):
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "gpus", None) is not None:
            from qimg.cli.ranks import run_on_ranks

            return run_on_ranks(args, argv)
        return args.handler(args)
    except QimgError as err:
        if main_rank(args):  # the other ranks of a parallel run meet the same refusal: one message is enough
            print(f"qimg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qimg: interrupted", file=sys.stderr)
        return 130
    finally:
        if getattr(args, "parallel", None) and "torch.distributed" in sys.modules:
            from qimg.parallel.mesh import leave

            leave()


if __name__ == "__main__":
    sys.exit(main())
