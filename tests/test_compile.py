"""`compile=True` / "blocks" (`--compile`): the blocks' two halves compiled once and shared by every block;
`compile="step"`: the whole step as one graph. Compiled and eager outputs within 1e-5 in float32 (2.x with its
prefix KV cache, v1); no recompile for a new step, guidance branch or picture at the same size, at most one per graph
for a new size; the compile time is in the pictures' parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qimg
from qimg.models.layers import apply_rope, rope_frequencies, rope_table

pytestmark = pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile is not available")


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_real_rope_table_rotates_like_the_complex_one():
    f = rope_frequencies(torch.randint(-6, 9, (12, 3)), (4, 6, 6))
    x = torch.randn(2, 12, 3, 16)
    assert torch.allclose(apply_rope(x, rope_table(f, True)), apply_rope(x, f), atol=1e-6)
    batched = torch.stack([f, f.flip(0)])
    assert torch.allclose(apply_rope(x, rope_table(batched, True)), apply_rope(x, batched), atol=1e-6)


def velocities(pipe, family: str):
    """The transformer's output on fixed inputs (2.x: a cached prefix and the target; v1: one joint call)."""
    model = pipe.transformer
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        if family == "2.x":
            prefix = model.encode_prefix(torch.randn(1, 7, model.cfg.context_in_dim, generator=g),
                                         torch.zeros(7, dtype=torch.bool))
            latents = torch.randn(1, 16, model.cfg.in_channels, generator=g)
            return model.denoise(latents, torch.tensor([0.6]), prefix, (4, 4))
        latents = torch.randn(1, 16, model.cfg.in_channels, generator=g)
        text = torch.randn(1, 5, model.cfg.joint_attention_dim, generator=g)
        return model(latents, text, torch.tensor([0.6]), [(1, 4, 4)])


@pytest.mark.parametrize("mode", [True, "step"])
@pytest.mark.parametrize("family", ["2.x", "v1"])
def test_compiled_blocks_match_eager_and_compile_once(family, mode, ref21, ref_v1):
    folder = ref21[1] if family == "2.x" else ref_v1["t2i"][1]
    eager = qimg.load(folder, dtype="float32")
    fast = qimg.load(folder, dtype="float32", compile=mode, batch_guidance=False)
    assert fast.transformer.compiled_step == (mode == "step")

    def picture(pipe, size=64, seed=3):
        return pipe.generate("a red circle", width=size, height=size, steps=3, seed=seed, cfg=4.0)[0]

    before = graphs()
    first = picture(fast)  # both guidance branches, three steps: one graph per half
    assert first.info["qimg"]["compiled"] is True and first.info["qimg"]["compile_s"] > 0
    assert graphs() - before <= 2
    assert torch.allclose(velocities(fast, family), velocities(eager, family), atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(first, dtype=int) - np.asarray(picture(eager), dtype=int)).max() <= 1
    settled = graphs()
    again = picture(fast, seed=4)
    assert graphs() == settled and again.info["qimg"]["compile_s"] < first.info["qimg"]["compile_s"]
    picture(fast, size=96)  # a new size: at most one more graph per half
    assert graphs() - settled <= 2
    grown = graphs()
    picture(fast, size=96, seed=5)
    assert graphs() == grown


def test_compile_modes_are_named_and_a_step_with_a_hook_runs_eagerly(ref21):
    from qimg.errors import InputError
    from qimg.models.compiled import compile_step
    from qimg.options import LoadOptions

    assert LoadOptions(compile=True).compile == "blocks" and LoadOptions(compile="step").compile == "step"
    assert LoadOptions().compile is False
    with pytest.raises(InputError, match=r"compile must be true, false or one of \['blocks', 'step'\], got 'fast'"):
        LoadOptions(compile="fast")
    pipe = qimg.load(ref21[1], dtype="float32", compile="step")
    before = graphs()
    seen = []

    def hook(where, index, state, run):  # a step cache's or a user's hook sees every block: not one graph
        seen.append(index)
        return run(state)

    picture = pipe.generate("a red circle", width=64, height=64, steps=2, seed=1, cfg=1, block_hook=hook)[0]
    assert graphs() == before and len(seen) == 2 * len(pipe.transformer.transformer_blocks)
    eager = qimg.load(ref21[1], dtype="float32").generate("a red circle", width=64, height=64, steps=2, seed=1,
                                                           cfg=1)[0]
    assert np.abs(np.asarray(picture, dtype=int) - np.asarray(eager, dtype=int)).max() <= 1

    class Split:  # a sequence split across processes (what Ulysses sets)
        pass

    other = qimg.load(ref21[1], dtype="float32")
    other.transformer.set_sequence(Split())
    with pytest.raises(InputError, match="runs on one process"):
        compile_step(other.transformer)
