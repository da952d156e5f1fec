"""Batched condition encoding for training the tiny 2.x models: prompts of one token length per batch (no padding),
encoded by the Qwen3-VL condition encoder as the pipeline reads it (the last layer's input, the system turn dropped)."""

from __future__ import annotations


class Conditioning:
    """Batched, equal-length condition encoding for training (the inference path encodes one prompt at a time)."""

    def __init__(self, processor, text_encoder):
        from qimg.models.conditioner import SYSTEM_21, Qwen3VLConditioner

        self.processor, self.model = processor, text_encoder
        self.template = Qwen3VLConditioner.template
        sys_tokens = processor.apply_chat_template(
            [{"role": "system", "content": [{"type": "text", "text": SYSTEM_21}]}], tokenize=True, return_dict=False)
        self.drop_idx = len(sys_tokens[0])
        self.pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.norm = text_encoder.model.language_model.norm

    def length(self, prompt: str, n_images: int) -> int:
        return len(self.processor.tokenizer(self.template(n_images).format(prompt)).input_ids)

    def __call__(self, prompts: list[str], images=None):
        kwargs = {"text": [self.template(1 if images else 0).format(p) for p in prompts], "padding": True,
                  "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        inputs = self.processor(**kwargs)
        if not bool(inputs.attention_mask.all()):
            raise ValueError("training batches must hold prompts of equal token length")
        captured = {}
        handle = self.norm.register_forward_hook(lambda m, a, o: captured.setdefault("x", a[0]))
        try:
            device = self.norm.weight.device  # the processor's tensors are on the CPU; the encoder may not be
            fwd = {k: inputs[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                                     "mm_token_type_ids") if k in inputs}
            self.model.model(**fwd)
        finally:
            handle.remove()
        states = captured["x"][:, self.drop_idx:]
        slots = inputs.input_ids[0, self.drop_idx:] == self.pad_id
        return states, slots


def equal_length_batch(cond: Conditioning, draw, size: int, n_images: int, max_tries: int) -> list:
    """Candidates (prompt first) all of one token length: the length of a first natural draw, then further draws
    of that length, so lengths keep their natural frequencies while a batch needs no padding."""
    first = draw()
    while first is None:
        first = draw()
    length = cond.length(first[0], n_images)
    chosen = [first]
    for _ in range(max_tries):
        if len(chosen) == size:
            break
        cand = draw()
        if cand is not None and cond.length(cand[0], n_images) == length:
            chosen.append(cand)
    return chosen
