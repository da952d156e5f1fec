"""qimg-tiny training code: the losses fall on repeated batches, and the export loads through the normal loader."""

import random
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qimg.tiny.fit as fit
import qimg.tiny.train as T
import qimg.tiny.train_layered as L
from qimg.models.qwenimage21 import QwenImage21Config, QwenImage21Transformer
from qimg.models.vae import VAE
from qimg.models.vae21 import VAE21
from qimg.tiny import world

pytestmark = pytest.mark.slow  # quick subset: python -m pytest -q -m 'not slow'


def test_vae_loss_falls():
    torch.manual_seed(0)
    vae = VAE21(T.vae_config()).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    rng = random.Random(0)
    x = T.rgba_tensor([world.render_array(world.random_scene(rng))[32:96, 32:96] for _ in range(4)])
    losses = []
    for _ in range(12):
        out = vae._decode(vae._encode(x))
        loss = F.l1_loss(out, x) + F.mse_loss(out, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("module,vae_class", [(T, VAE21), (L, VAE)], ids=["tiny", "layered"])
def test_decoder_stage_trains_the_decoder_only(module, vae_class, tmp_path, monkeypatch):
    frames, masks = module._decoder_batch(random.Random(9))
    assert len(frames) == len(masks) >= 4
    for frame, mask in zip(frames, masks):  # the mask is exactly what is not background (or not empty)
        assert mask.any() and len(np.unique(frame[~mask].reshape(-1, frame.shape[-1]), axis=0)) == 1
    torch.manual_seed(0)
    T._save(tmp_path / "state-vae.pt", model=vae_class(module.vae_config()).state_dict(), opt=None, step=0)
    plain = module.load_vae(tmp_path)
    x = T.rgba_tensor(frames)

    def error(vae):
        with torch.no_grad():
            return F.l1_loss(vae._decode(vae._encode(x)), x).item()

    monkeypatch.setattr(module, "DECODER_STEPS", 10)
    monkeypatch.setattr(fit, "DECODER_LR", 1e-2)
    assert module.refine_decoder(tmp_path, time.time() + 300)
    refined = module.load_vae(tmp_path)
    assert module.load_vae(tmp_path, refined=False).state_dict()["decoder.conv_out.weight"].equal(
        plain.state_dict()["decoder.conv_out.weight"])
    for name, value in refined.state_dict().items():  # the encoder, and so every latent, is unchanged
        if not name.startswith(("decoder.", "post_quant_conv.")):
            assert value.equal(plain.state_dict()[name]), name
    assert not refined.state_dict()["decoder.conv_out.weight"].equal(plain.state_dict()["decoder.conv_out.weight"])
    assert error(refined) < 0.9 * error(plain)


def test_dit_loss_falls(tmp_path):
    """Joint transformer + Qwen3-VL steps on one repeated batch (t2i and edit) lower the flow-matching loss."""
    tokenizer = T._load_or_build_tokenizer(tmp_path)
    cond = T.Conditioning(T.build_processor(tokenizer), T.build_text_encoder(tokenizer).train())
    torch.manual_seed(0)
    model = QwenImage21Transformer(QwenImage21Config(**{**T.DIT, "num_layers": 2})).train()
    T._init_dit(model)
    rng = random.Random(0)
    pairs = []
    while len(pairs) < 16:
        src = world.random_scene(rng)
        instruction, tgt = world.random_edit(src, rng)
        pairs.append((src, instruction, tgt))
    z = T.VAE["z_dim"]
    src, tgt = torch.randn(16, z, T.GRID, T.GRID), torch.randn(16, z, T.GRID, T.GRID)
    params = list(model.parameters()) + list(cond.model.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3)
    for task in ("t2i", "edit"):
        losses = []
        for _ in range(8):
            torch.manual_seed(1)
            loss = T._dit_step(model, cond, random.Random(3), task, T.LatentPool(src, tgt, pairs), 8, progress=1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.9 * losses[0], (task, losses)


def test_object_tokens_mark_the_objects_and_words_only():
    rng = random.Random(5)
    for _ in range(20):
        scene = world.random_scene(rng, word_prob=0.5)
        marked = T.object_tokens(scene).view(T.GRID, T.GRID)
        items = [o.cell for o in scene.objects] + ([scene.word.cell] if scene.word else [])
        for cell in items:  # the token under each item's centre is marked
            cx, cy = world.cell_centre(cell)
            assert marked[int(cy // T.SCALE), int(cx // T.SCALE)] == 1
        for cell in set(range(9)) - set(items):  # no token lying wholly inside an empty cell is
            x0, y0, x1, y1 = world.cell_box(cell)
            for ty in range(-(-y0 // T.SCALE), y1 // T.SCALE):
                for tx in range(-(-x0 // T.SCALE), x1 // T.SCALE):
                    assert marked[ty, tx] == 0, (world.prompt(scene), cell, ty, tx)


def test_word_tokens_cover_the_word_and_nothing_else():
    rng = random.Random(9)
    seen = 0
    while seen < 10:
        scene = world.random_scene(rng, word_prob=1.0)
        if scene.word is None or not scene.objects:
            continue
        words, items = T.word_tokens(scene), T.object_tokens(scene)
        cx, cy = world.cell_centre(scene.word.cell)
        grid = words.view(T.GRID, T.GRID)
        assert grid[int(cy // T.SCALE), int(cx // T.SCALE)] == 1
        for o in scene.objects:  # an object's centre token holds no ink of the word (they sit in other cells)
            ox, oy = world.cell_centre(o.cell)
            assert grid[int(oy // T.SCALE), int(ox // T.SCALE)] == 0
        assert bool((words <= items).all())  # the word's tokens are among the foreground tokens
        assert T.word_tokens(world.Scene(scene.background, scene.objects, None)).sum() == 0
        seen += 1


def test_text_to_image_frames_show_a_word_word_share_of_the_time():
    rng = random.Random(4)
    pairs = [(s, *world.random_edit(s, rng)) for s in (world.random_scene(rng, word_prob=0.2) for _ in range(400))]
    pool = T.LatentPool(None, None, pairs)
    frames = [pool.draw_frame(rng) for _ in range(4000)]
    shown = [pairs[i][2] if use_t else pairs[i][0] for i, use_t in frames]
    share = sum(s.word is not None for s in shown) / len(shown)
    natural = len(pool.word_frames) / (2 * len(pairs))
    assert natural < 0.3 and abs(share - (T.WORD_SHARE + (1 - T.WORD_SHARE) * natural)) < 0.03, (share, natural)


def test_object_weighted_dit_loss(tmp_path, monkeypatch):
    """With no token weighted up the object-weighted loss is the plain loss; with the object masks it differs."""
    tokenizer = T._load_or_build_tokenizer(tmp_path)
    cond = T.Conditioning(T.build_processor(tokenizer), T.build_text_encoder(tokenizer))
    torch.manual_seed(0)
    model = QwenImage21Transformer(QwenImage21Config(**{**T.DIT, "num_layers": 1}))
    rng = random.Random(0)
    pairs = [(s, *world.random_edit(s, rng)) for s in (world.random_scene(rng) for _ in range(8))]
    z = T.VAE["z_dim"]
    src, tgt = torch.randn(8, z, T.GRID, T.GRID), torch.randn(8, z, T.GRID, T.GRID)

    def loss(weight, task="t2i", tokens=None):
        monkeypatch.setattr(T, "DIT_OBJECT_WEIGHT", weight)
        monkeypatch.setattr(T, "DIT_WORD_WEIGHT", weight)
        pool = T.LatentPool(src, tgt, pairs)
        if tokens is not None:
            monkeypatch.setattr(pool, "weight_mask", tokens)
            monkeypatch.setattr(pool, "word_mask", tokens)
        torch.manual_seed(1)
        with torch.no_grad():
            return T._dit_step(model, cond, random.Random(3), task, pool, 4, progress=1.0).item()

    for task in ("t2i", "edit"):
        plain = loss(0.0, task)
        assert loss(8.0, task, lambda *a: torch.zeros(T.GRID ** 2)) == pytest.approx(plain, rel=1e-5)
        monkeypatch.undo()
        assert abs(loss(8.0, task) - plain) > 1e-4 * plain


def test_edit_weight_mask_marks_what_the_edit_changes():
    """An edit's mask holds the target's objects and every token the edit changes: a removed object's cell too."""
    rng = random.Random(7)
    checked = 0
    while checked < 5:
        scene = world.random_scene(rng, n_objects=2)
        instruction, target = world.random_edit(scene, rng, kind="remove")
        pool = T.LatentPool(None, None, [(scene, instruction, target)])
        mask = pool.weight_mask(0, "edit", True).view(T.GRID, T.GRID)
        gone = [o for o in scene.objects if o not in target.objects]
        cx, cy = world.cell_centre(gone[0].cell)
        assert mask[int(cy // T.SCALE), int(cx // T.SCALE)] == 1
        assert pool.weight_mask(0, "t2i", True).view(T.GRID, T.GRID)[int(cy // T.SCALE), int(cx // T.SCALE)] == 0
        checked += 1


class StepClock:
    """A stand-in for the `time` module in qimg.tiny.train: every time() call is one second later."""

    def __init__(self):
        self.now = 0.0

    def time(self):
        self.now += 1
        return self.now

    @staticmethod
    def strftime(fmt):
        return time.strftime(fmt)


def test_a_seed_fixes_the_run_and_a_resumed_run_matches(tmp_path, monkeypatch):
    """Two runs with one seed give the same weights, also when one of them stops mid-stage and resumes; another
    seed gives others; a work folder refuses a seed it was not started with."""
    from qimg.errors import InputError

    for name, value in (("VAE_STEPS", 3), ("POOL_PAIRS", 64), ("DECODER_STEPS", 2), ("DIT_STEPS", 4)):
        monkeypatch.setattr(T, name, value)
    no_export = ("vae", "latents", "decoder", "dit")
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert T.run(10, a, tmp_path / "none", stages=no_export, seed=7)
    assert T.run(10, b, tmp_path / "none", stages=no_export[:3], seed=7)
    monkeypatch.setattr(T, "time", StepClock())
    assert not T.train_dit(b, deadline=3.5, seed=7)  # stops after 2 of 4 steps
    monkeypatch.setattr(T, "time", time)
    assert torch.load(b / "state-dit.pt", weights_only=False)["step"] == 2
    assert T.run(10, b, tmp_path / "none", stages=no_export, seed=7)
    for stage in ("vae", "decoder", "dit"):
        first, second = (torch.load(w / f"state-{stage}.pt", weights_only=False) for w in (a, b))
        assert first["step"] == second["step"] > 0
        for key, value in first["model"].items():
            assert value.equal(second["model"][key]), (stage, key)
    ema = torch.load(a / "state-dit.pt", weights_only=False)["ema"]
    assert all(v.equal(torch.load(b / "state-dit.pt", weights_only=False)["ema"][k]) for k, v in ema.items())

    assert T.run(10, c, tmp_path / "none", stages=("vae",), seed=8)
    other = torch.load(c / "state-vae.pt", weights_only=False)["model"]
    assert not other["decoder.conv_out.weight"].equal(
        torch.load(a / "state-vae.pt", weights_only=False)["model"]["decoder.conv_out.weight"])
    with pytest.raises(InputError, match="started with seed 7"):
        T.run(10, a, tmp_path / "none", seed=8)


def test_corpus_keeps_capitals_as_single_tokens(tmp_path):
    tok = T._load_or_build_tokenizer(tmp_path)
    ids = tok('with the word "QZX" in red').input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert "Q" in pieces and "Z" in pieces and "X" in pieces


def test_short_run_exports_loads_and_resumes(tmp_path, monkeypatch, capsys):
    """Every stage for a few steps, exported and loaded like a real checkpoint; a longer schedule then resumes the
    transformer from its checkpoint instead of starting over."""
    import json

    import qimg

    for name, value in (("VAE_STEPS", 2), ("POOL_PAIRS", 64), ("DECODER_STEPS", 2), ("DIT_STEPS", 2)):
        monkeypatch.setattr(T, name, value)
    work, out = tmp_path / "work", tmp_path / "out"
    assert T.run(10, work, out)
    pipe = qimg.load(out)
    assert pipe.describe()["pipeline"] == "QwenImage21Pipeline" and pipe.describe()["default_resolution"] == 128
    image = pipe.generate(world.prompt(world.held_out(1, seed=5)[0]), steps=2, seed=0)[0]
    assert image.size == (128, 128) and image.mode == "RGBA"
    first = torch.load(work / "state-dit.pt", weights_only=False)
    capsys.readouterr()
    assert T.run(10, work, out, steps=3)  # `qimg tiny train --steps 3`
    again = torch.load(work / "state-dit.pt", weights_only=False)
    assert again["step"] == 3 and first["step"] == 2
    # the lengthened schedule warms its rate up again from where it resumed; an unchanged one does not
    assert first["total"] == 2 and again["total"] == 3 and first["warm_from"] == 0 and again["warm_from"] == 2
    log = capsys.readouterr().out
    assert "dit: step 2/3" in log  # resumed at step 2, not started over
    assert "vae: step" not in log and "decoder: step" not in log  # finished stages are not rerun
    meta = json.loads((out / "model_index.json").read_text())["_qimg"]
    assert meta["trained_steps"] == 3 and meta["decoder_steps"] == 2
    again_out = tmp_path / "again"  # no time at all: the finished stages return at once and the export is written
    assert T.run(0, work, again_out)
    assert json.loads((again_out / "model_index.json").read_text())["_qimg"]["trained_steps"] == 3


def test_tiny_train_cli_takes_a_seed(tmp_path, capsys):
    import json

    from qimg.cli import main

    work, out = tmp_path / "work", tmp_path / "out"
    args = ["tiny", "train", "--minutes", "0", "--work", str(work), "--out", str(out)]
    assert main([*args, "--seed", "5"]) == 0
    # no time for the stages before the transformer: it says so, not that it exported
    assert "nothing exported yet" in capsys.readouterr().out and not (out / "model_index.json").exists()
    assert json.loads((work / "seed.json").read_text()) == {"seed": 5}
    assert main([*args, "--seed", "6"]) == 2
    assert "was started with seed 5; resume it with --seed 5" in capsys.readouterr().err
    assert main(args) == 2  # no --seed means 1234, not "whatever the folder has"


def test_edit_kinds_are_drawn_evenly():
    """Edit training draws every kind equally often, though the pool holds them unevenly."""
    from collections import Counter

    rng = random.Random(11)
    pairs = []
    while len(pairs) < 600:
        scene = world.random_scene(rng, word_prob=0.3)
        kind = "background" if len(pairs) < 400 else None  # two thirds of the pool are background changes
        pairs.append((scene, *world.random_edit(scene, rng, kind=kind)))
    pool = T.LatentPool(None, None, pairs)
    drawn = Counter(world.parse_edit(T.draw_edit(pool, rng)[0]).kind for _ in range(6000))
    assert set(drawn) == set(pool.kinds) and len(drawn) >= 5
    share = 1 / len(drawn)
    assert all(abs(n / 6000 - share) < 0.03 for n in drawn.values()), drawn


def test_train_refuses_a_device_it_cannot_use(tmp_path, capsys):
    import torch

    from qimg.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    base = ["tiny", "train", "--minutes", "0", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    assert main([*base, "--device", "cuda"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
    assert main([*base, "--device", "cuda", "--model", "layered"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
    assert main([*base, "--device", "mps"]) == 2
    assert "expected cpu or cuda[:N]" in capsys.readouterr().err
    assert main([*base, "--batch", "0"]) == 2
    assert "--batch must be at least 1, got 0" in capsys.readouterr().err
    assert main([*base, "--steps", "-5"]) == 2
    assert "--steps must be at least 1, got -5" in capsys.readouterr().err


def test_vae_crops_keep_an_object_or_word_in_view_and_weight_it():
    for seed in range(3):
        frames, masks = T._vae_crops(random.Random(seed))
        assert len(frames) == len(masks) == 16
        for frame, mask in zip(frames, masks):
            assert frame.shape[:2] == mask.shape == (64, 64)
            assert mask.sum() >= 40  # a whole small object or word, not a sliver at the edge
            assert len(np.unique(frame[~mask].reshape(-1, frame.shape[-1]), axis=0)) <= 1  # the rest: background
    mask = np.zeros((1, 16, 16), bool)
    mask[0, 8, 8] = True
    weight = fit.pixel_weight(mask)[0, 0]
    assert weight[6:11, 6:11].eq(1 + fit.OBJECT_WEIGHT).all() and weight.sum() == 256 + 25 * fit.OBJECT_WEIGHT


def test_an_export_of_another_vae_lends_its_encoder_and_blocks(tmp_path, monkeypatch, capsys):
    """When the recipe's VAE differs from the export's, no stage is resumed but the transformer stage starts from
    the export's condition encoder and transformer blocks, with fresh latent-facing layers."""
    import json

    from qimg.loading.weights import open_state_dict
    from qimg.loading.files import default_model_path

    shipped = default_model_path()
    z = 16 if json.loads((shipped / "vae" / "config.json").read_text())["z_dim"] != 16 else 32  # not the export's
    monkeypatch.setattr(T, "VAE", {**T.VAE, "z_dim": z})
    monkeypatch.setattr(T, "DIT", {**T.DIT, "in_channels": z, "out_channels": z})
    assert T.resume_from_export(shipped, tmp_path)
    assert "its VAE is not this recipe's" in capsys.readouterr().out
    assert not (tmp_path / "state-vae.pt").exists() and not (tmp_path / "latent-stats.json").exists()
    state = torch.load(tmp_path / "state-dit.pt", weights_only=False)
    assert state["step"] == 0 and state["opt"] is None
    blocks = open_state_dict(shipped / "transformer", "diffusion_pytorch_model")
    model = QwenImage21Transformer(QwenImage21Config(**T.DIT))
    model.load_state_dict(state["model"])
    assert model.img_in.weight.shape[1] == z and model.proj_out.weight.abs().sum() == 0  # fresh, zero output
    for key in ("transformer_blocks.0.attn.to_q.weight", "txt_in.in_layer.weight", "norm_out.linear.weight"):
        assert state["model"][key].equal(blocks[key].float()), key
    te = T.build_text_encoder(T._load_or_build_tokenizer(tmp_path))
    te.load_state_dict(state["text_encoder"])  # the export's tokenizer came along, so its encoder fits
    assert (tmp_path / "tokenizer.json").read_text() == (shipped / "tokenizer-bpe.json").read_text()
    assert not T.resume_from_export(shipped, tmp_path)  # never overwrites a work folder
    # the fresh layers are the ones a run of that seed draws: another seed, other layers and another data stream
    torch.manual_seed(T.SEED)
    fresh = QwenImage21Transformer(QwenImage21Config(**T.DIT))
    T._init_dit(fresh)
    assert state["model"]["img_in.weight"].equal(fresh.img_in.weight)
    (tmp_path / "seed7").mkdir()
    assert T.resume_from_export(shipped, tmp_path / "seed7", seed=7)
    other = torch.load(tmp_path / "seed7" / "state-dit.pt", weights_only=False)
    assert not other["model"]["img_in.weight"].equal(state["model"]["img_in.weight"])
    assert other["model"]["txt_in.in_layer.weight"].equal(state["model"]["txt_in.in_layer.weight"])
    assert other["rng"].random() != state["rng"].random()
