"""Parallel runs on CPU with gloo: 2 and 4 processes (`qimg.parallel.launch`, each running `tests.parallel_worker`)
give the single-process picture of tiny 2.1, v1 (text-to-image, Edit-2511) and Layered folders within 1/255 for
cfg=2, ulysses=2 and ulysses=2,cfg=2, step caches included; tiles shared by ranks decode the same; the refusals name
their numbers; `qimg generate --gpus N --device cpu` writes one picture from rank 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import qimg
from qimg.errors import InputError
from qimg.options import LoadOptions
from qimg.parallel.config import ParallelConfig
from qimg.parallel.launch import launch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


# -- what needs no second process ------------------------------------------------------------------------------
@pytest.mark.parametrize("text,config", [("ulysses=2,cfg=2", ParallelConfig(2, 2)), ("cfg=2", ParallelConfig(1, 2)),
                                         ("Ulysses=4", ParallelConfig(4, 1)), (None, None), ("none", None)])
def test_parse(text, config):
    assert ParallelConfig.parse(text) == config
    assert LoadOptions(parallel=text).parallel == config


@pytest.mark.parametrize("text,message", [("cfg=3", "cfg must be 1 or 2"), ("ulysses=0", "positive integer"),
                                          ("tensor=2", "NAME in"), ("ulysses=x", "must be an integer"),
                                          ("cfg=2,cfg=2", "twice"), (4, "must be a string")])
def test_parse_refusals(text, message):
    with pytest.raises(InputError, match=message):
        ParallelConfig.parse(text)


def test_without_torchrun_is_refused(ref21, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(InputError, match="RANK and WORLD_SIZE are not set"):
        qimg.load(ref21[1], parallel="cfg=2")


def test_cli_gpu_refusals(ref21, capsys):
    from qimg.cli import main

    assert main(["generate", "x", "--model", str(ref21[1]), "--gpus", str(torch.cuda.device_count() + 1)]) == 2
    assert "CUDA devices; torch sees" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(ref21[1]), "--gpus", "3", "--device", "cpu",
                 "--parallel", "cfg=2"]) == 2
    assert "needs 2 ranks (ulysses 1 x cfg 2) but --gpus asks for 3" in capsys.readouterr().err


def test_launch_flags_are_replaced():
    from qimg.cli.ranks import without_launch_flags

    argv = ["generate", "a", "--gpus", "2", "--parallel=cfg=2", "--steps", "3", "--gpus=4", "--parallel", "x"]
    assert without_launch_flags(argv) == ["generate", "a", "--steps", "3"]


# -- 2 and 4 processes -----------------------------------------------------------------------------------------
def decoded_alone(job: dict) -> np.ndarray:
    """The worker's "vae" job on one process: the same latents and pixels through the same tiles, one after
    another (decoded, then encoded, flattened)."""
    pipe = qimg.load(job["folder"])
    z = torch.randn(1, pipe.vae.z_dim, *job["grid"], generator=torch.Generator().manual_seed(0))
    pixels = torch.rand(1, pipe.vae.image_channels, 128, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
    decoded = pipe.vae.decode(z, tile=tuple(job["tile"])).numpy()
    encoded = pipe.vae.encode(pixels, tile=tuple(job["tile"])).numpy()
    return np.concatenate([decoded.reshape(-1), encoded.reshape(-1)])


def pictures_alone(job: dict) -> tuple[np.ndarray, dict]:
    """A job's pictures made by one process, and their metadata."""
    pipe = qimg.load(job["folder"])
    images = [Image.open(p) for p in job.get("images", [])]
    out = pipe.layers(images[0], **job["options"]) if job.get("task") == "layers" else \
        pipe.generate(job["prompt"], images=images, **job["options"])
    return np.stack([np.asarray(p) for p in out]), out[0].info["qimg"]


@pytest.fixture(scope="module")
def models(ref21, ref_v1, ref_layered, tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel_inputs")
    Image.new("RGB", (64, 48), (200, 40, 30)).save(root / "cond.png")
    rgba = Image.new("RGBA", (64, 64), (30, 40, 200, 255))
    rgba.paste((240, 200, 20, 255), (16, 16, 48, 40))
    rgba.save(root / "rgba.png")
    from tests.reference import build_reference_21

    build_reference_21(root / "q21_per_step", causal_condition=False)  # its prefix is encoded at every step
    return {"q21": str(ref21[1]), "q21_per_step": str(root / "q21_per_step"), "v1": str(ref_v1["t2i"][1]),
            "edit2511": str(ref_v1["edit_plus_2511"][1]), "layered": str(ref_layered[1]),
            "cond": str(root / "cond.png"), "rgba": str(root / "rgba.png")}


def picture_jobs(m: dict) -> list[dict]:
    """Guided runs of every family (odd token counts on v1: 80x48 is 15 tokens, shares of 8 and 7; two pictures at
    once on a 2.x model whose prefix depends on the step)."""
    return [
        dict(name="q21", folder=m["q21"], prompt="a blue square",
             options=dict(negative_prompt="blurry", cfg=4.0, width=96, height=64, steps=3, seed=5)),
        dict(name="q21_edit", folder=m["q21"], prompt="make it green", images=[m["cond"]],
             options=dict(cfg=3.0, resolution=64, steps=2, seed=3)),
        dict(name="q21_per_step", folder=m["q21_per_step"], prompt="a red circle",
             options=dict(cfg=4.0, width=64, height=64, steps=2, seed=7, n=2)),
        dict(name="v1", folder=m["v1"], prompt="a red circle",
             options=dict(cfg=4.0, width=80, height=48, steps=2, seed=5)),
        dict(name="edit2511", folder=m["edit2511"], prompt="make it blue", images=[m["cond"]],
             options=dict(cfg=4.0, width=64, height=64, steps=2, seed=3)),
        dict(name="layered", folder=m["layered"], task="layers", images=[m["rgba"]], prompt="a card",
             options=dict(layers=2, resolution=64, steps=2, seed=1, cfg=4.0)),
        dict(name="q21_cache", folder=m["q21"], prompt="a red circle",
             options=dict(cfg=4.0, width=64, height=64, steps=8, seed=2, cache="magcache:0.5")),
        dict(name="v1_cache", folder=m["v1"], prompt="a red circle",
             options=dict(cfg=4.0, width=64, height=64, steps=8, seed=2, cache="fbcache:0.6")),
    ]


def run_ranks(tmp_path, world: int, jobs: list[dict]) -> dict:
    out = tmp_path / f"out{world}"
    out.mkdir()
    spec = tmp_path / f"jobs{world}.json"
    spec.write_text(json.dumps({"out": str(out), "jobs": jobs}))
    assert launch(["-m", "tests.parallel_worker", str(spec)], world, threads=1, timeout=600) == 0
    outcomes = json.loads((out / "outcomes.json").read_text())
    return {name: (np.load(out / f"{name}.npy") if outcome == "ok" else outcome, outcomes.get(f"{name}:meta"))
            for name, outcome in outcomes.items() if not name.endswith(":meta")}


def check_pictures(results: dict, jobs: list[dict], configs: list[str]) -> None:
    for job in jobs:
        alone, meta = pictures_alone(job)
        for config in configs:
            got, got_meta = results[f"{job['name']}@{config}"]
            assert isinstance(got, np.ndarray), got
            diff = np.abs(got.astype(int) - alone.astype(int)).max()
            assert diff <= 1, f"{job['name']} with {config}: off by {diff}/255"
            assert got_meta["parallel"] == str(ParallelConfig.parse(config))
            if "cache" in job["options"]:
                assert meta["cache_skipped"] > 0  # the cache did skip: the check below means something
                assert (got_meta["model_calls"], got_meta["cache_skipped"]) == \
                    (meta["model_calls"], meta["cache_skipped"]), config


def test_two_processes(models, tmp_path):
    configs = ["cfg=2", "ulysses=2"]
    jobs = picture_jobs(models)
    vae = dict(name="vae", folder=models["q21"], task="vae", grid=[8, 8], tile=[64, 16])
    run = [{**job, "name": f"{job['name']}@{c}", "parallel": c} for job in jobs for c in configs]
    run += [{**vae, "name": "vae@ulysses=2", "parallel": "ulysses=2"},
            {**jobs[0], "name": "mixed", "parallel": "cfg=2", "dtype_by_rank": ["float32", "bfloat16"]},
            {**jobs[0], "name": "world", "parallel": "ulysses=2,cfg=2"}]
    results = run_ranks(tmp_path, 2, run)
    check_pictures(results, jobs, configs)
    # 9 tiles each way, shared 5 + 4 by two ranks
    assert np.abs(results["vae@ulysses=2"][0] - decoded_alone(vae)).max() < 1e-5
    assert "one kind of device and one dtype; got rank 0: cpu float32, rank 1: cpu bfloat16" in results["mixed"][0]
    assert "needs 4 processes (ulysses 2 x cfg 2); this run has 2" in results["world"][0]


def test_four_processes(models, tmp_path):
    jobs = picture_jobs(models)
    run = [{**job, "name": f"{job['name']}@ulysses=2,cfg=2", "parallel": "ulysses=2,cfg=2"} for job in jobs]
    run.append({**jobs[2], "name": "heads", "parallel": "ulysses=4"})
    results = run_ranks(tmp_path, 4, run)
    check_pictures(results, jobs, ["ulysses=2,cfg=2"])
    assert "ulysses=4 must divide the transformer's 2 attention heads" in results["heads"][0]


def test_cli_gpus_on_cpu(ref21, tmp_path):
    """`--gpus 2 --device cpu` and torchrun: two ranks, one picture written by rank 0, the one process's picture."""
    args = ["generate", "a red circle", "--model", str(ref21[1]), "--cfg", "4", "--steps", "2", "--size", "64x64",
            "--seed", "4", "--quiet"]
    one = subprocess.run([sys.executable, "-m", "qimg.cli", *args, "-o", str(tmp_path / "one.png")],
                         capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "qimg.cli", *args, "-o", str(tmp_path / "two.png"), "--gpus", "2",
                          "--device", "cpu", "--parallel", "cfg=2"], capture_output=True, text=True, timeout=300)
    # the launcher users know: torchrun (torch.distributed.run) starting the same command on two ranks
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "qimg.cli", *args, "-o", str(tmp_path / "run.png"), "--parallel", "ulysses=2"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for done in (one, two, run):
        assert done.returncode == 0, done.stderr
    assert two.stdout.count("wrote") == 1 and "2 cpu ranks (ulysses=1,cfg=2)" in two.stdout
    assert run.stdout.count("wrote") == 1 and "2 cpu ranks (ulysses=2,cfg=1)" in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "run.png", "two.png"]  # no stray tmp files
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("one", "two", "run"))
    assert np.abs(a - b).max() <= 1 and np.abs(a - c).max() <= 1
    assert json.loads(Image.open(tmp_path / "two.png").info["qimg"])["parallel"] == "ulysses=1,cfg=2"
