"""Fused projections (`qimg.models.fused`): q/k/v and gate/up as one matrix product, the checkpoint layout and
values unchanged, and never stale when a LoRA, a hook or a move changes the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qimg
from qimg.loading.weights import save_state_dict
from qimg.models.fused import FUSED, fuse_linears, fuse_projections, fused_group, linears
from qimg.models.qwenimage import QwenImageConfig, QwenImageTransformer
from qimg.models.qwenimage21 import QwenImage21Config, QwenImage21Transformer

V21 = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6), in_channels=16,
           out_channels=16, context_in_dim=32)
V1 = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6), in_channels=64,
          out_channels=16, joint_attention_dim=32)


def perturbed(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def groups(model):
    return [g for m in model.modules() for g in getattr(m, "fused_groups", lambda: ())()]


def test_a_group_runs_as_one_product_and_falls_back_when_changed():
    torch.manual_seed(1)
    layers = [nn.Linear(8, n) for n in (8, 4, 6)]
    x = torch.randn(5, 8)
    expected = [layer(x) for layer in layers]
    state = {i: {k: v.clone() for k, v in layer.state_dict().items()} for i, layer in enumerate(layers)}
    assert fuse_linears(layers) and fused_group(layers) is not None
    for i, layer in enumerate(layers):  # same values, same keys
        assert all(torch.equal(layer.state_dict()[k], v) for k, v in state[i].items())
    calls = []
    for got, want in zip(linears(layers, x), expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert fuse_linears(layers) and getattr(layers[0], FUSED)[0].data_ptr() == layers[0].weight.data_ptr()

    with torch.no_grad():  # an in-place change (a LoRA merged into the views) reaches the fused weight
        layers[1].weight.add_(1.0)
    torch.testing.assert_close(linears(layers, x)[1], layers[1](x), rtol=1e-6, atol=1e-6)

    handle = layers[2].register_forward_hook(lambda m, i, out: calls.append(1) or out * 2)  # a hook pauses it
    assert fused_group(layers) is None
    torch.testing.assert_close(linears(layers, x)[2], 2 * expected[2], rtol=1e-6, atol=1e-6)
    assert calls == [1]
    handle.remove()
    assert fused_group(layers) is not None

    layers[0].weight = nn.Parameter(layers[0].weight.detach() * 3)  # a replaced weight ends it
    replaced = x @ layers[0].weight.T + layers[0].bias
    assert not torch.allclose(replaced, expected[0])
    torch.testing.assert_close(linears(layers, x)[0], replaced, rtol=1e-5, atol=1e-5)
    assert not hasattr(layers[0], FUSED)  # and the stale copy is let go
    assert fuse_linears(layers) and fused_group(layers) is not None  # fusing again picks the new weight up
    torch.testing.assert_close(linears(layers, x)[0], replaced, rtol=1e-5, atol=1e-5)


def test_groups_that_cannot_share_a_weight_are_left_alone():
    assert not fuse_linears([nn.Linear(8, 4), nn.Linear(6, 4)])  # input sizes differ
    assert not fuse_linears([nn.Linear(8, 4), nn.Linear(8, 4, bias=False)])  # one bias, one not
    assert not fuse_linears([nn.Linear(8, 4), nn.Linear(8, 4).double()])
    assert not fuse_linears([nn.Linear(8, 4)])

    class Quantised(nn.Linear):
        pass

    assert not fuse_linears([nn.Linear(8, 4), Quantised(8, 4)])
    with torch.device("meta"):
        assert not fuse_linears([nn.Linear(8, 4), nn.Linear(8, 4)])


def test_moving_the_model_ends_the_fusion_and_drops_the_copy():
    layers = nn.ModuleList([nn.Linear(8, 4), nn.Linear(8, 4)])
    fuse_linears(layers)
    x = torch.randn(3, 8, dtype=torch.float64)
    layers.double()
    assert fused_group(list(layers)) is None and not hasattr(layers[0], FUSED)
    torch.testing.assert_close(linears(list(layers), x)[1], layers[1](x))


@pytest.mark.parametrize("family", ["v21", "v1"])
def test_a_fused_transformer_keeps_its_checkpoint_and_its_outputs(family, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    if family == "v21":
        model = perturbed(QwenImage21Transformer(QwenImage21Config(**V21)))
        per_block = 2  # q/k/v; the SwiGLU's gate and up
        text = torch.randn(1, 7, 32)
        args = (torch.randn(1, 16, 16), text, torch.tensor([0.6]), torch.zeros(7, dtype=torch.bool))
        kwargs = {"shape": (4, 4)}
    else:
        model = perturbed(QwenImageTransformer(QwenImageConfig(**V1)))
        per_block = 2  # the image stream's q/k/v, the text stream's
        args = (torch.randn(1, 16, 64), torch.randn(1, 7, 32), torch.tensor([0.6]), [(1, 4, 4)])
        kwargs = {}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        expected = model(*args, **kwargs)
    assert fuse_projections(model) == per_block * len(model.transformer_blocks)
    assert all(fused_group(g) is not None for g in groups(model))
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], v) for k, v in before.items())
    with torch.inference_mode():
        got = model(*args, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    save_state_dict(model.state_dict(), tmp_path / "w.safetensors")  # views of one tensor save as their own rows
    loaded = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in before.items())
    # loading new weights copies into the views: the fused products follow
    fresh = perturbed(type(model)(model.cfg))
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(1.5)
    model.load_state_dict(fresh.state_dict())
    assert all(fused_group(g) is not None for g in groups(model))
    with torch.inference_mode():
        torch.testing.assert_close(model(*args, **kwargs), fresh(*args, **kwargs), rtol=1e-5, atol=1e-5)


def test_a_fused_pipeline_with_loras_draws_what_the_unfused_one_draws(ref21, tmp_path):
    pytest.importorskip("peft")
    from tests.lora_files import linear_shapes, random_lora, write_lora

    _, folder = ref21
    shapes = linear_shapes(ref21[0].transformer)
    lora = write_lora(tmp_path / "a.safetensors", random_lora(shapes), "peft")
    plain = qimg.load(folder, dtype="float32", device="cpu")
    fused = qimg.load(folder, dtype="float32", device="cpu")
    # what a GPU load does (on the CPU the weights stay memory-mapped, so a CPU pipeline never fuses)
    assert not fused.fused_projections
    fused.__class__ = type("OnAGpu", (type(fused),), {"fused_projections": True})
    assert fuse_projections(fused.transformer) > 0

    def picture(pipe):
        return np.asarray(pipe.generate("a red circle", width=64, height=64, steps=2, seed=1, cfg=1)[0], int)

    def all_fused(pipe):
        return all(fused_group(g) is not None for g in groups(pipe.transformer))

    base = picture(plain)
    assert np.abs(picture(fused) - base).max() <= 1
    for mode in (True, False):  # fused LoRAs replace weights (fused again after), unfused ones hook the layers
        plain.set_loras([(lora, 0.8)], fused=mode)
        fused.set_loras([(lora, 0.8)], fused=mode)
        assert all_fused(fused) == mode
        assert np.abs(picture(fused) - picture(plain)).max() <= 1
    fused.unload_loras()
    assert all_fused(fused)
    assert np.abs(picture(fused) - base).max() <= 1
