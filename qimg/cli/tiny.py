"""`qimg tiny train` and `qimg tiny eval`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(sub) -> None:
    tiny = sub.add_parser("tiny", help="train or evaluate the embedded tiny models")
    cmds = tiny.add_subparsers(dest="tiny_command", required=True)
    train = cmds.add_parser("train", help="train a tiny model from scratch on the synthetic world (resumable)")
    train.add_argument("--model", choices=["tiny", "layered"], default="tiny",
                       help="tiny: qimg-tiny (2.x, text-to-image and edits); layered: qimg-tiny-layered")
    train.add_argument("--minutes", type=float, default=60.0, help="stop (and checkpoint) after this long")
    train.add_argument("--out", type=Path, default=None, help="where to export the trained model (default: "
                       "~/.local/share/qimg/tiny/NAME, or under $QIMG_HOME; never the installed package; a fresh "
                       "run starts from the embedded model's weights)")
    train.add_argument("--work", type=Path, default=None, help="checkpoints and caches (default: runs/tiny, "
                       "runs/tiny-layered)")
    train.add_argument("--device", default="cpu", help="where training runs: cpu or cuda[:N] (the transformer "
                       "stage with bf16 autocast); qimg-tiny trains every stage there, qimg-tiny-layered its "
                       "transformer stage (its other stages are short and stay on the CPU)")
    train.add_argument("--batch", type=int, default=None, help="transformer stage: scenes per step (default 32 for "
                       "qimg-tiny, 8 for qimg-tiny-layered; a GPU takes 8x that or more)")
    train.add_argument("--steps", type=int, default=None,
                       help="transformer stage: length of its schedule in steps (default 40,000 for qimg-tiny, 37,500 "
                            "for qimg-tiny-layered); a work folder saved on another length warms its rate up again "
                            "and decays it to this one")
    train.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    train.add_argument("--seed", type=int, default=None,
                       help="fixes the whole run: model init, data, noise (default 1234; a --work folder keeps the "
                            "seed it was started with)")
    train.set_defaults(handler=run_train)
    ev = cmds.add_parser("eval", help="score a model on held-out scenes of the synthetic world")
    ev.add_argument("--n", type=int, default=200, help="held-out scenes per task")
    ev.add_argument("--out", type=Path, default=Path("eval"), help="folder for eval.json and samples.png")
    ev.add_argument("--model", default=None, help="for t2i and edit (default: qimg-tiny)")
    ev.add_argument("--layered-model", default=None, help="for layers (default: qimg-tiny-layered)")
    ev.add_argument("--steps", type=int, default=None, help="denoising steps (default: each model's)")
    ev.add_argument("--cfg", type=float, default=None, help="guidance scale (default: each model's)")
    ev.add_argument("--tasks", default="t2i,edit,layers", help="comma-separated: t2i, edit, layers")
    ev.add_argument("--cache", default=None, metavar="NAME[:THRESHOLD]", help="a step cache, e.g. fbcache:0.2")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.add_argument("--against", type=Path, default=None, metavar="EVAL_JSON",
                    help="another model's eval.json on the same scenes (same --n): scene-by-scene wins and losses, "
                         "with a sign test")
    ev.set_defaults(handler=run_eval)


def run_train(args) -> int:
    import torch

    from qimg.tiny.train import SEED

    if args.model == "layered":
        from qimg.tiny.train_layered import run
    else:
        from qimg.tiny.train import run

    from qimg.errors import InputError
    from qimg.loading.files import embedded_model_path
    from qimg.tiny.fit import user_dir

    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device != "cpu":
        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            raise InputError(f"--device {args.device}: expected cpu or cuda[:N] with a CUDA device present "
                             f"(torch.cuda.is_available() is {torch.cuda.is_available()})")
    name = "qimg-tiny" if args.model == "tiny" else "qimg-tiny-layered"
    out = (args.out or user_dir() / name).expanduser()
    package = Path(__import__("qimg").__file__).resolve().parent
    if out.resolve() == package or package in out.resolve().parents:
        raise InputError(f"--out {out} is inside the installed qimg package ({package}); export elsewhere and "
                         f"point --model at it")
    shipped = embedded_model_path(name)
    source = out if (out / "model_index.json").is_file() else shipped
    work = args.work or Path("runs/tiny" if args.model == "tiny" else "runs/tiny-layered")
    if args.batch is not None and args.batch < 1:
        raise InputError(f"--batch must be at least 1, got {args.batch}")
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps must be at least 1, got {args.steps}")
    extra = {"device": args.device, "steps": args.steps, **({"batch": args.batch} if args.batch else {})}
    index = out / "model_index.json"
    before = index.stat().st_mtime_ns if index.is_file() else None
    done = run(args.minutes, work, out, seed=SEED if args.seed is None else args.seed, source=source, **extra)
    exported = index.is_file() and index.stat().st_mtime_ns != before
    print(f"export: {out}" if exported else "nothing exported yet: the stages before the transformer are unfinished")
    print("training complete" if done else f"stopped after {args.minutes} minutes; run again to resume")
    return 0


def run_eval(args) -> int:
    import qimg
    from qimg.errors import InputError
    from qimg.tiny.eval import compare, evaluate

    if args.n < 1:
        raise InputError(f"--n must be at least 1, got {args.n}")
    other = None
    if args.against is not None:
        try:
            other = json.loads(args.against.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"--against {args.against}: not a readable eval.json ({err})") from None
        scored = other.get("held_out_scenes") if isinstance(other, dict) else None
        if scored != args.n:
            raise InputError(f"--against {args.against}: scored {scored} held-out scenes, this run --n {args.n}; "
                             "compare evaluations of the same scenes")
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    unknown = set(tasks) - {"t2i", "edit", "layers"}
    if unknown or not tasks:
        raise InputError(f"--tasks takes t2i, edit, layers; got {args.tasks!r}")
    pipe = qimg.load(args.model) if {"t2i", "edit"} & set(tasks) else None
    layered = qimg.load(args.layered_model, task="layers") if "layers" in tasks else None
    bars = {}

    def progress(task, done, total):
        if args.quiet:
            return
        if task not in bars:
            from tqdm import tqdm

            bars[task] = tqdm(total=total, desc=f"eval {task}", unit="scene", file=sys.stderr, dynamic_ncols=True)
        bars[task].update(done - bars[task].n)
        if done >= total:
            bars[task].close()

    result = evaluate(pipe, n=args.n, out=args.out, steps=args.steps, cfg=args.cfg, cache=args.cache, tasks=tasks,
                      layered=layered, progress=progress)
    if "first_command" in result:
        first = result["first_command"]
        print(f"first command ({first['prompt']!r}), seeds 0-{first['of'] - 1}: {first['right']} of {first['of']} "
              f"exact")
    for task in ("t2i", "edit", "layers"):
        if task in result:
            print(task, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result[task].items()
                         if k != "scenes"})
    if "word_gap" in result:
        gaps = ", ".join(f"{v['ratio']:.3f} at sigma {s}" for s, v in result["word_gap"]["sigmas"].items())
        print(f"word-token error, a random word over the true one ({result['word_gap']['scenes']} scenes): {gaps}")
    if other is not None:
        for task, c in compare(result, other).items():
            if task == "word_rank":
                print(f"drawn words against {args.against}: nearer the true word in {c['nearer']} of {c['n']}, "
                      f"farther in {c['farther']} (sign test p = {c['sign_test_p']:.3f})")
                continue
            print(f"{task} against {args.against}: passed in both {c['both']} of {c['n']}, only here "
                  f"{c['only_ours']}, only there {c['only_theirs']} (sign test p = {c['sign_test_p']:.3f})")
    print(f"wrote {args.out / 'eval.json'} and {args.out / 'samples.png'}")
    return 0
