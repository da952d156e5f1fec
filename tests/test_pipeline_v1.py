"""Whole-pipeline parity with the reference v1 pipelines (QwenImagePipeline, QwenImageEditPipeline,
QwenImageEditPlusPipeline): same folder, prompt, size, steps and seed -> the same image within 1/255 per pixel."""

import numpy as np
import pytest
import torch
from PIL import Image

import qimg
from qimg.cli import main
from qimg.errors import InputError

VAE_AREA, VLM_AREA = 64 * 64, 48 * 48  # small stand-ins for 1024^2 / 384^2


@pytest.fixture(scope="module")
def pipes(ref_v1):
    """name -> (reference, qimg) for t2i, edit, edit_plus, edit_plus_2511. qimg's VLM positions follow the reference
    (no mm_token_type_ids, see Qwen25VLConditioner) so that images can be compared."""
    out = {}
    for name, (ref, folder) in ref_v1.items():
        ours = qimg.load(folder, dtype="float32", device="cpu")
        ours.conditioner.mrope = False
        out[name] = ref, ours
    return out


@pytest.fixture
def small_edit_plus(monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as module

    monkeypatch.setattr(module, "VAE_IMAGE_SIZE", VAE_AREA)
    monkeypatch.setattr(module, "CONDITION_IMAGE_SIZE", VLM_AREA)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    assert a.mode == b.mode and a.size == b.size, (a.mode, a.size, b.mode, b.size)
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


def pictures():
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), "RGB")
    tall = Image.fromarray(rng.integers(0, 256, (80, 64, 3), dtype=np.uint8), "RGB")
    return [wide, tall]


def test_text_to_image(pipes):
    ref, ours = pipes["t2i"]
    expected = ref("a large red circle", height=64, width=96, num_inference_steps=3,
                   generator=torch.Generator().manual_seed(11)).images[0]  # no negative prompt: no guidance
    got = ours.generate("a large red circle", width=96, height=64, steps=3, seed=11, cfg=1)[0]
    assert got.mode == "RGB" and got.size == (96, 64)
    assert max_diff(got, expected) <= 1
    assert np.asarray(got).std() > 5
    assert got.info["qimg"]["pipeline"] == "QwenImagePipeline" and got.info["qimg"]["seed"] == 11


def test_text_to_image_cfg(pipes):
    ref, ours = pipes["t2i"]
    expected = ref("a blue square", negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=64,
                   num_inference_steps=2, generator=torch.Generator().manual_seed(5)).images[0]
    got = ours.generate("a blue square", negative_prompt="blurry", cfg=4.0, width=64, height=64, steps=2, seed=5)[0]
    assert max_diff(got, expected) <= 1
    plain = ours.generate("a blue square", width=64, height=64, steps=2, seed=5, cfg=1)[0]
    assert max_diff(got, plain) > 1  # guidance changed the picture


@pytest.mark.parametrize("variant", ["edit_plus", "edit_plus_2511"])
@pytest.mark.parametrize("count", [1, 2])
def test_edit_plus(pipes, small_edit_plus, variant, count):
    ref, ours = pipes[variant]
    assert ours.transformer.cfg.zero_cond_t == (variant == "edit_plus_2511")
    imgs = pictures()[:count]
    expected = ref(imgs, "make the circle green", height=64, width=64, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(3)).images[0]
    got = ours.generate("make the circle green", images=imgs, width=64, height=64, steps=2, seed=3, cfg=1,
                        vae_image_area=VAE_AREA, vlm_image_area=VLM_AREA)[0]
    assert max_diff(got, expected) <= 1


def test_edit_2508_with_cfg(pipes, monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as module

    area = module.calculate_dimensions
    monkeypatch.setattr(module, "calculate_dimensions", lambda target, ratio: area(VAE_AREA, ratio))
    ref, ours = pipes["edit"]
    img = pictures()[0]
    expected = ref(img, "make it blue", negative_prompt="ugly", true_cfg_scale=3.0, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(8)).images[0]
    got = ours.generate("make it blue", images=[img], resolution=64, vae_image_area=VAE_AREA, negative_prompt="ugly",
                        cfg=3.0, steps=2, seed=8)[0]
    assert got.size == expected.size == (64, 64)
    assert max_diff(got, expected) <= 1


def test_vlm_states_reference_mode_and_mrope(pipes):
    """mrope off: exactly the reference's prompt embeddings. On: the VLM also gets `mm_token_type_ids` (3D positions
    for image tokens, as transformers 4.x computed them), which changes image-conditioned states but not text-only."""
    ref, ours = pipes["edit_plus"]
    imgs = [img.resize((48, 48)) for img in pictures()]
    cond = ours.conditioner
    cond.mrope = False
    expected, _ = ref.encode_prompt("make it red", image=imgs, device="cpu")
    got = cond.encode_edit("make it red", imgs, plus=True)
    assert got.states.shape == expected.shape and torch.equal(got.states, expected)
    assert int(got.slot_mask.sum()) > 0  # image tokens lie after the dropped template tokens
    try:
        cond.mrope = True
        mrope = cond.encode_edit("make it red", imgs, plus=True)
        assert (mrope.states - expected).abs().max() > 1e-3
        inputs = ref.processor(text=[ref.prompt_template_encode.format(
            "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: <|vision_start|><|image_pad|>"
            "<|vision_end|>make it red")], images=imgs, padding=True, return_tensors="pt")
        with torch.no_grad():
            full = ref.text_encoder(**inputs, output_hidden_states=True).hidden_states[-1][0, 64:]
        assert torch.allclose(mrope.states[0], full, atol=1e-6)
        t2i_ref, t2i = pipes["t2i"]
        t2i.conditioner.mrope = True
        expected_text, _ = t2i_ref.encode_prompt("a cat", device="cpu")
        assert torch.equal(t2i.conditioner.encode_text("a cat").states, expected_text)
    finally:
        cond.mrope = False
        pipes["t2i"][1].conditioner.mrope = False


def test_describe_and_tasks(pipes):
    assert pipes["t2i"][1].describe()["tasks"] == ["generate"]
    for name in ("edit", "edit_plus", "edit_plus_2511"):
        assert pipes[name][1].describe()["tasks"] == ["edit"]
    assert pipes["edit_plus"][1].describe()["max_images"] == 3


@pytest.mark.parametrize("name,kwargs,message", [
    ("t2i", dict(images=[Image.new("RGB", (32, 32))]), "text-to-image only; it takes no condition images"),
    ("edit", dict(), "edits an image: give exactly 1 image"),
    ("edit", dict(images=[Image.new("RGB", (32, 32))] * 2), "2 condition images given; the limit is 1"),
    ("edit_plus", dict(), "give 1 to 3 images"),
    ("edit_plus", dict(images=[Image.new("RGB", (32, 32))] * 4), "4 condition images given; the limit is 3"),
    ("edit_plus", dict(images=["not an image"]), "image 1 is a str, not a picture"),
    ("edit_plus", dict(images=[Image.new("RGB", (0, 0))]), r"image 1 is empty \(0x0\)"),
    ("edit_plus", dict(images=[Image.new("RGB", (32, 32))], vae_image_area=10), "vae_image_area must be"),
    ("t2i", dict(width=8, height=64), "width 8 is out of range"),
    ("t2i", dict(steps=0), "steps must be"),
    ("t2i", dict(n=0), "n must be"),
])
def test_bad_input_is_named(pipes, name, kwargs, message):
    _, ours = pipes[name]
    with pytest.raises(InputError, match=message):
        ours.generate("a", **{"steps": 1, **kwargs})


def test_over_limit_image(pipes, monkeypatch):
    import qimg.imaging as images

    monkeypatch.setattr(images, "MAX_INPUT_PIXELS", 1000)
    with pytest.raises(InputError, match=r"image 1 is 40x40 = 1600 pixels; the limit is 1000"):
        pipes["edit_plus"][1].generate("a", images=[Image.new("RGB", (40, 40))], steps=1)


def test_prompt_token_limit(pipes):
    _, ours = pipes["t2i"]
    with pytest.raises(InputError, match=r"the prompt is \d+ tokens after the template; the limit is 1024"):
        ours.generate("red " * 1100, width=64, height=64, steps=1)


def test_progress_and_seeds(pipes):
    _, ours = pipes["t2i"]
    events = []
    a = ours.generate("x", width=64, height=64, steps=2, seed=1, cfg=1, progress=events.append)[0]
    b = ours.generate("x", width=64, height=64, steps=2, seed=1, cfg=1)[0]
    c = ours.generate("x", width=64, height=64, steps=2, seed=2, cfg=1)[0]
    assert max_diff(a, b) == 0 and max_diff(a, c) > 0
    denoise = [e for e in events if e.stage == "denoise"]
    assert [e.step for e in denoise] == [1, 2] and denoise[0].preview().size == (64, 64)


def test_cli_generate_and_edit(pipes, ref_v1, tmp_path, monkeypatch, small_edit_plus):
    ref, _ = pipes["t2i"]
    out = tmp_path / "t2i.png"
    assert main(["generate", "a red circle", "-o", str(out), "--model", str(ref_v1["t2i"][1]), "--size", "64x64",
                 "--steps", "2", "--seed", "4", "--cfg", "1", "--dtype", "float32", "--device", "cpu",
                 "--quiet"]) == 0
    expected = ref("a red circle", height=64, width=64, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(4)).images[0]
    assert max_diff(Image.open(out).convert("RGB"), expected) <= 1

    import qimg.pipelines.qwenimage as v1

    monkeypatch.setattr(v1, "VAE_IMAGE_AREA", VAE_AREA)
    monkeypatch.setattr(v1, "VLM_IMAGE_AREA", VLM_AREA)
    src = tmp_path / "in.png"
    pictures()[0].save(src)
    out = tmp_path / "edit.png"
    assert main(["edit", str(src), "make it blue", "-o", str(out), "--model", str(ref_v1["edit_plus"][1]),
                 "--resolution", "64", "--steps", "2", "--seed", "8", "--cfg", "1", "--quiet"]) == 0
    assert Image.open(out).size == (64, 64)
    # text-only generate on an edit model: a clean error, no file
    out = tmp_path / "none.png"
    assert main(["generate", "x", "-o", str(out), "--model", str(ref_v1["edit_plus"][1]), "--quiet"]) == 2
    assert not out.exists()
