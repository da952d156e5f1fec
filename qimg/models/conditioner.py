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
    """Qwen-Image 2.x: Qwen3-VL's last decoder layer output before the final norm, after the system turn.

    Built from a transformers model and processor, or loaded from a folder (`load`): then a prompt without
    pictures runs through `qimg.models.qwen3_text` on the language model's weights alone, and transformers' VLM
    (whose import costs seconds) is loaded the first time a picture, `model` or `processor` is needed; from then on
    both paths read its weights.
    """

    def __init__(self, model=None, processor=None, *, folder: Path | None = None, dtype=None, device=None,
                 text=None, tokenizer=None, text_config=None):
        self._model, self._processor = model, processor
        self.folder, self.dtype, self.load_device = folder, dtype, device
        self.text_config = text_config
        self._text = text  # a qwen3_text.Qwen3Text while the VLM is not loaded
        self._tokenizer = tokenizer  # a tokenizers.Tokenizer
        if processor is not None:
            self._from_processor(processor)
        else:
            system = tokenizer.encode(f"<|im_start|>system\n{SYSTEM_21}<|im_end|>\n").ids
            self.drop_idx = len(system)
            self.image_token_id = tokenizer.token_to_id("<|image_pad|>")

    def _from_processor(self, processor) -> None:
        sys_message = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_21}]}]
        tokens = processor.apply_chat_template(sys_message, tokenize=True, return_dict=False)
        self.drop_idx = len(tokens[0])
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    @classmethod
    def load(cls, folder: Path, *, dtype: torch.dtype, device, file=None) -> "Qwen3VLConditioner":
        """The light form: the tokenizer and the language model's weights now, the VLM when first needed. A folder
        without `processor/tokenizer.json`, or weights from one `file` (`qimg.loading.single_files`), load the VLM
        at once."""
        for sub in ("text_encoder", "processor"):
            if not (folder / sub).is_dir():
                raise CheckpointError(f"missing component folder {folder / sub}")
        if file is not None or not (folder / "processor" / "tokenizer.json").is_file():
            model, processor = cls._load_vlm(folder, dtype, device, file)
            return cls(model, processor)
        from tokenizers import Tokenizer

        from qimg.loading.files import read_json
        from qimg.loading.weights import load_module
        from qimg.models.qwen3_text import PREFIX, Qwen3Text, Qwen3TextConfig

        try:
            tokenizer = Tokenizer.from_file(str(folder / "processor" / "tokenizer.json"))
            config = Qwen3TextConfig.from_vlm_config(read_json(folder / "text_encoder" / "config.json"))
        except (OSError, ValueError, KeyError, Exception) as err:  # tokenizers raises its own Exception type
            raise CheckpointError(f"cannot read the Qwen3-VL condition encoder in {folder}: {err}") from err
        text = load_module(lambda: Qwen3Text(config), folder / "text_encoder", dtype=dtype, device=device,
                           base_name="model", prefix=PREFIX)
        return cls(folder=folder, dtype=dtype, device=device, text=text, tokenizer=tokenizer, text_config=config)

    @staticmethod
    def _load_vlm(folder: Path, dtype, device, file=None):
        from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            processor = image_only(Qwen3VLProcessor).from_pretrained(str(folder / "processor"))
            if file is not None:
                from qimg.loading.single_files import vlm_from_file

                return vlm_from_file(Qwen3VLForConditionalGeneration, folder / "text_encoder", file, dtype=dtype,
                                     device=device)[0], processor
            model = Qwen3VLForConditionalGeneration.from_pretrained(str(folder / "text_encoder"), dtype=dtype)
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"cannot load the Qwen3-VL condition encoder from {folder}: {err}") from err
        return model.to(device).eval().requires_grad_(False), processor

    # -- the VLM, loaded on first need ---------------------------------------------------------------------------
    @property
    def model(self):
        if self._model is None:
            device = self._text.embed_tokens.weight.device if self._text is not None else self.load_device
            self._model, self._processor = self._load_vlm(self.folder, self.dtype, device)
            self._from_processor(self._processor)
            self._text = None  # the VLM's language model holds the same weights
        return self._model

    @model.setter
    def model(self, value) -> None:
        self._model, self._text = value, None

    @property
    def processor(self):
        if self._processor is None:
            self.model  # noqa: B018 - loads both
        return self._processor

    def to(self, device) -> "Qwen3VLConditioner":
        """Move what is loaded (the language model, or the whole VLM) to `device`."""
        (self._text if self._model is None else self._model).to(device)
        self.load_device = device
        return self

    @property
    def text_module(self):
        """The module whose weights the text-only path reads."""
        return self._text if self._text is not None else self._model.model.language_model

    @property
    def encoder(self):
        """The part of the model that encoding runs: the vision tower and the decoder layers, not the LM head (1.2
        GB of an 8B Qwen3-VL in bfloat16 that offload then need not move to the GPU); before the VLM is loaded,
        the language model alone."""
        return self._text if self._model is None else self._model.model

    @staticmethod
    def template(n_images: int) -> str:
        slots = "".join(f"{' ' if i > 1 else ''}<image{i}>{IMAGE_SLOT}" for i in range(1, n_images + 1))
        return (f"<|im_start|>system\n{SYSTEM_21}<|im_end|>\n<|im_start|>user\n{slots}{{}}<|im_end|>\n"
                f"<|im_start|>assistant\n")

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size if self.text_config else self.model.config.text_config.hidden_size

    @torch.no_grad()
    def encode(self, prompt: str, images: list[Image.Image] = (), max_tokens: int = MAX_PROMPT_TOKENS) -> Condition:
        """Encode one prompt with its condition images (already resized to their VAE size)."""
        text = self.template(len(images)).format(prompt or " ")
        if not images and self._tokenizer is not None:
            return self._encode_text(text, max_tokens)
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

    def _encode_text(self, text: str, max_tokens: int) -> Condition:
        """A prompt without pictures through `qwen3_text` (no padding: one prompt)."""
        from qimg.models.qwen3_text import last_hidden_states

        ids = torch.tensor(self._tokenizer.encode(text).ids)
        n_text = len(ids) - self.drop_idx
        if n_text > max_tokens:
            raise InputError(f"the prompt is {n_text} tokens after the template; the limit is {max_tokens}")
        module = self.text_module
        states = last_hidden_states(module, self.text_config, ids[None].to(module.embed_tokens.weight.device))
        return Condition(states[:, self.drop_idx:], torch.zeros(n_text, dtype=torch.bool))

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


# ---------------------------------------------------------------------------------------------------------------------
# Qwen-Image v1 family (Qwen-Image, 2512, Edit, Edit-2509/2511, Layered): Qwen2.5-VL-7B-Instruct

T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
_EDIT_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n")
EDIT_TEMPLATE = _EDIT_SYSTEM + IMAGE_SLOT + "{}<|im_end|>\n<|im_start|>assistant\n"  # Edit (2508): one image
EDIT_PLUS_TEMPLATE = _EDIT_SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"  # Edit-2509/2511: "Picture N: " slots
PICTURE = "Picture {}: " + IMAGE_SLOT
# Leading template tokens dropped from the states. Fixed counts, calibrated by the reference on Qwen's vocabulary
# (the system turn plus "<|im_start|>user\n"); with another vocabulary the same count is dropped anyway.
T2I_DROP = 34
EDIT_DROP = 64
CAPTION_MAX_NEW_TOKENS = 512
# Layered's captioning prompts, exactly as the reference pipeline holds them (its line breaks included).
CAPTION_PROMPTS = {
    "en": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n# Image Annotator\n"
        "You are a professional\nimage annotator. Please write an image caption based on the input image:\n"
        "1. Write the caption using natural,\ndescriptive language without structured formats or rich text.\n"
        "2. Enrich caption details by including: \n - Object\nattributes, such as quantity, color, shape, size, "
        "material, state, position, actions, and so on\n - Vision Relations\nbetween objects, such as spatial "
        "relations, functional relations, possessive relations, attachment relations, action\nrelations, comparative "
        "relations, causal relations, and so on\n - Environmental details, such as weather, lighting,\ncolors, "
        "textures, atmosphere, and so on\n - Identify the text clearly visible in the image, without translation or\n"
        "explanation, and highlight it in the caption with quotation marks\n3. Maintain authenticity and accuracy:\n"
        " - Avoid\ngeneralizations\n - Describe all visible information in the image, while do not add information "
        "not explicitly shown in\nthe image\n" + IMAGE_SLOT + "<|im_end|>\n<|im_start|>assistant\n"),
    "zh": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n# 图像标注器\n"
        "你是一个专业的图像标注器。请基于输入图像，撰写图注:\n1.\n使用自然、描述性的语言撰写图注，不要使用结构化形式或富文本形式。\n"
        "2. 通过加入以下内容，丰富图注细节：\n - 对象的属性：如数量、颜色、形状、大小、位置、材质、状态、动作等\n -\n"
        "对象间的视觉关系：如空间关系、功能关系、动作关系、从属关系、比较关系、因果关系等\n - 环境细节：例如天气、光照、颜色、纹理、气氛等\n"
        " - 文字内容：识别图像中清晰可见的文字，不做翻译和解释，用引号在图注中强调\n3.\n保持真实性与准确性：\n - 不要使用笼统的描述\n -\n"
        "描述图像中所有可见的信息，但不要加入没有在图像中出现的内容\n" + IMAGE_SLOT + "<|im_end|>\n<|im_start|>assistant\n"),
}
PROCESSOR_CLASSES = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")


class Qwen25VLConditioner:
    """Qwen-Image v1: Qwen2.5-VL's `hidden_states[-1]` (under transformers 5.x: after the final norm, as the reference
    reads it) for the template's tokens after a fixed drop count.

    `mrope`: give the VLM the processor's `mm_token_type_ids`, so image tokens get Qwen2.5-VL's 3D positions (what
    the model computed under transformers 4.x, which the checkpoints were released with). The reference (diffusers
    0.42.1) does not pass them, so under transformers 5.x its image tokens get plain sequential positions
    (huggingface/diffusers#14194). Set `mrope = False` to reproduce the reference. Text-only prompts are the same
    either way.
    """

    def __init__(self, model, tokenizer, processor=None, *, mrope: bool = True, has_lm_head: bool = True):
        self.model, self.tokenizer, self.processor, self.mrope = model, tokenizer, processor, mrope
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.has_lm_head = has_lm_head  # False: weights from a file without the LM head (it encodes, not captions)

    @classmethod
    def load(cls, folder: Path, *, dtype: torch.dtype, device, processor: str | None = None,
             mrope: bool = True, file=None) -> "Qwen25VLConditioner":
        """`folder` holds `text_encoder/`, `tokenizer/` and (for image inputs) `processor/`; `processor` names the
        transformers class from model_index.json (None: the folder has no processor); `file`: the encoder's
        weights from one file instead of `text_encoder/` (`qimg.loading.single_files`)."""
        import transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        needed = ("text_encoder", "tokenizer") + (("processor",) if processor else ())
        for sub in needed:
            if not (folder / sub).is_dir():
                raise CheckpointError(f"missing component folder {folder / sub}")
        if processor is not None and processor not in PROCESSOR_CLASSES:
            raise CheckpointError(f"unsupported processor class {processor!r}; qimg runs {list(PROCESSOR_CLASSES)}")
        try:
            tokenizer = transformers.Qwen2Tokenizer.from_pretrained(str(folder / "tokenizer"))
            proc = None
            if processor is not None:
                proc = image_only(getattr(transformers, processor)).from_pretrained(str(folder / "processor"))
            if file is not None:
                from qimg.loading.single_files import vlm_from_file

                model, head = vlm_from_file(transformers.Qwen2_5_VLForConditionalGeneration, folder / "text_encoder",
                                            file, dtype=dtype, device=device)
                return cls(model, tokenizer, proc, mrope=mrope, has_lm_head=head)
            model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder / "text_encoder"),
                                                                                   dtype=dtype)
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"cannot load the Qwen2.5-VL condition encoder from {folder}: {err}") from err
        return cls(model.to(device).eval().requires_grad_(False), tokenizer, proc, mrope=mrope)

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def encoder(self):
        """What offload moves for this encoder: the whole model (Layered writes captions with its LM head)."""
        return self.model

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device) -> "Qwen25VLConditioner":
        self.model.to(device)
        return self

    def encode_text(self, prompt: str, max_tokens: int = MAX_PROMPT_TOKENS) -> Condition:
        """Text-to-image (and Layered) conditioning: the t2i template through the tokenizer."""
        inputs = self.tokenizer([T2I_TEMPLATE.format(prompt)], padding=True, return_tensors="pt")
        return self._encode(inputs, T2I_DROP, max_tokens)

    def encode_edit(self, prompt: str, images: list[Image.Image], *, plus: bool,
                    max_tokens: int = MAX_PROMPT_TOKENS) -> Condition:
        """Edit conditioning with the images as the VLM sees them (already resized). `plus` (Edit-2509/2511):
        "Picture N: " slots for 1..N images; otherwise (Edit 2508) exactly one image in the template's slot."""
        if self.processor is None:
            raise CheckpointError("this checkpoint has no processor/ folder, so it cannot read condition images")
        if plus:
            text = EDIT_PLUS_TEMPLATE.format("".join(PICTURE.format(i + 1) for i in range(len(images))) + prompt)
        else:
            if len(images) != 1:
                raise InputError(f"this edit model takes exactly 1 image, got {len(images)}")
            text = EDIT_TEMPLATE.format(prompt)
        inputs = self.processor(text=[text], images=list(images), padding=True, return_tensors="pt")
        return self._encode(inputs, EDIT_DROP, max_tokens)

    @torch.no_grad()
    def _encode(self, inputs, drop: int, max_tokens: int) -> Condition:
        keep = inputs["attention_mask"][0].bool()
        ids = inputs["input_ids"][0][keep]
        n_text = int((ids[drop:] != self.image_token_id).sum())
        if n_text > max_tokens:
            raise InputError(f"the prompt is {n_text} tokens after the template; the limit is {max_tokens}")
        names = ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]
        if self.mrope:
            names.append("mm_token_type_ids")
        forward = {k: inputs[k].to(self.device) for k in names if k in inputs}
        # the base model: the same hidden states as the reference's full model, without computing vocabulary logits
        states = self.model.model(**forward, output_hidden_states=True).hidden_states[-1]
        states = states[0][keep.to(states.device)][drop:]
        return Condition(states[None], (ids[drop:] == self.image_token_id).to(states.device))

    @torch.no_grad()
    def caption(self, image: Image.Image, language: str = "en") -> str:
        """Layered's automatic prompt: the VLM describes `image` (greedy or as its generation config says)."""
        if language not in CAPTION_PROMPTS:
            raise InputError(f"caption language must be one of {sorted(CAPTION_PROMPTS)}, got {language!r}")
        if self.processor is None:
            raise CheckpointError("this checkpoint has no processor/ folder, so it cannot caption images")
        if not self.has_lm_head:
            raise InputError("the text-encoder file has no LM head (ComfyUI's encoder files leave it out), so it "
                             "cannot caption the image: give a prompt that describes it")
        inputs = self.processor(text=CAPTION_PROMPTS[language], images=image, padding=True,
                                return_tensors="pt").to(self.device)
        out = self.model.generate(**inputs, max_new_tokens=CAPTION_MAX_NEW_TOKENS)
        new = [o[len(i):] for i, o in zip(inputs["input_ids"], out)]
        text = self.processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
        return text.strip()
