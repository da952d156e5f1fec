"""qimg's v1 VAE (also the Layered RGBA VAE) against the reference (diffusers 0.42.1) at a tiny random config, its
checkpoint contracts, and its use of the shared tiling helper (the helper itself is tested in test_vae21.py).

Measured on the tiny config: the decoder's receptive field is ~14 latent cells each way and the encoder's ~10, so with
the mid-block attention switched off a 16-cell overlap makes tiled = untiled outside the overlaps.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from qimg.errors import CheckpointError, InputError
from qimg.models.tiling import tile_starts
from qimg.models.vae import VAE, VAEConfig
from tests.reference import perturb
from tests.contracts import read_contract, state_contract

TINY = dict(base_dim=8, z_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True])


def reference_pair(tmp_path, channels):
    diffusers = pytest.importorskip("diffusers")
    g = torch.Generator().manual_seed(channels)
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLQwenImage(
        **TINY, input_channels=channels, latents_mean=torch.randn(8, generator=g).tolist(),
        latents_std=(torch.rand(8, generator=g) + 0.5).tolist()).eval()
    perturb(ref)
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    ours = VAE(VAEConfig.from_dict(config)).eval()
    ours.load_state_dict(load_file(tmp_path / "diffusion_pytorch_model.safetensors"), strict=True)
    return ref, ours


@pytest.mark.parametrize("channels", [3, 4])
def test_parity(tmp_path, channels):
    ref, ours = reference_pair(tmp_path, channels)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for h, w in [(48, 80), (32, 32)]:
            images = torch.rand(2, channels, h, w, generator=g) * 2 - 1
            expected = ref.encode(images[:, :, None]).latent_dist.mode()[:, :, 0]
            got = ours.encode(images)
            assert got.shape == (2, 8, h // 8, w // 8)
            assert (got - expected).abs().max() <= 1e-5

            latents = torch.randn(2, 8, h // 8, w // 8, generator=g)
            expected = ref.decode(latents[:, :, None]).sample[:, :, 0]
            got = ours.decode(latents)
            assert got.shape == (2, channels, h, w)
            assert (expected.abs() < 1).float().mean() > 0.9  # mostly unclamped: the comparison means something
            assert (got - expected).abs().max() <= 1e-5

    z = torch.randn(1, 8, 2, 3, generator=g)
    mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, -1, 1, 1)
    assert torch.equal(ours.normalize(z), (z - mean) / std)
    assert torch.equal(ours.denormalize(z), z * std + mean)
    assert ours.scale_factor == 8 and ours.z_dim == 8


@pytest.mark.parametrize("name", ["keys_AutoencoderKLQwenImage.txt", "keys_AutoencoderKLQwenImage_rgba.txt"])
def test_contract(name):
    config, keys = read_contract(name)
    with torch.device("meta"):
        model = VAE(VAEConfig.from_dict(config))
    assert state_contract(model) == keys
    assert len(keys) == 194


def test_config_errors():
    with pytest.raises(CheckpointError, match="input_chanels"):
        VAEConfig.from_dict({**TINY, "input_chanels": 4})
    with pytest.raises(CheckpointError, match="temperal_downsample"):
        VAEConfig.from_dict({"temperal_downsample": [False, True]})
    assert VAEConfig.from_dict({"_class_name": "AutoencoderKLQwenImage", "_diffusers_version": "0.42.1"}) == VAEConfig()


def test_input_errors():
    model = VAE(VAEConfig.from_dict({**TINY, "latents_mean": [0.0] * 8, "latents_std": [1.0] * 8}))
    with pytest.raises(InputError, match="multiples of 8"):
        model.encode(torch.zeros(1, 3, 36, 32))
    with pytest.raises(InputError, match=r"\[B, 8, H, W\]"):
        model.decode(torch.zeros(1, 16, 2, 2))


def test_tiling():
    torch.manual_seed(0)
    model = VAE(VAEConfig.from_dict({**TINY, "latents_mean": [0.0] * 8, "latents_std": [1.0] * 8})).eval()
    with torch.no_grad():
        z = torch.randn(1, 8, 4, 6)
        assert torch.equal(model.decode(z, tile=True), model.decode(z))  # fits in one tile: no tiling

        for name, p in model.named_parameters():
            if ".attentions.0.proj." in name:
                p.zero_()
        assert tile_starts(64, 40, 16) == [0, 24]
        z = torch.randn(1, 8, 4, 64)
        full, tiles = model.decode(z), model.decode(z, tile=(320, 128))
        assert (full[..., : 24 * 8] - tiles[..., : 24 * 8]).abs().max() <= 1e-5
        assert (full[..., 40 * 8:] - tiles[..., 40 * 8:]).abs().max() <= 1e-5
        assert (full - tiles).abs().max() > 1e-4

        images = torch.rand(1, 3, 32, 512) * 2 - 1
        full, tiles = model.encode(images), model.encode(images, tile=(320, 128))
        assert (full[..., :24] - tiles[..., :24]).abs().max() <= 1e-5
        assert (full[..., 40:] - tiles[..., 40:]).abs().max() <= 1e-5
