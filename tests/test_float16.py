"""float16 stays finite where its range (65504) overflows: tiny models whose activations exceed it (all-NaN output
before the fix) give finite pictures, close to float32 where float32 itself stays within the range."""

import copy

import torch
from torch import nn

from qimg.models.layers import FP16_MAX, wide_linear
from qimg.models.qwenimage import QwenImageConfig, QwenImageTransformer
from qimg.models.qwenimage21 import QwenImage21Config, QwenImage21Transformer
from qimg.models.vae import VAE, VAEConfig
from qimg.models.vae21 import VAE21, VAE21Config

TINY = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6))


def input_amax(layers) -> list[float]:
    """Records the largest |input| each layer sees (hooks stay on the layers)."""
    seen = [0.0]
    for layer in layers:
        layer.register_forward_pre_hook(lambda m, args: seen.append(max(seen.pop(), args[0].abs().max().item())))
    return seen


def assert_close_in_half(model, run):
    """`run(model, dtype)` in float16 is finite and closer to float32 than bfloat16 (3 bits less mantissa, same
    range as float32) is: these scaled-up weights amplify rounding, so the yardstick is another 16-bit run."""
    with torch.no_grad():
        ref = run(model, torch.float32)
        out = run(copy.deepcopy(model).half(), torch.float16)
        bf16 = run(copy.deepcopy(model).bfloat16(), torch.bfloat16)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert ref.abs().max() < 100
    err, bf16_err = (out.float() - ref).abs(), (bf16.float() - ref).abs()
    assert err.max() <= 0.05 * ref.abs().max() and err.mean() <= 0.5 * bf16_err.mean()


def test_wide_linear_keeps_overflowing_products_and_leaves_other_dtypes():
    torch.manual_seed(0)
    layer = nn.Linear(64, 8)
    x = torch.randn(3, 64) * 8000  # in range, but its products with these weights are not
    with torch.no_grad():
        layer.weight.mul_(32)
        ref = layer(x)
        half = layer.half()
        assert ref.abs().max() > FP16_MAX and not torch.isfinite(half(x.half())).all()  # float16 matmul runs on CPU
        wide = wide_linear(half, x)
        assert wide.dtype == torch.float32
        assert (wide - ref).abs().max() <= 2e-3 * ref.abs().max()
        for dtype in (torch.float32, torch.bfloat16):
            other = nn.Linear(64, 8).to(dtype)
            assert torch.equal(wide_linear(other, x.to(dtype)), other(x.to(dtype)))


def overflows_then_close(model, hidden: list, floor: float, run) -> None:
    """In float32 the watched activation exceeds `floor` (so float16 would overflow there); float16 stays close."""
    with torch.no_grad():
        run(model, torch.float32)
    assert hidden[0] > floor
    assert_close_in_half(model, run)


def test_qwenimage21_swiglu_product_over_float16_range():
    torch.manual_seed(0)
    model = QwenImage21Transformer(QwenImage21Config(**TINY, in_channels=16, out_channels=16,
                                                     context_in_dim=32)).eval()
    with torch.no_grad():  # gate and up projections below 1000, their product over 1.5e5, the MLP output back near 1
        for block in model.transformer_blocks:
            block.img_mlp.gate_layer.weight.mul_(300)
            block.img_mlp.proj.weight.mul_(300)
            block.img_mlp.out.weight.div_(300)
    hidden = input_amax([block.img_mlp.out for block in model.transformer_blocks])
    g = torch.Generator().manual_seed(1)
    latents, text = torch.randn(2, 16, 16, generator=g), torch.randn(2, 5, 32, generator=g)

    overflows_then_close(model, hidden, 2 * FP16_MAX, lambda m, dtype: m(
        latents.to(dtype), text.to(dtype), torch.tensor([0.5, 0.7]), torch.zeros(5, dtype=torch.bool)))


def test_qwenimage_v1_modulated_mlp_over_float16_range():
    torch.manual_seed(0)
    model = QwenImageTransformer(QwenImageConfig(**TINY, in_channels=32, out_channels=8,
                                                 joint_attention_dim=24)).eval()
    dim = model.cfg.dim
    with torch.no_grad():  # MLP modulation scale 2e4: GELU pre-activations over 1e5; MLP gates 1e-3
        for block in model.transformer_blocks:
            for mod in (block.img_mod[1], block.txt_mod[1]):
                mod.bias[4 * dim:5 * dim] += 2e4
                mod.bias[5 * dim:] = 1e-3 * mod.bias[5 * dim:].sign()
            block.img_mlp.net[0].proj.weight.mul_(4)
            block.txt_mlp.net[0].proj.weight.mul_(4)
    hidden = input_amax([m for block in model.transformer_blocks for m in (block.img_mlp.net[2], block.txt_mlp.net[2])])
    g = torch.Generator().manual_seed(1)
    latents, text = torch.randn(2, 16, 32, generator=g), torch.randn(2, 5, 24, generator=g)

    overflows_then_close(model, hidden, 1.5 * FP16_MAX, lambda m, dtype: m(
        latents.to(dtype), text.to(dtype), torch.tensor([0.5, 0.7]), [(1, 4, 4)]))


def test_vae_decoders_saturate_instead_of_nan():
    torch.manual_seed(0)
    vaes = [VAE(VAEConfig(base_dim=8, z_dim=8, dim_mult=(1, 2, 4, 4), num_res_blocks=1,
                          temperal_downsample=(False, True, True), latents_mean=(0.0,) * 8, latents_std=(1.0,) * 8)),
            VAE21(VAE21Config(base_dim=8, decoder_base_dim=12, z_dim=16, dim_mult=(1, 2, 4, 4, 4), num_res_blocks=1,
                              temperal_downsample=(False, True, True, True), in_channels=3, out_channels=3,
                              latents_mean=(0.0,) * 16, latents_std=(1.0,) * 16))]
    for vae in vaes:
        conv = vae.eval().decoder.mid_block.resnets[0].conv2
        with torch.no_grad():
            conv.weight.mul_(1e5)
            conv.bias.mul_(1e5)
            stream = input_amax([vae.decoder.mid_block.attentions[0]])
            z = torch.randn(1, vae.z_dim, 4, 4)
            vae.decode(z)
            assert stream[0] > FP16_MAX
            out = vae.half().decode(z.half())
        assert torch.isfinite(out).all()
