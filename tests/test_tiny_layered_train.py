"""qimg-tiny-layered training code: frames and layer order, falling losses on repeated batches, and a whole (very
short) run whose export loads through the normal loader and decomposes an image."""

import random
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qimg
import qimg.tiny.train_layered as L
from qimg.models.qwenimage import QwenImageConfig, QwenImageTransformer
from qimg.models.vae import VAE
from qimg.tiny import checker, world
from qimg.tiny.train import rgba_tensor

pytestmark = pytest.mark.slow  # quick subset: python -m pytest -q -m 'not slow'


def test_frames_are_the_composite_then_layers_in_reading_order():
    rng = random.Random(4)
    scene = next(s for s in (world.random_scene(rng, n_objects=3) for _ in range(100)) if s.word is not None)
    frames = L.frames_of(scene)
    assert frames.shape == (1 + 1 + 3 + 1, 128, 128, 4)
    assert (frames[0, ..., 3] == 255).all()
    assert np.array_equal(frames[0, ..., :3], world.composite_array(list(frames[1:]))[..., :3])
    cells = [o.cell for o in L.layer_scene(scene).objects]
    assert cells == sorted(cells)
    keys = L.layer_keys(scene)
    assert len(keys) == len(frames) - 1 and keys[0] == ("background", scene.background) and keys[-1] is None
    for key, layer in zip(keys[1:-1], frames[2:-1]):  # a cached object layer is the same whatever the scene
        alone = world.Scene("black" if key.colour != "black" else "white", (key,))
        assert np.array_equal(L.frames_of(alone)[2], layer)
    clear = frames[2:, ..., 3] == 0  # transparent pixels carry no colour, so an object layer is local
    assert clear.any() and not frames[2:][clear].any()
    assert np.array_equal(frames[2:][~clear], world.layer_arrays(L.layer_scene(scene))[1:][~clear])


def test_vae_loss_falls():
    torch.manual_seed(0)
    vae = VAE(L.vae_config()).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=L.VAE_LR)
    rng = random.Random(0)
    x = rgba_tensor([L.frames_of(world.random_scene(rng))[k][32:96, 32:96] for k in (0, 1, 2, 0)])
    losses = []
    for _ in range(20):
        loss = F.l1_loss(vae._decode(vae._encode(x)), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_caption_and_transformer_losses_fall(tmp_path):
    tokenizer = L.load_or_build_tokenizer(tmp_path)
    processor = L.build_processor(tokenizer)
    vlm = L.build_text_encoder(tokenizer).train()
    rng = random.Random(0)
    scenes = [world.random_scene(rng, n_objects=2, word_prob=0.0) for _ in range(4)]  # 3 layers each
    inputs, labels = L._caption_batch(processor, scenes, rng)
    assert (labels != -100).sum() > 4 * 10  # the captions (and their end tokens) are the targets
    fwd = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw") if k in inputs}
    opt = torch.optim.AdamW(vlm.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = vlm(**fwd, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses

    vlm.eval().requires_grad_(False)
    torch.manual_seed(0)
    model = QwenImageTransformer(QwenImageConfig(**{**L.DIT, "num_layers": 2})).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x0 = torch.randn(4, 4, L.Z, 16, 16)  # composite + 3 layers
    losses = []
    for _ in range(8):
        torch.manual_seed(1)
        loss = L.layered_loss(model, tokenizer, vlm, x0, scenes, random.Random(2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_layer_tokens_mark_each_layer_frame_with_its_own_item():
    rng = random.Random(4)
    for _ in range(10):
        scene = world.random_scene(rng, word_prob=0.0)  # a word's centre may fall between its letters
        layers = world.layer_arrays(scene)
        marked = L.layer_tokens(scene, len(layers) + 2).view(-1, 8, 8)  # one extra, empty frame
        assert marked[:2].sum() == 0 and marked[-1].sum() == 0  # composite, background, the extra frame
        items = [o.cell for o in scene.objects]
        assert len(items) == len(layers) - 1
        centres = [tuple(int(c) for c in world.cell_centre(cell)) for cell in items]
        for frame, layer in zip(marked[2:-1], layers[1:]):
            own = [(x, y) for x, y in centres if layer[y, x, 3] > 0]
            assert len(own) == 1  # each layer holds one item
            for x, y in centres:  # its frame marks its own item's centre token and no other item's
                assert frame[y // 16, x // 16] == ((x, y) in own)
            assert 0 < frame.sum() <= 16


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """Every stage for a few steps, exported and loaded like a real checkpoint."""
    root = tmp_path_factory.mktemp("layered")
    saved = L.VAE_STEPS, L.POOL_SCENES, L.DECODER_STEPS, L.CAPTION_STEPS, L.DIT_STEPS
    L.VAE_STEPS, L.POOL_SCENES, L.DECODER_STEPS, L.CAPTION_STEPS, L.DIT_STEPS = 2, 32, 2, 2, 2
    try:
        assert L.run(10, root / "work", root / "out")
    finally:
        L.VAE_STEPS, L.POOL_SCENES, L.DECODER_STEPS, L.CAPTION_STEPS, L.DIT_STEPS = saved
    return root


def test_short_run_exports_a_loadable_layered_model(short_run):
    pipe = qimg.load(short_run / "out")
    assert pipe.describe()["pipeline"] == "QwenImageLayeredPipeline" and pipe.describe()["default_resolution"] == 128
    scene = world.held_out(1, seed=5)[0]
    truth = world.render_layers(scene)
    layers = pipe.layers(world.render(scene), layers=len(truth), prompt=world.prompt(scene), steps=2, seed=0)
    assert len(layers) == len(truth) and all(x.size == (128, 128) and x.mode == "RGBA" for x in layers)
    score = checker.score_layers(layers, truth)
    assert 0 <= score["mean_alpha_iou"] <= 1 and score["n_pred"] == len(truth)


def test_training_resumes_from_an_export(short_run, tmp_path):
    out = short_run / "out"
    assert L.resume_from_export(out, tmp_path)
    state = torch.load(tmp_path / "state-dit.pt", weights_only=False)
    model = QwenImageTransformer(QwenImageConfig(**L.DIT))
    model.load_state_dict(state["model"])
    tokenizer, vlm = L.load_text_encoder(tmp_path)
    assert len(tokenizer) == len(L.load_or_build_tokenizer(short_run / "work"))
    assert L.load_vae(tmp_path).config.latents_std == tuple(qimg.load(out).vae.config.latents_std)
    decoder = torch.load(tmp_path / "state-decoder.pt", weights_only=False)  # the refined decoder counts as done
    assert decoder["step"] == L.DECODER_STEPS and L.refine_decoder(tmp_path, time.time())
    shipped = qimg.load(out).vae.state_dict()
    assert all(torch.allclose(v, shipped[k].float()) for k, v in L.load_vae(tmp_path).state_dict().items())
    assert not L.resume_from_export(out, tmp_path)  # never overwrites a work folder


def test_a_lengthened_schedule_resumes_and_warms_up_again(short_run, tmp_path, monkeypatch):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(short_run / "work", work)
    first = torch.load(work / "state-dit.pt", weights_only=False)
    for name, value in (("VAE_STEPS", 2), ("POOL_SCENES", 32), ("DECODER_STEPS", 2), ("CAPTION_STEPS", 2),
                        ("DIT_STEPS", 3)):
        monkeypatch.setattr(L, name, value)
    assert L.run(10, work, tmp_path / "out")
    again = torch.load(work / "state-dit.pt", weights_only=False)
    assert first["step"] == first["total"] == 2 and first["warm_from"] == 0
    assert again["step"] == again["total"] == 3 and again["warm_from"] == 2  # resumed, rate warmed up from there


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_transformer_stage_trains_on_cuda(short_run, tmp_path, monkeypatch):
    """`--device cuda`: the stage trains under bf16 autocast, its checkpoint holds CPU tensors (it resumes anywhere)
    and the export loads."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(short_run / "work", work)
    monkeypatch.setattr(L, "DIT_STEPS", 4)
    assert L.train_dit(work, time.time() + 600, batch=16, device="cuda")
    state = torch.load(work / "state-dit.pt", weights_only=False)
    assert state["step"] == 4
    assert all(v.device.type == "cpu" for v in (*state["model"].values(), *state["ema"].values()))
    assert all(t.device.type == "cpu" for s in state["opt"]["state"].values() for t in s.values()
               if isinstance(t, torch.Tensor))  # the optimizer state too: it resumes without a GPU
    assert all(torch.isfinite(v).all() for v in state["ema"].values())
    pipe = qimg.load(L.export(work, tmp_path / "out"))
    assert pipe.describe()["pipeline"] == "QwenImageLayeredPipeline"
