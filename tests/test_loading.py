"""Checkpoint loading: resolving model folders, reading JSON, mapping safetensors, loading modules."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from qimg.errors import CheckpointError
from qimg.loading.files import read_json, read_model_index, resolve_model
from qimg.loading.weights import load_module, open_state_dict, save_state_dict


class Tiny(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("steps", torch.zeros(2, dtype=torch.int64))


def tiny_sd(dim=8):
    torch.manual_seed(0)
    return {k: torch.randn_like(v.float()).to(v.dtype) for k, v in Tiny(dim).state_dict().items()}


def write_component(folder: Path, sd, name="diffusion_pytorch_model"):
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(sd, folder / f"{name}.safetensors")
    return folder


def write_model(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    return folder


# ---- resolve_model / read_json -------------------------------------------------------------------


def test_folder_missing(tmp_path):
    with pytest.raises(CheckpointError, match="model folder not found.*nope"):
        resolve_model(tmp_path / "nope")


def test_model_index_missing(tmp_path):
    with pytest.raises(CheckpointError, match="model_index.json is missing"):
        resolve_model(tmp_path)


def test_folder_ok(tmp_path):
    assert resolve_model(write_model(tmp_path / "m")) == tmp_path / "m"
    assert read_model_index(tmp_path / "m")["_class_name"] == "QwenImagePipeline"


def test_repo_id_from_fake_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--Qwen--Qwen-Image-2.1"
    old = write_model(repo / "snapshots" / "aaa111")
    new = write_model(repo / "snapshots" / "bbb222")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaa111\n")
    assert resolve_model("Qwen/Qwen-Image-2.1") == old
    (repo / "refs" / "main").unlink()  # no ref: newest snapshot
    import os

    os.utime(old, (1, 1))
    assert resolve_model("Qwen/Qwen-Image-2.1") == new


def test_repo_id_via_hf_home(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    snap = write_model(tmp_path / "hub" / "models--org--m" / "snapshots" / "abc")
    assert resolve_model("org/m") == snap


def test_repo_id_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        resolve_model("Qwen/Not-A-Model")
    msg = str(e.value)
    assert "Qwen/Not-A-Model" in msg and str(tmp_path) in msg and "qimg pull Qwen/Not-A-Model" in msg


def test_default_model_missing_or_present():
    from qimg.loading.files import default_model_path

    if (default_model_path() / "model_index.json").is_file():
        assert resolve_model(None) == default_model_path()
    else:
        with pytest.raises(CheckpointError, match="embedded tiny model"):
            resolve_model(None)


def test_invalid_json(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"a": 1,\n "b": }')
    with pytest.raises(CheckpointError, match=r"config.json at line 2 column"):
        read_json(p)
    with pytest.raises(CheckpointError, match="file not found.*other.json"):
        read_json(tmp_path / "other.json")


# ---- safetensors mapping -------------------------------------------------------------------------


def test_sharded_round_trip(tmp_path):
    sd = tiny_sd()
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
    for name, ks in shards.items():
        save_state_dict({k: sd[k] for k in ks}, tmp_path / name)
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    out = open_state_dict(tmp_path)  # base name "model" auto-detected
    assert sorted(out) == keys
    for k in keys:
        assert torch.equal(out[k], sd[k]) and out[k].dtype == sd[k].dtype


def test_index_missing_shard(tmp_path):
    sd = tiny_sd()
    save_state_dict(sd, tmp_path / "a.safetensors")
    wm = {k: "a.safetensors" for k in sd} | {"extra": "b.safetensors"}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match="missing shard.*b.safetensors"):
        open_state_dict(tmp_path)


def test_no_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no weights in"):
        open_state_dict(tmp_path)


def test_truncated(tmp_path):
    f = write_component(tmp_path, tiny_sd()) / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors: file is truncated"):
        open_state_dict(tmp_path)


def _header(f: Path):
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _rewrite(f: Path, header: dict, body: bytes):
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda f: f.write_bytes(struct.pack("<Q", 10**12) + b"{}"), "header length 1000000000000 exceeds"),
        (lambda f: f.write_bytes(struct.pack("<Q", 5) + b"{nope"), "invalid JSON"),
        (lambda f: f.write_bytes(b"abc"), "too short"),
    ],
)
def test_corrupt_header(tmp_path, corrupt, message):
    f = write_component(tmp_path, tiny_sd()) / "diffusion_pytorch_model.safetensors"
    corrupt(f)
    with pytest.raises(CheckpointError, match=message):
        open_state_dict(tmp_path)


def test_bad_dtype_and_offsets(tmp_path):
    f = write_component(tmp_path, tiny_sd()) / "diffusion_pytorch_model.safetensors"
    header, body = _header(f)
    header["proj.weight"]["dtype"] = "Q4"
    _rewrite(f, header, body)
    with pytest.raises(CheckpointError, match="'proj.weight': unknown dtype 'Q4'"):
        open_state_dict(tmp_path)
    header["proj.weight"]["dtype"] = "F32"
    header["proj.weight"]["shape"] = [8, 9]
    _rewrite(f, header, body)
    with pytest.raises(CheckpointError, match=r"'proj.weight'.*span 256 bytes but shape \[8, 9\] of F32 needs 288"):
        open_state_dict(tmp_path)


# ---- load_module ---------------------------------------------------------------------------------


def test_load_module_values(tmp_path):
    sd = tiny_sd()
    m = load_module(Tiny, write_component(tmp_path, sd))
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]) and v.device.type == "cpu"


def test_missing_and_unexpected_keys(tmp_path):
    sd = tiny_sd()
    sd.pop("proj.bias")
    sd["stray.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_module(Tiny, write_component(tmp_path, sd))
    msg = str(e.value)
    assert "1 missing key(s): proj.bias" in msg and "1 unexpected key(s): stray.weight" in msg


def test_long_key_lists_capped(tmp_path):
    sd = tiny_sd() | {f"junk.{i}": torch.zeros(1) for i in range(50)}
    with pytest.raises(CheckpointError, match=r"50 unexpected key\(s\).*\(30 more\)"):
        load_module(Tiny, write_component(tmp_path, sd))


def test_shape_mismatch(tmp_path):
    sd = tiny_sd()
    sd["proj.weight"] = torch.zeros(8, 4)
    with pytest.raises(CheckpointError, match=r"proj.weight: expected \(8, 8\), found \(8, 4\)"):
        load_module(Tiny, write_component(tmp_path, sd))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_conversion(tmp_path, dtype):
    sd = tiny_sd()
    m = load_module(Tiny, write_component(tmp_path, sd), dtype=dtype)
    assert m.proj.weight.dtype == dtype and m.scale.dtype == dtype
    assert m.steps.dtype == torch.int64  # integers are not cast
    assert torch.equal(m.proj.weight, sd["proj.weight"].to(dtype))


class WithRope(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self):
        self.register_buffer("freqs", torch.arange(4, dtype=torch.float32) * 2, persistent=False)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = WithRope()


def test_non_persistent_buffers(tmp_path):
    sd = {k: torch.randn(v.shape) for k, v in Outer().state_dict().items()}
    m = load_module(Outer, write_component(tmp_path, sd), dtype=torch.bfloat16)
    assert m.inner.freqs.device.type == "cpu" and torch.equal(m.inner.freqs, torch.arange(4.0) * 2)


def test_meta_buffer_without_hook_is_an_error(tmp_path):
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("cache", torch.zeros(2), persistent=False)

    sd = {k: torch.randn(v.shape) for k, v in Bad().state_dict().items()}
    with pytest.raises(RuntimeError, match="cache.*init_non_persistent_buffers"):
        load_module(Bad, write_component(tmp_path, sd))


def test_tensors_are_views_on_the_file_mapping(tmp_path):
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc/self/maps")
    f = write_component(tmp_path, tiny_sd()) / "diffusion_pytorch_model.safetensors"
    m = load_module(Tiny, tmp_path)
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == str(f.resolve()):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    assert ranges, "file is not mapped"
    for name, t in m.state_dict().items():
        ptr = t.untyped_storage().data_ptr()
        assert any(lo <= ptr < hi for lo, hi in ranges), f"{name} is not a view on the mapping"
    # writing to a tensor copies the page privately and never changes the file
    before = f.read_bytes()
    m.proj.weight.data.add_(1.0)
    assert f.read_bytes() == before


def test_rss_barely_grows_when_loading_200mb(tmp_path):
    psutil = pytest.importorskip("psutil")
    del psutil
    n = 50 * 1024 * 1024  # 50M float32 = 200 MB
    save_state_dict({"w": torch.zeros(n // 1024, 1024)}, tmp_path / "diffusion_pytorch_model.safetensors")
    script = textwrap.dedent(
        f"""
        import psutil, torch
        from torch import nn
        from qimg.loading.weights import load_module
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.empty({n // 1024}, 1024))
        proc = psutil.Process()
        before = proc.memory_info().rss
        m = load_module(M, {str(tmp_path)!r})
        after = proc.memory_info().rss
        print((after - before) / 2**20)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grew_mib = float(out.stdout.strip())
    assert grew_mib < 20, f"RSS grew by {grew_mib:.1f} MiB loading a 200 MB file"
