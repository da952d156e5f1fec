"""`qimg lora train`: train a LoRA on a folder of examples (resumable: run it again to continue)."""

from __future__ import annotations

import sys
from pathlib import Path

from qimg.cli.common import model_args


def register(sub) -> None:
    lora = sub.add_parser("lora", help="train LoRAs")
    cmds = lora.add_subparsers(dest="lora_command", required=True)
    train = cmds.add_parser("train", help="train a LoRA on NAME.png + NAME.txt pairs (or NAME_source/_target + "
                                          "NAME.txt edit triplets)",
                            description="Train a LoRA for the model's transformer on a folder of examples and write "
                                        "it in the diffusers/PEFT format. A run stopped early (--minutes, Ctrl-C "
                                        "between checkpoints) resumes from OUT.train.pt when started again.")
    train.add_argument("--data", required=True, type=Path, help="folder of examples")
    train.add_argument("--out", required=True, type=Path, metavar="FILE.safetensors",
                       help="the LoRA to write (its checkpoint goes beside it as FILE.train.pt)")
    train.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    train.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scale 1)")
    train.add_argument("--steps", type=int, default=1000, help="optimizer steps in all (default 1000)")
    train.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    train.add_argument("--batch", type=int, default=4, help="examples per optimizer step")
    train.add_argument("--targets", default="blocks",
                       help="blocks (every Linear in the transformer blocks), all, or comma-separated name pieces")
    train.add_argument("--resolution", type=int, default=None, help="train at about N*N pixels (default: the "
                                                                     "model's)")
    train.add_argument("--minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    train.add_argument("--seed", type=int, default=0, help="fixes the run: initial weights, examples, noise")
    train.add_argument("--save-every", type=int, default=100, metavar="STEPS",
                       help="write the resumable checkpoint every STEPS steps (default 100)")
    train.add_argument("--checkpointing", action="store_true",
                       help="recompute block activations in the backward pass (less memory; for GPUs)")
    train.add_argument("--preserve", type=Path, default=None, metavar="DIR",
                       help="examples (same layout) whose output the LoRA must keep: trained toward the base model's "
                            "own prediction on them (output preservation)")
    train.add_argument("--preserve-share", type=float, default=0.5, metavar="F",
                       help="share of the examples drawn from --preserve (default 0.5)")
    train.add_argument("--preserve-weight", type=float, default=1.0, metavar="W",
                       help="the preserved examples' loss counts W times (default 1)")
    train.add_argument("--orthogonal", type=float, default=None, metavar="E",
                       help="keep the LoRA's input directions off those holding share E (e.g. 0.9999) of the "
                            "--preserve examples' inputs to each layer (null-space training: prompts like those "
                            "change little; best on text-side layers such as txt_in)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    model_args(train)
    train.set_defaults(handler=run_train)


def run_train(args) -> int:
    import qimg
    from qimg.adapters.train import TrainOptions, train_lora
    from qimg.errors import InputError

    if args.lora:
        raise InputError("--lora is for generating; a LoRA is trained on the bare model")
    options = TrainOptions(data=args.data, out=args.out, rank=args.rank, alpha=args.alpha, steps=args.steps,
                           lr=args.lr, batch=args.batch, targets=args.targets, resolution=args.resolution,
                           seed=args.seed, minutes=args.minutes, save_every=args.save_every,
                           checkpointing=args.checkpointing, preserve=args.preserve,
                           preserve_share=args.preserve_share, preserve_weight=args.preserve_weight,
                           orthogonal=args.orthogonal)
    pipe = qimg.load(args.model, dtype=args.dtype, device=args.device, attention=args.attention)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=options.steps, desc="lora", unit="step", file=sys.stderr, dynamic_ncols=True)

    def progress(step, total, loss):
        if bar is not None:
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{loss:.4f}")

    try:
        result = train_lora(pipe, options, progress)
    finally:
        if bar is not None:
            bar.close()
    state = "done" if result["finished"] else "stopped early; run again to resume"
    print(f"wrote {Path(result['out']).resolve()} ({result['layers']} layers, rank {options.rank}, "
          f"{result['steps']}/{options.steps} steps, {state}; loss {result['loss_recent']:.4f}, "
          f"{result['seconds']:.0f} s)")
    if result["free_dims"]:
        free = result["free_dims"]
        print(f"orthogonal to the preserved inputs: {sum(free.values())} free input dims over {len(free)} layers "
              f"(fewest {min(free.values())}, most {max(free.values())})")
    return 0
