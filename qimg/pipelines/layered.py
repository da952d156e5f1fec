"""Qwen-Image-Layered: one RGBA image -> a stack of RGBA layers, bottom to top.

The transformer denoises L+1 frames of the input's size at once (frame 0 the whole picture, frames 1..L the layers),
reading the VAE latents of the input (RGBA VAE) appended as a last image entry at RoPE frame -1, with a flag embedding
(0) added to the time embedding. The composite frame is discarded and each layer is decoded with the RGBA VAE. The
order is the reference's output order, which its demo app stacks first-at-the-bottom (and which `qimg.export`
expects): index 0 is the bottom layer (usually the background), the last index the top.

Schedule: `linspace(1, 0, steps + 1)[:-1]` shifted by mu = sqrt(S_cond / 256), S_cond the input's token count, with
the time shift of the checkpoint's scheduler config (linear for the released model). Guidance: true CFG, rescaled to
the conditional norm only with `cfg_normalize`. With no prompt the VLM writes a caption of the input first.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from qimg.errors import CheckpointError, InputError
from qimg.export import composite
from qimg.pipelines import images as im
from qimg.pipelines.base import (Clock, Defaults, Progress, ProgressEvent, check_steps, draw_noise,
                                 make_generator)
from qimg.pipelines.qwenimage import PATCH, QwenImageV1Pipeline
from qimg.sampling.sample import euler
from qimg.sampling.schedule import get_sigmas

MIN_LAYERS, MAX_LAYERS = 2, 10
BUCKETS = (640, 1024)  # the released model's training resolutions; 640 is recommended
MIN_RESOLUTION, MAX_RESOLUTION = 64, 1024
BASE_TOKENS = 256  # mu = sqrt(condition tokens / 256)
DEFAULTS = Defaults(resolution=640, steps=50, cfg=4.0)


def check_resolution(resolution) -> int:
    ok = (isinstance(resolution, int) and not isinstance(resolution, bool) and resolution % 32 == 0
          and MIN_RESOLUTION <= resolution <= MAX_RESOLUTION)
    if not ok:
        raise InputError(f"resolution must be {BUCKETS[0]} or {BUCKETS[1]} (the model's buckets) or a multiple of 32 "
                         f"from {MIN_RESOLUTION} to {MAX_RESOLUTION}, got {resolution!r}")
    return resolution


class QwenImageLayeredPipeline(QwenImageV1Pipeline):
    pipeline_class = "QwenImageLayeredPipeline"
    tasks = ["layers"]
    max_images = 1
    needs_processor = True
    image_channels = 4
    default_config = DEFAULTS

    @classmethod
    def check_configs(cls, tcfg, vcfg, folder):
        super().check_configs(tcfg, vcfg, folder)
        if not (tcfg.use_layer3d_rope and tcfg.use_additional_t_cond):
            raise CheckpointError(f"{folder}: a Layered transformer needs use_layer3d_rope and use_additional_t_cond")

    def generate(self, prompt=None, **kwargs):
        raise InputError(f"this model ({self.pipeline_class}) splits an image into layers; it does not generate "
                         f"images: use layers() (or `qimg layers IMAGE -o OUT.psd`)")

    @torch.inference_mode()
    def layers(self, image, *, layers: int = 4, resolution: int | None = None, prompt: str | None = None,
               steps: int | None = None, seed: int | None = None, cfg: float | None = None,
               negative_prompt: str | None = None, cfg_normalize: bool = False, recurse: int | None = None,
               progress: Progress | None = None, should_stop=None, sigmas=None,
               caption_language: str = "en") -> list[Image.Image]:
        """Decompose `image` into `layers` (2-10) RGBA layers, bottom to top, each of the size the input takes at
        about `resolution`^2 pixels (640 or 1024; smaller multiples of 32 for tests and previews).

        `prompt`: a description of the image (None or blank: the VLM captions it, in `caption_language` "en" or
        "zh"). `recurse=i`: decompose returned layer i again with the same settings and return the stack with it
        replaced by its sub-layers (`layers - 1 + layers` layers). Each layer carries its parameters in
        `layer.info["qimg"]`.
        """
        image = im.check_image(image)
        if not isinstance(layers, int) or isinstance(layers, bool) or not MIN_LAYERS <= layers <= MAX_LAYERS:
            raise InputError(f"layers must be an integer from {MIN_LAYERS} to {MAX_LAYERS}, got {layers!r}")
        if recurse is not None and (not isinstance(recurse, int) or isinstance(recurse, bool)
                                    or not 0 <= recurse < layers):
            raise InputError(f"recurse must be the index of a returned layer, 0 to {layers - 1}, got {recurse!r}")
        if prompt is not None and not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        if caption_language not in ("en", "zh"):
            raise InputError(f"caption_language must be 'en' or 'zh', got {caption_language!r}")
        resolution = check_resolution(self.defaults.resolution if resolution is None else resolution)
        width, height = im.fit_area(resolution * resolution, image.width / image.height)
        if width < 32 or height < 32:
            raise InputError(f"a {image.width}x{image.height} image at resolution {resolution} would be "
                             f"{width}x{height}; its aspect ratio is too extreme")
        steps = check_steps(self.defaults.steps if steps is None else steps)
        cfg = self.defaults.cfg if cfg is None else float(cfg)
        if cfg > 1 and negative_prompt is None:
            negative_prompt = " "
        _, seed = make_generator(seed)  # validates, and picks a seed shared by a recursive pass
        settings = dict(layers=layers, width=width, height=height, prompt=prompt, steps=steps, seed=seed, cfg=cfg,
                        negative_prompt=negative_prompt, cfg_normalize=bool(cfg_normalize), sigmas=sigmas,
                        caption_language=caption_language)
        clock = Clock()
        report = progress or (lambda event: None)
        out = self._decompose(image, clock, report, should_stop, **settings)
        if recurse is not None:
            sub = self._decompose(out[recurse], clock, report, should_stop, **settings)
            out = out[:recurse] + sub + out[recurse + 1:]
        for i, layer in enumerate(out):
            layer.info["qimg"] = {**layer.info.get("qimg", {}), "index": i, "of": len(out), "recurse": recurse,
                                  "seconds": round(clock(), 3)}
        return out

    def _decompose(self, image: Image.Image, clock: Clock, report, should_stop, *, layers: int, width: int,
                   height: int, prompt, steps: int, seed: int, cfg: float, negative_prompt, cfg_normalize: bool,
                   sigmas, caption_language: str) -> list[Image.Image]:
        generator, _ = make_generator(seed)
        cond_image = image.convert("RGBA").resize((width, height), Image.LANCZOS)
        report(ProgressEvent("encode", 0, 1, clock()))
        self.placement.use(self.conditioner.encoder)
        if prompt is None or not prompt.strip():
            prompt = self.conditioner.caption(cond_image, caption_language)
        cond = self.conditioner.encode_text(prompt)
        neg = self.conditioner.encode_text(negative_prompt) if cfg > 1 else None
        cond_tokens, cond_shape = self.encode_image(cond_image)
        report(ProgressEvent("encode", 1, 1, clock()))

        h, w = height // self.vae.scale_factor, width // self.vae.scale_factor
        frames = layers + 1  # frame 0: the whole picture
        noise = draw_noise((1, frames, self.vae.z_dim, h, w), generator, self.info.dtype)
        x = im.pack(noise[0], PATCH).reshape(1, -1, self.transformer.cfg.in_channels).to(self.info.device)
        shapes = [(1, h // PATCH, w // PATCH)] * frames + [cond_shape]
        grid = np.linspace(1.0, 0.0, steps + 1)[:-1] if sigmas is None else sigmas
        mu = math.sqrt(cond_tokens.shape[1] / BASE_TOKENS)
        schedule = get_sigmas(self.scheduler, sigmas=grid, mu=mu)
        sigma_t = torch.from_numpy(schedule).to(self.info.device)
        flag = torch.zeros(1, dtype=torch.long, device=self.info.device)
        self.placement.use(self.transformer)
        velocity = self.velocity(cond, [cond_tokens], shapes, 1, flag)
        uncond = self.velocity(neg, [cond_tokens], shapes, 1, flag) if neg is not None else None

        def on_step(step, total, latents, denoised):
            report(ProgressEvent("denoise", step, total, clock(), latents,
                                 preview=lambda: composite(self._decode_layers(denoised, frames, h, w))))

        x = euler(velocity, x, sigma_t, uncond=uncond, cfg=cfg, renorm=cfg_normalize, progress=on_step,
                  should_stop=should_stop)
        report(ProgressEvent("decode", 0, 1, clock()))
        out = self._decode_layers(x, frames, h, w)
        report(ProgressEvent("decode", 1, 1, clock()))
        params = {"model": str(self.info.folder), "pipeline": self.pipeline_class, "prompt": prompt,
                  "negative_prompt": negative_prompt if cfg > 1 else None, "width": width, "height": height,
                  "layers": layers, "steps": len(schedule) - 1, "seed": seed, "cfg": cfg,
                  "cfg_normalize": cfg_normalize, "dtype": str(self.info.dtype).replace("torch.", "")}
        for layer in out:
            layer.info["qimg"] = dict(params)
        return out

    def _decode_layers(self, tokens: torch.Tensor, frames: int, h: int, w: int) -> list[Image.Image]:
        """Packed `[1, frames * S, C]` -> the RGBA layers (frames 1..L; frame 0, the composite, is dropped)."""
        per_frame = tokens.reshape(frames, -1, tokens.shape[-1])
        return self.decode_latents(im.unpack(per_frame[1:], h, w, PATCH))

    def describe(self) -> dict:
        return {**super().describe(), "layers": [MIN_LAYERS, MAX_LAYERS], "resolutions": list(BUCKETS)}
