"""Train qimg-tiny (the Qwen-Image 2.x architecture at a tiny config) from scratch on CPU on the synthetic world.

Stages, each resumable from `WORK/state-<stage>.pt`:
  vae     the 2.x VAE on 64x64 crops of world renders (RGBA), reconstruction loss;
  latents latent statistics (written into the VAE config) and a cached pool of scenes and edit pairs;
  decoder the VAE's decoder fine-tuned on whole renders, encoder frozen (the latents stay valid);
  dit     the transformer and the Qwen3-VL condition encoder together, flow matching, t2i and edits;
  export  the diffusers-layout folder that `qimg.load` reads like any real checkpoint.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from qimg.models.qwenimage21 import QwenImage21Config, QwenImage21Transformer
from qimg.models.vae21 import VAE21, VAE21Config
from qimg.tiny import world
from qimg.tiny.conditioning import Conditioning, equal_length_batch
from qimg.tiny.fit import (SEED, _save, cosine_lr, decoder_steps, export_weights, fit_autoencoder, fit_decoder,
                           load_trained_vae, log, optimizer_step, patch_any, resume_state, rewarm_start, rgba_tensor,
                           run_stages, sample_sigmas, seed_vae_from_export, step_seed, user_dir, work_seed,
                           write_export)

VAE_STEPS = 4000
DECODER_STEPS = 1200
DIT_STEPS = 40000
POOL_PAIRS = 12000  # edit pairs; sources and targets also serve text-to-image
# 16x as the 2.x pipeline requires, 64 channels as the official VAE has, an encoder twice as wide as the decoder's
# first level: with crops centred on words and objects, the round trip of held-out renders keeps words and small
# squares' corners, which the 32-channel VAE of base width 8 shipped before did not (README, "The embedded tiny
# models").
VAE = dict(base_dim=16, decoder_base_dim=16, z_dim=64, dim_mult=(1, 2, 4, 8, 8), num_res_blocks=1,
           temperal_downsample=(False, True, True, True), in_channels=4, out_channels=4)
SCALE = 2 ** len(VAE["temperal_downsample"])  # pixels per latent token along each side
GRID = world.CANVAS // SCALE  # latent tokens along each side of a 128x128 frame
DIT = dict(num_layers=6, attention_head_dim=32, num_attention_heads=6, axes_dims_rope=(8, 12, 12),
           in_channels=VAE["z_dim"], out_channels=VAE["z_dim"], context_in_dim=128, mlp_ratio=3)
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, mrope=[8, 4, 4])
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
             "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256,
             "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential",
             "invert_sigmas": False, "stochastic_sampling": False, "use_karras_sigmas": False,
             "use_exponential_sigmas": False, "use_beta_sigmas": False}
ENCODER_EMBED_STD = 1.0
# logit-normal sigma centred above 0.5: the prompt decides the layout at high noise, which sigmoid(N(0, 1)) rarely
# samples (P(sigma > 0.9) = 1.4%)
SIGMA_SHIFT = 0.7
ENCODER_INIT = "embed-std-1"  # recorded in exports; older exports' transformer/encoder are not resumed
# Sampling defaults, measured best on the shipped weights: text-to-image 5 steps, edits 2 (the step and guidance
# sweeps are in the README, "The embedded tiny models").
DEFAULTS = {"default_resolution": 128, "default_steps": 5, "default_cfg": 2.0, "default_edit_cfg": 1.0,
            "default_edit_steps": 2}
# The transformer's flow-matching loss weights the latent tokens an object or word touches (and, for an edit, every
# token it changes) this much more, times (0.5 + sigma) (0: plain MSE). Most of a frame is flat background that is
# easy to predict; the objects are what the prompt is about, and at high noise only the prompt lays them out.
DIT_OBJECT_WEIGHT = 8.0
# Words: their tokens weigh this much more at every noise level (a glyph's strokes are shaped at mid and low noise,
# where the object weight above has faded), and this share of text-to-image samples shows a word (the pool's
# scenes hold one 30% of the time). The 7,792-step model drew letter-spaced bars ("II", "III") for every word;
# 8 and 0.5 until 14,500 steps, then 16 and 0.75 (the word-free scenes were then 136 of 138 exact).
DIT_WORD_WEIGHT = 16.0
WORD_SHARE = 0.75


# -- data ----------------------------------------------------------------------------------------------------


def curriculum_scene(rng: random.Random, progress: float) -> world.Scene:
    """Mostly one object early, uniform 1-3 objects after 30% of training; held-out scenes never appear."""
    weights = [1.0, min(1.0, progress / 0.3), min(1.0, progress / 0.3)]
    while True:
        n = rng.choices([1, 2, 3], weights=[max(w, 0.05) for w in weights])[0]
        scene = world.random_scene(rng, n_objects=n)
        if not world.is_held_out(scene):
            return scene


def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Text the tokenizer is trained on: templates and world prompts/edits, without the quoted words' letters
    merged (the words are 2-3 random capitals, so each capital stays one token)."""
    from qimg.models.conditioner import SYSTEM_21

    rng = random.Random(seed)
    texts = [SYSTEM_21, "system user assistant", "Picture 1: Picture 2:"]
    for _ in range(n):
        scene = world.random_scene(rng)
        texts.append(world.prompt(scene))
        texts.append(world.paraphrase(scene, rng))
        texts.append(world.random_edit(scene, rng)[0])
    return [_mask_words(t) for t in texts]


def _mask_words(text: str) -> str:
    import re

    return re.sub(r'"[A-Z]{2,3}"', '" "', text)


# -- model construction ---------------------------------------------------------------------------------------
def build_processor(tokenizer):
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from qimg.models.conditioner import image_only
    from qimg.tiny.tokenizer import CHAT_TEMPLATE

    ip = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=32 * 32,
                                  max_pixels=32 * 32 * 1024)
    return image_only(Qwen3VLProcessor)(image_processor=ip, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_text_encoder(tokenizer, seed: int = SEED):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    t = TEXT
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=t["hidden_size"],
                         intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
                         num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_key_value_heads"],
                         head_dim=t["head_dim"], max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": t["mrope"],
                                          "mrope_interleaved": True},
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=t["hidden_size"],
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        **vision_token_ids(tokenizer), tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return widen_embeddings(Qwen3VLForConditionalGeneration(config))


def vision_token_ids(tokenizer) -> dict:
    """The special-token ids a Qwen-VL config names, from a tokenizer with Qwen's specials."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def widen_embeddings(model):
    """Re-draw a fresh Qwen-VL's token embeddings at std ENCODER_EMBED_STD. With transformers' default std 0.02
    the random encoder washes out token identity and the transformer never learns to use the text (overfit probe:
    loss with right vs shuffled prompts 0.6407 vs 0.6406 after 250 steps); embeddings at std 1 keep it (0.082 vs
    1.778)."""
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.normal_(std=ENCODER_EMBED_STD)
    return model


def vae_config(mean=None, std=None) -> VAE21Config:
    z = VAE["z_dim"]
    return VAE21Config(**VAE, latents_mean=tuple(mean or [0.0] * z), latents_std=tuple(std or [1.0] * z))


# -- training helpers shared with train_layered ---------------------------------------------------------------


# -- stage: VAE -----------------------------------------------------------------------------------------------
def _vae_crops(rng: random.Random) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """16 64x64 crops of world renders and their object/word pixels; every other crop holds a word when its scene
    has one (7 in 10 of those scenes do), the rest an object, so strokes and corners are always in view."""
    frames, masks = [], []
    for i in range(16):
        scene = world.random_scene(rng, word_prob=0.7 if i % 2 == 0 else 0.3)
        while world.is_held_out(scene):
            scene = world.random_scene(rng, word_prob=0.7 if i % 2 == 0 else 0.3)
        img = world.render_array(scene)
        on_word = i % 2 == 0 and scene.word is not None
        cell = scene.word.cell if on_word else rng.choice([o.cell for o in scene.objects])
        y, x = (_crop_start(rng, (cell // 3 + 0.5) * world.CELL), _crop_start(rng, (cell % 3 + 0.5) * world.CELL))
        frames.append(img[y:y + 64, x:x + 64])
        masks.append(foreground(scene, img)[y:y + 64, x:x + 64])
    return frames, masks


def _crop_start(rng: random.Random, centre: float) -> int:
    """A random crop start (a multiple of 8 px) whose 64 px keep 22 px either side of `centre` (a cell's middle)."""
    starts = [v for v in range(0, world.CANVAS - 63, 8) if v <= centre - 22 and v + 64 >= centre + 22]
    return rng.choice(starts) if starts else min(world.CANVAS - 64, max(0, int(centre - 32) // 8 * 8))


def train_vae(work: Path, deadline: float, seed: int = SEED, device: str = "cpu") -> bool:
    torch.manual_seed(seed)
    vae = VAE21(vae_config()).train()
    return fit_autoencoder(vae, work / "state-vae.pt", deadline, steps=VAE_STEPS, lr=2e-3, warmup=200, floor=0.1,
                           crops=_vae_crops, name="vae", seed=seed, device=device)


def _decoder_batch(rng: random.Random, n: int = 6) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Whole renders and their non-background pixels."""
    frames, masks = [], []
    for _ in range(n):
        scene = curriculum_scene(rng, 1.0)
        img = world.render_array(scene)
        frames.append(img)
        masks.append(foreground(scene, img))
    return frames, masks


def refine_decoder(work: Path, deadline: float, seed: int = SEED, device: str = "cpu") -> bool:
    return fit_decoder(load_vae(work, refined=False), work / "state-decoder.pt", deadline, steps=DECODER_STEPS,
                       batches=_decoder_batch, name="decoder", seed=seed + 4, device=device)


def load_vae(work: Path, refined: bool = True) -> VAE21:
    """The trained VAE; with `refined`, its decoder from the decoder stage once that has run."""
    return load_trained_vae(work, VAE21, vae_config, refined)


# -- stage: latent pool -----------------------------------------------------------------------------------------
def build_pool(work: Path, deadline: float, seed: int = SEED, device: str = "cpu") -> bool:
    path = work / "pool.pt"
    if path.exists():
        return True
    if time.time() >= deadline:  # the pool is built in one go: do not start it past the deadline
        return False
    vae = load_vae(work).to(device)
    rng = random.Random(seed + 1)
    pairs, sources, targets = [], [], []
    log(f"latents: encoding {POOL_PAIRS} edit pairs")
    with torch.inference_mode():
        while len(pairs) < POOL_PAIRS:
            batch_pairs = []
            while len(batch_pairs) < 64:
                progress = len(pairs) / POOL_PAIRS
                src = curriculum_scene(rng, 0.3 + progress)  # the pool covers all object counts
                instruction, tgt = world.random_edit(src, rng)
                if world.is_held_out(tgt):
                    continue
                batch_pairs.append((src, instruction, tgt))
            imgs = [world.render_array(s) for s, _, _ in batch_pairs]
            imgs += [world.render_array(t) for _, _, t in batch_pairs]
            z = vae._encode(rgba_tensor(imgs).to(device)).cpu()
            sources.append(z[:64].half())
            targets.append(z[64:].half())
            pairs.extend(batch_pairs)
            if len(pairs) % 3200 == 0:
                log(f"latents: {len(pairs)}/{POOL_PAIRS}")
    src_z, tgt_z = torch.cat(sources), torch.cat(targets)
    stats = work / "latent-stats.json"
    if not stats.exists():  # a work folder seeded from an export keeps the statistics its transformer was trained on
        both = torch.cat([src_z, tgt_z]).float()
        mean = both.mean(dim=(0, 2, 3)).tolist()
        std = both.std(dim=(0, 2, 3)).tolist()
        stats.write_text(json.dumps({"mean": mean, "std": std}))
    scenes = [(s, i, t) for s, i, t in pairs]
    torch.save({"src": src_z, "tgt": tgt_z, "pairs": scenes}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    log("latents: done")
    return True


# -- stage: transformer + condition encoder ---------------------------------------------------------------------
class LatentPool:
    """The cached edit pairs as normalised latents (on the training device) with their scenes, and the
    loss-weight masks of each pair's scenes, computed once (rendering them is a tenth of a CPU step)."""

    def __init__(self, src: torch.Tensor, tgt: torch.Tensor, pairs: list):
        self.src, self.tgt, self.pairs = src, tgt, pairs
        self._masks: dict = {}
        self.by_kind: dict[str, list[int]] = {}
        for i, (_, instruction, _) in enumerate(pairs):
            self.by_kind.setdefault(world.parse_edit(instruction).kind, []).append(i)
        self.kinds = sorted(self.by_kind)
        # (pair index, use_target) of every frame that shows a word
        self.word_frames = [(i, use_t) for i, (s, _, t) in enumerate(pairs)
                            for use_t, scene in ((False, s), (True, t)) if scene.word is not None]

    @classmethod
    def load(cls, work: Path, device: str) -> "LatentPool":
        pool = torch.load(work / "pool.pt", weights_only=False)
        stats = json.loads((work / "latent-stats.json").read_text())
        mean = torch.tensor(stats["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(stats["std"]).view(1, -1, 1, 1)
        return cls(((pool["src"].float() - mean) / std).to(device), ((pool["tgt"].float() - mean) / std).to(device),
                   pool["pairs"])

    def __len__(self) -> int:
        return len(self.pairs)

    def weight_mask(self, i: int, task: str, use_target: bool) -> torch.Tensor:
        """`[tokens]` 1.0 on the tokens the loss weights up: the objects and words of the frame being denoised
        and, for an edit, every token whose pixels the edit changes (a removed object's cell too)."""
        key = (i, task, use_target)
        if key not in self._masks:
            src, _, tgt = self.pairs[i]
            mask = object_tokens(self.frame(i, task, use_target))
            if task == "edit":
                changed = (world.render_array(tgt) != world.render_array(src)).any(-1)
                mask = torch.maximum(mask, patch_any(changed, SCALE))
            self._masks[key] = mask
        return self._masks[key]

    def word_mask(self, i: int, task: str, use_target: bool) -> torch.Tensor:
        """`[tokens]` 1.0 on the tokens the word of the frame being denoised touches (all 0.0 without a word)."""
        key = (i, task, use_target, "word")
        if key not in self._masks:
            self._masks[key] = word_tokens(self.frame(i, task, use_target))
        return self._masks[key]

    def frame(self, i: int, task: str, use_target: bool) -> world.Scene:
        """The scene of the frame being denoised: an edit's target; for text-to-image the pair's source or target."""
        src, _, tgt = self.pairs[i]
        return tgt if task == "edit" or use_target else src

    def draw_frame(self, rng: random.Random) -> tuple[int, bool]:
        """(pair index, use_target) of a text-to-image frame: one showing a word WORD_SHARE of the time."""
        if self.word_frames and rng.random() < WORD_SHARE:
            return rng.choice(self.word_frames)
        return rng.randrange(len(self)), rng.random() < 0.5


def train_dit(work: Path, deadline: float, seed: int = SEED, batch: int = 32, device: str = "cpu",
              steps: int | None = None) -> bool:
    path, steps = work / "state-dit.pt", steps or DIT_STEPS
    pool = LatentPool.load(work, device)
    tokenizer = _load_or_build_tokenizer(work)
    processor = build_processor(tokenizer)
    text_encoder = build_text_encoder(tokenizer, seed).train()
    torch.manual_seed(seed)
    model = QwenImage21Transformer(QwenImage21Config(**DIT)).train()
    _init_dit(model)
    state = resume_state(path, model)
    if state:
        text_encoder.load_state_dict(state["text_encoder"])
    model.to(device)
    text_encoder.to(device)
    params = list(model.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01, betas=(0.9, 0.99))
    if state.get("opt") is not None:
        opt.load_state_dict(state["opt"])
    ema = {k: v.to(device) for k, v in state["ema"].items()} if state.get("ema") else \
        {k: v.detach().clone() for k, v in _all_state(model, text_encoder).items()}
    step, rng = state.get("step", 0), state.get("rng", random.Random(seed + 2))
    warm_from = rewarm_start(state, step, steps)
    if step >= steps:
        return True
    cond = Conditioning(processor, text_encoder)
    log(f"dit: step {step}/{steps} on {device}, {sum(p.numel() for p in model.parameters()):,} transformer "
        f"and {sum(p.numel() for p in text_encoder.parameters()):,} encoder parameters")
    losses: dict[str, list] = {"t2i": [], "edit": []}
    started = time.time()

    def save():
        _save(path, model=model.state_dict(), text_encoder=text_encoder.state_dict(), opt=opt.state_dict(), ema=ema,
              step=step, rng=rng, warm_from=warm_from, total=steps)

    while step < steps and time.time() < deadline:
        step_seed(seed + 2, step)
        lr = cosine_lr(5e-4, step, steps, 500, rewarm_from=warm_from)
        for group in opt.param_groups:
            group["lr"] = lr
        task = "edit" if rng.random() < 0.4 else "t2i"
        with torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda")):
            loss = _dit_step(model, cond, rng, task, pool, batch, step / steps)
        optimizer_step(opt, loss, params)
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for k, v in _all_state(model, text_encoder).items():
                if v.dtype.is_floating_point:
                    ema[k].lerp_(v.detach(), 1 - decay)
        step += 1
        losses[task].append(loss.item())
        if step % 50 == 0:
            rate = 50 / max(time.time() - started, 1e-6)
            started = time.time()
            log(f"dit: step {step}/{steps} t2i {np.mean(losses['t2i'] or [0]):.4f} "
                f"edit {np.mean(losses['edit'] or [0]):.4f} lr {lr:.2e} {rate:.2f} it/s")
            losses = {"t2i": [], "edit": []}
        if step % 500 == 0:
            save()
    save()
    return step >= steps


def _init_dit(model: QwenImage21Transformer) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                torch.nn.init.normal_(p, std=0.02)
        model.proj_out.weight.zero_()
        model.modulation[1].weight.mul_(0.1)


def _all_state(model, text_encoder) -> dict:
    return {**{f"dit.{k}": v for k, v in model.state_dict().items()},
            **{f"te.{k}": v for k, v in text_encoder.state_dict().items()}}


def _load_or_build_tokenizer(work: Path):
    return cached_tokenizer(work, corpus)


def cached_tokenizer(work: Path, texts):
    """The work folder's BPE tokenizer (Qwen specials added), trained on `texts()` and saved there the first time."""
    from qimg.tiny.tokenizer import qwen_tokenizer, train_bpe

    path = work / "tokenizer.json"
    if not path.exists():
        vocab, merges = train_bpe(texts(), vocab_size=600)
        path.write_text(json.dumps({"vocab": vocab, "merges": merges}))
    data = json.loads(path.read_text())
    return qwen_tokenizer(data["vocab"], data["merges"])


def draw_edit(pool: LatentPool, rng: random.Random) -> tuple[str, int, bool]:
    """An edit pair (instruction, pool index, True): every edit kind equally often, whatever its share of the pool
    (word edits are 6% of it, background changes 22%)."""
    i = rng.choice(pool.by_kind[rng.choice(pool.kinds)])
    return pool.pairs[i][1], i, True


def _dit_step(model, cond, rng, task, pool: LatentPool, batch, progress) -> torch.Tensor:
    pairs = pool.pairs

    def draw():
        if task == "edit":
            return draw_edit(pool, rng)
        i, use_target = pool.draw_frame(rng)
        scene = pool.frame(i, task, use_target)
        if len(scene.objects) > 1 and rng.random() > min(1.0, 0.2 + progress / 0.3):
            return None  # curriculum: few multi-object scenes early on
        text = world.prompt(scene) if rng.random() < 0.5 else world.paraphrase(scene, rng)
        return text, i, use_target

    chosen = equal_length_batch(cond, draw, batch, 1 if task == "edit" else 0, max_tries=20 * batch)
    # for CFG, drop the text of a whole batch at a time (a shorter prompt would change the batch's token length)
    prompts = [c[0] for c in chosen] if rng.random() > 0.1 else [" "] * len(chosen)
    idx = [c[1] for c in chosen]
    device = pool.src.device
    if task == "t2i":
        x0 = torch.stack([pool.tgt[i] if use_t else pool.src[i] for (_, i, use_t) in chosen])
        states, slots = cond(prompts)
        cond_tokens, cond_shapes = [], []
    else:
        x0 = pool.tgt[idx]
        states, slots = cond(prompts, [world.render(pairs[i][0]) for i in idx])
        cond_tokens, cond_shapes = [pool.src[idx].flatten(2).transpose(1, 2)], [(GRID, GRID)]
    b = x0.shape[0]
    x0 = x0.flatten(2).transpose(1, 2)
    sigma = sample_sigmas(b, SIGMA_SHIFT).to(device)
    noise = torch.randn(x0.shape).to(device)  # drawn on the CPU: the same noise on every device for one seed
    xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    prefix = model.encode_prefix(states, slots.to(device), cond_tokens, cond_shapes)
    v = model.denoise(xt, sigma, prefix, (GRID, GRID)).float()
    mask = torch.stack([pool.weight_mask(i, task, c[2]) for c, i in zip(chosen, idx)]).to(device)
    # objects weigh more at high noise, where the prompt alone lays them out: OBJECT_WEIGHT x (0.5 + sigma)
    words = torch.stack([pool.word_mask(i, task, c[2]) for c, i in zip(chosen, idx)]).to(device)
    weight = 1 + DIT_OBJECT_WEIGHT * (0.5 + sigma[:, None]) * mask + DIT_WORD_WEIGHT * words
    return ((v - (noise - x0)).pow(2).mean(-1) * weight).sum() / weight.sum()


def object_tokens(scene: world.Scene) -> torch.Tensor:
    """`[tokens]` 1.0 where a latent token's patch holds any pixel of an object or word, else 0.0."""
    return patch_any(foreground(scene, world.render_array(scene)), SCALE)


def word_tokens(scene: world.Scene) -> torch.Tensor:
    """`[tokens]` 1.0 where a latent token's patch holds any pixel of the scene's word, else 0.0."""
    mask = np.zeros((world.CANVAS, world.CANVAS), bool)
    if scene.word is not None:
        x0, y0, patch = world.word_alpha(scene.word.text, scene.word.cell)
        mask[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]] = patch > 0
    return patch_any(mask, SCALE)


def foreground(scene: world.Scene, img: np.ndarray) -> np.ndarray:
    """`[H, W]` bool: the pixels of a render of `scene` that are not its background colour."""
    return (img != np.asarray(world.COLOURS[scene.background], np.uint8)).any(axis=-1)


# -- stage: export ----------------------------------------------------------------------------------------------
def export(work: Path, out: Path, use_ema: bool = True) -> Path:
    """Write the trained model as a diffusers-layout folder (float16 weights) at `out`, atomically."""
    state = torch.load(work / "state-dit.pt", weights_only=False)
    tokenizer = _load_or_build_tokenizer(work)
    processor = build_processor(tokenizer)
    text_encoder = build_text_encoder(tokenizer)
    dit_sd, te_sd = state["model"], state["text_encoder"]
    if use_ema:
        dit_sd = {k[4:]: v for k, v in state["ema"].items() if k.startswith("dit.")}
        te_sd = {k[3:]: v for k, v in state["ema"].items() if k.startswith("te.")}
    text_encoder.load_state_dict(te_sd)
    vae = load_vae(work)
    index = {"_class_name": "QwenImage21Pipeline", "_diffusers_version": "0.42.1",
             "processor": ["transformers", "Qwen3VLProcessor"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
             "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKLQwenImage21"], "sample_sigmas": None,
             "_qimg": {**DEFAULTS, "name": "qimg-tiny", "trained_steps": state["step"], "encoder_init": ENCODER_INIT,
                       "decoder_steps": decoder_steps(work), "seed": work_seed(work)}}
    return write_export(out, work, index, SCHEDULER, text_encoder, processor, [
        ("transformer", dit_sd, QwenImage21Config(**DIT)), ("vae", vae.state_dict(), vae.config)])


def resume_from_export(out: Path, work: Path, seed: int = SEED) -> bool:
    """Seed an empty work folder from a shipped export (weights only; optimizer state starts fresh), so training
    resumes on a machine that only has the repository. An export whose VAE is not this recipe's lends its condition
    encoder, tokenizer and transformer blocks to a run that trains every stage afresh. Returns True when it did."""
    meta = seed_vae_from_export(out, work, VAE_STEPS, DECODER_STEPS, VAE, seed)
    if meta is None:
        return _transplant(out, work, seed)
    if meta.get("encoder_init") != ENCODER_INIT:
        log(f"resumed the VAE from {out}; its transformer and encoder predate {ENCODER_INIT} and start afresh")
        return True
    dit_sd, te_sd = _export_dit_and_encoder(out, work)
    _seed_dit(work, dit_sd, te_sd, int(meta.get("trained_steps", 0)), seed)
    log(f"resumed from {out} at step {meta.get('trained_steps', 0)} (optimizer state starts fresh)")
    return True


def _export_dit_and_encoder(out: Path, work: Path) -> tuple[dict, dict]:
    dit_sd = export_weights(out / "transformer")
    te_sd = export_weights(out / "text_encoder", "model")
    te_keys = build_text_encoder(_load_or_build_tokenizer(work)).state_dict().keys()
    te_sd = {k: te_sd[k] if k in te_sd else te_sd[k.replace("lm_head", "model.language_model.embed_tokens")]
             for k in te_keys}
    return dit_sd, te_sd


def _seed_dit(work: Path, dit_sd: dict, te_sd: dict, step: int, seed: int) -> None:
    ema = {**{f"dit.{k}": v.clone() for k, v in dit_sd.items()}, **{f"te.{k}": v.clone() for k, v in te_sd.items()}}
    _save(work / "state-dit.pt", model=dit_sd, text_encoder=te_sd, opt=None, ema=ema, step=step,
          rng=random.Random(seed + 2), warm_from=step)


def _transplant(out: Path, work: Path, seed: int) -> bool:
    """For an export of another VAE (an empty work folder, a current encoder): its tokenizer, condition encoder and
    transformer blocks start this run's transformer stage at step 0; the layers that read and write latents
    (`img_in`, `proj_out`) start afresh, as every VAE stage does."""
    from qimg.loading.files import read_json

    if any((work / f).exists() for f in ("state-vae.pt", "state-dit.pt", "tokenizer.json")) or \
            not (out / "model_index.json").exists():
        return False
    meta = read_json(out / "model_index.json").get("_qimg", {})
    if meta.get("encoder_init") != ENCODER_INIT or not (out / "tokenizer-bpe.json").exists():
        return False
    (work / "tokenizer.json").write_text((out / "tokenizer-bpe.json").read_text())
    dit_sd, te_sd = _export_dit_and_encoder(out, work)
    torch.manual_seed(seed)  # as train_dit draws a fresh transformer
    fresh = QwenImage21Transformer(QwenImage21Config(**DIT))
    _init_dit(fresh)
    fresh_sd = fresh.state_dict()
    if set(dit_sd) != set(fresh_sd):
        raise ValueError(f"{out}: transformer keys differ from this recipe's: {sorted(set(dit_sd) ^ set(fresh_sd))}")
    kept = {k: v for k, v in dit_sd.items()
            if v.shape == fresh_sd[k].shape and not k.startswith(("img_in.", "proj_out."))}
    _seed_dit(work, {**fresh_sd, **kept}, te_sd, 0, seed)
    log(f"started from {out}'s condition encoder and transformer blocks ({len(kept)} of {len(fresh_sd)} tensors); "
        "its VAE is not this recipe's, so every stage trains afresh")
    return True


def default_out() -> Path:
    """Where an export goes unless told: the user's data folder, never the installed package."""
    return user_dir() / "qimg-tiny"


STAGES = ("vae", "latents", "decoder", "dit", "export")


def run(minutes: float, work: Path, out: Path | None, stages=STAGES, seed: int = SEED,
        source: Path | None = None, device: str = "cpu", batch: int = 32,
        steps: int | None = None) -> bool:
    """Run the stages in order for at most `minutes`; returns True when training is complete. One `seed` fixes the
    whole run (a work folder keeps the one it was started with). An empty work folder is seeded from the export
    at `source` (default: `out`) when there is one. Every stage trains on `device` (the transformer stage with bf16
    autocast on CUDA and `batch` scenes per step); batches are drawn on the CPU."""
    import functools

    fits = [(name, functools.partial(fit, device=device))
            for name, fit in (("vae", train_vae), ("latents", build_pool), ("decoder", refine_decoder))]
    fits.append(("dit", functools.partial(train_dit, device=device, batch=batch, steps=steps)))
    return run_stages(minutes, work, out or default_out(), stages, seed, fits, resume_from_export, export,
                      source)
