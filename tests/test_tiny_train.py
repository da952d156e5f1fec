"""qimg-tiny training code: the losses fall on repeated batches, and the export loads through the normal loader."""

import random

import torch
import torch.nn.functional as F

import qimg.tiny.train as T
from qimg.models.qwenimage21 import QwenImage21Config, QwenImage21Transformer
from qimg.models.vae21 import VAE21
from qimg.tiny import world


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
    src, tgt = torch.randn(16, z, 8, 8), torch.randn(16, z, 8, 8)
    params = list(model.parameters()) + list(cond.model.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3)
    for task in ("t2i", "edit"):
        losses = []
        for _ in range(8):
            torch.manual_seed(1)
            loss = T._dit_step(model, cond, random.Random(3), task, src, tgt, pairs, 8, progress=1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.9 * losses[0], (task, losses)


def test_corpus_keeps_capitals_as_single_tokens(tmp_path):
    tok = T._load_or_build_tokenizer(tmp_path)
    ids = tok('with the word "QZX" in red').input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert "Q" in pieces and "Z" in pieces and "X" in pieces
