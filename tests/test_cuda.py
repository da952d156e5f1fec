"""The CUDA paths (skipped where torch sees no CUDA device; CI has none, so run these on a GPU machine):
parity with the reference on the GPU in float32 and bfloat16, the GPU against the CPU on the shipped tiny models,
the default bfloat16 against float32, and the CLI choosing the GPU by itself.

float32 on CUDA is not bit-equal to the CPU: cuDNN convolutions use TF32 by default, and kernels sum in other
orders, so these tolerances are looser than the CPU parity tests' 1 level in 255."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

import qimg
from qimg.cli import main
from qimg.tiny import checker, world

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def diff(a: Image.Image, b: Image.Image) -> tuple[int, float]:
    """(max, mean) absolute difference in levels of 255."""
    assert a.mode == b.mode and a.size == b.size
    d = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
    return int(d.max()), float(d.mean())


def psnr(a: Image.Image, b: Image.Image) -> float:
    return checker.psnr(np.asarray(a.convert("RGB"), np.float32), np.asarray(b.convert("RGB"), np.float32))


def test_2x_matches_the_reference_on_cuda(ref21):
    ref, folder = ref21
    ref.to("cuda")
    try:
        ours = qimg.load(folder, dtype="float32", device="cuda")
        expected = ref("a large red circle", height=64, width=96, num_inference_steps=3,
                       generator=torch.Generator().manual_seed(11)).images[0]
        got = ours.generate("a large red circle", width=96, height=64, steps=3, seed=11)[0]
        most, mean = diff(got, expected)
        print(f"2.x t2i on cuda vs reference on cuda: max {most}, mean {mean:.3f}")
        assert most <= 2 and mean < 0.1
    finally:
        ref.to("cpu")


def test_2x_matches_the_reference_in_bfloat16(ref21):
    """Same seed, same noise (drawn in bfloat16 by both), same picture up to bfloat16 arithmetic."""
    ref, folder = ref21
    ref.to("cuda", torch.bfloat16)
    try:
        ours = qimg.load(folder, dtype="bfloat16", device="cuda")
        expected = ref("a large red circle", height=64, width=96, num_inference_steps=3,
                       generator=torch.Generator().manual_seed(11)).images[0]
        got = ours.generate("a large red circle", width=96, height=64, steps=3, seed=11)[0]
        print(f"2.x t2i bfloat16 on cuda vs reference: PSNR {psnr(got, expected):.1f} dB")
        assert psnr(got, expected) > 30
    finally:
        ref.to("cpu", torch.float32)


@pytest.fixture
def float32_noise(monkeypatch):
    """Noise drawn in float32 and cast, in every pipeline, so that dtypes are compared on the same noise (torch's
    bfloat16 normals differ from its float32 ones for some sizes and torch versions)."""
    import qimg.pipelines.pipeline as pipeline

    def draw(shape, generator, dtype):
        return torch.randn(shape, generator=generator).to(dtype)

    monkeypatch.setattr(pipeline, "draw_noise", draw)  # the one path draws every family's noise


def test_v1_and_layered_match_the_reference_on_cuda(ref_v1, ref_layered, monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_layered as module

    area = module.calculate_dimensions
    monkeypatch.setattr(module, "calculate_dimensions", lambda target, ratio: area(64 * 64, ratio))
    ref, folder = ref_v1["t2i"]
    ref.to("cuda")
    try:
        ours = qimg.load(folder, dtype="float32", device="cuda")
        expected = ref("a large red circle", height=64, width=96, num_inference_steps=3,
                       generator=torch.Generator().manual_seed(11)).images[0]
        most, mean = diff(ours.generate("a large red circle", width=96, height=64, steps=3, seed=11, cfg=1)[0],
                          expected)
        print(f"v1 t2i on cuda vs reference on cuda: max {most}, mean {mean:.3f}")
        assert most <= 2 and mean < 0.1
    finally:
        ref.to("cpu")
    ref, folder = ref_layered
    ref.to("cuda")
    try:
        ours = qimg.load(folder, dtype="float32", device="cuda")
        source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 4), dtype=np.uint8), "RGBA")
        expected = ref(image=source, prompt="a red circle", layers=2, num_inference_steps=2, resolution=640,
                       generator=torch.Generator().manual_seed(5)).images[0]
        got = ours.layers(source, layers=2, resolution=64, prompt="a red circle", steps=2, seed=5, cfg=1)
        for a, b in zip(got, expected):
            most, mean = diff(a, b)
            print(f"layered on cuda vs reference on cuda: max {most}, mean {mean:.3f}")
            assert most <= 2 and mean < 0.1
    finally:
        ref.to("cpu")


@pytest.fixture(scope="module")
def tiny_cpu():
    return qimg.load(dtype="float32", device="cpu")


def test_tiny_on_cuda_matches_cpu_and_bf16_stays_close(tiny_cpu, float32_noise):
    on_gpu = qimg.load(dtype="float32", device="cuda")
    default = qimg.load()  # with a GPU present: CUDA, bfloat16
    assert default.info.device.type == "cuda" and default.info.dtype == torch.bfloat16
    for i, scene in enumerate(world.held_out(3, seed=7)):
        prompt = world.prompt(scene)
        cpu = tiny_cpu.generate(prompt, seed=i)[0]
        gpu = on_gpu.generate(prompt, seed=i)[0]
        bf16 = default.generate(prompt, seed=i)[0]
        most, mean = diff(cpu, gpu)
        print(f"tiny t2i cuda fp32 vs cpu: max {most}, mean {mean:.3f}; bf16 vs fp32 PSNR {psnr(bf16, gpu):.1f} dB")
        assert mean < 0.5 and psnr(cpu, gpu) > 40
        assert psnr(bf16, gpu) > 28
        source = world.render(scene)
        edit = world.random_edit(scene, random.Random(i))[0]
        a = tiny_cpu.generate(edit, images=[source], seed=i)[0]
        b = on_gpu.generate(edit, images=[source], seed=i)[0]
        assert psnr(a, b) > 40


def test_tiny_layered_on_cuda_matches_cpu(float32_noise):
    cpu = qimg.load("qimg-tiny-layered", dtype="float32", device="cpu")
    gpu = qimg.load("qimg-tiny-layered", dtype="float32", device="cuda")
    bf16 = qimg.load("qimg-tiny-layered")
    scene = world.held_out(1, seed=11)[0]
    image = world.render(scene)
    n = len(world.render_layers(scene))
    a = cpu.layers(image, layers=n, seed=0, prompt=world.prompt(scene))
    b = gpu.layers(image, layers=n, seed=0, prompt=world.prompt(scene))
    c = bf16.layers(image, layers=n, seed=0, prompt=world.prompt(scene))
    for x, y, z in zip(a, b, c):
        print(f"tiny layers cuda fp32 vs cpu: PSNR {psnr(x, y):.1f} dB; bf16 vs fp32 {psnr(z, y):.1f} dB")
        assert psnr(x, y) > 40 and psnr(z, y) > 28


def test_cli_generates_on_the_gpu_by_default(tmp_path, capsys):
    out = tmp_path / "gpu.png"
    assert main(["generate", "a large red circle in the center on a blue background", "-o", str(out)]) == 0
    assert Image.open(out).size == (128, 128)
    assert "s on cuda, bfloat16)" in capsys.readouterr().out


def test_offload_gives_the_same_pictures_with_less_on_the_gpu():
    scene = world.held_out(1, seed=5)[0]
    prompt, source = world.prompt(scene), world.render(scene)
    plain = qimg.load(dtype="float32", device="cuda")
    expected = [plain.generate(prompt, seed=3)[0], plain.generate("make the background red", images=[source],
                                                                    seed=3)[0]]
    del plain
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    pipe = qimg.load(dtype="float32", device="cuda", offload=True)
    assert pipe.describe()["offload"] is True
    assert {p.device.type for p in pipe.transformer.parameters()} == {"cpu"}  # nothing big on the GPU yet
    got = [pipe.generate(prompt, seed=3)[0], pipe.generate("make the background red", images=[source], seed=3)[0]]
    for a, b in zip(got, expected):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert {p.device.type for p in pipe.transformer.parameters()} == {"cuda"}
    assert {p.device.type for p in pipe.conditioner.model.parameters()} == {"cpu"}
    encoder_bytes = sum(p.numel() * p.element_size() for p in pipe.conditioner.encoder.parameters())
    resident = torch.cuda.memory_allocated() - before
    pipe.placement.release()
    assert {p.device.type for p in pipe.transformer.parameters()} == {"cpu"}
    assert torch.cuda.memory_allocated() - before < resident - encoder_bytes / 2
    layered = qimg.load("qimg-tiny-layered", dtype="float32", device="cuda", offload=True)
    plain = qimg.load("qimg-tiny-layered", dtype="float32", device="cuda")
    for a, b in zip(layered.layers(source, layers=2, seed=1), plain.layers(source, layers=2, seed=1)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_block_streaming_gives_the_same_pictures():
    scene = world.held_out(1, seed=6)[0]
    prompt = world.prompt(scene)
    plain = qimg.load(dtype="float32", device="cuda")
    expected = plain.generate(prompt, seed=4)[0]
    del plain
    torch.cuda.empty_cache()
    pipe = qimg.load(dtype="float32", device="cuda", offload="blocks")
    assert pipe.describe()["offload_mode"] == "blocks"
    blocks = pipe.transformer.transformer_blocks
    assert {p.device.type for p in blocks.parameters()} == {"cpu"}
    assert {p.device.type for p in pipe.transformer.img_in.parameters()} == {"cuda"}
    assert np.array_equal(np.asarray(pipe.generate(prompt, seed=4)[0]), np.asarray(expected))
    pipe.placement.release()
    assert {p.device.type for p in blocks.parameters()} == {"cpu"}
