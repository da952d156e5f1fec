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


def drift(base, tuned, folder) -> float:
    """How far the tuned model's velocities move from the base model's on `folder`'s examples (fixed noise)."""
    from qimg.adapters.train import read_examples
    from qimg.options import GenerateOptions

    total = 0.0
    with torch.no_grad():
        for i, ex in enumerate(read_examples(folder)):
            outs = []
            for pipe in (base, tuned):
                plan = pipe.plan(GenerateOptions(prompt=ex.prompt, width=64, height=64, steps=1, seed=0, cfg=1))
                x0 = pipe.image_tokens(plan, ex.target)
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(i))
                cond = pipe.encode(plan)
                outs.append(pipe.velocity(plan, cond.positive, cond.extra)(0.2 * x0 + 0.8 * noise,
                                                                          torch.tensor([0.8])))
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
