"""The CLI end to end on a tiny reference checkpoint: same image as the reference, metadata, errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from qimg.cli import main
from qimg.export.picture import read_png_parameters


def test_generate_matches_reference(ref21, tmp_path, capsys):
    ref, folder = ref21
    out = tmp_path / "out.png"
    code = main(["generate", "a red circle", "-o", str(out), "--model", str(folder), "--size", "64x64",
                 "--steps", "3", "--seed", "4", "--dtype", "float32", "--device", "cpu"])
    assert code == 0
    captured = capsys.readouterr()
    assert str(out.resolve()) in captured.out
    assert "denoise" in captured.err  # the progress bar
    expected = ref("a red circle", height=64, width=64, num_inference_steps=3,
                   generator=torch.Generator().manual_seed(4)).images[0]
    got = Image.open(out)
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
    params = read_png_parameters(out)
    assert params["prompt"] == "a red circle" and params["seed"] == 4 and params["steps"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_edit_with_cfg_matches_reference(ref21, tmp_path):
    ref, folder = ref21
    src = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 96, 4), dtype=np.uint8), "RGBA")
    src.save(tmp_path / "in.png")
    out = tmp_path / "edit.png"
    assert main(["edit", str(tmp_path / "in.png"), "make it blue", "-o", str(out), "--model", str(folder),
                 "--resolution", "64", "--steps", "2", "--seed", "8", "--cfg", "3", "--negative-prompt", "ugly",
                 "--quiet"]) == 0
    expected = ref("make it blue", image=[Image.open(tmp_path / "in.png")], negative_prompt="ugly",
                   true_cfg_scale=3.0, num_inference_steps=2, output_resolution=64,
                   generator=torch.Generator().manual_seed(8)).images[0]
    assert np.abs(np.asarray(Image.open(out), dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def test_opaque_background_and_jpeg(ref21, tmp_path):
    _, folder = ref21
    out = tmp_path / "o.jpg"
    assert main(["generate", "x", "-o", str(out), "--model", str(folder), "--size", "64x64", "--steps", "1",
                 "--background", "opaque", "--quiet"]) == 0
    assert Image.open(out).mode == "RGB"


def test_info(ref21, capsys):
    _, folder = ref21
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "QwenImage21Pipeline" in out and "QwenImage21Transformer2DModel" in out and "parameters" in out


@pytest.mark.parametrize("argv,message", [
    (["generate", "x", "-o", "out.txt"], "suffix '.txt'"),
    (["generate", "x", "-o", "/no/such/dir/o.png"], "output folder does not exist"),
    (["generate", "x", "--model", "/no/such/model"], "model folder not found"),
    (["edit", "/no/such.png", "x"], "image not found"),
])
def test_errors_are_clean(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_not_a_picture(ref21, tmp_path, capsys):
    _, folder = ref21
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # a truncated PNG
    assert main(["edit", str(bad), "x", "--model", str(folder), "-o", str(tmp_path / "o.png")]) == 2
    assert "not a readable picture" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
