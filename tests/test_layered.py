"""QwenImageLayeredPipeline: parity with the reference (layers 2 and 3, with a prompt, with the VLM's caption),
recursion, bad input, and the `qimg layers` command writing .psd/.ora/.pptx/.zip stacks that reopen unchanged.

The reference asserts resolution 640 or 1024; tests patch its `calculate_dimensions` to a 64^2 area and give qimg
`resolution=64`. Its `output_type="latent"` is broken in 0.42.1, so images are compared."""

import numpy as np
import pytest
import torch
from PIL import Image

import qimg
from qimg.cli import main
from qimg.errors import InputError
from qimg.export import read_layers

RES = 64


@pytest.fixture(scope="module")
def pipes(ref_layered):
    ref, folder = ref_layered
    return ref, qimg.load(folder, dtype="float32", device="cpu"), folder


@pytest.fixture
def small(monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_layered as module

    area = module.calculate_dimensions
    monkeypatch.setattr(module, "calculate_dimensions", lambda target, ratio: area(RES * RES, ratio))


def max_diff(a: Image.Image, b: Image.Image) -> int:
    assert a.mode == b.mode and a.size == b.size, (a.mode, a.size, b.mode, b.size)
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


def source() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 96, 4), dtype=np.uint8), "RGBA")  # non-square, with alpha


@pytest.mark.parametrize("count,normalize", [(2, False), (3, True)])
def test_layers_match_reference(pipes, small, count, normalize):
    ref, ours, _ = pipes
    expected = ref(image=source(), prompt="a red circle on a blue square", layers=count, num_inference_steps=2,
                   negative_prompt="blurry", true_cfg_scale=3.0, cfg_normalize=normalize, resolution=640,
                   generator=torch.Generator().manual_seed(5)).images[0]
    got = ours.layers(source(), layers=count, resolution=RES, prompt="a red circle on a blue square", steps=2, seed=5,
                      negative_prompt="blurry", cfg=3.0, cfg_normalize=normalize)
    assert len(got) == len(expected) == count  # the composite frame is not returned
    for a, b in zip(got, expected):
        assert a.mode == "RGBA" and a.size == (64, 64)
        assert max_diff(a, b) <= 1
    assert got[0].info["qimg"]["layers"] == count and got[-1].info["qimg"]["index"] == count - 1


@pytest.mark.parametrize("language", ["en", "zh"])
def test_caption_when_no_prompt(pipes, small, language):
    ref, ours, _ = pipes
    from qimg.models.conditioner import CAPTION_PROMPTS

    assert CAPTION_PROMPTS[language] == (ref.image_caption_prompt_en if language == "en" else
                                         ref.image_caption_prompt_cn)
    expected = ref(image=source(), prompt="", layers=2, num_inference_steps=2, use_en_prompt=language == "en",
                   generator=torch.Generator().manual_seed(2)).images[0]
    got = ours.layers(source(), layers=2, resolution=RES, steps=2, seed=2, cfg=1, caption_language=language)
    assert all(max_diff(a, b) <= 1 for a, b in zip(got, expected))
    caption = got[0].info["qimg"]["prompt"]
    resized = source().resize((64, 64), Image.LANCZOS)
    assert caption == ref.get_image_caption(resized, use_en_prompt=language == "en", device="cpu")


def test_recurse_replaces_one_layer(pipes):
    _, ours, _ = pipes
    kwargs = dict(layers=2, resolution=RES, prompt="a", steps=2, seed=7, cfg=1)
    top = ours.layers(source(), **kwargs)
    both = ours.layers(source(), recurse=1, **kwargs)
    sub = ours.layers(top[1], **kwargs)
    assert len(both) == 3
    assert max_diff(both[0], top[0]) == 0
    assert all(max_diff(a, b) == 0 for a, b in zip(both[1:], sub))
    assert both[2].info["qimg"]["recurse"] == 1 and both[2].info["qimg"]["of"] == 3


def test_describe_and_no_generate(pipes):
    """Layered is a sibling of the generation pipelines: it has layers(), not a generate() that refuses."""
    from qimg.pipelines.generation import ImagePipeline
    from qimg.pipelines.pipeline import Pipeline

    _, ours, _ = pipes
    info = ours.describe()
    assert info["tasks"] == ["layers"] and info["pipeline"] == "QwenImageLayeredPipeline"
    assert isinstance(ours, Pipeline) and not isinstance(ours, ImagePipeline)
    assert not hasattr(ours, "generate")


@pytest.mark.parametrize("kwargs,message", [
    (dict(layers=1), "layers must be an integer from 2 to 10, got 1"),
    (dict(layers=11), "layers must be an integer from 2 to 10, got 11"),
    (dict(layers=2, recurse=2), r"recurse must be the index of a returned layer, 0 to 1, got 2"),
    (dict(recurse=-1), r"0 to 3, got -1"),
    (dict(resolution=100), "resolution must be 640 or 1024"),
    (dict(resolution=2048), "resolution must be 640 or 1024"),
    (dict(steps=0), "steps must be"),
    (dict(caption_language="fr"), "caption_language must be"),
])
def test_bad_options(pipes, kwargs, message):
    _, ours, _ = pipes
    with pytest.raises(InputError, match=message):
        ours.layers(source(), **{"resolution": RES, **kwargs})


@pytest.mark.parametrize("image,message", [
    ("not an image", "image 1 is a str, not a picture"),
    (Image.new("RGBA", (0, 0)), r"image 1 is empty \(0x0\)"),
    (Image.new("RGBA", (40, 40)), r"40x40 = 1600 pixels; the limit is 1000"),
    (Image.new("RGBA", (4000, 40)), "aspect ratio is too extreme"),
])
def test_bad_images(pipes, monkeypatch, image, message):
    import qimg.imaging as images

    if image != "not an image" and image.size == (40, 40):
        monkeypatch.setattr(images, "MAX_INPUT_PIXELS", 1000)
    with pytest.raises(InputError, match=message):
        pipes[1].layers(image, resolution=RES, steps=1)


@pytest.mark.parametrize("suffix", [".psd", ".ora", ".pptx", ".zip"])
def test_cli_writes_a_stack_that_reopens(pipes, tmp_path, capsys, suffix):
    _, ours, folder = pipes
    src = tmp_path / "in.png"
    source().save(src)
    out = tmp_path / f"stack{suffix}"
    assert main(["layers", str(src), "-o", str(out), "--model", str(folder), "--layers", "2", "--resolution", "64",
                 "--prompt", "a", "--steps", "2", "--seed", "3", "--cfg", "1", "--dtype", "float32",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert str(out.resolve()) in captured.out and "2 layers" in captured.out
    assert "layers" in captured.err  # the progress bar
    expected = ours.layers(Image.open(src), layers=2, resolution=RES, prompt="a", steps=2, seed=3, cfg=1)
    layers, _ = read_layers(out)
    assert len(layers) == 2
    assert all(max_diff(a, b) == 0 for a, b in zip(layers, expected))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.png", out.name])


def test_cli_recurse(pipes, tmp_path):
    _, ours, folder = pipes
    src = tmp_path / "in.png"
    source().save(src)
    out = tmp_path / "stack.zip"
    assert main(["layers", str(src), "-o", str(out), "--model", str(folder), "--layers", "2", "--resolution", "64",
                 "--prompt", "a", "--steps", "1", "--seed", "3", "--cfg", "1", "--recurse", "0", "--quiet"]) == 0
    assert len(read_layers(out)[0]) == 3


@pytest.mark.parametrize("args,message", [
    (["-o", "{tmp}/out.gif", "--model", "/no/such/model"], "suffix '.gif'"),  # checked before loading the model
    (["-o", "{tmp}/out", "--model", "/no/such/model"], "suffix '(none)'"),
    (["-o", "/no/such/dir/out.psd"], "output folder does not exist"),
    (["-o", "{tmp}/out.psd", "--layers", "11", "--model", "/no/such/model"], "--layers must be from 2 to 10"),
    (["-o", "{tmp}/out.psd", "--recurse", "4", "--model", "/no/such/model"], "--recurse must be the index of a "
                                                                             "returned layer, 0 to 3, got 4"),
    (["-o", "{tmp}/out.psd", "--resolution", "100", "--model", "/no/such/model"], "resolution must be 640 or 1024"),
])
def test_cli_errors_before_loading(tmp_path, capsys, args, message):
    src = tmp_path / "in.png"
    source().save(src)
    argv = ["layers", str(src)] + [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["in.png"]


def test_cli_bad_picture_and_wrong_model(pipes, ref_v1, tmp_path, capsys):
    _, _, folder = pipes
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    out = tmp_path / "o.psd"
    assert main(["layers", str(bad), "-o", str(out), "--model", str(folder)]) == 2
    assert "not a readable picture" in capsys.readouterr().err
    src = tmp_path / "in.png"
    source().save(src)
    assert main(["layers", str(src), "-o", str(out), "--model", str(ref_v1["t2i"][1]), "--quiet"]) == 2
    assert "does not split images into layers" in capsys.readouterr().err
    assert not out.exists()
