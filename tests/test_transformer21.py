"""Parity of qimg's 2.x transformer with the reference (diffusers 0.42.1) at a tiny random config."""

import pytest
import torch

from qimg.models.qwenimage21 import QwenImage21Config, QwenImage21Transformer
from tests.reference import perturb

diffusers = pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache  # noqa: E402

TINY = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6),
            in_channels=16, out_channels=16, context_in_dim=24, mlp_ratio=3)


def models(**overrides):
    cfg = {**TINY, **overrides}
    torch.manual_seed(0)
    ref = diffusers.QwenImage21Transformer2DModel(**cfg).eval()
    perturb(ref)
    ours = QwenImage21Transformer(QwenImage21Config.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def run_reference(ref, latents, text, sigma, slot_mask, shapes, text_mask=None, cache=False, steps=1):
    img_mask = torch.cat([slot_mask, torch.ones(shapes[-1][0] * shapes[-1][1] // 4, dtype=torch.bool)])
    img_mask = img_mask[None].expand(latents.shape[0], -1)
    kwargs = dict(encoder_hidden_states=text, img_shapes=[[(1, h, w) for h, w in shapes]] * latents.shape[0],
                  img_mask=img_mask, encoder_hidden_states_mask=text_mask, return_dict=False)
    n = shapes[-1][0] * shapes[-1][1]
    if not cache:
        return [ref(hidden_states=latents, timestep=s, **kwargs)[0][:, -n:] for s in sigma]
    kv = QwenImage21KVCache(len(ref.transformer_blocks))
    return [ref(hidden_states=latents, timestep=s, kv_cache=kv, kv_cache_mode="extract" if i == 0 else "cached",
                **kwargs)[0][:, -n:] for i, s in enumerate(sigma)]


def layout(spec):
    """spec: list of ints (text run lengths) and (h, w) tuples (condition images)."""
    mask, shapes = [], []
    for item in spec:
        if isinstance(item, tuple):
            mask += [True] * (item[0] * item[1] // 4)
            shapes.append(item)
        else:
            mask += [False] * item
    return torch.tensor(mask), shapes


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("spec,target", [([9], (4, 4)), ([3, (4, 6), 2, (2, 2), 4], (4, 6)), ([5, (2, 4), (2, 2), 3], (2, 2))])
def test_parity(spec, target, cache):
    ref, ours = models()
    slot_mask, cond_shapes = layout(spec)
    g = torch.Generator().manual_seed(1)
    batch = 2
    text = torch.randn(batch, len(slot_mask), 24, generator=g)
    text_mask = torch.ones(batch, len(slot_mask), dtype=torch.bool)
    text_mask[1, -2:] = False  # right padding of the second prompt
    cond = [torch.randn(batch, h * w, 16, generator=g) for h, w in cond_shapes]
    latents = torch.randn(batch, target[0] * target[1], 16, generator=g)
    sigmas = [torch.full((batch,), s) for s in (0.9, 0.4)]
    with torch.no_grad():
        expected = run_reference(ref, torch.cat(cond + [latents], 1), text, sigmas, slot_mask,
                                 cond_shapes + [target], text_mask, cache=cache)
        prefix = ours.encode_prefix(text, slot_mask, cond, cond_shapes, text_mask)
        got = [ours.denoise(latents, s, prefix, target) for s in sigmas]
    for e, o in zip(expected, got):
        assert o.shape == e.shape
        assert (o - e).abs().max().item() <= 1e-5


def test_parity_without_causal_condition():
    ref, ours = models(causal_condition=False)
    slot_mask, cond_shapes = layout([4, (2, 2), 3])
    g = torch.Generator().manual_seed(2)
    text = torch.randn(1, len(slot_mask), 24, generator=g)
    cond = [torch.randn(1, 4, 16, generator=g)]
    latents = torch.randn(1, 16, 16, generator=g)
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        (expected,) = run_reference(ref, torch.cat(cond + [latents], 1), text, [sigma], slot_mask,
                                    cond_shapes + [(4, 4)])
        got = ours(latents, text, sigma, slot_mask, cond, cond_shapes, shape=(4, 4))
    assert (got - expected).abs().max().item() <= 1e-5


def test_slot_mismatch_is_a_clear_error():
    _, ours = models()
    slot_mask, _ = layout([3, (2, 2), 2])
    with pytest.raises(ValueError, match="more than the 0 condition images"):
        ours.encode_prefix(torch.randn(1, len(slot_mask), 24), slot_mask)


def test_checkpoint_contract():
    """At the official config (meta device), exactly the official keys, shapes and dtypes."""
    from tests.contracts import read_contract, state_contract

    config, keys = read_contract("keys_QwenImage21Transformer2DModel.txt")
    cfg = QwenImage21Config.from_dict(config)
    assert cfg == QwenImage21Config()  # the defaults are the official config
    with torch.device("meta"):
        model = QwenImage21Transformer(cfg)
    assert state_contract(model) == keys
    assert sum(p.numel() for p in model.parameters()) == 7115124736


def test_unknown_config_key_is_named():
    from qimg.errors import CheckpointError

    with pytest.raises(CheckpointError, match="use_magic"):
        QwenImage21Config.from_dict({**TINY, "use_magic": True})
