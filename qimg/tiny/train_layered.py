"""Train qimg-tiny-layered (Qwen-Image-Layered at a tiny config) from scratch on CPU on the synthetic world.

Stages, each resumable from `WORK/state-<stage>.pt`:
  vae      the v1 RGBA VAE on 64x64 crops of world composites and single layers;
  latents  latent statistics (written into the VAE config) and a cached pool of scenes with the latents of their
           composite and of each layer (background, objects in reading order, word);
  decoder  the VAE's decoder fine-tuned on whole frames, encoder frozen (the latents stay valid);
  caption  the Qwen2.5-VL learns to caption renders with their canonical prompts (the pipeline captions its input
           when no prompt is given), then stays frozen;
  dit      the Layered transformer, flow matching on [composite, layer 1..L] conditioned on the composite's latents;
  export   the diffusers-layout folder that `qimg.load` reads like the real checkpoint.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from qimg.models.conditioner import CAPTION_PROMPTS, T2I_DROP, T2I_TEMPLATE
from qimg.models.latents import pack
from qimg.models.qwenimage import QwenImageConfig, QwenImageTransformer
from qimg.models.vae import VAE, VAEConfig
from qimg.tiny import world
from qimg.tiny.fit import (SEED, _save, cosine_lr, decoder_steps, export_weights, fit_autoencoder, fit_decoder,
                           load_trained_vae, log, optimizer_step, patch_any, resume_state, rewarm_start, rgba_tensor,
                           run_stages, sample_sigmas, seed_vae_from_export, step_seed, user_dir, work_seed,
                           write_export)
from qimg.tiny.train import (_mask_words, cached_tokenizer, curriculum_scene, vision_token_ids, widen_embeddings)

NAME = "qimg-tiny-layered"
VAE_STEPS = 2000
VAE_LR = 6e-4  # 2e-3 (what the 2.x VAE takes) stalls this one at ~15 dB
POOL_SCENES = 4000
CAPTION_STEPS = 500
DECODER_STEPS = 1200
DIT_STEPS = 37500
DIT_LR = 5e-4
Z = 16
VAE_CFG = dict(base_dim=16, z_dim=Z, dim_mult=(1, 2, 4, 4), num_res_blocks=1, temperal_downsample=(False, True, True),
               input_channels=4)
DIT = dict(patch_size=2, in_channels=4 * Z, out_channels=Z, num_layers=4, attention_head_dim=32, num_attention_heads=4,
           joint_attention_dim=128, axes_dims_rope=(8, 12, 12), use_additional_t_cond=True, use_layer3d_rope=True)
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            mrope=[4, 6, 6])
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
             "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256,
             "max_image_seq_len": 8192, "shift_terminal": None, "time_shift_type": "linear",
             "invert_sigmas": False, "stochastic_sampling": False, "use_karras_sigmas": False,
             "use_exponential_sigmas": False, "use_beta_sigmas": False}
# Few steps score as well as many (200 held-out scenes, alpha IoU / composite: 20 steps 0.558 / 19.7 dB, 10 steps
# 0.560 / 19.8, 5 steps 0.565 / 19.9, 3 steps 0.568 / 20.1): the layers are a deterministic function of the input.
DEFAULTS = {"default_resolution": 128, "default_steps": 5, "default_cfg": 1.0}
TOKENS = 64  # tokens per frame: 128x128 at 8x, 2x2 patches
# Object and word layers differ from the empty layer only where they are (about 1/20 of the composite's loss
# before weighting), so unweighted the transformer learns the composite and background first and the layers last.
LAYER_WEIGHT = 4.0
# Within layer frames, tokens whose 16 px patch holds any of the layer's pixels weigh this much more (0: off); the
# rest of a layer is transparent and easy, yet the objects are what the split is judged on. The shipped model took
# it from step 5,000 to 6,443 (12 minutes): on 100 held-out scenes alpha IoU 0.560 -> 0.592, composite PSNR
# 20.2 -> 21.1 dB, where the 1,500 plain steps before it had moved IoU by 0.003.
LAYER_OBJECT_WEIGHT = 8.0
EXTRA_LAYER_P = 0.15  # sometimes one more layer than the scene has: it must come out empty


def layer_scene(scene: world.Scene) -> world.Scene:
    """The layer order the model learns: background, objects in reading (cell) order, then the word."""
    return scene.canonical()


def frames_of(scene: world.Scene) -> np.ndarray:
    """uint8 `[1 + L, 128, 128, 4]`: the opaque composite, then the layers bottom to top.

    Fully transparent pixels are zeroed (the world fills them with the layer's colour). With the colour fill an
    object layer's latents depend on the object's colour at every position, so the transformer had to find that
    colour anywhere in the image; it never learned to (x0 error from pure noise stayed at the prior's). Zeroed, a
    layer differs from the empty layer only where its object is, and the model learns it as a local copy."""
    layers = world.layer_arrays(layer_scene(scene)).copy()
    layers[1:][layers[1:, ..., 3] == 0] = 0
    comp = world.render_array(scene)
    comp = np.concatenate([comp, np.full(comp.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    return np.concatenate([comp[None], layers])


def layer_keys(scene: world.Scene) -> list:
    """A cache key per layer of `frames_of(scene)[1:]` (None: the word layer, not cached)."""
    s = layer_scene(scene)
    return [("background", s.background)] + list(s.objects) + ([None] if s.word else [])


# -- model construction ---------------------------------------------------------------------------------------
def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = [T2I_TEMPLATE, CAPTION_PROMPTS["en"], "system user assistant"]
    for _ in range(n):
        scene = world.random_scene(rng)
        texts += [world.prompt(scene), world.paraphrase(scene, rng)]
    return [_mask_words(t) for t in texts]


def load_or_build_tokenizer(work: Path):
    return cached_tokenizer(work, corpus)


def build_processor(tokenizer):
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from qimg.models.conditioner import image_only
    from qimg.tiny.tokenizer import CHAT_TEMPLATE

    patch, merge = 14, 2
    ip = Qwen2VLImageProcessorPil(patch_size=patch, temporal_patch_size=2, merge_size=merge,
                                  min_pixels=(patch * merge) ** 2, max_pixels=(patch * merge) ** 2 * 64)
    return image_only(Qwen2VLProcessor)(image_processor=ip, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_text_encoder(tokenizer, seed: int = SEED):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    t = TEXT
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=t["hidden_size"],
                         intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
                         num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_key_value_heads"],
                         rms_norm_eps=1e-6, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": t["mrope"]},
                         pad_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), bos_token_id=None),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=t["hidden_size"],
                           window_size=56, fullatt_block_indexes=[1]),
        **vision_token_ids(tokenizer), tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = widen_embeddings(Qwen2_5_VLForConditionalGeneration(config))
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.generation_config.do_sample = False
    return model


def vae_config(mean=None, std=None) -> VAEConfig:
    return VAEConfig(**VAE_CFG, latents_mean=tuple(mean or [0.0] * Z), latents_std=tuple(std or [1.0] * Z))


def load_vae(work: Path, refined: bool = True) -> VAE:
    """The trained VAE; with `refined`, its decoder from the decoder stage once that has run."""
    return load_trained_vae(work, VAE, vae_config, refined)


# -- stage: VAE -----------------------------------------------------------------------------------------------
def _vae_crops(rng: random.Random) -> tuple[list[np.ndarray], None]:
    """64x64 crops: 30% of composites, the rest single layers (mostly transparent); no pixel weights."""
    crops = []
    for _ in range(16):
        frames = frames_of(world.random_scene(rng))
        img = frames[0] if rng.random() < 0.3 else frames[rng.randrange(1, len(frames))]
        y, x = rng.randrange(0, 65, 8), rng.randrange(0, 65, 8)
        crops.append(img[y:y + 64, x:x + 64])
    return crops, None


def train_vae(work: Path, deadline: float, seed: int = SEED) -> bool:
    torch.manual_seed(seed)
    vae = VAE(vae_config()).train()
    return fit_autoencoder(vae, work / "state-vae.pt", deadline, steps=VAE_STEPS, lr=VAE_LR, warmup=100, floor=0.05,
                           crops=_vae_crops, name="layered vae", seed=seed)


# -- stage: latent pool -----------------------------------------------------------------------------------------
def build_pool(work: Path, deadline: float, seed: int = SEED) -> bool:
    path = work / "pool.pt"
    if path.exists():
        return True
    vae = load_vae(work)
    rng = random.Random(seed + 1)
    scenes, latents = [], []
    cache: dict = {}  # background and object layers repeat across scenes (8 + 432 kinds): encode each once
    log(f"layered latents: encoding {POOL_SCENES} scenes")
    with torch.inference_mode():
        while len(scenes) < POOL_SCENES:
            if time.time() > deadline:
                return False
            batch = [curriculum_scene(rng, 1.0) for _ in range(32)]
            todo, where = [], []
            for b, scene in enumerate(batch):
                frames = frames_of(scene)
                for f, key in enumerate([None] + layer_keys(scene)):
                    if key is None or key not in cache:
                        where.append((b, f, key))
                        todo.append(frames[f])
            z = vae._encode(rgba_tensor(todo)).half()
            fresh: dict = {}
            for (b, f, key), zi in zip(where, z):
                fresh[(b, f)] = zi
                if key is not None:
                    cache[key] = zi
            for b, scene in enumerate(batch):
                keys = [None] + layer_keys(scene)
                latents.append(torch.stack([fresh[(b, f)] if (b, f) in fresh else cache[k]
                                            for f, k in enumerate(keys)]))
            scenes.extend(batch)
            if len(scenes) % 800 == 0:
                log(f"layered latents: {len(scenes)}/{POOL_SCENES}")
        empty = vae._encode(rgba_tensor([np.zeros((128, 128, 4), np.uint8)])).half()
    both = torch.cat(latents).float()
    mean, std = both.mean(dim=(0, 2, 3)).tolist(), both.std(dim=(0, 2, 3)).tolist()
    (work / "latent-stats.json").write_text(json.dumps({"mean": mean, "std": std}))
    _save(path, scenes=scenes, latents=latents, empty=empty[0])
    log("layered latents: done")
    return True


# -- stage: decoder ---------------------------------------------------------------------------------------------
def _decoder_batch(rng: random.Random, scenes: int = 2) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Whole frames (composites, object and word layers; a plain background teaches nothing) and a mask per frame
    of the pixels that are not background or empty."""
    frames, masks = [], []
    for _ in range(scenes):
        f = frames_of(curriculum_scene(rng, 1.0))
        background = f[1, 0, 0, :3]
        frames.append(f[0])
        masks.append((f[0, ..., :3] != background).any(axis=-1))
        for layer in f[2:]:
            frames.append(layer)
            masks.append(layer[..., 3] > 0)
    return frames, masks


def refine_decoder(work: Path, deadline: float, seed: int = SEED) -> bool:
    """Decoding the true layers' latents scored alpha IoU 0.89 and composite PSNR 27.1 dB before this stage: a
    ceiling on the whole model."""
    return fit_decoder(load_vae(work, refined=False), work / "state-decoder.pt", deadline, steps=DECODER_STEPS,
                       batches=_decoder_batch, name="layered decoder", seed=seed + 4)


# -- stage: captioner -------------------------------------------------------------------------------------------
def _caption_batch(processor, scenes, rng):
    """Inputs and labels for teacher-forced captioning: loss only on the caption and its end token."""
    texts = [CAPTION_PROMPTS["en"] + (world.prompt(s)) + "<|im_end|>" for s in scenes]
    images = [world.render(s) for s in scenes]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    prompt_len = len(processor(text=[CAPTION_PROMPTS["en"]], images=images[:1], return_tensors="pt").input_ids[0])
    labels = inputs.input_ids.clone()
    labels[:, :prompt_len] = -100
    labels[inputs.attention_mask == 0] = -100
    return inputs, labels


def train_caption(work: Path, deadline: float, seed: int = SEED) -> bool:
    path = work / "state-caption.pt"
    tokenizer = load_or_build_tokenizer(work)
    processor = build_processor(tokenizer)
    model = build_text_encoder(tokenizer, seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    state = resume_state(path, model, opt)
    step, rng = state.get("step", 0), state.get("rng", random.Random(seed + 3))
    if step >= CAPTION_STEPS:
        return True
    log(f"layered caption: step {step}/{CAPTION_STEPS}, {sum(p.numel() for p in model.parameters()):,} parameters")
    losses = []
    processor.tokenizer.padding_side = "right"
    while step < CAPTION_STEPS and time.time() < deadline:
        step_seed(seed + 3, step)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(1e-3, step, CAPTION_STEPS, 100)
        scenes = [curriculum_scene(rng, 1.0) for _ in range(16)]
        inputs, labels = _caption_batch(processor, scenes, rng)
        fwd = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                       "mm_token_type_ids") if k in inputs}
        loss = model(**fwd, labels=labels).loss
        optimizer_step(opt, loss, list(model.parameters()))
        step += 1
        losses.append(loss.item())
        if step % 50 == 0:
            log(f"layered caption: step {step}/{CAPTION_STEPS} loss {np.mean(losses):.4f}")
            losses = []
        if step % 300 == 0:
            _save(path, model=model.state_dict(), opt=opt.state_dict(), step=step, rng=rng)
    _save(path, model=model.state_dict(), opt=opt.state_dict(), step=step, rng=rng)
    return step >= CAPTION_STEPS


def load_text_encoder(work: Path):
    tokenizer = load_or_build_tokenizer(work)
    model = build_text_encoder(tokenizer)
    model.load_state_dict(torch.load(work / "state-caption.pt", weights_only=False)["model"])
    return tokenizer, model.eval().requires_grad_(False)


def encode_prompts(tokenizer, model, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states `[B, S, D]` as the pipeline computes them (T2I template, first T2I_DROP tokens dropped), right
    padded, and their mask."""
    states = []
    for p in prompts:
        ids = tokenizer([T2I_TEMPLATE.format(p)], return_tensors="pt").to(model.device)
        states.append(model.model(**ids, output_hidden_states=True).hidden_states[-1][0, T2I_DROP:])
    n = max(s.shape[0] for s in states)
    out = torch.zeros(len(states), n, states[0].shape[-1], dtype=states[0].dtype, device=states[0].device)
    mask = torch.zeros(len(states), n, dtype=torch.bool, device=states[0].device)
    for i, s in enumerate(states):
        out[i, : s.shape[0]], mask[i, : s.shape[0]] = s, True
    return out, mask


# -- stage: transformer -----------------------------------------------------------------------------------------
def train_dit(work: Path, deadline: float, seed: int = SEED, batch: int = 8, device: str = "cpu",
              steps: int | None = None) -> bool:
    """The transformer stage; on `device` (bf16 autocast on CUDA). Noise and noise levels are drawn on the CPU, so a
    seed draws the same batches on every device."""
    path, steps = work / "state-dit.pt", steps or DIT_STEPS
    pool = torch.load(work / "pool.pt", weights_only=False)
    stats = json.loads((work / "latent-stats.json").read_text())
    mean = torch.tensor(stats["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(stats["std"]).view(1, -1, 1, 1)
    scenes, latents = pool["scenes"], [((z.float() - mean) / std).to(device) for z in pool["latents"]]
    empty = ((pool["empty"].float()[None] - mean) / std).to(device)
    by_frames: dict[int, list[int]] = {}
    for i, z in enumerate(latents):
        by_frames.setdefault(z.shape[0], []).append(i)
    tokenizer, text_encoder = load_text_encoder(work)
    text_encoder.to(device)
    torch.manual_seed(seed)
    model = QwenImageTransformer(QwenImageConfig(**DIT)).train()
    with torch.no_grad():
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()
    state = resume_state(path, model)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01, betas=(0.9, 0.99))
    if state.get("opt") is not None:
        opt.load_state_dict(state["opt"])
    ema = {k: v.to(device) for k, v in state["ema"].items()} if state.get("ema") else \
        {k: v.detach().clone() for k, v in model.state_dict().items()}
    step, rng = state.get("step", 0), state.get("rng", random.Random(seed + 2))
    warm_from = rewarm_start(state, step, steps)
    if step >= steps:
        return True
    log(f"layered dit: step {step}/{steps} on {device}, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters")
    losses, started = [], time.time()

    def save():
        _save(path, model=model.state_dict(), opt=opt.state_dict(), ema=ema, step=step, rng=rng, warm_from=warm_from,
              total=steps)

    while step < steps and time.time() < deadline:
        step_seed(seed + 2, step)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(DIT_LR, step, steps, 200, rewarm_from=warm_from)
        first = rng.randrange(len(latents))
        group_ids = by_frames[latents[first].shape[0]]
        idx = [first] + [rng.choice(group_ids) for _ in range(batch - 1)]
        x0 = torch.stack([latents[i] for i in idx])  # [B, F, z, h, w]
        if rng.random() < EXTRA_LAYER_P:
            x0 = torch.cat([x0, empty[None].expand(len(idx), -1, -1, -1, -1)], dim=1)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda")):
            loss = layered_loss(model, tokenizer, text_encoder, x0, [scenes[i] for i in idx], rng)
        optimizer_step(opt, loss, list(model.parameters()))
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for k, v in model.state_dict().items():
                ema[k].lerp_(v.detach(), 1 - decay)
        step += 1
        losses.append(loss.item())
        if step % 50 == 0:
            rate = 50 / max(time.time() - started, 1e-6)
            started = time.time()
            log(f"layered dit: step {step}/{steps} loss {np.mean(losses):.4f} {rate:.2f} it/s")
            losses = []
        if step % 250 == 0:
            save()
    save()
    return step >= steps


def layered_loss(model, tokenizer, text_encoder, x0: torch.Tensor, scenes, rng: random.Random) -> torch.Tensor:
    """Flow-matching loss on all frames (composite first) with the composite's latents as the condition."""
    b, frames = x0.shape[:2]
    prompts = []
    for s in scenes:
        r = rng.random()
        # The input image fully determines the layers. Blank prompts (30%) and another scene's prompt (20%) teach
        # the model to lean on it, so the tiny captioner's mistakes (the pipeline captions when no prompt is given)
        # matter little.
        if r < 0.3:
            prompts.append(world.prompt(s))
        elif r < 0.5:
            prompts.append(world.paraphrase(s, rng))
        elif r < 0.8:
            prompts.append(" ")
        else:
            prompts.append(world.prompt(curriculum_scene(rng, 1.0)))
    with torch.no_grad():
        states, mask = encode_prompts(tokenizer, text_encoder, prompts)
    tokens = pack(x0.flatten(0, 1), 2).reshape(b, frames * TOKENS, -1)
    cond = pack(x0[:, 0], 2)
    sigma = sample_sigmas(b).to(tokens.device)
    noise = torch.randn(tokens.shape).to(tokens.device)
    xt = (1 - sigma[:, None, None]) * tokens + sigma[:, None, None] * noise
    shapes = [(1, 8, 8)] * frames + [(1, 8, 8)]
    flag = torch.zeros(b, dtype=torch.long, device=tokens.device)
    v = model(torch.cat([xt, cond], dim=1), states, sigma, shapes, text_mask=mask, additional_t_cond=flag)
    err = (v[:, : xt.shape[1]].float() - (noise - tokens)).pow(2).mean(-1).reshape(b, frames, TOKENS)
    weight = torch.ones(frames, device=err.device)
    weight[2:] = LAYER_WEIGHT
    if not LAYER_OBJECT_WEIGHT:
        return (err.mean(dim=(0, 2)) * weight).sum() / weight.sum()
    tokens_weight = 1 + LAYER_OBJECT_WEIGHT * torch.stack([layer_tokens(s, frames) for s in scenes]).to(err.device)
    per_frame = (err * tokens_weight).sum(dim=(0, 2)) / tokens_weight.sum(dim=(0, 2))
    return (per_frame * weight).sum() / weight.sum()


def layer_tokens(scene: world.Scene, frames: int) -> torch.Tensor:
    """`[frames, tokens]`: 1.0 where a layer frame's token patch holds any of that layer's pixels (frames past the
    scene's layers are empty); 0.0 on the composite and background frames."""
    layers = world.layer_arrays(scene)
    if len(layers) + 1 > frames:
        raise ValueError(f"the scene has {len(layers)} layers, more than the {frames - 1} layer frames given")
    out = torch.zeros(frames, TOKENS)
    for k, layer in enumerate(layers[1:]):
        out[k + 2] = patch_any(layer[..., 3] > 0)
    return out


# -- stage: export ----------------------------------------------------------------------------------------------
def export(work: Path, out: Path, use_ema: bool = True) -> Path:
    """Write the trained model as a diffusers-layout folder (float16 weights) at `out`, atomically."""
    state = torch.load(work / "state-dit.pt", weights_only=False)
    tokenizer, text_encoder = load_text_encoder(work)
    vae = load_vae(work)
    index = {"_class_name": "QwenImageLayeredPipeline", "_diffusers_version": "0.42.1",
             "processor": ["transformers", "Qwen2VLProcessor"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
             "tokenizer": ["transformers", "Qwen2Tokenizer"],
             "transformer": ["diffusers", "QwenImageTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKLQwenImage"],
             "_qimg": {**DEFAULTS, "name": NAME, "trained_steps": state["step"],
                       "decoder_steps": decoder_steps(work), "seed": work_seed(work)}}
    weights = [("transformer", state["ema"] if use_ema else state["model"], QwenImageConfig(**DIT)),
               ("vae", vae.state_dict(), vae.config)]
    return write_export(out, work, index, SCHEDULER, text_encoder, build_processor(tokenizer), weights, tokenizer)


def resume_from_export(out: Path, work: Path, seed: int = SEED) -> bool:
    """Seed an empty work folder from a shipped export (weights only; optimizers start fresh)."""
    meta = seed_vae_from_export(out, work, VAE_STEPS, DECODER_STEPS, VAE_CFG, seed)
    if meta is None:
        return False
    from transformers import Qwen2_5_VLForConditionalGeneration

    te = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out / "text_encoder"), dtype=torch.float32)
    te_sd = {k: v.clone() for k, v in te.state_dict().items()}  # the saved file uses the checkpoint key layout
    _save(work / "state-caption.pt", model=te_sd, opt=None, step=CAPTION_STEPS, rng=random.Random(seed + 3))
    dit_sd = export_weights(out / "transformer")
    _save(work / "state-dit.pt", model=dit_sd, opt=None, ema={k: v.clone() for k, v in dit_sd.items()},
          step=int(meta.get("trained_steps", 0)), rng=random.Random(seed + 2))
    log(f"resumed from {out} at step {meta.get('trained_steps', 0)} (optimizer state starts fresh)")
    return True


def default_out() -> Path:
    """Where an export goes unless told: the user's data folder, never the installed package."""
    return user_dir() / NAME


STAGES = ("vae", "latents", "decoder", "caption", "dit", "export")


def run(minutes: float, work: Path, out: Path | None, stages=STAGES, seed: int = SEED,
        source: Path | None = None, device: str = "cpu", batch: int = 8,
        steps: int | None = None) -> bool:
    """Run the stages in order for at most `minutes`; returns True when training is complete. One `seed` fixes the
    whole run (a work folder keeps the one it was started with). An empty work folder is seeded from the export
    at `source` (default: `out`) when there is one. `device` runs the transformer stage there (bf16 autocast on
    CUDA; `batch` scenes per step); the others stay on the CPU."""
    import functools

    fits = [("vae", train_vae), ("latents", build_pool), ("decoder", refine_decoder), ("caption", train_caption),
            ("dit", functools.partial(train_dit, device=device, batch=batch, steps=steps))]
    return run_stages(minutes, work, out or default_out(), stages, seed, fits, resume_from_export, export,
                      source)
