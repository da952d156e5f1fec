"""Pipelines that make pictures from a prompt, optionally conditioned on images (text-to-image and edits)."""

from __future__ import annotations

import torch
from PIL import Image

from qimg.errors import InputError
from qimg.imaging import check_size, fit_area, to_tensor
from qimg.options import GenerateOptions
from qimg.pipelines.batching import batch_key, run_batch
from qimg.pipelines.pipeline import Pipeline, Plan


class ImagePipeline(Pipeline):
    """`generate()`: a prompt (and 0..max_images condition images) -> `n` pictures."""

    multiple: int  # output sizes are floored to a multiple of this
    max_images: int

    @torch.inference_mode()
    def generate(self, prompt: str | GenerateOptions, **options) -> list[Image.Image]:
        """Text-to-image (no `images`) or image-conditioned generation; the keywords are `GenerateOptions`'
        fields (or pass one `GenerateOptions`). Each picture carries its parameters in `image.info["qimg"]`."""
        if isinstance(prompt, GenerateOptions):
            if options:
                raise TypeError("pass either a GenerateOptions or keyword options, not both")
            return self.run(self.plan(prompt))
        return self.run(self.plan(GenerateOptions(prompt=prompt, **options)))

    @torch.inference_mode()
    def generate_batch(self, requests: list[GenerateOptions]) -> list[list[Image.Image] | Exception]:
        """Several requests, denoised together where their plans allow (`qimg.pipelines.batching`): each gets the
        pictures it gets alone, or the exception that refused or stopped it (in order)."""
        outcomes: list = [None] * len(requests)
        groups: dict = {}
        for i, options in enumerate(requests):
            try:
                plan = self.plan(options)
            except Exception as err:  # noqa: BLE001 - this request's own refusal
                outcomes[i] = err
                continue
            key = batch_key(plan) if getattr(self, "batchable", None) and self.batchable(plan) else None
            groups.setdefault(("alone", i) if key is None else key, []).append((i, plan))
        for members in groups.values():
            for (i, _), outcome in zip(members, run_batch(self, [plan for _, plan in members])):
                outcomes[i] = outcome
        return outcomes

    def plan(self, options: GenerateOptions) -> Plan:
        images = list(options.images)
        self.check_images(images)
        resolution = self.defaults.resolution if options.resolution is None else options.resolution
        for i, img in enumerate(images):  # condition images are read at about resolution^2 pixels
            w, h = fit_area(resolution * resolution, img.width / img.height)
            if min(w, h) < 32:
                raise InputError(f"image {i + 1} is {img.width}x{img.height}: at resolution {resolution} it would be "
                                 f"{w}x{h}; its aspect ratio is too extreme (crop or pad it)")
        width, height = options.width, options.height
        if images and (width is None or height is None):
            ref = self.size_image(images)
            w, h = fit_area(resolution * resolution, ref.width / ref.height)
            width, height = width or w, height or h
        width, height = check_size(width or resolution, height or resolution, self.multiple)
        extra = {"resolution": resolution, "background": options.background, **self.plan_extra(options)}
        return self.settle(options, editing=bool(images), prompt=options.prompt, images=images, width=width,
                           height=height, n=options.n, extra=extra)

    # -- family hooks with defaults ------------------------------------------------------------------------------
    def check_images(self, images: list[Image.Image]) -> None:
        """The model's rules on how many condition images it takes (InputError naming the count)."""

    def size_image(self, images: list[Image.Image]) -> Image.Image:
        """The image whose aspect the output takes when no size is given."""
        return images[-1]

    def plan_extra(self, options: GenerateOptions) -> dict:
        """The family's own settled options (refusing those it does not take)."""
        return {}

    def image_tokens(self, plan: Plan, image: Image.Image) -> torch.Tensor:
        """A picture at the plan's size as the clean tokens the transformer denoises toward (`[1, S, C]`, the
        layout `tokens` gives the noise): what training targets."""
        pixels = to_tensor(image.resize((plan.width, plan.height), Image.LANCZOS), self.vae.image_channels)
        z = self.vae.normalize(self.vae.encode(pixels.to(self.info.device, self.info.dtype), tile="auto"))
        return self.tokens(plan, z[:, None])
