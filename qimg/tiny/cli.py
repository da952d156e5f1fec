"""`qimg tiny train` and `qimg tiny eval`."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    tiny = sub.add_parser("tiny", help="train or evaluate the embedded tiny models")
    cmds = tiny.add_subparsers(dest="tiny_command", required=True)
    train = cmds.add_parser("train", help="train qimg-tiny from scratch on the synthetic world (resumable)")
    train.add_argument("--minutes", type=float, default=60.0, help="stop (and checkpoint) after this long")
    train.add_argument("--out", type=Path, default=None, help="where to export the trained model "
                       "(default: the package's embedded qimg-tiny)")
    train.add_argument("--work", type=Path, default=Path("runs/tiny"), help="checkpoints and caches")
    train.add_argument("--threads", type=int, default=None)
    train.set_defaults(handler=run_train)
    ev = cmds.add_parser("eval", help="score a model on held-out scenes of the synthetic world")
    ev.add_argument("--n", type=int, default=200, help="held-out scenes per task")
    ev.add_argument("--out", type=Path, default=Path("eval"), help="folder for eval.json and samples.png")
    ev.add_argument("--model", default=None)
    ev.add_argument("--steps", type=int, default=None)
    ev.add_argument("--cfg", type=float, default=None)
    ev.add_argument("--tasks", default="t2i,edit", help="comma-separated: t2i, edit")
    ev.set_defaults(handler=run_eval)


def run_train(args) -> int:
    import torch

    from qimg.tiny.train import run

    if args.threads:
        torch.set_num_threads(args.threads)
    done = run(args.minutes, args.work, args.out)
    print("training complete" if done else f"stopped after {args.minutes} minutes; run again to resume")
    return 0


def run_eval(args) -> int:
    import qimg
    from qimg.errors import InputError
    from qimg.tiny.eval import evaluate

    if args.n < 1:
        raise InputError(f"--n must be at least 1, got {args.n}")
    pipe = qimg.load(args.model)
    result = evaluate(pipe, n=args.n, out=args.out, steps=args.steps, cfg=args.cfg, tasks=tuple(args.tasks.split(",")))
    for task in ("t2i", "edit"):
        if task in result:
            print(task, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result[task].items()})
    print(f"wrote {args.out / 'eval.json'} and {args.out / 'samples.png'}")
    return 0
