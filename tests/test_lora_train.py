"""`qimg lora train`: the loss falls on what it is shown, the file is diffusers' PEFT format (diffusers loads it and
draws qimg's picture), a stopped run resumes to the same weights, clear refusals."""

import numpy as np
import pytest
import torch
from PIL import Image

import qimg
from qimg.adapters.train import TrainOptions, train_lora
from qimg.cli import main
from qimg.errors import InputError

pytestmark = pytest.mark.slow  # quick subset: python -m pytest -q -m 'not slow'

diffusers = pytest.importorskip("diffusers")


def examples(folder, n=3, edit=False, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        picture = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        if edit:
            picture.save(folder / f"ex{i}_target.png")
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"ex{i}_source.png")
        else:
            picture.save(folder / f"ex{i}.png")
        (folder / f"ex{i}.txt").write_text(f"picture number {i}")
    return folder


def fixed_loss(pipe, folder) -> float:
    """The flow-matching loss on the examples at fixed noise levels and noise (no LoRA training randomness)."""
    from qimg.adapters.train import read_examples
    from qimg.options import GenerateOptions

    total = 0.0
    with torch.no_grad():
        for i, ex in enumerate(read_examples(folder)):
            plan = pipe.plan(GenerateOptions(prompt=ex.prompt, width=64, height=64, steps=1, seed=0, cfg=1))
            cond = pipe.encode(plan)
            x0 = pipe.image_tokens(plan, ex.target)
            for sigma in (0.3, 0.7, 0.95):
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(i))
                v = pipe.velocity(plan, cond.positive, cond.extra)((1 - sigma) * x0 + sigma * noise,
                                                                  torch.tensor([sigma]))
                total += float(((v - (noise - x0)) ** 2).mean())
    return total


def test_training_lowers_the_loss_and_diffusers_loads_the_file(ref21, tmp_path):
    ref, folder = ref21
    data = examples(tmp_path / "data")
    pipe = qimg.load(folder, dtype="float32", device="cpu")
    before = fixed_loss(pipe, data)
    out = tmp_path / "mine.safetensors"
    events = []
    result = train_lora(pipe, TrainOptions(data=data, out=out, rank=4, steps=40, lr=5e-3, batch=2, targets="all",
                                           resolution=64), lambda *e: events.append(e))
    assert result["finished"] and result["steps"] == 40 and len(events) == 40
    trained = qimg.load(folder, dtype="float32", device="cpu", loras=[out])
    after = fixed_loss(trained, data)
    assert after < 0.8 * before, (before, after)
    assert pipe.describe()["loras"] == []  # training left the pipeline without adapters
    ref.load_lora_weights(str(out), adapter_name="mine")  # the PEFT format, unchanged
    try:
        expected = ref("picture number 1", height=64, width=64, num_inference_steps=2,
                       generator=torch.Generator().manual_seed(3)).images[0]
    finally:
        ref.unload_lora_weights()
    got = trained.generate("picture number 1", width=64, height=64, steps=2, seed=3)[0]
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(expected, dtype=int)).max() <= 2


def test_a_stopped_run_resumes_to_the_same_weights(ref21, tmp_path):
    _, folder = ref21
    data = examples(tmp_path / "data", n=2)
    pipe = qimg.load(folder, dtype="float32", device="cpu")
    kwargs = dict(data=data, rank=2, lr=1e-3, batch=2, resolution=64, save_every=2)
    whole = train_lora(pipe, TrainOptions(out=tmp_path / "whole.safetensors", steps=6, **kwargs))
    part = train_lora(pipe, TrainOptions(out=tmp_path / "part.safetensors", steps=3, **kwargs))
    assert part["steps"] == 3
    again = train_lora(pipe, TrainOptions(out=tmp_path / "part.safetensors", steps=6, **kwargs))
    assert again["steps"] == 6 and whole["steps"] == 6
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "part.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="is a checkpoint of another run"):
        train_lora(pipe, TrainOptions(out=tmp_path / "part.safetensors", steps=8, **{**kwargs, "rank": 3}))


def test_edit_triplets(ref21, tmp_path):
    _, folder = ref21
    data = examples(tmp_path / "edits", n=2, edit=True)
    pipe = qimg.load(folder, dtype="float32", device="cpu")
    result = train_lora(pipe, TrainOptions(data=data, out=tmp_path / "edit.safetensors", rank=2, steps=3,
                                           resolution=64, batch=1))
    assert result["finished"] and result["examples"] == 2


def test_refusals(ref21, ref_v1, ref_layered, tmp_path):
    _, folder = ref21
    pipe = qimg.load(folder, dtype="float32", device="cpu")
    out = tmp_path / "x.safetensors"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="found no examples"):
        train_lora(pipe, TrainOptions(data=tmp_path / "empty", out=out))
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "a.txt").write_text("x")
    with pytest.raises(InputError, match="has no picture"):
        train_lora(pipe, TrainOptions(data=tmp_path / "lonely", out=out))
    with pytest.raises(InputError, match="written as .safetensors"):
        TrainOptions(data=tmp_path, out=tmp_path / "x.pt")
    with pytest.raises(InputError, match="rank must be an integer >= 1"):
        TrainOptions(data=tmp_path, out=out, rank=0)
    t2i = qimg.load(ref_v1["t2i"][1], dtype="float32", device="cpu")
    with pytest.raises(InputError, match="are edit triplets, but QwenImagePipeline does not edit"):
        train_lora(t2i, TrainOptions(data=examples(tmp_path / "e", n=1, edit=True), out=out))
    layered = qimg.load(ref_layered[1], dtype="float32", device="cpu")
    with pytest.raises(InputError, match="splits layers"):
        train_lora(layered, TrainOptions(data=examples(tmp_path / "l", n=1), out=out))


def test_cli(ref21, tmp_path, capsys):
    _, folder = ref21
    data = examples(tmp_path / "data", n=2)
    out = tmp_path / "cli.safetensors"
    assert main(["lora", "train", "--data", str(data), "--out", str(out), "--model", str(folder), "--steps", "2",
                 "--rank", "2", "--resolution", "64", "--dtype", "float32", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert str(out.resolve()) in captured.out and "2/2 steps, done" in captured.out and "lora" in captured.err
    assert main(["lora", "train", "--data", str(tmp_path / "none"), "--out", str(out), "--model", str(folder)]) == 2
    assert "training data folder not found" in capsys.readouterr().err


def drift(base, tuned, folder, negative=False) -> float:
    """How far the tuned model's velocities move from the base model's on `folder`'s examples (fixed noise); with
    `negative`, under the default negative prompt (a guided plan's other branch)."""
    from qimg.adapters.train import read_examples
    from qimg.options import GenerateOptions

    total = 0.0
    with torch.no_grad():
        for i, ex in enumerate(read_examples(folder)):
            outs = []
            for pipe in (base, tuned):
                plan = pipe.plan(GenerateOptions(prompt=ex.prompt, width=64, height=64, steps=1, seed=0,
                                                 cfg=4 if negative else 1))
                x0 = pipe.image_tokens(plan, ex.target)
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(i))
                cond = pipe.encode(plan)
                branch = cond.negative if negative else cond.positive
                outs.append(pipe.velocity(plan, branch, cond.extra)(0.2 * x0 + 0.8 * noise, torch.tensor([0.8])))
            total += float(((outs[0] - outs[1]) ** 2).mean())
    return total


def test_preserved_examples_keep_the_base_models_output(ref21, tmp_path):
    """Trained on one set of examples, a LoRA moves the model's output on others; with those others as --preserve
    examples it moves it much less, and still learns its own examples."""
    _, folder = ref21
    data, keep = examples(tmp_path / "data", seed=1), examples(tmp_path / "keep", n=4, seed=2)
    for i in range(4):  # other prompts than the training examples'
        (keep / f"ex{i}.txt").write_text(f"another scene {i}")
    base = qimg.load(folder, dtype="float32", device="cpu")
    common = dict(data=data, rank=4, steps=30, lr=5e-3, batch=2, targets="all", resolution=64)
    plain = train_lora(base, TrainOptions(out=tmp_path / "plain.safetensors", **common))
    kept = train_lora(base, TrainOptions(out=tmp_path / "kept.safetensors", preserve=keep, **common))
    assert plain["preserved"] == 0 and kept["preserved"] == 4
    tuned = {name: qimg.load(folder, dtype="float32", device="cpu", loras=[tmp_path / f"{name}.safetensors"])
             for name in ("plain", "kept")}
    moved, held = drift(base, tuned["plain"], keep), drift(base, tuned["kept"], keep)
    assert held < 0.5 * moved, (moved, held)
    assert fixed_loss(tuned["kept"], data) < 0.9 * fixed_loss(base, data)
    with pytest.raises(InputError, match="preserve_share must be between 0 and 1"):
        TrainOptions(data=data, out=tmp_path / "x.safetensors", preserve=keep, preserve_share=1.0)


def test_preservation_keeps_the_negative_prompt_and_weighs_as_told(ref21, tmp_path):
    """Guidance subtracts the negative prompt's velocity from every picture: with --preserve on a model that guides
    by default, that branch is kept too; a larger preserve_weight keeps the preserved outputs closer."""
    from dataclasses import replace

    from qimg.adapters.train import _encode_kept, read_examples

    _, folder = ref21
    data, keep = examples(tmp_path / "data", seed=1), examples(tmp_path / "keep", n=4, seed=2)
    for i in range(4):
        (keep / f"ex{i}.txt").write_text(f"another scene {i}")
    base = qimg.load(folder, dtype="float32", device="cpu")
    base.defaults = replace(base.defaults, cfg=4.0)  # a model that guides by default, as qimg-tiny does
    with torch.no_grad():
        items = _encode_kept(base, read_examples(keep)[0], 64, 8.0)
    assert len(items) == 2 and all(cond.negative is None for _, cond, _, _ in items)
    common = dict(data=data, rank=4, steps=30, lr=5e-3, batch=2, targets="all", resolution=64)
    train_lora(base, TrainOptions(out=tmp_path / "plain.safetensors", **common))
    for weight in (1.0, 20.0):
        train_lora(base, TrainOptions(out=tmp_path / f"kept{weight:g}.safetensors", preserve=keep,
                                      preserve_weight=weight, **common))
    tuned = {name: qimg.load(folder, dtype="float32", device="cpu", loras=[tmp_path / f"{name}.safetensors"])
             for name in ("plain", "kept1", "kept20")}
    assert drift(base, tuned["kept1"], keep, True) < 0.5 * drift(base, tuned["plain"], keep, True)
    assert drift(base, tuned["kept20"], keep) < drift(base, tuned["kept1"], keep)
    with pytest.raises(InputError, match="preserve_weight must be > 0"):
        TrainOptions(data=data, out=tmp_path / "x.safetensors", preserve=keep, preserve_weight=0)


def test_orthogonal_training_leaves_the_preserved_prompts_alone(ref21, tmp_path):
    """Null-space training (orthogonal=E): lora_A's rows stay off the directions holding E of the preserved examples'
    inputs to each layer, so on text-side layers prompts like the preserved ones barely move, while the training
    examples (other words) are still learnt."""
    from qimg.adapters.train import read_examples
    from safetensors.torch import load_file

    _, folder = ref21
    data, keep = examples(tmp_path / "data", seed=1), examples(tmp_path / "keep", n=4, seed=2)
    for i in range(4):
        (keep / f"ex{i}.txt").write_text(f"another scene {i}")
    base = qimg.load(folder, dtype="float32", device="cpu")
    common = dict(data=data, rank=4, steps=30, lr=5e-3, batch=2, targets="txt_in", resolution=64, preserve=keep)
    plain = train_lora(base, TrainOptions(out=tmp_path / "plain.safetensors", **common))
    null = train_lora(base, TrainOptions(out=tmp_path / "null.safetensors", orthogonal=0.999, **common))
    assert plain["free_dims"] == {} and null["free_dims"] and all(0 < f for f in null["free_dims"].values())
    tuned = {name: qimg.load(folder, dtype="float32", device="cpu", loras=[tmp_path / f"{name}.safetensors"])
             for name in ("plain", "null")}
    assert drift(base, tuned["null"], keep) < 0.01 * drift(base, tuned["plain"], keep)
    before, learnt = fixed_loss(base, data), fixed_loss(tuned["plain"], data)
    assert before - fixed_loss(tuned["null"], data) > 0.03 * (before - learnt) > 0  # the shipped model's test: more
    weights = load_file(tmp_path / "null.safetensors")
    assert read_examples(keep) and any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)
    with pytest.raises(InputError, match="orthogonal needs preserved examples"):
        TrainOptions(data=data, out=tmp_path / "x.safetensors", orthogonal=0.99)
    with pytest.raises(InputError, match="orthogonal must be between 0 and 1"):
        TrainOptions(data=data, out=tmp_path / "x.safetensors", preserve=keep, orthogonal=1.0)


def world_examples(folder, scenes):
    from qimg.tiny import world

    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        world.render(scene).save(folder / f"ex{i}.png")
        (folder / f"ex{i}.txt").write_text(world.prompt(scene))
    return folder


def test_orthogonal_lora_teaches_the_shipped_model_a_word_and_leaves_other_prompts(tmp_path):
    """On qimg-tiny's text projection: a word the model never saw ("azure") has token states partly outside what
    ordinary prompts use, so null-space training still learns it, more slowly, while prompts that were not among
    the preserved examples move far less. How much more slowly depends on the shipped encoder and the share of
    energy kept fixed: in 40 steps, keeping 99.99%, the 32,978-step model learned about a fifth of what plain
    preservation learns, the 7,792-step model on the 64-channel VAE 3.1%, the 14,500-step model 1.6% and the
    20,000-step model 0.03%; keeping 99% (75 and 120 free input dims), the 14,500-step model 3.7% and the 20,000-step
    model 11%, with the other prompts moving 2.1% and 1.5% as far as under plain preservation."""
    import random

    from qimg.tiny import world

    rng = random.Random(7)

    def azure(scene):
        first = scene.objects[0]
        objects = (world.Obj(first.shape, first.size, "azure", first.cell),) + tuple(scene.objects[1:])
        return world.validate(world.Scene(scene.background, objects, scene.word))

    data = world_examples(tmp_path / "data", [azure(world.random_scene(rng)) for _ in range(6)])
    keep = world_examples(tmp_path / "keep", [world.random_scene(rng) for _ in range(16)])
    other = world_examples(tmp_path / "other", [world.random_scene(rng) for _ in range(6)])
    base = qimg.load(dtype="float32", device="cpu")
    common = dict(data=data, preserve=keep, rank=8, steps=40, lr=2e-3, batch=2, targets="txt_in")
    train_lora(base, TrainOptions(out=tmp_path / "plain.safetensors", **common))
    null = train_lora(base, TrainOptions(out=tmp_path / "null.safetensors", orthogonal=0.99, **common))
    assert all(0 < free < 128 for free in null["free_dims"].values()), null["free_dims"]
    tuned = {name: qimg.load(dtype="float32", device="cpu", loras=[tmp_path / f"{name}.safetensors"])
             for name in ("plain", "null")}
    assert drift(base, tuned["null"], other) < 0.25 * drift(base, tuned["plain"], other)
    before = fixed_loss(base, data)
    assert before - fixed_loss(tuned["null"], data) > 0.015 * (before - fixed_loss(tuned["plain"], data)) > 0
