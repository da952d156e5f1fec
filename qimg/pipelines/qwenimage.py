"""Qwen-Image v1 family: text-to-image (Qwen-Image, 2512), Edit (2508) and Edit-Plus (2509/2511).

All share the dual-stream transformer on 2x2-packed latents of the 8x VAE (16 px per token), the Qwen2.5-VL condition
encoder, the exponential-shift flow-matching schedule with mu from the target token count, and true CFG whose result is
rescaled per token to the conditional prediction's norm. Edit variants append the VAE latents of their reference
images after the noisy target tokens; Edit-2511 (`zero_cond_t`) modulates those tokens at t=0. Layered builds on the
same pieces (`qimg.pipelines.layered`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from qimg.errors import CheckpointError, InputError
from qimg.imaging import fit_area, flatten, to_pil, to_tensor
from qimg.models.conditioner import Condition, Qwen25VLConditioner
from qimg.models.latents import pack, unpack
from qimg.models.qwenimage import QwenImageConfig, QwenImageTransformer
from qimg.models.vae import VAE, VAEConfig
from qimg.options import GenerateOptions
from qimg.pipelines.base import Defaults
from qimg.pipelines.generation import ImagePipeline
from qimg.pipelines.pipeline import Conditioning, Plan
from qimg.sampling.schedule import mu_for_tokens

PATCH = 2  # latent cells per token side
MULTIPLE = 16  # output sizes are floored to the VAE factor times the patch, as the reference does
VAE_IMAGE_AREA = 1024 * 1024  # reference images are VAE-encoded at about this many pixels (EditPlus VAE_IMAGE_SIZE)
VLM_IMAGE_AREA = 384 * 384  # Edit-Plus shows each reference image to the VLM at about this (CONDITION_IMAGE_SIZE)
# The reference's defaults are 50 steps and true_cfg_scale 4 (guidance only runs with a negative prompt there);
# qimg turns guidance on with the negative prompt " " the model cards use whenever cfg > 1.
DEFAULTS = Defaults(resolution=1024, steps=50, cfg=4.0)


def rgb(image: Image.Image) -> Image.Image:
    """What the RGB models see: transparency composited on white, any mode as RGB."""
    return flatten(image.convert("RGBA")) if image.mode in ("RGBA", "LA", "P") else image.convert("RGB")


def resize_to_area(image: Image.Image, area: int) -> Image.Image:
    """`image` at about `area` pixels, aspect kept, sides multiples of 32 (the reference's `calculate_dimensions`),
    resampled with Lanczos as the reference's image processor does."""
    width, height = fit_area(area, image.width / image.height)
    if width < 32 or height < 32:
        raise InputError(f"an image of {image.width}x{image.height} at about {area} pixels would be {width}x{height}; "
                         f"its aspect ratio is too extreme")
    return image.resize((width, height), Image.LANCZOS)


class V1Parts:
    """What every v1-family pipeline shares, Layered included: the dual-stream transformer on 2x2-packed latents of
    the 8x VAE, the Qwen2.5-VL encoder, reference latents appended to the image tokens, per-image decoding."""

    family = "v1"
    transformer_types = (QwenImageConfig, QwenImageTransformer)
    vae_types = (VAEConfig, VAE)
    needs_processor = False
    image_channels = 3

    @classmethod
    def load_conditioner(cls, folder: Path, index: dict, *, dtype, device, file=None):
        processor = None
        if cls.needs_processor:
            entry = index.get("processor")
            processor = entry[1] if isinstance(entry, list) and len(entry) == 2 else "Qwen2VLProcessor"
        return Qwen25VLConditioner.load(folder, dtype=dtype, device=device, processor=processor, file=file)

    @classmethod
    def check_configs(cls, tcfg: QwenImageConfig, vcfg: VAEConfig, folder: Path) -> None:
        if tcfg.patch_size != PATCH or tcfg.in_channels != PATCH * PATCH * vcfg.z_dim:
            raise CheckpointError(f"{folder}: transformer patch_size {tcfg.patch_size} / in_channels "
                                  f"{tcfg.in_channels} do not fit 2x2 patches of the VAE's {vcfg.z_dim} channels")
        if (tcfg.out_channels or tcfg.in_channels) != vcfg.z_dim:
            raise CheckpointError(f"{folder}: transformer out_channels {tcfg.out_channels} != VAE z_dim {vcfg.z_dim}")
        if vcfg.input_channels != cls.image_channels:
            raise CheckpointError(f"{folder}: {cls.pipeline_class} needs a VAE with {cls.image_channels} image "
                                  f"channels, this one has {vcfg.input_channels}")
        if 2 ** len(vcfg.temperal_downsample) * PATCH != MULTIPLE:
            raise CheckpointError(f"{folder}: the VAE must downsample 8x (3 stages), got {vcfg.temperal_downsample}")

    def latent_grid(self, plan: Plan) -> tuple[int, int]:
        return plan.height // self.vae.scale_factor, plan.width // self.vae.scale_factor

    def encode_image(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """A (resized) image -> normalised, packed posterior-mean latents `[1, S, 4z]` and its patch grid."""
        pixels = to_tensor(image, self.vae.image_channels).to(self.info.device, self.info.dtype)
        z = self.vae.normalize(self.vae.encode(pixels, tile="auto"))
        return pack(z, PATCH), (1, z.shape[-2] // PATCH, z.shape[-1] // PATCH)

    def reference_velocity(self, cond: Condition, ref_tokens: list[torch.Tensor], shapes, n: int, flag=None):
        """`(x, sigma, block_hook=None) -> v` for the target tokens, with the reference tokens appended to the
        sequence; `shapes` lists the target's patch grid(s) then the references'."""
        model = self.transformer
        states = cond.states.to(self.info.device, self.info.dtype).expand(n, -1, -1)
        freqs = model.rope(shapes, states.shape[1], self.info.device)
        refs = torch.cat(ref_tokens, dim=1).expand(n, -1, -1) if ref_tokens else None

        def velocity(x, sigma, block_hook=None):
            tokens = x if refs is None else torch.cat([x, refs], dim=1)
            return model(tokens, states, sigma, shapes, additional_t_cond=flag, freqs=freqs,
                         block_hook=block_hook)[:, : x.shape[1]]

        return velocity

    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """Normalised latents `[B, z, h, w]` -> PIL images, one VAE call per image (bounded memory)."""
        out = []
        for z in latents.to(self.info.dtype).split(1):
            out += to_pil(self.vae.decode(self.vae.denormalize(z), tile="auto"))
        return out


class QwenImageV1Pipeline(V1Parts, ImagePipeline):
    """Text-to-image and editing on the v1 transformer; a variant overrides `conditioning` and the image rules."""

    pipeline_class = "QwenImagePipeline"
    tasks = ("generate",)
    max_images = 0
    multiple = MULTIPLE
    default_config = DEFAULTS
    cfg_normalize_default = True  # the reference rescales guided predictions to the conditional norm

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.vae_image_area, self.vlm_image_area = VAE_IMAGE_AREA, VLM_IMAGE_AREA

    def describe(self) -> dict:
        return {**super().describe(), "max_images": self.max_images}

    def check_images(self, images: list[Image.Image]) -> None:
        """The number of condition images against `max_images` (0: text-to-image only; else edits need 1+)."""
        if not self.max_images and images:
            raise InputError(f"this model ({self.pipeline_class}) does text-to-image only; it takes no condition "
                             f"images (got {len(images)})")
        if self.max_images and not images:
            wanted = "an image: give exactly 1 image" if self.max_images == 1 else \
                f"images: give 1 to {self.max_images} images"
            raise InputError(f"this model ({self.pipeline_class}) edits {wanted} (text-to-image needs a "
                             f"text-to-image model)")
        if len(images) > self.max_images:
            raise InputError(f"{len(images)} condition images given; the limit is {self.max_images}")

    def size_image(self, images: list[Image.Image]) -> Image.Image:
        return images[0]

    def plan_extra(self, options: GenerateOptions) -> dict:
        vae_area = self.vae_image_area if options.vae_image_area is None else options.vae_image_area
        return {"vae_area": vae_area, "vlm_area": options.vlm_image_area}  # vlm None: the variant's own choice

    def conditioning(self, images: list[Image.Image], vae_area: int, vlm_area: int | None):
        """-> (prompt -> Condition, [(reference tokens [1, S, C], (1, h, w)), ...])."""
        return self.conditioner.encode_text, []

    # -- hooks ---------------------------------------------------------------------------------------------------
    def encode(self, plan: Plan) -> Conditioning:
        encode, refs = self.conditioning(plan.images, plan.extra["vae_area"], plan.extra["vlm_area"])
        cond = encode(plan.prompt)
        neg = encode(plan.negative_prompt) if plan.guided else None
        return Conditioning(cond, neg, plan.prompt, refs)

    def noise_shape(self, plan: Plan) -> tuple[int, ...]:
        return (plan.n, 1, self.vae.z_dim, *self.latent_grid(plan))

    def tokens(self, plan: Plan, noise: torch.Tensor) -> torch.Tensor:
        return pack(noise[:, 0], PATCH)

    def mu(self, plan: Plan, cond: Conditioning, x: torch.Tensor) -> float:
        return mu_for_tokens(plan.scheduler, x.shape[1])

    def velocity(self, plan: Plan, condition, extra):
        h, w = self.latent_grid(plan)
        shapes = [(1, h // PATCH, w // PATCH)] + [shape for _, shape in extra]
        return self.reference_velocity(condition, [tokens for tokens, _ in extra], shapes, plan.n)

    def decode(self, plan: Plan, tokens: torch.Tensor) -> list[Image.Image]:
        return self.decode_latents(unpack(tokens, *self.latent_grid(plan), PATCH))


class QwenImagePipeline(QwenImageV1Pipeline):
    """Text-to-image: Qwen-Image and Qwen-Image-2512."""


class QwenImageEditPipeline(QwenImageV1Pipeline):
    """Qwen-Image-Edit (2508): one image, VAE-encoded at about 1024^2 pixels; the VLM sees that same copy."""

    pipeline_class = "QwenImageEditPipeline"
    tasks = ("edit",)
    max_images = 1
    needs_processor = True

    def conditioning(self, images, vae_area, vlm_area):
        image = rgb(images[0])
        vae_copy = resize_to_area(image, vae_area)
        # the VLM reads the VAE-sized copy unless another area was asked for
        vlm_copy = vae_copy if vlm_area is None else resize_to_area(image, vlm_area)
        return (lambda prompt: self.conditioner.encode_edit(prompt, [vlm_copy], plus=False),
                [self.encode_image(vae_copy)])


class QwenImageEditPlusPipeline(QwenImageV1Pipeline):
    """Qwen-Image-Edit-2509/2511: 1-3 images ("Picture N:"), each VAE-encoded at about 1024^2 pixels and shown to the
    VLM at about 384^2; the output takes the last image's aspect. 2511's `zero_cond_t` comes from the transformer
    config."""

    pipeline_class = "QwenImageEditPlusPipeline"
    tasks = ("edit",)
    max_images = 3
    needs_processor = True

    def size_image(self, images):
        return images[-1]

    def conditioning(self, images, vae_area, vlm_area):
        images = [rgb(img) for img in images]
        vlm_copies = [resize_to_area(img, vlm_area or self.vlm_image_area) for img in images]
        refs = [self.encode_image(resize_to_area(img, vae_area)) for img in images]
        return lambda prompt: self.conditioner.encode_edit(prompt, vlm_copies, plus=True), refs
