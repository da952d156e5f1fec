"""qimg's 2.x VAE against the reference (diffusers 0.42.1) at a tiny random config, its checkpoint contract, and the
tiling helper (`qimg/models/tiling.py`), which is tested here for both VAEs' shared code path.

What tiling can and cannot promise (measured on the tiny config below, random weights):
- The blend weights are a partition of unity, so a tile-local function is reproduced exactly (`test_blend_*`).
- The VAE is not tile-local: every conv sees zero padding at a tile edge (decoder receptive field ~14 latent cells
  each way, encoder ~10), and the mid-block attention is global over whatever it is given. With the attention's
  output projection zeroed and an overlap of 16 cells, tiled = untiled to float rounding (<= 1e-5) everywhere
  outside the overlaps (`test_tiled_exact_away_from_seams`); inside them each tile's edge error is only damped by
  the linear weights, not removed.
- With attention on, tiled vs untiled decode (output range [-1, 1]) differs by:
  default 512 px tiles / 128 px overlap on a 48x48 latent: max 6.8e-3, mean 3e-4 with weights at half their default
  scale; max 8.6e-2, mean 4.7e-3 at full scale. 192 px tiles / 64 px overlap on 16x16 (the test, 3 seeds): max
  1.2-1.6e-2, mean 1.2e-3 at half scale; max 0.17-0.28, mean 0.02 at full scale. Those are the honest sizes of
  tile seams for a random network; the test bounds the half-scale case (`test_tiled_decode_seams_are_small`).
- Memory (official config, meta device): a 2048x2048 decode's widest activation is 288 x 2048^2 elements untiled
  (4.8 GB in fp32), 288 x 1024^2 with 1024 px tiles, 288 x 512^2 (0.3 GB) with the default 512 px tiles.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from qimg.errors import CheckpointError, InputError
from qimg.models.tiling import resolve_tile, tile_starts, tiled
from tests.contracts import read_contract, state_contract
from qimg.models.vae21 import VAE21, VAE21Config
from tests.reference import perturb

TINY = dict(base_dim=8, decoder_base_dim=12, z_dim=16, dim_mult=[1, 2, 4, 4, 4], num_res_blocks=1,
            temperal_downsample=[False, True, True, True])


def tiny_config(channels: int = 3, **overrides) -> VAE21Config:
    return VAE21Config.from_dict({**TINY, "in_channels": channels, "out_channels": channels,
                                  "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16, **overrides})


def reference_pair(tmp_path, channels):
    """A perturbed tiny reference VAE saved with save_pretrained, and qimg's VAE loaded from that folder."""
    diffusers = pytest.importorskip("diffusers")
    g = torch.Generator().manual_seed(channels)
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLQwenImage21(
        **TINY, in_channels=channels, out_channels=channels, latents_mean=torch.randn(16, generator=g).tolist(),
        latents_std=(torch.rand(16, generator=g) + 0.5).tolist()).eval()
    perturb(ref)
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    ours = VAE21(VAE21Config.from_dict(config)).eval()
    ours.load_state_dict(load_file(tmp_path / "diffusion_pytorch_model.safetensors"), strict=True)
    return ref, ours


@pytest.mark.parametrize("channels", [3, 4])
def test_parity(tmp_path, channels):
    ref, ours = reference_pair(tmp_path, channels)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for h, w in [(64, 96), (32, 32)]:
            images = torch.rand(2, channels, h, w, generator=g) * 2 - 1
            expected = ref.encode(images[:, :, None]).latent_dist.mode()[:, :, 0]
            got = ours.encode(images)
            assert got.shape == (2, 16, h // 16, w // 16)
            assert (got - expected).abs().max() <= 1e-5

            latents = 0.5 * torch.randn(2, 16, h // 16, w // 16, generator=g)
            expected = ref.decode(latents[:, :, None]).sample[:, :, 0]
            got = ours.decode(latents)
            assert got.shape == (2, channels, h, w)
            assert (expected.abs() < 1).float().mean() > 0.9  # mostly unclamped: the comparison means something
            assert (got - expected).abs().max() <= 1e-5

    z = torch.randn(1, 16, 2, 3, generator=g)
    assert torch.allclose(ours.denormalize(ours.normalize(z)), z, atol=1e-6)
    mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, -1, 1, 1)
    assert torch.equal(ours.normalize(z), (z - mean) / std)
    assert ours.scale_factor == 16 and ours.z_dim == 16


def test_contract():
    config, keys = read_contract("keys_AutoencoderKLQwenImage21.txt")
    assert VAE21Config.from_dict(config) == VAE21Config()  # the defaults are the official config
    with torch.device("meta"):
        model = VAE21(VAE21Config.from_dict(config))
    assert state_contract(model) == keys
    assert sum(p.numel() for p in model.parameters()) == 337740404


def test_config_errors():
    with pytest.raises(CheckpointError, match="bogus_key"):
        VAE21Config.from_dict({**TINY, "bogus_key": 1})
    with pytest.raises(CheckpointError, match="latents_mean"):
        VAE21Config.from_dict({**TINY})  # 64 default stats for z_dim 16
    with pytest.raises(CheckpointError, match="scale_factor_spatial"):
        VAE21Config.from_dict({"dim_mult": [1, 2, 4, 4], "temperal_downsample": [False, True, True]})


def test_input_errors():
    model = VAE21(tiny_config())
    with pytest.raises(InputError, match="multiples of 16"):
        model.encode(torch.zeros(1, 3, 40, 32))
    with pytest.raises(InputError, match=r"\[B, 3, H, W\]"):
        model.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(InputError, match=r"\[B, 16, H, W\]"):
        model.decode(torch.zeros(1, 8, 2, 2))


# ---------------------------------------------------------------------------------------------------------------------
# Tiling


def test_resolve_tile():
    assert resolve_tile(None, 16) is None and resolve_tile(False, 16) is None
    assert resolve_tile(True, 16) == resolve_tile("auto", 16) == (32, 8)
    assert resolve_tile(256, 16) == (16, 4)
    assert resolve_tile((256, 64), 8) == (32, 8)
    for bad in [(250, 64), (256, 256), (256, -16), "big", 0]:
        with pytest.raises(ValueError, match="tile"):
            resolve_tile(bad, 16)


@pytest.mark.parametrize("n,size,overlap", [(10, 10, 2), (11, 8, 2), (37, 8, 3), (64, 16, 0), (20, 8, 7)])
def test_blend_is_partition_of_unity(n, size, overlap):
    """A tile-local function (here: nearest upsampling x4) comes back exactly; every cell is covered."""
    starts = tile_starts(n, size, overlap)
    assert starts[0] == 0 and starts[-1] == max(n - size, 0)
    assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))
    x = torch.randn(2, 3, n, n + 5)
    up = lambda t: t.repeat_interleave(4, 2).repeat_interleave(4, 3)  # noqa: E731
    assert torch.allclose(tiled(up, x, size, overlap, scale_in=1, scale_out=4), up(x), atol=1e-6)
    down = lambda t: t[:, :, ::4, ::4]  # noqa: E731
    big = up(x)
    assert torch.allclose(tiled(down, big, size, overlap, scale_in=4, scale_out=1), x, atol=1e-6)


def scaled(model, factor):
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(factor)
    return model


def test_auto_tiling_is_a_no_op_when_it_fits():
    torch.manual_seed(0)
    model = VAE21(tiny_config()).eval()
    z = torch.randn(1, 16, 4, 6)
    with torch.no_grad():
        assert torch.equal(model.decode(z, tile=True), model.decode(z))
        images = torch.rand(1, 3, 64, 96) * 2 - 1
        assert torch.equal(model.encode(images, tile="auto"), model.encode(images))


def test_tiled_exact_away_from_seams():
    """With the global attention switched off (proj = 0), a 16-cell overlap covers the receptive field: outside the
    overlap the tiled result is the untiled one."""
    torch.manual_seed(0)
    model = VAE21(tiny_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".attentions.0.proj." in name:
                p.zero_()
        z = torch.randn(1, 16, 4, 64)  # one row of two 40-cell tiles at cells [0, 40) and [24, 64)
        full, tiles = model.decode(z), model.decode(z, tile=(640, 256))
        assert tile_starts(64, 40, 16) == [0, 24]
        outside = torch.cat([full[..., : 24 * 16] - tiles[..., : 24 * 16], full[..., 40 * 16:] - tiles[..., 40 * 16:]])
        assert outside.abs().max() <= 1e-5
        assert (full - tiles).abs().max() > 1e-4  # ... while inside the overlap the tiles do differ

        images = torch.rand(1, 3, 64, 1024) * 2 - 1
        full, tiles = model.encode(images), model.encode(images, tile=(640, 256))
        assert (full[..., :24] - tiles[..., :24]).abs().max() <= 1e-5
        assert (full[..., 40:] - tiles[..., 40:]).abs().max() <= 1e-5


def test_tiled_decode_seams_are_small():
    """Attention on, weights at half the default scale, 4-cell overlap: measured max 1.2-1.6e-2 (module doc)."""
    torch.manual_seed(0)
    model = scaled(VAE21(tiny_config()).eval(), 0.5)
    z = torch.randn(1, 16, 16, 16)
    with torch.no_grad():
        full, tiles = model.decode(z), model.decode(z, tile=(192, 64))
    diff = (full - tiles).abs()
    assert diff.max() < 0.05 and diff.mean() < 5e-3, (diff.max(), diff.mean())


def largest_activation(model, fn, *args, **kwargs):
    """Run `fn` and return the largest number of elements any submodule of `model` output."""
    largest = [0]

    def hook(module, inputs, out):
        largest[0] = max(largest[0], out.numel())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            fn(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return largest[0]


def test_tiled_memory_is_bounded():
    """The official config, shapes only (meta device): a 2048x2048 tiled decode/encode never holds more than one
    tile's widest activation (288 x 1024 x 1024 for 1024 px tiles) instead of the untiled 288 x 2048 x 2048."""
    with torch.device("meta"):
        model = VAE21(VAE21Config()).eval()
    z = torch.empty(1, 64, 128, 128, device="meta")
    images = torch.empty(1, 4, 2048, 2048, device="meta")
    untiled = largest_activation(model, model.decode, z)
    one_tile = largest_activation(model, model.decode, z[..., :64, :64])
    assert untiled == 288 * 2048 * 2048 and one_tile == untiled // 4
    assert largest_activation(model, model.decode, z, tile=(1024, 128)) == one_tile
    assert largest_activation(model, model.encode, images, tile=(1024, 128)) == \
        largest_activation(model, model.encode, images[..., :1024, :1024])
