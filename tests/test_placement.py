"""Offload: `Placement` keeps one big component on the device at a time and sends the other back without a copy;
the pipelines place the encoder before encoding and the transformer before denoising; the server sends the
other models back before a job. (On a GPU, tests/test_cuda.py checks the pictures are unchanged.)"""

import numpy as np
import pytest
import torch
from torch import nn

import qimg
from qimg.pipelines.placement import Placement
from qimg.tiny import world


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.register_buffer("scale", torch.ones(4), persistent=False)


def devices(module: nn.Module) -> set[str]:
    return {t.device.type for t in [*module.parameters(), *module.buffers()]}


def test_one_module_on_the_device_at_a_time():
    first, second = Tied(), nn.Linear(3, 3)
    homes = {name: t.data_ptr() for name, t in first.state_dict(keep_vars=True).items()}
    place = Placement("meta", [first, second])
    assert place.offload
    place.use(first)
    assert devices(first) == {"meta"} and devices(second) == {"cpu"}
    assert first.b.weight is first.a.weight  # still tied
    place.use(second)
    assert devices(first) == {"cpu"} and devices(second) == {"meta"}
    # back on the CPU means the very same storage, not a copy
    assert {name: t.data_ptr() for name, t in first.state_dict(keep_vars=True).items()} == homes
    place.release()
    assert devices(first) == devices(second) == {"cpu"}


def test_without_offload_nothing_moves():
    module = nn.Linear(2, 2)
    place = Placement("meta")
    place.use(module)
    assert not place.offload and devices(module) == {"cpu"}


def test_offloaded_weights_must_start_on_the_cpu():
    with torch.device("meta"):
        module = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="must start on the CPU; weight is on meta"):
        Placement("cpu", [module])


class Recorder(Placement):
    def __init__(self, pipe):
        super().__init__(pipe.info.device)
        self.names = {id(pipe.conditioner.encoder): "encoder", id(pipe.transformer): "transformer"}
        self.calls = []

    def use(self, module):
        self.calls.append(self.names[id(module)])


def test_pipelines_place_each_component_before_its_phase():
    pipe = qimg.load(dtype="float32", device="cpu", offload=True)
    assert pipe.placement.offload is False and pipe.describe()["offload"] is False  # nothing to offload to on a CPU
    scene = world.held_out(1, seed=3)[0]
    # the first picture of a process is not always bit-equal to later ones (1 level on 16 pixels in 2 of 10
    # runs here, as if a kernel took another path on its first call), so both compared pictures come after one
    pipe.generate(world.prompt(scene), seed=1)
    plain = pipe.generate(world.prompt(scene), seed=1)[0]
    pipe.placement = Recorder(pipe)
    again = pipe.generate(world.prompt(scene), seed=1)[0]
    assert pipe.placement.calls == ["encoder", "transformer"]
    assert np.array_equal(np.asarray(plain), np.asarray(again))
    layered = qimg.load("qimg-tiny-layered", dtype="float32", device="cpu")
    layered.placement = Recorder(layered)
    layered.layers(world.render(scene), layers=2, seed=1, steps=1)  # captions first: the encoder
    assert layered.placement.calls == ["encoder", "transformer"]


def test_server_sends_other_models_back_before_a_job():
    from qimg.serve.models import ModelRegistry

    class Fake:
        def __init__(self):
            self.placement = type("P", (), {"released": 0, "release": lambda s: setattr(s, "released",
                                                                                        s.released + 1)})()

    a, b = Fake(), Fake()
    registry = ModelRegistry({}, pipelines={"a": a, "b": b})
    assert registry.load("a") is a
    assert (a.placement.released, b.placement.released) == (0, 1)


def test_2x_offload_leaves_the_lm_head_behind():
    """Encoding runs `conditioner.encoder` only, so offload need not move the LM head (1.2 GB at 8B) to the GPU:
    with the head's weight on the meta device (any use would fail) the states are unchanged."""
    pipe = qimg.load(dtype="float32", device="cpu")
    conditioner = pipe.conditioner
    model = conditioner.model  # the VLM (loaded on first need; text-only prompts do not need it)
    assert conditioner.encoder is model.model
    expected = conditioner.encode("a small red circle in the center on a blue background")
    head = conditioner.model.lm_head.weight
    conditioner.model.lm_head.weight = nn.Parameter(torch.empty(head.shape, device="meta"), requires_grad=False)
    try:
        got = conditioner.encode("a small red circle in the center on a blue background")
    finally:
        conditioner.model.lm_head.weight = head
    assert torch.equal(got.states, expected.states)


class Probe(nn.Module):
    """A block that records which blocks' weights are on the device (meta here) while it runs."""

    def __init__(self, seen: list, blocks: list):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2), requires_grad=False)
        self.seen, self.blocks = seen, blocks

    def forward(self, x):
        self.seen.append([i for i, b in enumerate(self.blocks) if b.weight.device.type == "meta"])
        return x


def test_block_streamer_keeps_a_window_of_blocks_on_the_device():
    from qimg.pipelines.placement import BlockStreamer

    seen, blocks = [], []
    blocks.extend(Probe(seen, blocks) for _ in range(5))
    stream = BlockStreamer(nn.ModuleList(blocks), "meta", ahead=2)
    for _ in range(2):  # two model calls: the window wraps round to the next call's first blocks
        for block in blocks:
            block(None)
    assert seen[:5] == [[0, 1, 2], [1, 2, 3], [2, 3, 4], [0, 3, 4], [0, 1, 4]]
    assert seen[5:] == seen[:5]
    blocks[0](None)
    blocks[1](None)  # a step cache skipped blocks 2-4 of the last call: blocks outside the window are dropped
    assert seen[-1] == [1, 2, 3]
    stream.close()
    assert all(b.weight.device.type == "cpu" for b in blocks)
    blocks[3](None)
    assert seen[-1] == []  # hooks removed


def test_block_streaming_computes_the_same(tmp_path):
    from qimg.pipelines.placement import BlockStreamer

    pipe = qimg.load(dtype="float32", device="cpu")
    plain = np.asarray(pipe.generate("a red circle", seed=2)[0])
    streamer = BlockStreamer(pipe.transformer.transformer_blocks, "cpu", ahead=1)
    sizes = []
    pipe.transformer.transformer_blocks[0].register_forward_hook(lambda *a: sizes.append(len(streamer.resident)))
    assert np.array_equal(np.asarray(pipe.generate("a red circle", seed=2)[0]), plain)
    assert sizes and max(sizes) == 2
    streamer.close()
    assert qimg.load(dtype="float32", device="cpu", offload="blocks").describe()["offload_mode"] is None  # on a CPU
