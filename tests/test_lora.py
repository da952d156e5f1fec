"""LoRAs and other adapters against the reference (diffusers 0.42.1 + peft) on tiny random v1 and 2.1 checkpoints:
every format, one LoRA at 0.8, two stacked, fused and unfused, within 2/255; LoKr/LoHa/diff against their formulas
(and peft's LoKr/LoHa layers); exact unfusing; clear refusals."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import qimg
from qimg.errors import InputError
from tests.lora_files import (linear_shapes, random_lora, reference_with, reference_with_deltas, settings_sidecar,
                              write_lora)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

PROMPT, SIZE, STEPS, SEED = "a red circle", 64, 2, 1


def max_diff(a: Image.Image, b: Image.Image) -> int:
    assert a.mode == b.mode and a.size == b.size
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


def reference_picture(ref):
    return ref(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS,
               generator=torch.Generator().manual_seed(SEED)).images[0]


def ours_picture(pipe):
    return pipe.generate(PROMPT, width=SIZE, height=SIZE, steps=STEPS, seed=SEED, cfg=1)[0]


@pytest.fixture(scope="module", params=["v21", "v1"])
def family(request, ref21, ref_v1):
    ref, folder = ref21 if request.param == "v21" else ref_v1["t2i"]
    return request.param, ref, folder, linear_shapes(ref.transformer)


# kohya-style flattened names of 2.x-only layers (img_mlp.gate_layer, txt_in.in_layer, modulation.1) are mangled by
# the reference's converter (it only knows v1's names); qimg resolves them against the model (tested below).
REFERENCE_FLAT_2X = ("attn.to_", "img_in", "proj_out", "norm_out", "time_text_embed")


@pytest.mark.parametrize("fmt", ["peft", "peft-default", "kohya", "comfy", "comfy-ab", "bare"])
def test_each_format_matches_the_reference(family, fmt, tmp_path):
    name, ref, folder, shapes = family
    if fmt == "kohya" and name == "v21":
        shapes = {m: s for m, s in shapes.items() if any(k in m for k in REFERENCE_FLAT_2X)}
    path = write_lora(tmp_path / f"{fmt}.safetensors", random_lora(shapes, seed=3), fmt,
                      alpha=2.0 if fmt in ("kohya", "comfy", "bare") else None)
    with reference_with(ref, [(path, 0.8)]):
        expected = reference_picture(ref)
    plain = reference_picture(ref)
    assert max_diff(expected, plain) > 4  # the LoRA changes the picture
    for mode in ("unfused", "fused"):
        ours = qimg.load(folder, dtype="float32", device="cpu", loras=[(path, 0.8)], lora_mode=mode)
        assert max_diff(ours_picture(ours), expected) <= 2, (fmt, mode)
        report = ours.describe()["loras"][0]
        assert report["layers"] == len(shapes) and report["fused"] == (mode == "fused")


def test_two_stacked_loras_and_alpha_scaling(family, tmp_path):
    _, ref, folder, shapes = family
    a = write_lora(tmp_path / "a.safetensors", random_lora(shapes, rank=4, seed=5), "peft")
    half = {m: s for i, (m, s) in enumerate(shapes.items()) if i % 2 == 0}
    b = write_lora(tmp_path / "b.safetensors", random_lora(half, rank=2, seed=6), "comfy", alpha=1.0)
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8,  # as diffusers saves
                                                 "transformer.target_modules": sorted(shapes)})}
    c = write_lora(tmp_path / "c.safetensors", random_lora(shapes, rank=4, seed=7), "peft", metadata=meta)
    with reference_with(ref, [(a, 0.8), (b, 0.5), (c, 0.3)]):
        expected = reference_picture(ref)
    for mode in ("unfused", "fused"):
        ours = qimg.load(folder, dtype="float32", device="cpu", loras=[(a, 0.8), (b, 0.5), (c, 0.3)],
                         lora_mode=mode)
        assert max_diff(ours_picture(ours), expected) <= 2, mode


def test_2x_only_flat_names_resolve_against_the_model(ref21, tmp_path):
    ref, folder = ref21
    shapes = linear_shapes(ref.transformer)
    lora = random_lora(shapes, seed=9)
    peft = write_lora(tmp_path / "p.safetensors", lora, "peft")
    kohya = write_lora(tmp_path / "k.safetensors", lora, "kohya")
    with reference_with(ref, [(peft, 1.0)]):
        expected = reference_picture(ref)
    ours = qimg.load(folder, dtype="float32", device="cpu", loras=[kohya])
    assert ours.describe()["loras"][0]["layers"] == len(shapes)  # gate_layer, txt_in.in_layer, modulation.1 too
    assert max_diff(ours_picture(ours), expected) <= 2


def lycoris_and_diff_files(shapes, tmp_path, seed=11):
    """(path, {module: dW without the user's scale}) for a LoKr, a LoHa and a diff file on a few layers."""
    g = torch.Generator().manual_seed(seed)
    picked = [m for m, (o, i) in shapes.items() if o % 2 == 0 and i % 2 == 0][:6]
    files = {}
    sd, deltas = {}, {}
    for m in picked:  # LoKr: w1 whole (2x2), w2 as a rank-2 product, alpha 1 -> scale 1/2
        o, i = shapes[m]
        w1 = torch.randn(2, 2, generator=g) * 0.5
        w2a, w2b = torch.randn(o // 2, 2, generator=g) * 0.3, torch.randn(2, i // 2, generator=g) * 0.3
        sd.update({f"lora_unet_{m.replace('.', '_')}.lokr_w1": w1, f"lora_unet_{m.replace('.', '_')}.lokr_w2_a": w2a,
                   f"lora_unet_{m.replace('.', '_')}.lokr_w2_b": w2b,
                   f"lora_unet_{m.replace('.', '_')}.alpha": torch.tensor(1.0)})
        deltas[m] = torch.kron(w1, w2a @ w2b) * 0.5
    save_file(sd, str(tmp_path / "lokr.safetensors"))
    files["lokr"] = (tmp_path / "lokr.safetensors", deltas)
    sd, deltas = {}, {}
    for m in picked:  # LoHa, rank 3, alpha 1.5 -> scale 1/2
        o, i = shapes[m]
        p = [torch.randn(*s, generator=g) * 0.3 for s in ((o, 3), (3, i), (o, 3), (3, i))]
        for role, t in zip(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), p):
            sd[f"diffusion_model.{m}.{role}"] = t
        sd[f"diffusion_model.{m}.alpha"] = torch.tensor(1.5)
        deltas[m] = (p[0] @ p[1]) * (p[2] @ p[3]) * 0.5
    save_file(sd, str(tmp_path / "loha.safetensors"))
    files["loha"] = (tmp_path / "loha.safetensors", deltas)
    sd, deltas = {}, {}
    for m in picked:
        d = torch.randn(*shapes[m], generator=g) * 0.05
        sd[f"diffusion_model.{m}.diff"] = d
        deltas[m] = d
    save_file(sd, str(tmp_path / "diff.safetensors"))
    files["diff"] = (tmp_path / "diff.safetensors", deltas)
    return files


@pytest.mark.parametrize("kind", ["lokr", "loha", "diff"])
def test_lycoris_and_full_deltas(family, kind, tmp_path):
    _, ref, folder, shapes = family
    path, deltas = lycoris_and_diff_files(shapes, tmp_path)[kind]
    with reference_with_deltas(ref, deltas, 0.7):
        expected = reference_picture(ref)
    assert max_diff(expected, reference_picture(ref)) > 2
    for mode in ("unfused", "fused"):
        ours = qimg.load(folder, dtype="float32", device="cpu", loras=[(path, 0.7)], lora_mode=mode)
        assert max_diff(ours_picture(ours), expected) <= 2, (kind, mode)


def test_lokr_and_loha_deltas_agree_with_peft():
    """qimg's LoKr/LoHa weight deltas equal peft's own layers' for the same factors (alpha / rank scaling)."""
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    from qimg.adapters.deltas import Hadamard, Kronecker

    torch.manual_seed(0)
    for config, kind in ((LoKrConfig(r=2, alpha=3, target_modules=["lin"], decompose_both=False,
                                     decompose_factor=2), "lokr"),
                         (LoHaConfig(r=3, alpha=2, target_modules=["lin"]), "loha")):
        base = torch.nn.Module()
        base.lin = torch.nn.Linear(8, 12)
        model = get_peft_model(base, config)
        layer = model.base_model.model.lin
        with torch.no_grad():
            for p in layer.parameters():
                if p.requires_grad or p.dim() > 1:
                    p.normal_(0, 0.3)
        expected = layer.get_delta_weight("default")
        params = {n.split(".")[0].replace("lokr_", "").replace("hada_", ""): getattr(layer, n)["default"].detach()
                  for n in dir(layer) if n.startswith(("lokr_w", "hada_w")) and "default" in getattr(layer, n)}
        if kind == "lokr":
            ours = Kronecker(config.alpha / config.r, params, (12, 8)).weight()
        else:
            ours = Hadamard(config.alpha / config.r, params).weight()
        assert torch.allclose(ours, expected.float(), atol=1e-6), kind


def test_unfusing_restores_every_weight_exactly(ref21, tmp_path):
    ref, folder = ref21
    shapes = linear_shapes(ref.transformer)
    path = write_lora(tmp_path / "a.safetensors", random_lora(shapes), "peft")
    extra = write_lora(tmp_path / "b.safetensors", random_lora(shapes, seed=1), "peft")
    pipe = qimg.load(folder, dtype="float32", device="cpu")
    before = {k: (v.clone(), v.data_ptr()) for k, v in pipe.transformer.state_dict().items()}
    base = ours_picture(pipe)
    pipe.set_loras([(path, 0.8), (extra, 0.4)], fused=True)
    changed = [k for k, v in pipe.transformer.state_dict().items() if not torch.equal(v, before[k][0])]
    assert len(changed) == len(shapes)  # every adapted weight was merged
    pipe.set_loras([(path, 0.5)], fused=True)  # re-weighting re-fuses from the originals
    pipe.set_loras([(path, 0.5)], fused=False)
    pipe.unload_loras()
    after = pipe.transformer.state_dict()
    assert sorted(after) == sorted(before)  # no adapter keys left behind
    for key, (value, pointer) in before.items():
        assert torch.equal(after[key], value), key
        assert after[key].data_ptr() == pointer, key  # the very same (memory-mapped) tensors are back
    assert max_diff(ours_picture(pipe), base) == 0


def test_switching_keeps_the_deltas_and_reads_each_file_once(ref21, tmp_path, monkeypatch):
    import qimg.adapters.manager as manager

    ref, folder = ref21
    shapes = linear_shapes(ref.transformer)
    a = write_lora(tmp_path / "a.safetensors", random_lora(shapes, seed=1), "peft")
    b = write_lora(tmp_path / "b.safetensors", random_lora(shapes, seed=2), "peft")
    reads = []
    original = manager.read_adapter
    monkeypatch.setattr(manager, "read_adapter", lambda *args: reads.append(args[0]) or original(*args))
    pipe = qimg.load(folder, dtype="float32", device="cpu")
    pictures = []
    for spec in ([(a, 1.0)], {str(b): 1.0}, [f"{a}:1.0"], [(a, 0.5), (b, 0.5)], []):
        pipe.set_loras(spec)
        pictures.append(ours_picture(pipe))
    assert len(reads) == 2  # a and b, once each
    assert max_diff(pictures[0], pictures[2]) == 0 and max_diff(pictures[0], pictures[1]) > 2
    assert max_diff(pictures[4], ours_picture(qimg.load(folder, dtype="float32", device="cpu"))) == 0


def test_refusals_name_the_problem(ref21, ref_v1, tmp_path):
    ref, folder = ref21
    shapes = linear_shapes(ref.transformer)
    v1_shapes = linear_shapes(ref_v1["t2i"][0].transformer)
    flux = write_lora(tmp_path / "flux.safetensors",
                      {f"single_transformer_blocks.{i}.attn.to_q": (torch.zeros(2, 8), torch.zeros(8, 2))
                       for i in range(3)}, "peft")
    with pytest.raises(InputError, match=r"flux.safetensors \(diffusers/PEFT.*3 layers.*not Qwen-Image \(looks like "
                                         r"Flux\)\) does not fit this model, Qwen-Image 2.x"):
        qimg.load(folder, dtype="float32", device="cpu", loras=[flux])
    v1 = write_lora(tmp_path / "v1.safetensors", random_lora(v1_shapes), "kohya", alpha=4)
    with pytest.raises(InputError, match=r"kohya.*for Qwen-Image v1 .* does not fit this model, Qwen-Image 2.x "
                                         r"\(QwenImage21Pipeline\)"):
        qimg.load(folder, dtype="float32", device="cpu", loras=[v1])
    deep = dict(random_lora(shapes))
    deep.update({f"transformer_blocks.{i}.attn.to_q": deep["transformer_blocks.0.attn.to_q"] for i in (5, 6)})
    partial = write_lora(tmp_path / "deep.safetensors", deep, "peft")
    with pytest.raises(InputError, match=r"2 of its 24 layers are not in this model \(transformer_blocks.5.attn.to_q, "
                                         r"transformer_blocks.6.attn.to_q\); load the 22 that are with "
                                         r"--lora-partial"):
        qimg.load(folder, dtype="float32", device="cpu", loras=[partial])
    pipe = qimg.load(folder, dtype="float32", device="cpu", loras=[partial], lora_partial=True)
    assert pipe.describe()["loras"][0]["layers"] == 22 and pipe.describe()["loras"][0]["of"] == 24
    wrong = write_lora(tmp_path / "wrong.safetensors", {"img_in": (torch.zeros(2, 3), torch.zeros(5, 2))}, "peft")
    with pytest.raises(InputError, match=r"1 layers have other shapes than this model's: img_in: adapter \(5, 3\)"):
        qimg.load(folder, dtype="float32", device="cpu", loras=[wrong])
    save_file({"lora_te_text_model_q.lora_down.weight": torch.zeros(2, 4)}, str(tmp_path / "te.safetensors"))
    save_file({"transformer.img_in.lora_A.weight": torch.zeros(2, 4), "transformer.img_in.dora_scale":
               torch.zeros(1, 4), "transformer.img_in.lora_B.weight": torch.zeros(4, 2)},
              str(tmp_path / "dora.safetensors"))
    save_file({"transformer.img_in.weight": torch.zeros(2, 4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "x.pt").write_bytes(b"pickle")
    for name, message in (("te.safetensors", "adapts the text encoder"), ("dora.safetensors", "is a DoRA adapter"),
                          ("model.safetensors", "not adapter weights qimg knows: transformer.img_in.weight"),
                          ("x.pt", "from .safetensors files only"), ("none.safetensors", "LoRA file not found")):
        with pytest.raises(InputError, match=message):
            qimg.load(folder, dtype="float32", device="cpu", loras=[tmp_path / name])
    with pytest.raises(InputError, match="lora_mode must be one of"):
        qimg.load(folder, loras=[flux], lora_mode="merged")
    good = write_lora(tmp_path / "good.safetensors", random_lora(shapes), "peft")
    pipe = qimg.load(folder, dtype="float32", device="cpu", loras=[good])
    with pytest.raises(InputError, match="does not fit this model"):
        pipe.set_loras([v1])  # a refused set changes nothing
    assert pipe.describe()["loras"][0]["name"] == "good"


def test_layered_takes_v1_loras(ref_layered, tmp_path):
    ref, folder = ref_layered
    shapes = {m: s for m, s in linear_shapes(ref.transformer).items() if "addition" not in m}
    path = write_lora(tmp_path / "l.safetensors", random_lora(shapes, seed=4), "comfy", alpha=4)
    source = Image.new("RGBA", (64, 64), (200, 30, 30, 255))
    kwargs = dict(layers=2, resolution=64, prompt="a", steps=2, seed=3, cfg=1)
    plain = qimg.load(folder, dtype="float32", device="cpu").layers(source, **kwargs)
    unfused = qimg.load(folder, dtype="float32", device="cpu", loras=[path], lora_mode="unfused").layers(source,
                                                                                                      **kwargs)
    fused = qimg.load(folder, dtype="float32", device="cpu", loras=[path]).layers(source, **kwargs)
    assert max(max_diff(a, b) for a, b in zip(plain, unfused)) > 2
    assert all(max_diff(a, b) <= 2 for a, b in zip(fused, unfused))


def test_a_lora_brings_its_sampling_settings(ref_v1, tmp_path):
    from qimg.sampling.presets import LIGHTNING_SCHEDULER
    from tests.lora_files import reference_with

    ref, folder = ref_v1["t2i"]
    shapes = linear_shapes(ref.transformer)
    lightning = write_lora(tmp_path / "Qwen-Image-Lightning-4steps-V1.0.safetensors", random_lora(shapes, std=0.05),
                           "kohya", alpha=4)
    pipe = qimg.load(folder, dtype="float32", device="cpu", loras=[lightning])
    assert pipe.describe()["preset"] == "lightning-4"  # found from the file's name
    got = pipe.generate(PROMPT, width=SIZE, height=SIZE, seed=SEED)[0]
    assert got.info["qimg"]["steps"] == 4 and got.info["qimg"]["cfg"] == 1.0
    lightning_ref = type(ref)(**{**ref.components,
                                 "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(**LIGHTNING_SCHEDULER)})
    with reference_with(lightning_ref, [(lightning, 1.0)]):
        expected = lightning_ref(PROMPT, height=SIZE, width=SIZE, num_inference_steps=4,
                                 generator=torch.Generator().manual_seed(SEED)).images[0]
    assert max_diff(got, expected) <= 2
    custom = write_lora(tmp_path / "style.safetensors", random_lora(shapes, std=0.05), "peft")
    settings_sidecar(custom, {"steps": 3, "cfg": 1.5, "scheduler": {"shift_terminal": None}})
    pipe.set_loras([custom])
    assert pipe.describe()["preset"] == "style settings"
    meta = pipe.generate(PROMPT, width=SIZE, height=SIZE, seed=SEED)[0].info["qimg"]
    assert (meta["steps"], meta["cfg"], meta["preset"]) == (3, 1.5, "style settings")
    assert pipe.generate(PROMPT, width=SIZE, height=SIZE, seed=SEED, steps=2)[0].info["qimg"]["steps"] == 2
    pipe.unload_loras()
    assert pipe.describe()["preset"] is None
    settings_sidecar(custom, {"steps": 3, "frobnicate": 1})
    with pytest.raises(InputError, match=r"unknown sampling settings \['frobnicate'\]"):
        pipe.set_loras([custom])


def test_cli_lora_flags(ref21, tmp_path, capsys):
    from qimg.cli import main

    ref, folder = ref21
    shapes = {m: s for m, s in linear_shapes(ref.transformer).items() if any(k in m for k in REFERENCE_FLAT_2X)}
    path = write_lora(tmp_path / "style.safetensors", random_lora(shapes, seed=8), "kohya", alpha=4)
    out = tmp_path / "o.png"
    args = ["generate", PROMPT, "-o", str(out), "--model", str(folder), "--size", f"{SIZE}x{SIZE}", "--steps",
            str(STEPS), "--seed", str(SEED), "--cfg", "1", "--dtype", "float32", "--device", "cpu"]
    assert main([*args, "--lora", f"{path}:0.8"]) == 0
    err = capsys.readouterr().err
    assert "LoRA style at 0.8: kohya" in err and f"{len(shapes)} of {len(shapes)} layers, fused" in err
    with reference_with(ref, [(path, 0.8)]):
        expected = reference_picture(ref)
    assert max_diff(Image.open(out), expected) <= 2
    assert main([*args, "--lora", f"{path}:0.8", "--lora-mode", "unfused", "--quiet"]) == 0
    assert max_diff(Image.open(out), expected) <= 2
    out.unlink()
    assert main([*args, "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "LoRA file not found" in capsys.readouterr().err and not out.exists()


def test_edit_2511_with_a_lora(ref_v1, tmp_path, monkeypatch):
    """Edit-2511 modulates its reference tokens at t=0 (a second time embedding through the same img_mod layers):
    a LoRA on those layers still gives the reference's pixels."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as module

    monkeypatch.setattr(module, "VAE_IMAGE_SIZE", 64 * 64)
    monkeypatch.setattr(module, "CONDITION_IMAGE_SIZE", 48 * 48)
    import qimg.pipelines.qwenimage as v1

    monkeypatch.setattr(v1, "VAE_IMAGE_AREA", 64 * 64)
    monkeypatch.setattr(v1, "VLM_IMAGE_AREA", 48 * 48)
    ref, folder = ref_v1["edit_plus_2511"]
    path = write_lora(tmp_path / "relight.safetensors", random_lora(linear_shapes(ref.transformer), seed=12),
                      "comfy", alpha=2)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    with reference_with(ref, [(path, 0.8)]):
        expected = ref([picture], "make it blue", height=64, width=64, num_inference_steps=2,
                       generator=torch.Generator().manual_seed(2)).images[0]
    for mode in ("unfused", "fused"):
        ours = qimg.load(folder, dtype="float32", device="cpu", loras=[(path, 0.8)], lora_mode=mode)
        ours.conditioner.mrope = False  # the reference's positions (see Qwen25VLConditioner)
        got = ours.generate("make it blue", images=[picture], width=64, height=64, steps=2, seed=2, cfg=1)[0]
        assert max_diff(got, expected) <= 2, mode
