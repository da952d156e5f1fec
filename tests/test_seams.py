"""The seams later features plug into, each exercised with a trivial implementation: weight transforms at load time,
the per-block hook, the attention backend, the sampler table; and cancellation through the options."""

import numpy as np
import pytest
import torch
from torch import nn

import qimg
from qimg.errors import Cancelled, InputError
from qimg.models.hooks import BlockStep
from qimg.options import GenerateOptions


def same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def tiny():
    return qimg.load(dtype="float32", device="cpu")


class CountingLinear(nn.Linear):
    """A drop-in Linear, as an adapter or a quantized layer would be: same weights, counts its calls."""

    calls = 0

    def forward(self, x):
        CountingLinear.calls += 1
        return super().forward(x)


def swap_linears(module: nn.Module) -> int:
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                new = CountingLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                     device="meta")
                new.load_state_dict(child.state_dict(), assign=True)
                setattr(parent, name, new)
                swapped += 1
    return swapped


def test_weight_transforms_run_on_each_component_before_placement(tiny):
    seen = []

    def transform(component, module):
        seen.append((component, {p.device.type for p in module.parameters()}))
        if component == "transformer":
            assert swap_linears(module) > 0
        return module

    def replace_vae(component, module):  # a transform may return another module; the pipeline uses it
        return module if component != "vae" else ReplacedVAE(module)

    class ReplacedVAE(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

    pipe = qimg.load(dtype="float32", device="cpu", transforms=(transform, replace_vae))
    assert [c for c, _ in seen] == ["transformer", "vae", "text_encoder"]
    assert all(devices == {"cpu"} for _, devices in seen)  # transforms see the weights before placement
    assert isinstance(pipe.vae, ReplacedVAE)
    CountingLinear.calls = 0
    got = pipe.generate("a red circle", seed=2)[0]
    assert CountingLinear.calls > 0
    assert same(got, tiny.generate("a red circle", seed=2)[0])
    with pytest.raises(InputError, match="transforms must be callables"):
        qimg.load(transforms=("not callable",))


def test_block_hook_sees_every_block_step_and_branch(tiny):
    calls = []

    def hook(where: BlockStep, index, state, run):
        calls.append((where.step, where.branch, index, float(where.sigma[0])))
        return run(state)

    got = tiny.generate("a red circle", seed=1, steps=3, cfg=2, block_hook=hook)[0]
    assert same(got, tiny.generate("a red circle", seed=1, steps=3, cfg=2)[0])
    blocks = tiny.transformer.cfg.num_layers
    assert len(calls) == 3 * 2 * blocks
    assert [(s, b, i) for s, b, i, _ in calls[:blocks * 2]] == \
        [(0, "cond", i) for i in range(blocks)] + [(0, "uncond", i) for i in range(blocks)]
    sigmas = sorted({(s, sigma) for s, _, _, sigma in calls})
    assert [s for s, _ in sigmas] == [0, 1, 2] and sigmas[0][1] > sigmas[1][1] > sigmas[2][1]

    def skip_after_first(where, index, state, run):  # what a step cache does: skip blocks, reuse something
        return run(state) if index == 0 else state

    assert not same(got, tiny.generate("a red circle", seed=1, steps=3, cfg=2, block_hook=skip_after_first)[0])


def test_block_hook_on_v1_and_layered():
    layered = qimg.load("qimg-tiny-layered", dtype="float32", device="cpu")
    states = []

    def hook(where, index, state, run):
        states.append(type(state))
        out = run(state)
        assert isinstance(out, tuple) and len(out) == 2  # v1 blocks carry (image, text)
        return out

    from PIL import Image

    picture = Image.new("RGBA", (128, 128), (200, 30, 30, 255))
    a = layered.layers(picture, layers=2, steps=2, seed=0, block_hook=hook)
    b = layered.layers(picture, layers=2, steps=2, seed=0)
    assert all(same(x, y) for x, y in zip(a, b))
    assert states and states[0] is tuple and len(states) == 2 * layered.transformer.cfg.num_layers


def test_attention_backend_is_what_the_blocks_call(tiny):
    calls = []

    def counting(q, k, v, mask=None):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2)

    pipe = qimg.load(dtype="float32", device="cpu", attention=counting)
    got = pipe.generate("a blue square", seed=4)[0]
    assert calls and same(got, tiny.generate("a blue square", seed=4)[0])
    math_pipe = qimg.load(dtype="float32", device="cpu", attention="math")
    diff = np.abs(np.asarray(math_pipe.generate("a blue square", seed=4)[0], dtype=int) - np.asarray(got, dtype=int))
    assert diff.max() <= 1  # the explicit-softmax backend agrees with the fused kernel
    with pytest.raises(InputError, match="attention backend must be one of"):
        qimg.load(attention="flash9")


def test_adding_a_sampler_is_one_function_and_one_table_entry(tiny, monkeypatch):
    from qimg.sampling import samplers

    used = []

    def midpoint(model, x, sigmas, callback=None):  # the function
        for i in range(len(sigmas) - 1):
            s, t = sigmas[i], sigmas[i + 1]
            mid = x + (t - s) / 2 * model(x, s)
            x = x + (t - s) * model(mid, (s + t) / 2)
            used.append(i)
            if callback:
                callback(i + 1, len(sigmas) - 1, x, x)
        return x

    monkeypatch.setitem(samplers.SAMPLERS, "midpoint", midpoint)  # the table entry
    got = tiny.generate("a red circle", seed=0, steps=3, sampler="midpoint")[0]
    assert used == [0, 1, 2] and got.info["qimg"]["sampler"] == "midpoint"
    assert not same(got, tiny.generate("a red circle", seed=0, steps=3)[0])
    with pytest.raises(InputError, match=r"sampler must be one of \['dpmpp-2m', 'euler', 'midpoint'\]"):
        GenerateOptions(prompt="a", sampler="unipc-9")


def test_dpmpp_2m_runs_every_family(tiny):
    one = tiny.generate("a red circle", seed=0, steps=4, sampler="dpmpp-2m")[0]
    assert one.info["qimg"]["sampler"] == "dpmpp-2m" and np.asarray(one).std() > 5
    assert not same(one, tiny.generate("a red circle", seed=0, steps=4)[0])
    layered = qimg.load("qimg-tiny-layered", dtype="float32", device="cpu")
    from PIL import Image

    out = layered.layers(Image.new("RGB", (128, 128), "white"), layers=2, steps=3, seed=0, sampler="dpmpp-2m")
    assert len(out) == 2 and out[0].info["qimg"]["sampler"] == "dpmpp-2m"


def test_cancel_through_the_options(tiny):
    with pytest.raises(Cancelled, match="after 0 of 3 steps"):
        tiny.generate("a", steps=3, cancel=lambda: True)
    events = []
    with pytest.raises(Cancelled, match="after 1 of 3 steps"):
        tiny.generate("a", steps=3, progress=events.append, cancel=lambda: bool(events) and events[-1].step >= 1
                      and events[-1].stage == "denoise")
    assert not issubclass(Cancelled, OSError)  # qimg's own, not InterruptedError
    tiny.generate("a", steps=2, cancel=lambda: False)


def test_options_object_or_keywords(tiny):
    options = GenerateOptions(prompt="a red circle", seed=5, steps=2)
    assert same(tiny.generate(options)[0], tiny.generate("a red circle", seed=5, steps=2)[0])
    with pytest.raises(TypeError, match="either a GenerateOptions or keyword options"):
        tiny.generate(options, seed=1)
