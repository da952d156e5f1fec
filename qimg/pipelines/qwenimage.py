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
from qimg.loading.files import read_json
from qimg.loading.weights import load_module
from qimg.models.conditioner import Condition, Qwen25VLConditioner
from qimg.models.qwenimage import QwenImageConfig, QwenImageTransformer
from qimg.models.vae import VAE, VAEConfig
from qimg.pipelines import images as im
from qimg.pipelines.base import (Clock, Defaults, ModelInfo, Progress, ProgressEvent, check_request, draw_noise,
                                 pick_device, pick_dtype)
from qimg.pipelines.placement import Placement, weights_home
from qimg.sampling.sample import euler
from qimg.sampling.schedule import SchedulerConfig, get_sigmas, mu_for_tokens

PATCH = 2  # latent cells per token side
MULTIPLE = 16  # output sizes are floored to the VAE factor times the patch, as the reference does
VAE_IMAGE_AREA = 1024 * 1024  # reference images are VAE-encoded at about this many pixels (EditPlus VAE_IMAGE_SIZE)
VLM_IMAGE_AREA = 384 * 384  # Edit-Plus shows each reference image to the VLM at about this (CONDITION_IMAGE_SIZE)
# The reference's defaults are 50 steps and true_cfg_scale 4 (guidance only runs with a negative prompt there);
# qimg turns guidance on with the negative prompt " " the model cards use whenever cfg > 1.
DEFAULTS = Defaults(resolution=1024, steps=50, cfg=4.0)


def rgb(image: Image.Image) -> Image.Image:
    """What the RGB models see: transparency composited on white, any mode as RGB."""
    return im.flatten(image.convert("RGBA")) if image.mode in ("RGBA", "LA", "P") else image.convert("RGB")


def resize_to_area(image: Image.Image, area: int) -> Image.Image:
    """`image` at about `area` pixels, aspect kept, sides multiples of 32 (the reference's `calculate_dimensions`),
    resampled with Lanczos as the reference's image processor does."""
    width, height = im.fit_area(area, image.width / image.height)
    if width < 32 or height < 32:
        raise InputError(f"an image of {image.width}x{image.height} at about {area} pixels would be {width}x{height}; "
                         f"its aspect ratio is too extreme")
    return image.resize((width, height), Image.LANCZOS)


def check_area(name: str, value, default: int | None) -> int | None:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not 32 * 32 <= value <= im.MAX_SIDE**2:
        raise InputError(f"{name} must be an integer number of pixels from {32 * 32} to {im.MAX_SIDE ** 2}, "
                         f"got {value!r}")
    return value


class QwenImageV1Pipeline:
    """What the v1 pipelines share: loading, reference latents, the velocity closure, decoding."""

    pipeline_class = "QwenImagePipeline"
    tasks = ["generate"]
    max_images = 0
    needs_processor = False
    image_channels = 3
    default_config = DEFAULTS

    def __init__(self, transformer: QwenImageTransformer, vae: VAE, conditioner: Qwen25VLConditioner,
                 scheduler: SchedulerConfig, *, info: ModelInfo, defaults: Defaults | None = None,
                 placement: Placement | None = None):
        self.transformer, self.vae, self.conditioner = transformer, vae, conditioner
        self.placement = placement or Placement(info.device)
        self.scheduler, self.info = scheduler, info
        self.defaults = defaults or self.default_config
        self.vae_image_area, self.vlm_image_area = VAE_IMAGE_AREA, VLM_IMAGE_AREA

    @classmethod
    def load(cls, folder: Path, index: dict, *, dtype=None, device=None, offload=False):
        device = pick_device(device)
        dtype = pick_dtype(dtype, device)
        home = weights_home(device, offload)
        tcfg = QwenImageConfig.from_dict(read_json(folder / "transformer" / "config.json"))
        vcfg = VAEConfig.from_dict(read_json(folder / "vae" / "config.json"))
        cls.check_configs(tcfg, vcfg, folder)
        processor = None
        if cls.needs_processor:
            entry = index.get("processor")
            processor = entry[1] if isinstance(entry, list) and len(entry) == 2 else "Qwen2VLProcessor"
        transformer = load_module(lambda: QwenImageTransformer(tcfg), folder / "transformer", dtype=dtype,
                                  device=home)
        vae = load_module(lambda: VAE(vcfg), folder / "vae", dtype=dtype, device=device)
        conditioner = Qwen25VLConditioner.load(folder, dtype=dtype, device=home, processor=processor)
        scheduler = SchedulerConfig.from_dict(read_json(folder / "scheduler" / "scheduler_config.json"))
        placement = Placement.of_pipeline(device, home != device, conditioner, transformer)
        return cls(transformer, vae, conditioner, scheduler,
                   info=ModelInfo(folder, cls.pipeline_class, dtype, device),
                   defaults=Defaults.read(index, cls.default_config), placement=placement)

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

    # -- the public call -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt: str, *, images=None, width: int | None = None, height: int | None = None,
                 resolution: int | None = None, steps: int | None = None, seed: int | None = None,
                 negative_prompt: str | None = None, cfg: float | None = None, sigmas=None, n: int = 1,
                 progress: Progress | None = None, background: str | None = None, use_kv_cache: bool = True,
                 should_stop=None, vae_image_area: int | None = None,
                 vlm_image_area: int | None = None) -> list[Image.Image]:
        """Text-to-image (t2i models) or editing (Edit: 1 image; Edit-Plus: 1-3 images); returns `n` RGB images.

        Without width/height an edit takes the aspect of its first (Edit) or last (Edit-Plus) image at about
        `resolution`^2 pixels. Reference images are VAE-encoded at about `vae_image_area` pixels and shown to the VLM
        at about `vlm_image_area` (Edit-Plus; Edit shows the VLM its VAE-sized copy). `use_kv_cache` has no effect on
        v1 models. Each image carries its parameters in `image.info["qimg"]`.
        """
        req = check_request(prompt, images, width=width, height=height, resolution=resolution, steps=steps,
                            seed=seed, negative_prompt=negative_prompt, cfg=cfg, n=n, background=background,
                            defaults=self.defaults, multiple=MULTIPLE, check_images=self.check_images,
                            size_image=self.size_image)
        vae_area = check_area("vae_image_area", vae_image_area, self.vae_image_area)
        vlm_area = check_area("vlm_image_area", vlm_image_area, None)  # None: the variant's own choice
        prompt, images, width, height, steps, cfg = req.prompt, req.images, req.width, req.height, req.steps, req.cfg
        negative_prompt, generator, seed = req.negative_prompt, req.generator, req.seed
        clock = Clock()
        report = progress or (lambda event: None)

        report(ProgressEvent("encode", 0, 1, clock()))
        self.placement.use(self.conditioner.encoder)
        encode, refs = self.conditioning(images, vae_area, vlm_area)
        cond = encode(prompt)
        neg = encode(negative_prompt) if cfg > 1 else None
        report(ProgressEvent("encode", 1, 1, clock()))

        h, w = height // self.vae.scale_factor, width // self.vae.scale_factor
        noise = draw_noise((n, 1, self.vae.z_dim, h, w), generator, self.info.dtype)
        x = im.pack(noise[:, 0], PATCH).to(self.info.device)
        shapes = [(1, h // PATCH, w // PATCH)] + [shape for _, shape in refs]
        ref_tokens = [tokens for tokens, _ in refs]
        schedule = get_sigmas(self.scheduler, steps=None if sigmas is not None else steps, sigmas=sigmas,
                              mu=mu_for_tokens(self.scheduler, x.shape[1]))
        sigma_t = torch.from_numpy(schedule).to(self.info.device)
        self.placement.use(self.transformer)
        velocity = self.velocity(cond, ref_tokens, shapes, n)
        uncond = self.velocity(neg, ref_tokens, shapes, n) if neg is not None else None

        def on_step(step, total, latents, denoised):
            report(ProgressEvent("denoise", step, total, clock(), latents,
                                 preview=lambda: self.decode(denoised[:1], h, w)[0]))

        x = euler(velocity, x, sigma_t, uncond=uncond, cfg=cfg, renorm=True, progress=on_step, should_stop=should_stop)
        report(ProgressEvent("decode", 0, 1, clock()))
        out = self.decode(x, h, w)
        report(ProgressEvent("decode", 1, 1, clock()))
        params = {"model": str(self.info.folder), "pipeline": self.pipeline_class, "prompt": prompt,
                  "negative_prompt": negative_prompt if cfg > 1 else None, "width": width, "height": height,
                  "steps": len(schedule) - 1, "seed": seed, "cfg": cfg, "images": len(images),
                  "dtype": str(self.info.dtype).replace("torch.", ""),
                  "sigmas": [round(float(s), 6) for s in schedule[:-1]] if sigmas is not None else None,
                  "seconds": round(clock(), 3)}
        for i, img in enumerate(out):
            img.info["qimg"] = {**params, "index": i}
        return out

    # -- per-variant hooks -------------------------------------------------------------------------------------
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
        """The image whose aspect the output takes when no size is given."""
        return images[0]

    def conditioning(self, images: list[Image.Image], vae_area: int, vlm_area: int):
        """-> (prompt -> Condition, [(reference tokens [1, S, C], (1, h, w)), ...]); `vlm_area` None: the
        variant's default."""
        return self.conditioner.encode_text, []

    # -- pieces ------------------------------------------------------------------------------------------------
    def encode_image(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """A (resized) image -> normalised, packed posterior-mean latents `[1, S, 4z]` and its patch grid."""
        pixels = im.to_tensor(image, self.vae.image_channels).to(self.info.device, self.info.dtype)
        z = self.vae.normalize(self.vae.encode(pixels, tile="auto"))
        return im.pack(z, PATCH), (1, z.shape[-2] // PATCH, z.shape[-1] // PATCH)

    def velocity(self, cond: Condition, ref_tokens: list[torch.Tensor], shapes, n: int, flag=None):
        """`(x, sigma) -> v` for the target tokens, with the reference tokens appended to the sequence."""
        model = self.transformer
        states = cond.states.to(self.info.device, self.info.dtype).expand(n, -1, -1)
        freqs = model.rope(shapes, states.shape[1], self.info.device)
        refs = torch.cat(ref_tokens, dim=1).expand(n, -1, -1) if ref_tokens else None

        def velocity(x, sigma):
            tokens = x if refs is None else torch.cat([x, refs], dim=1)
            return model(tokens, states, sigma, shapes, additional_t_cond=flag, freqs=freqs)[:, : x.shape[1]]

        return velocity

    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """Normalised latents `[B, z, h, w]` -> PIL images, one VAE call per image (bounded memory)."""
        out = []
        for z in latents.to(self.info.dtype).split(1):
            out += im.to_pil(self.vae.decode(self.vae.denormalize(z), tile="auto"))
        return out

    def decode(self, tokens: torch.Tensor, h: int, w: int) -> list[Image.Image]:
        return self.decode_latents(im.unpack(tokens, h, w, PATCH))

    def describe(self) -> dict:
        return {"pipeline": self.pipeline_class, "folder": str(self.info.folder), "dtype": str(self.info.dtype),
                "device": str(self.info.device), "offload": self.placement.offload,
                "default_resolution": self.defaults.resolution, "default_steps": self.defaults.steps,
                "default_cfg": self.defaults.cfg, "max_images": self.max_images, "tasks": list(self.tasks)}


class QwenImagePipeline(QwenImageV1Pipeline):
    """Text-to-image: Qwen-Image and Qwen-Image-2512."""


class QwenImageEditPipeline(QwenImageV1Pipeline):
    """Qwen-Image-Edit (2508): one image, VAE-encoded at about 1024^2 pixels; the VLM sees that same copy."""

    pipeline_class = "QwenImageEditPipeline"
    tasks = ["edit"]
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
    tasks = ["edit"]
    max_images = 3
    needs_processor = True

    def size_image(self, images):
        return images[-1]

    def conditioning(self, images, vae_area, vlm_area):
        images = [rgb(img) for img in images]
        vlm_copies = [resize_to_area(img, vlm_area or self.vlm_image_area) for img in images]
        refs = [self.encode_image(resize_to_area(img, vae_area)) for img in images]
        return lambda prompt: self.conditioner.encode_edit(prompt, vlm_copies, plus=True), refs
