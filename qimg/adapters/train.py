"""Training a LoRA for a loaded pipeline on a folder of examples.

Examples: `NAME.png` + `NAME.txt` (text-to-image: the picture and its prompt) and, for models that edit,
`NAME_source.png` + `NAME_target.png` + `NAME.txt` (the instruction); .jpg/.jpeg/.webp pictures too. An optional
`NAME_mask.png` (grey levels) marks what matters: the latent tokens it touches count `1 + mask_weight` times in the
loss (most of a picture is often easy background that would otherwise drown the subject). The base
weights are frozen; low-rank `lora_A`/`lora_B` pairs beside the chosen Linear layers of the transformer are trained
on the flow-matching loss in the model's own parameterisation (x_t = (1 - sigma) x0 + sigma noise, target velocity
noise - x0), through the pipeline's own conditioning and velocity hooks. Prompts and pictures are encoded once.
With `preserve` (a second folder of the same kinds of examples), `preserve_share` of the examples a step draws come
from it and are trained toward the frozen base model's own velocity on them instead of their pictures' (output
preservation: what the LoRA must not change, learnt from the model itself; a picture there only sets where the
noise starts), their loss weighted `preserve_weight` times; where the model guides such requests by default, the
default negative prompt's velocity is kept the same way (guidance subtracts it from every picture). With
`orthogonal`, lora_A's rows are kept off the directions of each layer's inputs that the preserved examples use
(null-space training; `null_space_projectors`). A run is a function of its seed and resumes from `OUT.train.pt`
(written every `save_every` steps, atomically); the result is a diffusers/PEFT file
(`transformer.<layer>.lora_A.weight`, `lora_adapter_metadata`), which diffusers' `load_lora_weights` reads
unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from qimg.errors import InputError
from qimg.imaging import fit_area

PICTURES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class TrainOptions:
    data: Path
    out: Path
    rank: int = 16
    alpha: float | None = None  # None: the rank (scale 1)
    steps: int = 1000
    lr: float = 1e-4
    batch: int = 4  # examples per optimizer step (accumulated)
    targets: str = "blocks"  # "blocks" (every Linear in the blocks), "all", or comma-separated name pieces
    resolution: int | None = None  # examples at about resolution^2 pixels (None: the model's default)
    seed: int = 0
    minutes: float | None = None  # stop (with a checkpoint) after this long; rerun to resume
    save_every: int = 100
    checkpointing: bool = False  # recompute each block's activations in the backward pass (less memory)
    mask_weight: float = 8.0  # extra weight of the tokens an example's mask marks
    preserve: Path | None = None  # examples whose base-model velocity the LoRA must keep
    preserve_share: float = 0.5  # of the examples drawn, this share from `preserve` (when given)
    preserve_weight: float = 1.0  # the preserved examples' loss counts this many times
    orthogonal: float | None = None  # keep lora_A off the inputs' directions holding this share of their energy

    def __post_init__(self):
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))
        if self.preserve is not None:
            object.__setattr__(self, "preserve", Path(self.preserve))
        if not 0 < self.preserve_share < 1:
            raise InputError(f"preserve_share must be between 0 and 1 (exclusive), got {self.preserve_share!r}")
        if not self.preserve_weight > 0:
            raise InputError(f"preserve_weight must be > 0, got {self.preserve_weight!r}")
        if self.orthogonal is not None:
            if self.preserve is None:
                raise InputError("orthogonal needs preserved examples (preserve): their inputs are what it avoids")
            if not 0 < self.orthogonal < 1:
                raise InputError(f"orthogonal must be between 0 and 1 (exclusive), got {self.orthogonal!r}")
        for name, low in (("rank", 1), ("steps", 1), ("batch", 1), ("save_every", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
        if not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr!r}")
        if self.out.suffix != ".safetensors":
            raise InputError(f"the LoRA is written as .safetensors; got {self.out}")
        if not self.out.parent.is_dir():
            raise InputError(f"output folder does not exist: {self.out.parent}")

    @property
    def checkpoint(self) -> Path:
        return self.out.with_suffix(".train.pt")

    def recipe(self) -> dict:
        """What a checkpoint must agree on to be resumed."""
        return {"rank": self.rank, "alpha": self.alpha, "targets": self.targets, "seed": self.seed,
                "batch": self.batch, "resolution": self.resolution, "mask_weight": self.mask_weight,
                **({"preserve": str(self.preserve), "preserve_share": self.preserve_share,
                    "preserve_weight": self.preserve_weight, "orthogonal": self.orthogonal} if self.preserve else {})}


@dataclass
class Example:
    name: str
    prompt: str
    target: Image.Image
    source: Image.Image | None = None
    mask: Image.Image | None = None


def read_examples(folder: Path) -> list[Example]:
    if not folder.is_dir():
        raise InputError(f"training data folder not found: {folder}")
    out = []
    for text in sorted(folder.glob("*.txt")):
        stem = text.stem
        single = [p for p in (folder / f"{stem}{s}" for s in PICTURES) if p.is_file()]
        sources = [p for p in (folder / f"{stem}_source{s}" for s in PICTURES) if p.is_file()]
        targets = [p for p in (folder / f"{stem}_target{s}" for s in PICTURES) if p.is_file()]
        masks = [p for p in (folder / f"{stem}_mask{s}" for s in PICTURES) if p.is_file()]
        mask = _open(masks[0]) if masks else None
        prompt = text.read_text(encoding="utf-8").strip()
        if sources and targets:
            out.append(Example(stem, prompt, _open(targets[0]), _open(sources[0]), mask))
        elif single:
            out.append(Example(stem, prompt, _open(single[0]), mask=mask))
        else:
            raise InputError(f"{text} has no picture: expected {stem}.png, or {stem}_source.png and "
                             f"{stem}_target.png, beside it")
    if not out:
        raise InputError(f"found no examples in {folder}: expected NAME.png + NAME.txt pairs, or NAME_source.png + "
                         f"NAME_target.png + NAME.txt triplets")
    return out


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (OSError, Image.DecompressionBombError) as err:
        raise InputError(f"{path} is not a readable picture: {err}") from None


def target_layers(model: nn.Module, targets: str) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if targets == "all":
        chosen = names
    elif targets == "blocks":
        chosen = [n for n in names if n.startswith("transformer_blocks.")]
    else:
        pieces = [p.strip() for p in targets.split(",") if p.strip()]
        chosen = [n for n in names if any(p in n for p in pieces)]
    if not chosen:
        raise InputError(f"targets {targets!r} match no Linear layer of the transformer")
    return chosen


class TrainableLora(nn.Module):
    """lora_A / lora_B beside each chosen Linear (forward hooks; A as PEFT initialises it, B at zero)."""

    def __init__(self, model: nn.Module, layers: list[str], rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.layers, self.rank, self.alpha, self.scale = layers, rank, alpha, alpha / rank
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        self.hooks = []
        self.enabled = True
        for name in layers:
            linear = model.get_submodule(name)
            bound = 1 / math.sqrt(linear.in_features)  # kaiming_uniform(a=sqrt(5)), as PEFT initialises lora_A
            down = (torch.rand(rank, linear.in_features, generator=generator) * 2 - 1) * bound
            self.down.append(nn.Parameter(down.to(linear.weight.device)))
            self.up.append(nn.Parameter(torch.zeros(linear.out_features, rank, device=linear.weight.device)))
            self.hooks.append(linear.register_forward_hook(self._hook(len(self.down) - 1)))

    def _hook(self, i: int):
        def hook(module, args, output):
            if not self.enabled:
                return None
            x = args[0].float()
            return output + (F.linear(F.linear(x, self.down[i]), self.up[i]) * self.scale).to(output.dtype)
        return hook

    @torch.no_grad()
    def project(self, projectors: dict[str, torch.Tensor]) -> None:
        """lora_A <- lora_A P for the layers given: its rows stay in the subspace P projects onto."""
        for name, down in zip(self.layers, self.down):
            if name in projectors:
                down.copy_(down @ projectors[name].to(down.device, down.dtype))

    @contextlib.contextmanager
    def disabled(self):
        """Within: the base model alone."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {}
        for name, down, up in zip(self.layers, self.down, self.up):
            sd[f"transformer.{name}.lora_A.weight"] = down.detach().float().cpu().contiguous()
            sd[f"transformer.{name}.lora_B.weight"] = up.detach().float().cpu().contiguous()
        return sd

    def metadata(self) -> dict[str, str]:
        config = {"transformer.r": self.rank, "transformer.lora_alpha": self.alpha,
                  "transformer.target_modules": sorted(self.layers), "transformer.lora_dropout": 0.0,
                  "transformer.init_lora_weights": True}
        return {"lora_adapter_metadata": json.dumps(config), "format": "pt"}


def token_weights(mask: Image.Image | None, plan, extra: float) -> torch.Tensor | None:
    """`[1, tokens]` loss weights from a mask picture: 1 + extra where a token's 16x16 pixels hold any of the mask
    (every family here lays out one token per 16x16 pixels, row by row); None without a mask."""
    if mask is None:
        return None
    pixels = mask.convert("L").resize((plan.width, plan.height), Image.NEAREST)
    grey = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0)
    touched = F.max_pool2d(grey[None, None], 16)[0, 0].flatten()
    return (1 + extra * touched)[None]


def sample_sigma(generator: torch.Generator) -> float:
    """A third logit-normal, a third uniform, a third in [0.9, 1]: few-step sampling starts at sigma 1, where
    colours and layout are decided, which logit-normal alone rarely trains."""
    pick = int(torch.randint(0, 3, (1,), generator=generator))
    if pick == 0:
        return float(torch.sigmoid(torch.randn(1, generator=generator)))
    if pick == 1:
        return float(torch.rand(1, generator=generator).clamp(1e-3, 1))
    return float(0.9 + 0.1 * torch.rand(1, generator=generator))


def train_lora(pipe, options: TrainOptions, progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Train (or resume) a LoRA for `pipe`'s transformer; writes `options.out` and returns a summary."""
    from qimg.loading.weights import save_state_dict

    if "layers" in pipe.tasks:
        raise InputError(f"LoRA training takes text-to-image or edit models; {pipe.pipeline_class} splits layers")
    examples = read_examples(options.data)
    kept = read_examples(options.preserve) if options.preserve is not None else []
    edits = [e for e in examples + kept if e.source is not None]
    if edits and "edit" not in pipe.tasks:
        raise InputError(f"{len(edits)} examples are edit triplets, but {pipe.pipeline_class} does not edit")
    if len(edits) < len(examples) + len(kept) and "generate" not in pipe.tasks:
        raise InputError(f"{pipe.pipeline_class} only edits: every example needs NAME_source and NAME_target")
    start = time.perf_counter()
    pipe.unload_loras()
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    resolution = options.resolution or pipe.defaults.resolution
    with torch.no_grad():
        encoded = [_encode(pipe, ex, resolution, options.mask_weight) for ex in examples]
        kept_encoded = [item for ex in kept for item in _encode_kept(pipe, ex, resolution, options.mask_weight)]
    generator = torch.Generator().manual_seed(options.seed)
    lora = TrainableLora(transformer, target_layers(transformer, options.targets), options.rank,
                         float(options.alpha or options.rank), generator)
    opt = torch.optim.AdamW(lora.parameters(), lr=options.lr, weight_decay=0.0)
    projectors, free = {}, {}
    if options.orthogonal is not None:
        with lora.disabled():
            projectors, free = null_space_projectors(pipe, transformer, lora.layers, kept_encoded, options.orthogonal)
        lora.project(projectors)
    step, rng, losses = _resume(options, lora, opt)
    hook = _checkpointed if options.checkpointing else None
    deadline = None if options.minutes is None else start + options.minutes * 60
    try:
        while step < options.steps and (deadline is None or time.perf_counter() < deadline):
            noise_gen = torch.Generator().manual_seed(options.seed * 100_003 + step)
            total = 0.0
            for _ in range(options.batch):
                keep = bool(kept_encoded) and rng.random() < options.preserve_share
                pool = kept_encoded if keep else encoded
                plan, cond, x0, weight = pool[rng.randrange(len(pool))]
                sigma = sample_sigma(noise_gen)
                noise = torch.randn(x0.shape, generator=noise_gen).to(x0.device, x0.dtype)
                x_t = (1 - sigma) * x0 + sigma * noise
                velocity = pipe.velocity(plan, cond.positive, cond.extra)
                sigmas = torch.full((x0.shape[0],), sigma, device=x0.device)
                if keep:
                    with torch.no_grad(), lora.disabled():
                        target = velocity(x_t, sigmas).float()
                else:
                    target = (noise - x0).float()
                v = velocity(x_t, sigmas, block_hook=hook)
                error = (v.float() - target).pow(2).mean(-1)
                loss = (error.mean() if weight is None else (error * weight).sum() / weight.sum()) / options.batch
                if keep:
                    loss = loss * options.preserve_weight
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(lora.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            lora.project(projectors)
            step += 1
            losses.append(total)
            if progress is not None:
                progress(step, options.steps, total)
            if step % options.save_every == 0:
                _save_checkpoint(options, lora, opt, step, rng, losses)
        _save_checkpoint(options, lora, opt, step, rng, losses)
        save_state_dict(lora.peft_state_dict(), options.out, metadata=lora.metadata())
    finally:
        lora.remove()
    recent = losses[-min(len(losses), 50):]
    return {"out": str(options.out), "steps": step, "finished": step >= options.steps, "examples": len(examples),
            "preserved": len(kept), "free_dims": free,
            "layers": len(lora.layers), "loss_first": losses[0] if losses else None,
            "loss_recent": sum(recent) / len(recent) if recent else None,
            "seconds": round(time.perf_counter() - start, 1)}


@torch.no_grad()
def null_space_projectors(pipe, transformer: nn.Module, layers: list[str], items: list[tuple], energy: float,
                          sigmas=(1.0, 0.5)) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Per layer, the projector onto the directions of its inputs that the preserved examples barely use: the
    orthogonal complement of the principal directions holding `energy` of their summed squared inputs. A LoRA whose
    lora_A rows stay there leaves those inputs' outputs (nearly) as they were, while inputs reaching outside them
    (a new word's tokens) still move (null-space fine-tuning). Returns the projectors and each layer's free dims."""
    grams = {name: None for name in layers}

    def catch(name):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] = x.T @ x if grams[name] is None else grams[name] + x.T @ x
        return hook

    hooks = [transformer.get_submodule(name).register_forward_hook(catch(name)) for name in layers]
    try:
        generator = torch.Generator().manual_seed(0)
        for plan, cond, x0, _ in items:
            velocity = pipe.velocity(plan, cond.positive, cond.extra)
            for sigma in sigmas:
                noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
                velocity((1 - sigma) * x0 + sigma * noise, torch.full((x0.shape[0],), sigma, device=x0.device))
    finally:
        for hook in hooks:
            hook.remove()
    projectors, free = {}, {}
    for name, gram in grams.items():
        values, vectors = torch.linalg.eigh(gram.cpu())
        values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
        kept = int((values.cumsum(0) < energy * values.sum()).sum()) + 1
        used = vectors[:, :kept]
        projectors[name] = (torch.eye(len(values), dtype=torch.float64) - used @ used.T).float()
        free[name] = len(values) - kept
    return projectors, free


def _encode(pipe, ex: Example, resolution: int, mask_weight: float, cfg: float | None = 1.0) -> tuple:
    """(plan, conditioning, target tokens, token weights) of one example; with `cfg` > 1 (None: the model's default
    for such a request, as generating settles it) the conditioning holds the default negative prompt's too."""
    from qimg.options import GenerateOptions

    size = {} if ex.source is not None else dict(zip(("width", "height"), fit_area(
        resolution * resolution, ex.target.width / ex.target.height, pipe.multiple)))
    plan = pipe.plan(GenerateOptions(prompt=ex.prompt, images=(ex.source,) if ex.source else (),
                                     resolution=resolution, steps=1, seed=0, cfg=cfg, use_kv_cache=False, **size))
    return plan, pipe.encode(plan), pipe.image_tokens(plan, ex.target), token_weights(ex.mask, plan, mask_weight)


def _encode_kept(pipe, ex: Example, resolution: int, mask_weight: float) -> list[tuple]:
    """A preserved example, and, where the model guides such requests by default, the same picture under the
    default negative prompt: guidance subtracts that branch, so a LoRA that moved it would move every picture."""
    plan, cond, x0, weight = _encode(pipe, ex, resolution, mask_weight, cfg=None)
    items = [(plan, replace(cond, negative=None), x0, weight)]
    if cond.negative is not None:
        items.append((plan, replace(cond, positive=cond.negative, negative=None), x0, weight))
    return items


def _checkpointed(index, state, run):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(run, state, use_reentrant=False)


def _resume(options: TrainOptions, lora: TrainableLora, opt) -> tuple[int, random.Random, list[float]]:
    if not options.checkpoint.exists():
        return 0, random.Random(options.seed), []
    state = torch.load(options.checkpoint, weights_only=False)
    if state["recipe"] != options.recipe() or state["layers"] != lora.layers:
        raise InputError(f"{options.checkpoint} is a checkpoint of another run ({state['recipe']}); delete it or "
                         f"write to another --out")
    lora.load_state_dict(state["lora"])
    opt.load_state_dict(state["opt"])
    return state["step"], state["rng"], state["losses"]


def _save_checkpoint(options: TrainOptions, lora, opt, step: int, rng: random.Random, losses: list) -> None:
    tmp = options.checkpoint.with_suffix(".tmp")
    torch.save({"recipe": options.recipe(), "layers": lora.layers, "lora": lora.state_dict(),
                "opt": opt.state_dict(), "step": step, "rng": rng, "losses": losses,
                "options": {k: str(v) for k, v in asdict(options).items()}}, tmp)
    tmp.replace(options.checkpoint)
