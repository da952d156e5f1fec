"""Teach the embedded qimg-tiny a colour it never saw ("azure", which the synthetic world can draw but never puts in
a training scene) with `qimg lora train`, and measure it.

    python bench/lora_concept.py [--examples 200] [--minutes 15] [--held 100] [--eval 200] [--out DIR]

1. Writes `--examples` examples of the world: `--azure-share` of them pictures with one object azure, `--edit-share`
   ordinary edit triplets, the rest ordinary pictures (the ordinary ones keep the LoRA from redrawing what the
   model already knew; with --prior they are the shipped model's own pictures for those prompts), each
   with a mask of its objects (their tokens weigh 9x in the loss, as in the model's own training).
2. "Drawn right" on `--held` held-out azure prompts (other scenes, other seeds): in the azure object's cell, the
   pixels far from the background are at least 150 and their median colour is nearest to azure among the world's
   nine colours. Before (the shipped model) and after (with the LoRA at scale 1).
3. The model's own eval (`qimg tiny eval` figures for text-to-image and edits, `--eval` held-out scenes each)
   without and with the LoRA: what it costs on what the model already knew.
Prints a table and writes bench/results/lora_concept.json (the LoRA itself goes to `--out`). The README's recipe:
`--preserve --targets txt_in,transformer_blocks --lr 5e-4 --minutes 15 --preserve-weight 40 --steps 100000`.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import qimg
from qimg.adapters.train import TrainOptions, train_lora
from qimg.tiny import world as W

NEW = "azure"


def azure_scene(rng: random.Random, azure: bool) -> W.Scene:
    """A scene as the world draws them (1-3 objects, sometimes a word); with `azure`, one of its objects azure."""
    scene = W.random_scene(rng)
    if not azure:
        return scene
    objects = list(scene.objects)
    i = rng.randrange(len(objects))
    objects[i] = W.Obj(objects[i].shape, objects[i].size, NEW, objects[i].cell)
    return W.validate(W.Scene(scene.background, tuple(objects), scene.word))


def objects_mask(picture, scene: W.Scene) -> Image.Image:
    pixels = np.asarray(picture.convert("RGB"))
    objects = np.any(pixels != np.asarray(W.COLOURS[scene.background], np.uint8), axis=-1)
    return Image.fromarray((objects * 255).astype(np.uint8))


def write_examples(folder: Path, n: int, seed: int, share: float, edit_share: float, prior=None,
                   keep: Path | None = None) -> None:
    """`share` of the examples with an azure object, `edit_share` ordinary edit triplets, the rest ordinary
    text-to-image pairs; each with a mask of its objects (their tokens weigh 9x in the loss, as in the model's own
    training). With `prior` (the base pipeline), the ordinary examples' pictures are its own outputs for them
    (DreamBooth's prior preservation: they teach the LoRA to leave the rest of the model as it is). With `keep`, the
    ordinary examples go there instead (`qimg lora train --preserve`: trained toward the model's own velocity)."""
    folder.mkdir(parents=True, exist_ok=True)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    kinds = ["azure"] * round(n * share) + ["edit"] * round(n * edit_share)
    kinds += ["plain"] * (n - len(kinds))
    random.Random(seed + 1).shuffle(kinds)
    for i, kind in enumerate(kinds):
        name = f"ex{i:04d}"
        dest = keep if keep is not None and kind != "azure" else folder
        if kind == "edit":
            source = W.random_scene(rng)
            instruction, target = W.random_edit(source, rng)
            W.render(source).save(dest / f"{name}_source.png")
            picture = W.render(target) if prior is None else prior.generate(
                instruction, images=[W.render(source)], seed=i)[0]
            picture.save(dest / f"{name}_target.png")
            (dest / f"{name}.txt").write_text(instruction)
        else:
            target = azure_scene(rng, azure=kind == "azure")
            picture = W.render(target) if prior is None or kind == "azure" else prior.generate(
                W.prompt(target), seed=i)[0]
            picture.save(dest / f"{name}.png")
            (dest / f"{name}.txt").write_text(W.prompt(target))
        objects_mask(W.render(target), target).save(dest / f"{name}_mask.png")


def colour_of(image, scene: W.Scene) -> str | None:
    """The azure object's colour as read from its cell, or None when the cell holds too little."""
    obj = next(o for o in scene.objects if o.colour == NEW)
    arr = np.asarray(image.convert("RGB"), np.float32)
    x0, y0, x1, y1 = W.cell_box(obj.cell)
    crop = arr[y0:y1, x0:x1].reshape(-1, 3)
    background = np.asarray(W.COLOURS[scene.background], np.float32)
    far = crop[np.linalg.norm(crop - background, axis=1) > 60]
    if len(far) < 150:
        return None
    median = np.median(far, axis=0)
    names = list(W.ALL_COLOURS)
    distances = [np.linalg.norm(median - np.asarray(W.ALL_COLOURS[c], np.float32)) for c in names]
    return names[int(np.argmin(distances))]


def concept_score(pipe, scenes: list[W.Scene]) -> dict:
    reads = [colour_of(pipe.generate(W.prompt(s), seed=i)[0], s) for i, s in enumerate(scenes)]
    counts = {c: reads.count(c) for c in set(reads)}
    return {"azure_right": sum(r == NEW for r in reads) / len(reads), "reads": {str(k): v for k, v in counts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--azure-share", type=float, default=0.5)
    parser.add_argument("--edit-share", type=float, default=0.25, help="ordinary edit triplets (keep edits working)")
    parser.add_argument("--prior", action=argparse.BooleanOptionalAction, default=False,
                        help="ordinary examples drawn by the shipped model itself (prior preservation)")
    parser.add_argument("--preserve", action=argparse.BooleanOptionalAction, default=False,
                        help="ordinary examples in a --preserve folder: trained toward the shipped model's own output")
    parser.add_argument("--preserve-share", type=float, default=0.5)
    parser.add_argument("--preserve-weight", type=float, default=1.0)
    parser.add_argument("--orthogonal", type=float, default=None,
                        help="qimg lora train --orthogonal: lora_A kept off the preserved inputs' directions")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--targets", default="blocks", help="which layers the LoRA adapts (qimg lora train --targets)")
    parser.add_argument("--scale", type=float, default=1.0, help="the LoRA's scale when generating")
    parser.add_argument("--held", type=int, default=100, help="held-out prompts with the new colour")
    parser.add_argument("--eval", type=int, default=200, help="held-out scenes of the model's own eval")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/lora-concept")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    base = qimg.load(dtype="float32", device="cpu")
    keep = out / "keep" if args.preserve else None
    write_examples(data, args.examples, seed=101, share=args.azure_share, edit_share=args.edit_share,
                   prior=base if args.prior else None, keep=keep)
    rng = random.Random(202)
    held = []
    while len(held) < args.held:  # azure prompts that are not training examples
        scene = azure_scene(rng, azure=True)
        if scene not in held:
            held.append(scene)
    train_prompts = {path.read_text() for d in (data, keep) if d is not None for path in d.glob("*.txt")}
    held = [s for s in held if W.prompt(s) not in train_prompts]

    before = concept_score(base, held)
    lora_path = out / "azure.safetensors"
    start = time.perf_counter()
    result = train_lora(base, TrainOptions(data=data, out=lora_path, rank=args.rank, steps=args.steps, lr=args.lr,
                                           batch=4, targets=args.targets, minutes=args.minutes, save_every=250,
                                           preserve=keep, preserve_share=args.preserve_share,
                                           preserve_weight=args.preserve_weight, orthogonal=args.orthogonal))
    train_s = time.perf_counter() - start
    tuned = qimg.load(dtype="float32", device="cpu", loras=[(lora_path, args.scale)])
    after = concept_score(tuned, held)

    from qimg.tiny.eval import evaluate

    plain_eval = evaluate(base, n=args.eval, out=out / "eval-base", tasks=("t2i", "edit"))
    tuned_eval = evaluate(tuned, n=args.eval, out=out / "eval-lora", tasks=("t2i", "edit"))
    keys = {"t2i": ("exact", "colour", "shape", "size", "position"), "edit": ("satisfied", "untouched_psnr")}
    rows = [("azure drawn right", before["azure_right"], after["azure_right"])]
    for task, names in keys.items():
        for name in names:
            if name in plain_eval.get(task, {}):
                rows.append((f"{task} {name}", plain_eval[task][name], tuned_eval[task][name]))
    print(f"LoRA ({args.targets}, scale {args.scale}): {result['examples']} examples, {result['steps']} steps, "
          f"rank {args.rank}, lr {args.lr}, {train_s / 60:.1f} min "
          f"on {args.threads} CPU threads; {len(held)} held-out azure prompts")
    print(f"{'metric':<26}{'shipped':>10}{'with LoRA':>12}")
    for name, a, b in rows:
        print(f"{name:<26}{a:>10.3f}{b:>12.3f}")
    print("colours read in the azure object's cell, before:", before["reads"], "after:", after["reads"])
    path = Path(__file__).parent / "results" / "lora_concept.json"
    path.write_text(json.dumps({"examples": result["examples"], "azure_share": args.azure_share,
                                "edit_share": args.edit_share, "prior": args.prior, "preserve": args.preserve,
                                "preserve_share": args.preserve_share, "preserve_weight": args.preserve_weight,
                                "orthogonal": args.orthogonal, "free_dims": result["free_dims"],
                                "steps": result["steps"], "rank": args.rank, "targets": args.targets,
                                "scale": args.scale,
                                "lr": args.lr, "train_minutes": train_s / 60, "threads": args.threads,
                                "held_out": len(held), "before": before, "after": after,
                                "eval_base": plain_eval, "eval_lora": tuned_eval,
                                "loss_first": result["loss_first"], "loss_recent": result["loss_recent"]},
                               indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
