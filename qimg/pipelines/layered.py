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

import dataclasses
import math

import numpy as np
import torch
from PIL import Image

from qimg.errors import CheckpointError, InputError
from qimg.export import composite
from qimg.imaging import fit_area
from qimg.models.latents import pack, unpack
from qimg.options import LayersOptions
from qimg.pipelines.base import Defaults
from qimg.pipelines.pipeline import Conditioning, Pipeline, Plan
from qimg.pipelines.qwenimage import PATCH, V1Parts

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


class QwenImageLayeredPipeline(V1Parts, Pipeline):
    pipeline_class = "QwenImageLayeredPipeline"
    tasks = ("layers",)
    needs_processor = True
    image_channels = 4
    default_config = DEFAULTS

    @classmethod
    def check_configs(cls, tcfg, vcfg, folder):
        super().check_configs(tcfg, vcfg, folder)
        if not (tcfg.use_layer3d_rope and tcfg.use_additional_t_cond):
            raise CheckpointError(f"{folder}: a Layered transformer needs use_layer3d_rope and use_additional_t_cond")

    def describe(self) -> dict:
        return {**super().describe(), "max_images": 1, "layers": [MIN_LAYERS, MAX_LAYERS], "resolutions": list(BUCKETS)}

    @torch.inference_mode()
    def layers(self, image, **options) -> list[Image.Image]:
        """Decompose `image` into `layers` (2-10) RGBA layers, bottom to top, each of the size the input takes at
        about `resolution`^2 pixels (640 or 1024; smaller multiples of 32 for tests and previews). The keywords are
        `LayersOptions`' fields (or pass one `LayersOptions` as `image`).

        `prompt`: a description of the image (None or blank: the VLM captions it, in `caption_language` "en" or
        "zh"). `recurse=i`: decompose returned layer i again with the same settings and return the stack with it
        replaced by its sub-layers (`layers - 1 + layers` layers). Each layer carries its parameters in
        `layer.info["qimg"]`.
        """
        if isinstance(image, LayersOptions):
            if options:
                raise TypeError("pass either a LayersOptions or keyword options, not both")
            opts = image
        else:
            opts = LayersOptions(image=image, **options)
        plan = self.plan(opts)
        out = self.run(plan)
        if opts.recurse is not None:
            sub = self.run(dataclasses.replace(plan, images=[out[opts.recurse]]))
            out = out[:opts.recurse] + sub + out[opts.recurse + 1:]
        for i, layer in enumerate(out):
            layer.info["qimg"] = {**layer.info.get("qimg", {}), "index": i, "of": len(out), "recurse": opts.recurse,
                                  "seconds": round(plan.clock(), 3)}
        return out

    def plan(self, options: LayersOptions) -> Plan:
        image = options.image
        resolution = check_resolution(self.defaults.resolution if options.resolution is None else options.resolution)
        width, height = fit_area(resolution * resolution, image.width / image.height)
        if width < 32 or height < 32:
            raise InputError(f"a {image.width}x{image.height} image at resolution {resolution} would be "
                             f"{width}x{height}; its aspect ratio is too extreme")
        return self.settle(options, editing=False, prompt=options.prompt, images=[image], width=width,
                           height=height, extra={"layers": options.layers})

    def default_grid(self, steps: int) -> tuple[float, ...]:
        return tuple(np.linspace(1.0, 0.0, steps + 1)[:-1].tolist())

    def frames(self, plan: Plan) -> int:
        return plan.extra["layers"] + 1  # frame 0: the whole picture

    # -- hooks ---------------------------------------------------------------------------------------------------
    def encode(self, plan: Plan) -> Conditioning:
        cond_image = plan.images[0].convert("RGBA").resize((plan.width, plan.height), Image.LANCZOS)
        prompt = plan.prompt
        if prompt is None or not prompt.strip():
            prompt = self.conditioner.caption(cond_image, plan.options.caption_language)
        cond = self.conditioner.encode_text(prompt)
        neg = self.conditioner.encode_text(plan.negative_prompt) if plan.guided else None
        return Conditioning(cond, neg, prompt, self.encode_image(cond_image))

    def noise_shape(self, plan: Plan) -> tuple[int, ...]:
        return (1, self.frames(plan), self.vae.z_dim, *self.latent_grid(plan))

    def tokens(self, plan: Plan, noise: torch.Tensor) -> torch.Tensor:
        return pack(noise[0], PATCH).reshape(1, -1, self.transformer.cfg.in_channels)

    def mu(self, plan: Plan, cond: Conditioning, x: torch.Tensor) -> float:
        cond_tokens, _ = cond.extra
        return math.sqrt(cond_tokens.shape[1] / BASE_TOKENS)

    def velocity(self, plan: Plan, condition, extra):
        cond_tokens, cond_shape = extra
        h, w = self.latent_grid(plan)
        shapes = [(1, h // PATCH, w // PATCH)] * self.frames(plan) + [cond_shape]
        flag = torch.zeros(1, dtype=torch.long, device=self.info.device)
        return self.reference_velocity(condition, [cond_tokens], shapes, 1, flag)

    def decode(self, plan: Plan, tokens: torch.Tensor) -> list[Image.Image]:
        """Packed `[1, frames * S, C]` -> the RGBA layers (frames 1..L; frame 0, the composite, is dropped)."""
        per_frame = tokens.reshape(self.frames(plan), -1, tokens.shape[-1])
        return self.decode_latents(unpack(per_frame[1:], *self.latent_grid(plan), PATCH))

    def preview(self, plan: Plan, denoised: torch.Tensor) -> Image.Image:
        return composite(self.decode(plan, denoised))

    def extra_parameters(self, plan: Plan) -> dict:
        return {"layers": plan.extra["layers"], "cfg_normalize": plan.cfg_normalize}
