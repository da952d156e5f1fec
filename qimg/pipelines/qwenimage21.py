"""Qwen-Image 2.x: one pipeline for text-to-image and image-conditioned generation (editing)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from qimg.errors import InputError
from qimg.loading.files import read_json
from qimg.loading.weights import load_module
from qimg.models.conditioner import Qwen3VLConditioner
from qimg.models.qwenimage21 import QwenImage21Config, QwenImage21Transformer
from qimg.models.vae21 import VAE21, VAE21Config
from qimg.pipelines import images as im
from qimg.pipelines.base import (Clock, Defaults, ModelInfo, Progress, ProgressEvent, check_request, draw_noise,
                                 pick_device, pick_dtype)
from qimg.pipelines.placement import Placement, weights_home
from qimg.sampling.sample import euler
from qimg.sampling.schedule import SchedulerConfig, get_sigmas, mu_for_tokens

MAX_IMAGES = 10
MULTIPLE = 32  # sizes are floored to twice the VAE factor
DEFAULTS = Defaults(resolution=1024, steps=40, cfg=1.0)


class QwenImage21Pipeline:
    pipeline_class = "QwenImage21Pipeline"

    def __init__(self, transformer, vae, conditioner, scheduler: SchedulerConfig, *, info: ModelInfo,
                 defaults: Defaults = DEFAULTS, sample_sigmas=None, placement: Placement | None = None):
        self.transformer, self.vae, self.conditioner = transformer, vae, conditioner
        self.placement = placement or Placement(info.device)
        self.scheduler, self.info, self.defaults, self.sample_sigmas = scheduler, info, defaults, sample_sigmas

    @classmethod
    def load(cls, folder: Path, index: dict, *, dtype=None, device=None, offload=False) -> "QwenImage21Pipeline":
        device = pick_device(device)
        dtype = pick_dtype(dtype, device)
        home = weights_home(device, offload)
        tcfg = QwenImage21Config.from_dict(read_json(folder / "transformer" / "config.json"))
        vcfg = VAE21Config.from_dict(read_json(folder / "vae" / "config.json"))
        transformer = load_module(lambda: QwenImage21Transformer(tcfg), folder / "transformer", dtype=dtype,
                                  device=home)
        vae = load_module(lambda: VAE21(vcfg), folder / "vae", dtype=dtype, device=device)
        conditioner = Qwen3VLConditioner.load(folder, dtype=dtype, device=home)
        scheduler = SchedulerConfig.from_dict(read_json(folder / "scheduler" / "scheduler_config.json"))
        placement = Placement.of_pipeline(device, home != device, conditioner, transformer)
        return cls(transformer, vae, conditioner, scheduler,
                   info=ModelInfo(folder, cls.pipeline_class, dtype, device),
                   defaults=Defaults.read(index, DEFAULTS), sample_sigmas=index.get("sample_sigmas"),
                   placement=placement)

    # -- the public call -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt: str, *, images=None, width: int | None = None, height: int | None = None,
                 resolution: int | None = None, steps: int | None = None, seed: int | None = None,
                 negative_prompt: str | None = None, cfg: float | None = None, sigmas=None, n: int = 1,
                 progress: Progress | None = None, background: str | None = None, use_kv_cache: bool = True,
                 should_stop=None) -> list[Image.Image]:
        """Text-to-image (no `images`) or image-conditioned generation (1-10 `images`); returns `n` PIL images.

        Each returned image carries its parameters in `image.info["qimg"]` (a dict).
        """
        req = check_request(prompt, images, width=width, height=height, resolution=resolution, steps=steps,
                            seed=seed, negative_prompt=negative_prompt, cfg=cfg, n=n, background=background,
                            defaults=self.defaults, multiple=MULTIPLE, check_images=self._check_images)
        prompt, images, width, height, resolution = req.prompt, req.images, req.width, req.height, req.resolution
        steps, cfg, negative_prompt, generator, seed = req.steps, req.cfg, req.negative_prompt, req.generator, req.seed
        clock = Clock()
        report = progress or (lambda event: None)

        # condition images: one copy per image at about resolution^2 pixels, for the VLM and for the VAE
        sized = [img.resize(im.fit_area(resolution * resolution, img.width / img.height), Image.LANCZOS)
                 for img in images]
        report(ProgressEvent("encode", 0, 1, clock()))
        self.placement.use(self.conditioner.encoder)
        cond = self.conditioner.encode(prompt, sized)
        neg = self.conditioner.encode(negative_prompt, sized) if cfg > 1 else None
        cond_tokens, cond_shapes = self._encode_images(sized, n)
        report(ProgressEvent("encode", 1, 1, clock()))

        h, w = height // self.vae.scale_factor, width // self.vae.scale_factor
        dtype = self.info.dtype
        noise = draw_noise((n, 1, self.transformer.cfg.in_channels, h, w), generator, dtype)
        x = im.pack(noise[:, 0]).to(self.info.device)
        grid = self.sample_sigmas if sigmas is None else sigmas
        schedule = get_sigmas(self.scheduler, steps=None if grid is not None else steps, sigmas=grid,
                              mu=mu_for_tokens(self.scheduler, h * w))
        sigma_t = torch.from_numpy(schedule).to(self.info.device)

        self.placement.use(self.transformer)
        velocity = self._velocity(cond, cond_tokens, cond_shapes, (h, w), n, use_kv_cache)
        uncond = self._velocity(neg, cond_tokens, cond_shapes, (h, w), n, use_kv_cache) if neg else None

        def on_step(step, total, latents, denoised):
            report(ProgressEvent("denoise", step, total, clock(), latents,
                                 preview=lambda: self.decode(denoised[:1], h, w, background)[0]))

        x = euler(velocity, x, sigma_t, uncond=uncond, cfg=cfg, progress=on_step, should_stop=should_stop)
        report(ProgressEvent("decode", 0, 1, clock()))
        out = self.decode(x, h, w, background)
        report(ProgressEvent("decode", 1, 1, clock()))
        params = {"model": str(self.info.folder), "pipeline": self.pipeline_class, "prompt": prompt,
                  "negative_prompt": negative_prompt, "width": width, "height": height, "steps": len(schedule) - 1,
                  "seed": seed, "cfg": cfg, "images": len(images), "dtype": str(dtype).replace("torch.", ""),
                  "sigmas": [round(float(s), 6) for s in schedule[:-1]] if sigmas is not None else None,
                  "seconds": round(clock(), 3)}
        for i, img in enumerate(out):
            img.info["qimg"] = {**params, "index": i}
        return out

    # -- pieces ----------------------------------------------------------------------------------------------
    @staticmethod
    def _check_images(images: list) -> None:
        if len(images) > MAX_IMAGES:
            raise InputError(f"{len(images)} condition images given; the limit is {MAX_IMAGES}")

    def _encode_images(self, sized: list[Image.Image], n: int):
        tokens, shapes = [], []
        for img in sized:
            pixels = im.to_tensor(img, self.vae.image_channels).to(self.info.device, self.info.dtype)
            z = self.vae.normalize(self.vae.encode(pixels, tile="auto"))
            tokens.append(im.pack(z).expand(n, -1, -1))
            shapes.append(tuple(z.shape[-2:]))
        return tokens, shapes

    def _velocity(self, cond, cond_tokens, cond_shapes, shape, n, use_kv_cache: bool):
        model = self.transformer
        states = cond.states.to(self.info.device, self.info.dtype).expand(n, -1, -1)
        slots = cond.slot_mask.to(self.info.device)

        def prefix_for(sigma):
            return model.encode_prefix(states, slots, cond_tokens, cond_shapes, None, sigma)

        if model.cfg.causal_condition and use_kv_cache:
            prefix = prefix_for(None)
            freqs = model.target_rope(prefix, shape)
            return lambda x, sigma: model.denoise(x, sigma, prefix, shape, freqs)
        return lambda x, sigma: model.denoise(x, sigma, prefix_for(sigma), shape)

    def decode(self, tokens: torch.Tensor, h: int, w: int, background: str | None = None) -> list[Image.Image]:
        latents = self.vae.denormalize(im.unpack(tokens.to(self.info.dtype), h, w))
        out = im.to_pil(self.vae.decode(latents, tile="auto"))
        return [im.flatten(img) for img in out] if background == "opaque" else out

    def describe(self) -> dict:
        return {"pipeline": self.pipeline_class, "folder": str(self.info.folder), "dtype": str(self.info.dtype),
                "device": str(self.info.device), "offload": self.placement.offload,
                "default_resolution": self.defaults.resolution, "default_steps": self.defaults.steps,
                "default_cfg": self.defaults.cfg,
                "default_edit_cfg": self.defaults.cfg_for(True), "default_edit_steps": self.defaults.steps_for(True),
                "tasks": ["generate", "edit"]}
