"""The shipped qimg-tiny checkpoint: loaded by the normal loader, it draws what a simple prompt asks for."""

import numpy as np
import pytest

import qimg
from qimg.cli import main
from qimg.loading.files import default_model_path
from qimg.tiny import checker, world

# The shipped qimg-tiny-layered (37,500 steps) on these 4 held-out scenes measures IoU 0.90 / composite 28.1 dB at its
# default 5 steps; the one shipped before (27,500 steps) 0.86 / 27.1 dB, one at 24,500 steps 0.85 / 26.9 dB, 11,627
# steps 0.56 / 23.8 dB, 6,443 steps 0.50 / 21.8 dB, one without the object-weighted loss 0.47 / 20.2 dB, and one
# trained for 2 steps 0.20 / 9.9 dB.
LAYERED_MIN_IOU, LAYERED_MIN_PSNR = 0.88, 27.6


@pytest.fixture(scope="module")
def tiny():
    return qimg.load()  # no model named: the embedded default, through the same loader as real checkpoints


def test_default_is_the_shipped_checkpoint(tiny):
    assert tiny.info.folder == default_model_path()
    assert tiny.describe()["default_resolution"] == 128
    size = sum(p.stat().st_size for p in default_model_path().rglob("*") if p.is_file())
    assert size < 25e6  # both tiny models together must stay under 40 MB


def test_generates_pictures_the_checker_scores(tiny):
    """Held-out canonical prompts give 128x128 RGBA pictures, reproducible per seed, that the checker reads.

    The shipped model gets the background of 100% of held-out prompts right, puts 95% of objects in their cell
    and colours 92% right (see README), so all three are asserted: here it places and colours 6 of the 8 objects,
    the model shipped before it 6 and 5, the one before that 5 placed, and an untrained model gets about 1
    background in 8."""
    scenes = world.held_out(4, seed=7)
    backgrounds, placed, coloured = [], 0, 0
    for i, scene in enumerate(scenes):
        image = tiny.generate(world.prompt(scene), seed=i)[0]
        assert image.size == (128, 128) and image.mode == "RGBA"
        assert np.asarray(image)[..., :3].std() > 3  # a picture, not a flat fill
        score = checker.score_t2i(image, scene)
        assert set(score) >= {"exact", "background", "objects", "word_exact"}
        assert len(score["objects"]) == len(scene.objects)
        backgrounds.append(score["background"])
        placed += sum(o["position"] for o in score["objects"])
        coloured += sum(o["colour"] for o in score["objects"])
    assert sum(backgrounds) >= 3, backgrounds
    assert placed >= 6, f"{placed} of {sum(len(s.objects) for s in scenes)} objects in their cell"
    assert coloured >= 6, f"{coloured} of {sum(len(s.objects) for s in scenes)} objects in their colour"
    again = tiny.generate(world.prompt(scenes[0]), seed=0)[0]
    first = tiny.generate(world.prompt(scenes[0]), seed=0)[0]
    assert np.array_equal(np.asarray(again), np.asarray(first))


def test_draws_and_edits_held_out_scenes(tiny):
    """40 held-out scenes at the defaults, seeds fixed. The shipped model (20,000 steps on the 64-channel VAE) gets
    27 scenes exactly right, 74 of 74 shapes and 29 of 40 edits, as did the 14,500-step model before it (it fails
    the word test below); the 7,792-step model 27, 74 and 28 (it fails the background-edit test below); its
    4,000-step checkpoint 25, 71 and 21; the model shipped before it (32,978 steps on the 32-channel VAE) 18, 60 and
    19, the one before that (28,338 steps) 16, 58 and 19, so those fail here."""
    import random

    scenes = world.held_out(40, seed=21)
    exact = shapes = 0
    for i, scene in enumerate(scenes):
        score = checker.score_t2i(tiny.generate(world.prompt(scene), seed=i)[0], scene)
        exact += score["exact"]
        shapes += sum(o["shape"] for o in score["objects"])
    satisfied = 0
    for i, scene in enumerate(world.held_out(40, seed=5)):
        instruction, target = world.random_edit(scene, random.Random(100 + i))
        source = world.render(scene)
        out = tiny.generate(instruction, images=[source], seed=i)[0]
        satisfied += checker.score_edit(source, out, scene, target)["satisfied"]
    assert exact >= 24, f"{exact} of 40 scenes exactly right"
    assert shapes >= 70, f"{shapes} of {sum(len(s.objects) for s in scenes)} shapes right"
    assert satisfied >= 27, f"{satisfied} of 40 edits satisfied"


def test_changes_the_background_and_keeps_the_objects(tiny):
    """30 held-out "change the background to ..." edits: the shipped model satisfies 21 (77.5% of the 200-scene
    eval's), the 14,500-step model before it 22 (75%), the 7,792-step model 19 (60%)."""
    import random

    from qimg.tiny import checker

    satisfied = 0
    for i, scene in enumerate(world.held_out(30, seed=9)):
        instruction, target = world.random_edit(scene, random.Random(200 + i), kind="background")
        source = world.render(scene)
        out = tiny.generate(instruction, images=[source], seed=i)[0]
        satisfied += checker.score_edit(source, out, scene, target)["satisfied"]
    assert satisfied >= 21, f"{satisfied} of 30 background changes satisfied"


def test_draws_the_readme_first_command(tiny):
    """The README's first command (a large red circle and a small blue square) for seeds 0-9, read by the checker:
    the shipped model draws it exactly 10 times, as did the one before it (32,978 steps on the old VAE); the
    28,338-step model 5 (the small square read as a circle in the others), the 25,173-step model 2. The issue's
    target is 8."""
    from qimg.tiny.eval import eval_first_command

    result = eval_first_command(tiny, {})
    assert result["of"] == 10 and result["right"] >= 8, result


def test_reads_the_letters_of_a_word(tiny):
    """Words are not drawn legibly yet (README), but the transformer reads their letters: on the 62 word scenes of
    the 200 held-out ones, its error on the word's latent tokens at sigma 0.9 is 1.167x higher with a random word in
    the prompt than with the true one (the 20,000-step model); the 14,500-step model shipped before it 1.084x (and
    the 7,792-step model 1.006x on another 48 word scenes, where the 14,500-step one read 1.096x)."""
    from qimg.tiny.words import word_gap

    gap = word_gap(tiny, world.held_out(200))
    assert gap["scenes"] == 62 and gap["sigmas"]["0.9"]["ratio"] >= 1.12, gap


def test_edit_keeps_the_picture(tiny):
    """A recolour edit leaves the rest of the picture as it was: the untouched region stays close to the source
    (the shipped model averages 36.7 dB there on 200 held-out edits and 32.2 dB on these 4, the 14,500-step model
    before it 36.4 and 32.1 dB, the 7,792-step model 35.6 and 31.7 dB, the 32,978-step model 30.7 and 27.4 dB),
    and the picture does change."""
    import random

    from qimg.tiny import checker

    kept = []
    for i, scene in enumerate(world.held_out(4, seed=3)):
        instruction, target = world.random_edit(scene, random.Random(i), kind="recolour")
        source = world.render(scene)
        out = tiny.generate(instruction, images=[source], seed=i)[0]
        assert out.size == source.size
        kept.append(checker.score_edit(source, out, scene, target)["untouched_psnr"])
        assert np.abs(np.asarray(out.convert("RGB"), int) - np.asarray(source.convert("RGB"), int)).max() > 16
    assert np.mean(kept) >= 29, kept


def test_guidance_and_steps_default_per_task(tiny):
    """qimg-tiny generates at 5 steps and cfg 2 and edits at 2 steps and cfg 1 unless asked (measured best for
    each); a checkpoint without `default_edit_cfg` / `default_edit_steps` uses its one value for both."""
    from qimg.pipelines.base import Defaults

    described = tiny.describe()
    assert (described["default_cfg"], described["default_edit_cfg"]) == (2.0, 1.0)
    assert (described["default_steps"], described["default_edit_steps"]) == (5, 2)
    picture = tiny.generate("a large red circle in the center on a blue background", seed=0)[0]
    edited = tiny.generate("change the background to green", images=[picture], seed=0)[0]
    asked = tiny.generate("change the background to green", images=[picture], seed=0, steps=1, cfg=3.0)[0]
    assert [x.info["qimg"]["cfg"] for x in (picture, edited, asked)] == [2.0, 1.0, 3.0]
    assert [x.info["qimg"]["steps"] for x in (picture, edited, asked)] == [5, 2, 1]
    plain = Defaults.read({"_qimg": {"default_cfg": 4, "default_steps": 6}}, Defaults(resolution=64, steps=8))
    assert plain.cfg_for(True) == plain.cfg_for(False) == 4.0
    assert plain.steps_for(True) == plain.steps_for(False) == 6


def test_main_command_on_the_default(tmp_path, capsys):
    out = tmp_path / "qimg.png"
    assert main(["generate", "a large red circle in the center on a blue background", "-o", str(out), "--quiet"]) == 0
    assert str(out.resolve()) in capsys.readouterr().out


def test_training_resumes_from_the_shipped_export(tmp_path, monkeypatch):
    """A recipe whose VAE is the shipped one's resumes every stage from the export (a recipe with another VAE only
    borrows its encoder and blocks: tests/test_tiny_train.py)."""
    import json

    import torch

    import qimg.tiny.train as T

    shipped_vae = json.loads((default_model_path() / "vae" / "config.json").read_text())
    monkeypatch.setattr(T, "VAE", {k: shipped_vae[k] for k in T.VAE})
    z = shipped_vae["z_dim"]
    monkeypatch.setattr(T, "DIT", {**T.DIT, "in_channels": z, "out_channels": z})
    assert T.resume_from_export(default_model_path(), tmp_path)
    assert T.load_vae(tmp_path).config.latents_std == tuple(qimg.load().vae.config.latents_std)
    if qimg.load().info.folder.joinpath("model_index.json").read_text().count(T.ENCODER_INIT) == 0:
        assert not (tmp_path / "state-dit.pt").exists()  # an export from before the encoder fix: VAE only
        return
    state = torch.load(tmp_path / "state-dit.pt", weights_only=False)
    model = T.QwenImage21Transformer(T.QwenImage21Config(**T.DIT))
    model.load_state_dict(state["model"])
    T.build_text_encoder(T._load_or_build_tokenizer(tmp_path)).load_state_dict(state["text_encoder"])
    assert T.load_vae(tmp_path).config.latents_std == tuple(qimg.load().vae.config.latents_std)
    assert T.refine_decoder(tmp_path, 0.0)  # the shipped VAE's refined decoder counts as a finished stage
    shipped = qimg.load().vae.state_dict()
    assert all(torch.equal(v, shipped[k].float()) for k, v in T.load_vae(tmp_path).state_dict().items())
    assert not T.resume_from_export(default_model_path(), tmp_path)  # never overwrites a work folder


# -- qimg-tiny-layered ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_layered():
    return qimg.load(task="layers")  # the embedded default for layers, through the same loader


def test_layered_default_is_the_shipped_checkpoint(tiny_layered):
    assert tiny_layered.info.folder == default_model_path("layers") != default_model_path()
    assert tiny_layered.describe()["pipeline"] == "QwenImageLayeredPipeline"
    assert qimg.load("qimg-tiny-layered").info.folder == tiny_layered.info.folder  # also by name
    total = sum(p.stat().st_size for m in (default_model_path(), default_model_path("layers"))
                for p in m.rglob("*") if p.is_file())
    assert total < 40e6  # both tiny models together


def test_layered_splits_a_held_out_scene(tiny_layered):
    """The default path (the model captions the picture itself) gives the scene's layers back."""
    scores = []
    for i, scene in enumerate(world.held_out(4, seed=11)):
        truth = world.render_layers(scene)
        layers = tiny_layered.layers(world.render(scene), layers=len(truth), seed=i)
        assert len(layers) == len(truth) and all(x.size == (128, 128) and x.mode == "RGBA" for x in layers)
        assert layers[0].info["qimg"]["prompt"].strip()  # the caption it wrote
        scores.append(checker.score_layers(layers, truth))
    assert np.mean([s["mean_alpha_iou"] for s in scores]) > LAYERED_MIN_IOU
    assert np.mean([s["composite_psnr"] for s in scores]) > LAYERED_MIN_PSNR


def test_layers_command_on_the_default(tmp_path, capsys):
    src = tmp_path / "in.png"
    world.render(world.held_out(1, seed=2)[0]).save(src)
    out = tmp_path / "layers.psd"
    assert main(["layers", str(src), "-o", str(out), "--layers", "3", "--quiet"]) == 0
    assert str(out.resolve()) in capsys.readouterr().out and out.stat().st_size > 0


# -- qimg tiny eval ---------------------------------------------------------------------------------------------
def test_tiny_eval_command_writes_scores_and_a_grid(tmp_path, capsys):
    import json

    from PIL import Image

    assert main(["tiny", "eval", "--n", "3", "--steps", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["held_out_scenes"] == 3 and data["steps"] == 2
    assert data["model"]["pipeline"] == "QwenImage21Pipeline"
    assert data["layered_model"]["pipeline"] == "QwenImageLayeredPipeline"
    t2i, edit, layers = data["t2i"], data["edit"], data["layers"]
    assert t2i["n"] == edit["n"] == layers["n"] == 3
    for value in (t2i["exact"], t2i["colour"], t2i["shape"], t2i["size"], t2i["position"], edit["satisfied"],
                  layers["mean_alpha_iou"]):
        assert 0 <= value <= 1
    assert edit["untouched_psnr"] > 5 and layers["composite_psnr"] > 5
    kinds = t2i["shape_by_kind"]  # per size and shape: right, of, and what the misses were read as
    assert set(kinds) <= {f"{z} {s}" for z in world.SIZES for s in world.SHAPES}
    assert all(k["right"] + sum(k["read_as"].values()) == k["of"] for k in kinds.values())
    assert sum(k["right"] for k in kinds.values()) == round(t2i["shape"] * sum(k["of"] for k in kinds.values()))
    by_count = [v for v in layers["mean_alpha_iou_by_objects"].values() if v is not None]
    assert by_count and min(by_count) - 1e-9 <= layers["mean_alpha_iou"] <= max(by_count) + 1e-9
    assert all(data[task]["seconds_per_image"] > 0 for task in ("t2i", "edit", "layers"))
    with Image.open(tmp_path / "samples.png") as grid:
        assert grid.width == 6 * 128 and grid.height >= 3 * 168  # 3 t2i + 3 edit samples, then two layer strips
    assert "wrote" in capsys.readouterr().out
    assert main(["tiny", "eval", "--n", "0", "--out", str(tmp_path)]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    # per-scene rows: the prompt, the verdict and what the checker read, in the order of the held-out scenes
    rows = t2i["scenes"]
    assert [r["prompt"] for r in rows] == [world.prompt(s) for s in world.held_out(3)]
    assert sum(r["exact"] for r in rows) == round(3 * t2i["exact"]) and all(r["detected"] for r in rows)
    assert [len(r["objects"]) for r in rows] == [len(s.objects) for s in world.held_out(3)]
    assert sum(r["satisfied"] for r in edit["scenes"]) == round(3 * edit["satisfied"])
    assert all(world.parse_edit(r["instruction"]).kind == r["kind"] for r in edit["scenes"])
    assert len(layers["scenes"]) == 3
    again = tmp_path / "again"  # the same scenes, fewer steps: compared scene by scene
    assert main(["tiny", "eval", "--n", "3", "--steps", "1", "--tasks", "t2i,edit", "--quiet", "--out", str(again),
                 "--against", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    assert f"t2i against {tmp_path / 'eval.json'}: passed in both" in out and "sign test p =" in out
    assert main(["tiny", "eval", "--n", "4", "--out", str(again), "--against", str(tmp_path / "eval.json")]) == 2
    assert "scored 3 held-out scenes, this run --n 4" in capsys.readouterr().err
