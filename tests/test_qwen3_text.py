"""The text-only path of the 2.x condition encoder (qimg.models.qwen3_text, no transformers import) against the
transformers VLM on the same weights: same token ids, same states."""

import pytest
import torch

from qimg.models.conditioner import Qwen3VLConditioner

PROMPTS = ["a large red circle in the center on a blue background", " ", "Ünïcödé — 漢字 and emoji 🎨!",
           "<|im_start|> looks special", "word " * 200]


@pytest.mark.parametrize("which", ["reference", "embedded"])
def test_text_path_matches_the_vlm(ref21, which):
    from qimg.loading.files import embedded_model_path

    folder = ref21[1] if which == "reference" else embedded_model_path("qimg-tiny")
    light = Qwen3VLConditioner.load(folder, dtype=torch.float32, device="cpu")
    heavy = Qwen3VLConditioner(*Qwen3VLConditioner._load_vlm(folder, torch.float32, "cpu"))
    assert light._model is None and light.drop_idx == heavy.drop_idx
    for prompt in PROMPTS:
        text = light.template(0).format(prompt)
        assert light._tokenizer.encode(text).ids == heavy.processor.tokenizer(text).input_ids, prompt
        a, b = light.encode(prompt), heavy.encode(prompt)
        assert torch.equal(a.slot_mask, b.slot_mask) and a.states.shape == b.states.shape
        assert (a.states - b.states).abs().max() <= 1e-5, prompt
    assert light._model is None  # text-only prompts never loaded the VLM


def test_the_vlm_arrives_when_a_picture_does(ref21):
    from PIL import Image

    light = Qwen3VLConditioner.load(ref21[1], dtype=torch.float32, device="cpu")
    text_before = light.encode("a red circle")
    light.encode("make it blue", [Image.new("RGB", (64, 64), "red")])
    assert light._model is not None and light._text is None
    assert light.text_module is light.model.model.language_model  # one copy of the weights from now on
    assert (light.encode("a red circle").states - text_before.states).abs().max() <= 1e-5
