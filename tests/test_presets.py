"""Few-step presets, scheduler overrides and explicit sigma lists against the reference fed the same scheduler
config: the same pixels within 1/255 (float32, tiny random checkpoints)."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import qimg
from qimg.cli import main
from qimg.errors import InputError
from qimg.sampling.presets import LIGHTNING_SCHEDULER, TURBO_21_SCHEDULER, TURBO_21_SIGMAS, detect_preset
from tests.reference import QWEN_SCHEDULER

diffusers = pytest.importorskip("diffusers")


def max_diff(a: Image.Image, b: Image.Image) -> int:
    assert a.mode == b.mode and a.size == b.size
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


def with_scheduler(ref, config: dict, **extra):
    """The reference pipeline on the same components with another scheduler (the session's copy is untouched)."""
    components = {**ref.components, "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(**config)}
    return type(ref)(**components, **extra)


def v1_scheduler(ref_v1) -> dict:
    return dict(ref_v1["t2i"][0].scheduler.config)


@pytest.fixture(scope="module")
def v1(ref_v1):
    ref, folder = ref_v1["t2i"]
    return ref, qimg.load(folder, dtype="float32", device="cpu"), folder


@pytest.fixture(scope="module")
def v21(ref21):
    ref, folder = ref21
    return ref, qimg.load(folder, dtype="float32", device="cpu"), folder


@pytest.mark.parametrize("preset,steps", [("lightning-4", 4), ("lightning-8", 8)])
def test_lightning_presets_match_the_reference(v1, preset, steps):
    ref, ours, _ = v1
    lightning = with_scheduler(ref, LIGHTNING_SCHEDULER)
    expected = lightning("a red circle", height=64, width=96, num_inference_steps=steps, true_cfg_scale=1.0,
                         generator=torch.Generator().manual_seed(3)).images[0]
    got = ours.generate("a red circle", width=96, height=64, seed=3, preset=preset)[0]
    assert max_diff(got, expected) <= 1
    meta = got.info["qimg"]
    assert meta["steps"] == steps and meta["cfg"] == 1.0 and meta["preset"] == preset
    plain = ours.generate("a red circle", width=96, height=64, seed=3, steps=steps, cfg=1)[0]
    assert max_diff(got, plain) > 1  # the preset's schedule is not the checkpoint's


def test_turbo_preset_matches_the_reference(v21):
    ref, ours, _ = v21
    turbo = with_scheduler(ref, {**QWEN_SCHEDULER, **TURBO_21_SCHEDULER}, sample_sigmas=list(TURBO_21_SIGMAS))
    expected = turbo("a blue square", height=64, width=64, generator=torch.Generator().manual_seed(4)).images[0]
    got = ours.generate("a blue square", width=64, height=64, seed=4, preset="turbo-2.1")[0]
    assert max_diff(got, expected) <= 1
    assert got.info["qimg"]["steps"] == 8
    with pytest.raises(InputError, match=r"fixed 8-step grid .* steps=4 cannot be honoured"):
        ours.generate("a", width=64, height=64, preset="turbo-2.1", steps=4)


def test_a_turbo_checkpoint_samples_its_own_grid(ref21, tmp_path):
    """A checkpoint laid out as Qwen-Image-2.1-Turbo is (sample_sigmas in model_index.json, an unshifted scheduler)
    needs no preset: its grid and scheduler come with it."""
    ref, folder = ref21
    turbo_folder = tmp_path / "Qwen-Image-2.1-Turbo"
    shutil.copytree(folder, turbo_folder)
    index = json.loads((turbo_folder / "model_index.json").read_text())
    index["sample_sigmas"] = list(TURBO_21_SIGMAS)
    (turbo_folder / "model_index.json").write_text(json.dumps(index))
    sched_path = turbo_folder / "scheduler" / "scheduler_config.json"
    sched_path.write_text(json.dumps({**json.loads(sched_path.read_text()), **TURBO_21_SCHEDULER}))
    ours = qimg.load(turbo_folder, dtype="float32", device="cpu")
    turbo = with_scheduler(ref, {**QWEN_SCHEDULER, **TURBO_21_SCHEDULER}, sample_sigmas=list(TURBO_21_SIGMAS))
    expected = turbo("x", height=64, width=64, generator=torch.Generator().manual_seed(1)).images[0]
    assert max_diff(ours.generate("x", width=64, height=64, seed=1)[0], expected) <= 1
    assert ours.describe()["preset"] == "turbo-2.1"  # found from the folder's name; it agrees with the checkpoint


def test_a_lightning_merge_is_detected_from_its_name(ref_v1, v1, tmp_path):
    ref, _, folder = v1
    merged = tmp_path / "Qwen-Image-Lightning-8steps-V1.1-merged"
    shutil.copytree(folder, merged)
    ours = qimg.load(merged, dtype="float32", device="cpu")
    assert ours.describe()["preset"] == "lightning-8"
    expected = with_scheduler(ref, LIGHTNING_SCHEDULER)("a", height=64, width=64, num_inference_steps=8,
                                                          generator=torch.Generator().manual_seed(2)).images[0]
    got = ours.generate("a", width=64, height=64, seed=2)[0]  # no options: the preset's steps, cfg, scheduler
    assert max_diff(got, expected) <= 1
    assert qimg.load(merged, dtype="float32", device="cpu", preset="lightning-4").describe()["preset"] == \
        "lightning-4"  # named beats detected


def test_detection_rules():
    v1, v21 = "QwenImagePipeline", "QwenImage21Pipeline"
    assert detect_preset(["Qwen-Image-Lightning-4steps-V2.0.safetensors"], v1) == "lightning-4"
    assert detect_preset(["Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16"], "QwenImageEditPlusPipeline") == \
        "lightning-8"
    assert detect_preset(["Qwen-Image-Lightning-4steps"], v21) is None  # a v1 recipe never lands on 2.1
    assert detect_preset(["qwen_image_2.1_turbo_bf16.safetensors"], v21) == "turbo-2.1"
    assert detect_preset(["Qwen-Image-2.1-viggle-turbo-4step-lora"], v21) is None  # another recipe
    assert detect_preset(["Qwen-Image-2512"], v1) is None
    from pathlib import Path

    cached = Path("/hf/hub/models--someone--Qwen-Image-Lightning-4steps-merged/snapshots/0123abcd")
    assert detect_preset(cached.parts[-3:], v1) == "lightning-4"  # a repo in the Hugging Face cache


def test_a_preset_for_another_family_is_refused(v21, v1):
    with pytest.raises(InputError, match=r"preset 'lightning-4' is for QwenImagePipeline.*this model is "
                                         r"QwenImage21Pipeline"):
        v21[1].generate("a", width=64, height=64, preset="lightning-4")
    with pytest.raises(InputError, match="preset 'turbo-2.1' is for QwenImage21Pipeline"):
        qimg.load(v1[2], dtype="float32", device="cpu", preset="turbo-2.1")
    with pytest.raises(InputError, match="preset must be one of"):
        v1[1].generate("a", preset="lightning-3")


@pytest.mark.parametrize("family", ["v1", "v21"])
def test_scheduler_override_and_shift_match_the_reference(request, family, ref_v1):
    ref, ours, _ = request.getfixturevalue(family)
    base = dict(ref.scheduler.config)
    override = {"max_shift": 1.6, "shift_terminal": 0.1}
    expected = with_scheduler(ref, {**base, **override})("a", height=64, width=64, num_inference_steps=3,
                                                        generator=torch.Generator().manual_seed(5)).images[0]
    got = ours.generate("a", width=64, height=64, steps=3, seed=5, cfg=1, scheduler=override)[0]
    assert max_diff(got, expected) <= 1
    shifted = {**base, "use_dynamic_shifting": False, "shift": 2.5}
    expected = with_scheduler(ref, shifted)("a", height=64, width=64, num_inference_steps=3,
                                            generator=torch.Generator().manual_seed(5)).images[0]
    got = ours.generate("a", width=64, height=64, steps=3, seed=5, cfg=1, shift=2.5)[0]
    assert max_diff(got, expected) <= 1
    with pytest.raises(InputError, match="frobnicate"):
        ours.generate("a", scheduler={"frobnicate": 1})


def test_explicit_sigmas_on_v1(v1):
    ref, ours, _ = v1
    sigmas = [1.0, 0.7, 0.35]
    expected = ref("a", height=64, width=64, sigmas=sigmas, generator=torch.Generator().manual_seed(6)).images[0]
    got = ours.generate("a", width=64, height=64, sigmas=sigmas, seed=6, cfg=1)[0]
    assert max_diff(got, expected) <= 1 and got.info["qimg"]["steps"] == 3


def test_explicit_sigmas_on_layered(ref_layered, monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_layered as module

    area = module.calculate_dimensions
    monkeypatch.setattr(module, "calculate_dimensions", lambda target, ratio: area(64 * 64, ratio))
    ref, folder = ref_layered
    ours = qimg.load(folder, dtype="float32", device="cpu")
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA")
    sigmas = [1.0, 0.6, 0.25]
    expected = ref(image=source, prompt="a", layers=2, sigmas=sigmas, resolution=640, true_cfg_scale=1.0,
                   generator=torch.Generator().manual_seed(7)).images[0]
    got = ours.layers(source, layers=2, resolution=64, prompt="a", sigmas=sigmas, seed=7, cfg=1)
    assert all(max_diff(a, b) <= 1 for a, b in zip(got, expected))


def test_cli_schedule_flags(v1, tmp_path):
    ref, _, folder = v1
    out = tmp_path / "out.png"
    assert main(["generate", "a", "-o", str(out), "--model", str(folder), "--size", "64x64", "--seed", "3",
                 "--preset", "lightning-4", "--quiet"]) == 0
    expected = with_scheduler(ref, LIGHTNING_SCHEDULER)("a", height=64, width=64, num_inference_steps=4,
                                                          generator=torch.Generator().manual_seed(3)).images[0]
    assert max_diff(Image.open(out).convert("RGB"), expected) <= 1
    config = tmp_path / "scheduler_config.json"
    config.write_text(json.dumps({"max_shift": 1.6}))
    for flags in (["--scheduler-config", str(config)], ["--scheduler-config", '{"max_shift": 1.6}']):
        assert main(["generate", "a", "-o", str(out), "--model", str(folder), "--size", "64x64", "--seed", "3",
                     "--steps", "2", "--cfg", "1", "--quiet", *flags]) == 0
        expected = with_scheduler(ref, {**dict(ref.scheduler.config), "max_shift": 1.6})(
            "a", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(3)).images[0]
        assert max_diff(Image.open(out).convert("RGB"), expected) <= 1
    assert main(["generate", "a", "-o", str(out), "--model", str(folder), "--size", "64x64", "--seed", "3",
                 "--sigmas", "1.0,0.5", "--shift", "2", "--cfg", "1", "--quiet"]) == 0
    expected = with_scheduler(ref, {**dict(ref.scheduler.config), "use_dynamic_shifting": False, "shift": 2.0})(
        "a", height=64, width=64, sigmas=[1.0, 0.5], generator=torch.Generator().manual_seed(3)).images[0]
    assert max_diff(Image.open(out).convert("RGB"), expected) <= 1
    assert math.isclose(json.loads(Image.open(out).text["qimg"])["shift"], 2.0)
