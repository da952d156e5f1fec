"""Parity of qimg's Qwen-Image v1 transformer with the reference (diffusers 0.42.1) at tiny random configs."""

import pytest
import torch

from qimg.errors import CheckpointError
from qimg.models.qwenimage import QwenImageConfig, QwenImageTransformer
from tests.reference import perturb

diffusers = pytest.importorskip("diffusers")

Z = 8
TINY = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6), in_channels=4 * Z,
            out_channels=Z, joint_attention_dim=24)
LAYERED = dict(use_layer3d_rope=True, use_additional_t_cond=True)


def models(**overrides):
    torch.manual_seed(0)
    ref = diffusers.QwenImageTransformer2DModel(**{**TINY, **overrides}).eval()
    perturb(ref)
    ours = QwenImageTransformer(QwenImageConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(shapes, batch=2, text_len=7, pad=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, sum(f * h * w for f, h, w in shapes), 4 * Z, generator=g)
    text = torch.randn(batch, text_len, 24, generator=g)
    mask = None
    if pad:
        mask = torch.ones(batch, text_len, dtype=torch.bool)
        mask[-1, -pad:] = False  # right padding of the last prompt
    sigma = torch.rand(batch, generator=g) * 0.8 + 0.1
    return latents, text, sigma, mask


def check(ref, ours, shapes, flag=None, **kw):
    latents, text, sigma, mask = inputs(shapes, **kw)
    with torch.no_grad():
        expected = ref(hidden_states=latents, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                       timestep=sigma, img_shapes=[list(shapes)] * latents.shape[0], additional_t_cond=flag,
                       return_dict=False)[0]
        got = ours(latents, text, sigma, shapes, text_mask=mask, additional_t_cond=flag)
    assert got.shape == expected.shape == (latents.shape[0], latents.shape[1], 4 * Z)
    assert (got - expected).abs().max().item() <= 1e-5
    return got


@pytest.mark.parametrize("zero_cond_t", [False, True])
@pytest.mark.parametrize("pad", [0, 3])
def test_t2i(pad, zero_cond_t):
    ref, ours = models(zero_cond_t=zero_cond_t)
    check(ref, ours, [(1, 3, 6)], pad=pad)  # odd sides: centring


@pytest.mark.parametrize("zero_cond_t", [False, True])
@pytest.mark.parametrize("refs", [[(1, 3, 6)], [(1, 6, 2), (1, 5, 3)]])
def test_edit(refs, zero_cond_t):
    ref, ours = models(zero_cond_t=zero_cond_t)
    check(ref, ours, [(1, 4, 4)] + refs, pad=2)


def test_zero_cond_t_changes_only_through_reference_tokens():
    """zero_cond_t matters with reference images (so the parity above is not vacuous), not without."""
    _, plain = models()
    _, zero = models(zero_cond_t=True)
    for shapes, differs in (([(1, 4, 4), (1, 2, 6)], True), ([(1, 4, 4)], False)):
        latents, text, sigma, _ = inputs(shapes)
        with torch.no_grad():
            diff = (plain(latents, text, sigma, shapes) - zero(latents, text, sigma, shapes)).abs().max().item()
        assert (diff > 1e-3) == differs


@pytest.mark.parametrize("layers", [2, 3])
def test_layered(layers):
    ref, ours = models(**LAYERED)
    shapes = [(1, 4, 2)] * (layers + 1) + [(1, 3, 4)]  # text offset set by the layer count, not the image size
    check(ref, ours, shapes, flag=torch.zeros(2, dtype=torch.long), pad=1)
    check(ref, ours, shapes, flag=torch.tensor([0, 1]))


def test_bit_identical_in_bfloat16():
    """Same kernels on the same layouts as the reference (e.g. contiguous attention halves), so the same bits."""
    ref, ours = models(zero_cond_t=True)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    shapes = [(1, 4, 4), (1, 6, 2), (1, 5, 3)]
    latents, text, sigma, mask = inputs(shapes, pad=2)
    latents, text = latents.bfloat16(), text.bfloat16()
    with torch.no_grad():
        expected = ref(hidden_states=latents, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                       timestep=sigma, img_shapes=[shapes] * 2, return_dict=False)[0]
        got = ours(latents, text, sigma, shapes, text_mask=mask)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_time_embedding_bit_identical():
    """v1 computes 1000 * (sigma * freq), not (1000 * sigma) * freq; the rounding differs."""
    ref, ours = models(**LAYERED)
    sigma, flag = torch.tensor([0.013, 0.5, 0.977]), torch.tensor([0, 1, 0])
    with torch.no_grad():
        expected = ref.time_text_embed(sigma, torch.zeros(1), flag)
        assert torch.equal(ours.time_embedding(sigma, flag), expected)


def test_layered_positions():
    _, ours = models(**LAYERED)
    img, txt = ours.positions([(1, 2, 2), (1, 2, 2), (1, 2, 2)], 2)
    assert img[:, 0].tolist() == [0] * 4 + [1] * 4 + [-1] * 4
    assert img[:4, 1:].tolist() == [[-1, -1], [-1, 0], [0, -1], [0, 0]]
    assert txt.tolist() == [[2, 2, 2], [3, 3, 3]]


def test_precomputed_rope_and_default_flag():
    _, ours = models(**LAYERED)
    shapes = [(1, 4, 2)] * 3 + [(1, 2, 4)]
    latents, text, sigma, mask = inputs(shapes)
    freqs = ours.rope(shapes, text.shape[1])
    assert freqs[0].shape == (latents.shape[1], 8) and freqs[1].shape == (text.shape[1], 8)
    with torch.no_grad():
        a = ours(latents, text, sigma, shapes, mask, freqs=freqs)
        b = ours(latents, text, sigma, shapes, mask, additional_t_cond=torch.zeros(2, dtype=torch.long))
    assert torch.equal(a, b)


def test_input_errors():
    _, ours = models()
    latents, text, sigma, _ = inputs([(1, 4, 4)])
    with pytest.raises(ValueError, match="describe 20"):
        ours(latents, text, sigma, [(1, 4, 4), (1, 2, 2)])
    with pytest.raises(ValueError, match="use_additional_t_cond"):
        ours(latents, text, sigma, [(1, 4, 4)], additional_t_cond=torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("name,overrides", [("keys_QwenImageTransformer2DModel.txt", {}),
                                            ("keys_QwenImageTransformer2DModel_layered.txt", LAYERED)])
def test_checkpoint_contract(name, overrides):
    """At the official configs (meta device), exactly the official keys, shapes and dtypes."""
    from tests.contracts import read_contract, state_contract

    config, keys = read_contract(name)
    cfg = QwenImageConfig.from_dict(config)
    assert cfg == QwenImageConfig(**overrides)  # the defaults are the official config
    with torch.device("meta"):
        model = QwenImageTransformer(cfg)
    assert state_contract(model) == keys


def test_config_errors_are_named():
    with pytest.raises(CheckpointError, match="use_magic"):
        QwenImageConfig.from_dict({**TINY, "use_magic": True})
    with pytest.raises(CheckpointError, match="guidance_embeds"):
        QwenImageConfig.from_dict({**TINY, "guidance_embeds": True})
    with pytest.raises(CheckpointError, match="axes_dims_rope"):
        QwenImageConfig.from_dict({**TINY, "axes_dims_rope": [4, 6, 8]})
