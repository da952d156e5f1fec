"""Training machinery both tiny recipes share: data helpers, noise levels, seeding and resuming, the VAE and
decoder fitting loops, the stage runner, and writing a diffusers-layout export."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SEED = 1234
DECODER_LR = 3e-4
# The decoder stage weights pixels of (and 2 px around) objects and words this much more than plain ones: they are
# a few percent of a frame, yet they are all the checker reads.
OBJECT_WEIGHT = 8.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rgba_tensor(arrays) -> torch.Tensor:
    """uint8 `[B, H, W, 3|4]` arrays -> `[B, 4, H, W]` in [-1, 1] (opaque alpha added for RGB)."""
    x = torch.from_numpy(np.stack(arrays)).float() / 127.5 - 1
    if x.shape[-1] == 3:
        x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
    return x.permute(0, 3, 1, 2).contiguous()


# a run resumed with a fresh optimizer (from an export), or on a schedule of another length than its checkpoint's,
# warms its rate up again over this many steps
REWARM_STEPS = 200


def cosine_lr(base: float, step: int, total: int, warmup: int, floor: float = 0.05,
              rewarm_from: int | None = None) -> float:
    """Linear warm-up, then cosine decay to `floor * base` at `total` steps; with `rewarm_from` (see `rewarm_start`)
    the rate also warms up over REWARM_STEPS from that step."""
    decay = 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
    again = 1.0 if rewarm_from is None else min(1.0, (step - rewarm_from + 1) / REWARM_STEPS)
    return base * min(1.0, (step + 1) / warmup) * (decay * (1 - floor) + floor) * again


def rewarm_start(state: dict, step: int, total: int) -> int:
    """Where the rate last warmed up from (0: the start): the resumed step when the checkpoint `state` was saved on a
    schedule of another length (the cosine now ends elsewhere: its rate at this step may be far above the last one).
    Checkpoints record `total` and this value as `warm_from`."""
    if state and state.get("total") != total:
        return step
    return state.get("warm_from", 0)


def sample_sigmas(n: int, shift: float = 0.0) -> torch.Tensor:
    """Training noise levels: a third logit-normal (centred at `shift`), a third uniform on [0, 1], a third in
    [0.9, 1]. Samplers start at sigma = 1, where logit-normal alone almost never trains (P(sigma > 0.95) = 0.2%),
    and near 1 only the prompt and the condition image tell the target: without these samples both tiny models
    learned to denoise from x_t alone (a Layered model's x0 error from pure noise stayed at 0.88, no better than
    ignoring its input image, while it was 0.13 at sigma 0.9)."""
    pick = torch.randint(0, 3, (n,))
    logit_normal = torch.sigmoid(torch.randn(n) + shift)
    high = 0.9 + 0.1 * torch.rand(n)
    return torch.where(pick == 0, logit_normal, torch.where(pick == 1, torch.rand(n), high))


def step_seed(stage_seed: int, step: int) -> None:
    """Seed torch for one training step, so a run stopped and resumed anywhere draws what an uninterrupted one does
    (the Python `rng`, the optimizer and the EMA are saved with each checkpoint)."""
    torch.manual_seed(stage_seed * 100_003 + step)


def record_seed(work: Path, seed: int) -> None:
    """The work folder keeps the seed it was started with; resuming it with another one is refused."""
    from qimg.errors import InputError

    started = work_seed(work)
    if started is None:
        (work / "seed.json").write_text(json.dumps({"seed": seed}))
    elif started != seed:
        raise InputError(f"{work} was started with seed {started}; resume it with --seed {started}, or start "
                         f"seed {seed} in another --work folder")


def work_seed(work: Path) -> int | None:
    path = work / "seed.json"
    return json.loads(path.read_text())["seed"] if path.exists() else None


def optimizer_step(opt, loss: torch.Tensor, params: list) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def resume_state(path: Path, module, opt=None) -> dict:
    """Load a stage's checkpoint into `module` (and `opt`, when it has optimizer state); {} when there is none."""
    if not path.exists():
        return {}
    state = torch.load(path, weights_only=False)
    module.load_state_dict(state["model"])
    if opt is not None and state.get("opt") is not None:
        opt.load_state_dict(state["opt"])
    return state


def fit_vae(vae, params: list, path: Path, deadline: float, *, steps: int, lr: float, warmup: int, floor: float,
            batch_loss, name: str, seed: int, save_every: int, device: str = "cpu") -> bool:
    """The VAE stages' loop: AdamW on `params` with a cosine rate, `batch_loss(rng) -> (loss, plain pixel MSE)` per
    step, progress (loss and PSNR) every 100 steps, resumable from `path`; returns True once `steps` are done. The
    VAE trains on `device` (batches are drawn on the CPU; checkpoints are saved there)."""
    vae.to(device)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    state = resume_state(path, vae, opt)
    step, rng = state.get("step", 0), state.get("rng", random.Random(seed))
    if step >= steps:
        return True
    log(f"{name}: step {step}/{steps} on {device}, {sum(p.numel() for p in params):,} parameters")
    losses, errors = [], []
    while step < steps and time.time() < deadline:
        step_seed(seed, step)
        rate = cosine_lr(lr, step, steps, warmup, floor)
        for group in opt.param_groups:
            group["lr"] = rate
        loss, mse = batch_loss(rng)
        optimizer_step(opt, loss, params)
        step += 1
        losses.append(loss.item())
        errors.append(mse)
        if step % 100 == 0:
            psnr = 10 * math.log10(4 / max(np.mean(errors), 1e-10))  # pixels span [-1, 1]
            log(f"{name}: step {step}/{steps} loss {np.mean(losses):.4f} psnr {psnr:.1f} dB lr {rate:.2e}")
            losses, errors = [], []
        if step % save_every == 0:
            _save(path, model=vae.state_dict(), opt=opt.state_dict(), step=step, rng=rng)
    _save(path, model=vae.state_dict(), opt=opt.state_dict(), step=step, rng=rng)
    return step >= steps


def fit_autoencoder(vae, path: Path, deadline: float, *, steps: int, lr: float, warmup: int, floor: float,
                    crops, name: str, seed: int, device: str = "cpu") -> bool:
    """Reconstruction training (L1 + MSE, a light latent penalty) on batches `crops(rng) -> (uint8 RGBA arrays, bool
    masks of their object and word pixels, or None)`; masked pixels (and 2 px around them) weigh OBJECT_WEIGHT more."""

    def batch_loss(rng):
        frames, masks = crops(rng)
        x = rgba_tensor(frames).to(device)
        z = vae._encode(x)
        out = vae._decode(z)
        return reconstruction_loss(out, x, masks) + 1e-4 * z.pow(2).mean(), F.mse_loss(out, x).item()

    return fit_vae(vae, list(vae.parameters()), path, deadline, steps=steps, lr=lr, warmup=warmup, floor=floor,
                   batch_loss=batch_loss, name=name, seed=seed, save_every=500, device=device)


def pixel_weight(masks) -> torch.Tensor:
    """`[B, 1, H, W]` loss weights: 1 + OBJECT_WEIGHT on masked pixels and 2 px around them."""
    mask = torch.from_numpy(np.stack(masks)).float()[:, None]
    return 1 + OBJECT_WEIGHT * F.max_pool2d(mask, 5, stride=1, padding=2)


def reconstruction_loss(out: torch.Tensor, x: torch.Tensor, masks) -> torch.Tensor:
    """L1 + MSE per pixel, averaged with `pixel_weight(masks)` (plainly when `masks` is None)."""
    err = (out - x).abs() + (out - x).pow(2)
    if masks is None:
        return err.mean()
    weight = pixel_weight(masks).to(out.device)
    return (err * weight).sum() / (weight.sum() * x.shape[1])


def fit_decoder(vae, path: Path, deadline: float, *, steps: int, batches, name: str, seed: int,
                device: str = "cpu") -> bool:
    """Fine-tune a trained VAE's decoder with its encoder frozen, on whole frames `batches(rng) -> (uint8 arrays,
    bool masks of their object and word pixels)`. The latents (the pool, their statistics, the transformer trained
    on them) stay valid while what the decoder draws sharpens. The latents get a little noise, as the
    transformer's never exactly match the encoder's."""
    params = [p for key, p in vae.named_parameters() if key.startswith(("decoder.", "post_quant_conv."))]
    for p in params:
        p.requires_grad_(True)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1).to(device)

    def batch_loss(rng):
        frames, masks = batches(rng)
        x = rgba_tensor(frames).to(device)
        with torch.no_grad():
            z = vae._encode(x)
            z = z + 0.1 * (torch.rand(len(z), 1, 1, 1) * torch.randn(z.shape)).to(device) * std
        out = vae._decode(z)
        return reconstruction_loss(out, x, masks), F.mse_loss(out, x).item()

    return fit_vae(vae, params, path, deadline, steps=steps, lr=DECODER_LR, warmup=50, floor=0.05,
                   batch_loss=batch_loss, name=name, seed=seed, save_every=300, device=device)


def _on_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def _save(path: Path, **state) -> None:
    """Write a checkpoint atomically, every tensor (weights, EMA, optimizer state) on the CPU, so a run trained on a
    GPU resumes on a machine without one."""
    tmp = path.with_suffix(".tmp")
    torch.save(_on_cpu(state), tmp)
    tmp.replace(path)


def decoder_steps(work: Path) -> int:
    """For the export's metadata: how many steps refined its decoder (0: none)."""
    path = work / "state-decoder.pt"
    return torch.load(path, weights_only=False)["step"] if path.exists() else 0


def load_trained_vae(work: Path, cls, config, refined: bool = True):
    """The VAE stage's weights as `cls(config(mean, std))`, with the pool's latent statistics once written; with
    `refined`, the decoder stage's weights once that stage has run (its encoder is the VAE stage's)."""
    stage = "decoder" if refined and (work / "state-decoder.pt").exists() else "vae"
    state = torch.load(work / f"state-{stage}.pt", weights_only=False)
    mean = std = None
    if (work / "latent-stats.json").exists():
        data = json.loads((work / "latent-stats.json").read_text())
        mean, std = data["mean"], data["std"]
    vae = cls(config(mean, std))
    vae.load_state_dict(state["model"])
    return vae.eval().requires_grad_(False)


def patch_any(mask: np.ndarray, patch: int = 16) -> torch.Tensor:
    """`[H, W]` bool -> `[(H / patch) * (W / patch)]` float, row-major: 1.0 where the patch holds any True pixel."""
    h, w = mask.shape
    return torch.from_numpy(mask.reshape(h // patch, patch, w // patch, patch).any(axis=(1, 3)).ravel()).float()


def write_export(out: Path, work: Path, index: dict, scheduler: dict, text_encoder, processor, weights: list,
                 tokenizer=None) -> Path:
    """Write a diffusers-layout folder atomically: `weights` as (component, state dict, config) in float16 with
    the class names `index` gives them, the scheduler config, the transformers encoder and processor (and a
    `tokenizer/` folder when given), the BPE file training resumes from, and `model_index.json`."""
    import shutil

    from qimg.loading.weights import save_state_dict

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub, sd, cfg in weights:
        (tmp / sub).mkdir(parents=True)
        half = {k: v.half().contiguous() if v.is_floating_point() else v for k, v in sd.items()}
        save_state_dict(half, tmp / sub / "diffusion_pytorch_model.safetensors")
        _write_config(tmp / sub, index[sub][1], cfg)
    (tmp / "scheduler").mkdir(parents=True)
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    text_encoder.half().save_pretrained(tmp / "text_encoder")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "tokenizer")
    processor.save_pretrained(tmp / "processor")
    cfg_path = tmp / "processor" / "processor_config.json"
    if cfg_path.exists():  # the saved processor is an image-only subclass; name the transformers class
        data = json.loads(cfg_path.read_text())
        data["processor_class"] = index["processor"][1]
        cfg_path.write_text(json.dumps(data, indent=2))
    (tmp / "tokenizer-bpe.json").write_text((work / "tokenizer.json").read_text())  # lets training resume
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def _write_config(folder: Path, class_name: str, cfg) -> None:
    data = {"_class_name": class_name, "_diffusers_version": "0.42.1", **dataclasses.asdict(cfg)}
    (folder / "config.json").write_text(json.dumps(data, indent=2))


def seed_vae_from_export(out: Path, work: Path, vae_steps: int, decoder_steps: int, recipe: dict,
                         seed: int = SEED) -> dict | None:
    """First half of resuming from an export: unless `work` already has a VAE stage, or `out` is no export, or its VAE
    differs from the `recipe`'s VAE config (then every stage trains afresh), write the export's VAE (float32, as a
    finished stage; also as the finished decoder stage when the export's decoder was refined), latent statistics
    and BPE tokenizer into `work` and return its `_qimg` metadata; else None."""
    from qimg.loading.files import read_json

    if (work / "state-vae.pt").exists() or not (out / "model_index.json").exists():
        return None
    vcfg = read_json(out / "vae" / "config.json")
    differs = {k: vcfg.get(k) for k, v in recipe.items() if _plain(vcfg.get(k)) != _plain(v)}
    if differs:
        log(f"not resuming from {out}: its VAE ({differs}) is not this recipe's; every stage trains afresh")
        return None
    meta = read_json(out / "model_index.json").get("_qimg", {})
    (work / "latent-stats.json").write_text(json.dumps({"mean": vcfg["latents_mean"], "std": vcfg["latents_std"]}))
    (work / "tokenizer.json").write_text((out / "tokenizer-bpe.json").read_text())
    weights = export_weights(out / "vae")
    _save(work / "state-vae.pt", model=weights, opt=None, step=vae_steps, rng=random.Random(seed))
    if meta.get("decoder_steps") and not (work / "state-decoder.pt").exists():
        _save(work / "state-decoder.pt", model=weights, opt=None, step=decoder_steps, rng=random.Random(seed + 4))
    return meta


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def export_weights(folder: Path, base_name: str = "diffusion_pytorch_model") -> dict:
    """An exported component's (float16) weights as owned float32 tensors, ready to train on."""
    from qimg.loading.weights import open_state_dict

    return {k: v.float().clone() for k, v in open_state_dict(folder, base_name).items()}


def user_dir() -> Path:
    """The user's folder for tiny-model exports: $QIMG_HOME/tiny, else $XDG_DATA_HOME/qimg/tiny, else
    ~/.local/share/qimg/tiny."""
    import os

    if os.environ.get("QIMG_HOME"):
        return Path(os.environ["QIMG_HOME"]).expanduser() / "tiny"
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base).expanduser() / "qimg" / "tiny"


def run_stages(minutes: float, work: Path, out: Path, stages, seed: int, fits: list, resume, export_fn,
               source: Path | None = None) -> bool:
    """The stage runner both tiny trainers share. `fits` are (name, fit(work, deadline, seed) -> finished) in
    order; every stage must finish before the next starts, except the last (the transformer), which is exported
    from its latest checkpoint even when the deadline stops it. `resume(source, work, seed)` first seeds an empty
    work folder from an export."""
    work.mkdir(parents=True, exist_ok=True)
    record_seed(work, seed)
    resume(source or out, work, seed)
    deadline = time.time() + minutes * 60
    *before, (last, fit_last) = fits
    for name, fit in before:  # a finished stage returns at once, so a run past its deadline still exports
        if name not in stages:
            continue
        if not fit(work, deadline, seed):
            log(f"time is up before the {name} stage finished")
            return False
    done = fit_last(work, deadline, seed) if last in stages else True
    if "export" in stages and (work / "state-dit.pt").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        log(f"exported {export_fn(work, out)}")
    return done
