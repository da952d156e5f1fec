"""Qwen-Image 2.x: one pipeline for text-to-image and image-conditioned generation (editing).

The Qwen3-VL encoder reads the prompt with the condition images (each resized to about resolution^2 pixels); the
transformer reads the same images' VAE latents in the encoder's image slots. Its text + condition prefix is
modulated at t=0, so its keys and values are computed once per branch and reused at every step (the KV cache).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from qimg.errors import InputError
from qimg.imaging import fit_area, flatten, to_pil, to_tensor
from qimg.models.conditioner import Qwen3VLConditioner
from qimg.models.latents import pack, unpack
from qimg.models.qwenimage21 import QwenImage21Config, QwenImage21Transformer, stack_prefixes
from qimg.models.vae21 import VAE21, VAE21Config
from qimg.options import GenerateOptions
from qimg.pipelines.base import Defaults
from qimg.pipelines.generation import ImagePipeline
from qimg.pipelines.pipeline import Conditioning, Plan
from qimg.sampling.schedule import mu_for_tokens

MAX_IMAGES = 10
MULTIPLE = 32  # sizes are floored to twice the VAE factor
DEFAULTS = Defaults(resolution=1024, steps=40, cfg=1.0)


class QwenImage21Pipeline(ImagePipeline):
    pipeline_class = "QwenImage21Pipeline"
    family = "2.x"
    tasks = ("generate", "edit")
    transformer_types = (QwenImage21Config, QwenImage21Transformer)
    vae_types = (VAE21Config, VAE21)
    default_config = DEFAULTS
    multiple = MULTIPLE
    max_images = MAX_IMAGES

    @classmethod
    def load_conditioner(cls, folder: Path, index: dict, *, dtype, device, file=None):
        return Qwen3VLConditioner.load(folder, dtype=dtype, device=device, file=file)

    def check_images(self, images):
        if len(images) > MAX_IMAGES:
            raise InputError(f"{len(images)} condition images given; the limit is {MAX_IMAGES}")

    def plan_extra(self, options: GenerateOptions) -> dict:
        for name in ("vae_image_area", "vlm_image_area"):
            if getattr(options, name) is not None:
                raise InputError(f"{name} applies to Qwen-Image v1 Edit models; Qwen-Image 2.x reads condition "
                                 f"images at about resolution^2 pixels (set resolution instead)")
        return {"kv_cache": options.use_kv_cache}

    def describe(self) -> dict:
        return {**super().describe(), "max_images": MAX_IMAGES}

    # -- hooks ---------------------------------------------------------------------------------------------------
    def encode(self, plan: Plan) -> Conditioning:
        area = plan.extra["resolution"] ** 2
        sized = [img.resize(fit_area(area, img.width / img.height), Image.LANCZOS) for img in plan.images]
        cond = self.condition(plan.prompt, sized)
        neg = self.condition(plan.negative_prompt, sized) if plan.guided else None
        tokens, shapes = [], []
        for img in sized:
            pixels = to_tensor(img, self.vae.image_channels).to(self.info.device, self.info.dtype)
            z = self.vae.normalize(self.vae.encode(pixels, tile="auto"))
            tokens.append(pack(z).expand(plan.n, -1, -1))
            shapes.append(tuple(z.shape[-2:]))
        return Conditioning(cond, neg, plan.prompt, (tokens, shapes))

    def latent_grid(self, plan: Plan) -> tuple[int, int]:
        return plan.height // self.vae.scale_factor, plan.width // self.vae.scale_factor

    def noise_shape(self, plan: Plan) -> tuple[int, ...]:
        return (plan.n, 1, self.transformer.cfg.in_channels, *self.latent_grid(plan))

    def tokens(self, plan: Plan, noise: torch.Tensor) -> torch.Tensor:
        return pack(noise[:, 0])

    def mu(self, plan: Plan, cond: Conditioning, x: torch.Tensor) -> float:
        h, w = self.latent_grid(plan)
        return mu_for_tokens(plan.scheduler, h * w)

    def velocity(self, plan: Plan, condition, extra):
        cond_tokens, cond_shapes = extra
        model, shape = self.transformer, self.latent_grid(plan)
        states = condition.states.to(self.info.device, self.info.dtype).expand(plan.n, -1, -1)
        slots = condition.slot_mask.to(self.info.device)

        def prefix_for(sigma):
            return model.encode_prefix(states, slots, cond_tokens, cond_shapes, None, sigma)

        if model.cfg.causal_condition and plan.extra["kv_cache"]:
            prefix = prefix_for(None)
            freqs = model.target_rope(prefix, shape)
            return lambda x, sigma, block_hook=None: model.denoise(x, sigma, prefix, shape, freqs, block_hook)
        return lambda x, sigma, block_hook=None: model.denoise(x, sigma, prefix_for(sigma), shape,
                                                               block_hook=block_hook)

    def batchable(self, plan: Plan) -> bool:
        """Requests share a batch through their cached prefixes (a t=0 prefix, the KV cache on)."""
        return self.transformer.cfg.causal_condition and plan.extra["kv_cache"]

    def velocity_batch(self, plans: list[Plan], conditions: list, extras: list):
        """One guidance branch of several requests: each request's prefix computed as when it runs alone (its
        prompt, its condition images), stacked (`stack_prefixes`), and the targets denoised together."""
        model, shape = self.transformer, self.latent_grid(plans[0])
        prefixes, shared = [], {}
        for plan, condition, (cond_tokens, cond_shapes) in zip(plans, conditions, extras):
            key = (id(condition), plan.n) if not cond_shapes else None  # one text prompt several requests share
            if key is None or key not in shared:
                states = condition.states.to(self.info.device, self.info.dtype).expand(plan.n, -1, -1)
                prefix = model.encode_prefix(states, condition.slot_mask.to(self.info.device), cond_tokens,
                                             cond_shapes, None, None)
                if key is not None:
                    shared[key] = prefix
            prefixes.append(shared.get(key) or prefix)
        prefix = stack_prefixes(prefixes)
        freqs = model.target_rope(prefix, shape)
        return lambda x, sigma, block_hook=None: model.denoise(x, sigma, prefix, shape, freqs, block_hook)

    def decode(self, plan: Plan, tokens: torch.Tensor) -> list[Image.Image]:
        latents = self.vae.denormalize(unpack(tokens.to(self.info.dtype), *self.latent_grid(plan)))
        out = to_pil(self.vae.decode(latents, tile="auto"))
        return [flatten(img) for img in out] if plan.extra["background"] == "opaque" else out
