"""Condition encoders: transformers' Qwen-VL models and processors, used exactly as the reference pipelines use them.

transformers 5.x processors for Qwen-VL declare a required video processor, and every video processor needs
torchvision (absent from CPU-only installs). qimg never encodes video, so it uses processor subclasses that declare
only an image processor and a tokenizer; everything else is transformers' own code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from qimg.errors import CheckpointError, InputError

MAX_PROMPT_TOKENS = 1024
SYSTEM_21 = "Comprehend and analyze the provided prompt."
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"


def image_only(processor_cls):
    """A subclass of a Qwen-VL processor class whose only sub-processors are the image processor and tokenizer."""

    class ImageOnly(processor_cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_cls.__name__
    return ImageOnly


def on_white(image: Image.Image) -> Image.Image:
    """RGBA composited on white (what the VLM sees); other modes converted to RGB."""
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.getchannel("A"))
        return white
    return image.convert("RGB")


@dataclass
class Condition:
    """Encoder states for one prompt (batch 1): `[1, S, H]` states, `[S]` image-slot mask."""

    states: torch.Tensor
    slot_mask: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.states.shape[1])


class Qwen3VLConditioner:
    """Qwen-Image 2.x: Qwen3-VL's last decoder layer output before the final norm, after the system turn."""

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        sys_message = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_21}]}]
        tokens = processor.apply_chat_template(sys_message, tokenize=True, return_dict=False)
        self.drop_idx = len(tokens[0])
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    @classmethod
    def load(cls, folder: Path, *, dtype: torch.dtype, device) -> "Qwen3VLConditioner":
        from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        for sub in ("text_encoder", "processor"):
            if not (folder / sub).is_dir():
                raise CheckpointError(f"missing component folder {folder / sub}")
        try:
            processor = image_only(Qwen3VLProcessor).from_pretrained(str(folder / "processor"))
            model = Qwen3VLForConditionalGeneration.from_pretrained(str(folder / "text_encoder"), dtype=dtype)
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"cannot load the Qwen3-VL condition encoder from {folder}: {err}") from err
        return cls(model.to(device).eval().requires_grad_(False), processor)

    @staticmethod
    def template(n_images: int) -> str:
        slots = "".join(f"{' ' if i > 1 else ''}<image{i}>{IMAGE_SLOT}" for i in range(1, n_images + 1))
        return (f"<|im_start|>system\n{SYSTEM_21}<|im_end|>\n<|im_start|>user\n{slots}{{}}<|im_end|>\n"
                f"<|im_start|>assistant\n")

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @torch.no_grad()
    def encode(self, prompt: str, images: list[Image.Image] = (), max_tokens: int = MAX_PROMPT_TOKENS) -> Condition:
        """Encode one prompt with its condition images (already resized to their VAE size)."""
        text = self.template(len(images)).format(prompt or " ")
        kwargs = {"text": [text], "padding": True, "padding_side": "left", "return_tensors": "pt"}
        if images:
            kwargs["images"] = [on_white(img) for img in images]
        inputs = self.processor(**kwargs).to(self.model.device)
        ids = inputs.input_ids[0][inputs.attention_mask[0].bool()]
        n_text = int((ids[self.drop_idx:] != self.image_token_id).sum())
        if n_text > max_tokens:
            raise InputError(f"the prompt is {n_text} tokens after the template; the limit is {max_tokens}")
        forward = {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask}
        for key in ("pixel_values", "image_grid_thw", "mm_token_type_ids"):
            if key in inputs:
                forward[key] = inputs[key]
        states = self._pre_norm_states(forward)
        states = states[0][inputs.attention_mask[0].bool()][self.drop_idx:]
        return Condition(states[None], ids[self.drop_idx:] == self.image_token_id)

    def _pre_norm_states(self, forward: dict) -> torch.Tensor:
        """The last decoder layer's output, i.e. the input of the language model's final norm."""
        base = self.model.model
        norm = getattr(base, "language_model", base).norm
        captured = {}
        handle = norm.register_forward_hook(lambda module, args, output: captured.setdefault("x", args[0]))
        try:
            base(**forward)
        finally:
            handle.remove()
        return captured["x"]
