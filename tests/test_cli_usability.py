"""The CLI as a newcomer meets it: every flag explained, --version, -n, file modes, the embedded model saying what it
draws, `qimg tiny train` never writing into the package, and `import qimg` staying light."""

import argparse
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from qimg.cli import build_parser, main

PROMPT = "a large red circle in the center on a blue background"


def walk(parser: argparse.ArgumentParser, path=("qimg",)):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name))
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield " ".join(path), action


def test_every_flag_and_argument_is_explained():
    missing = [f"{cmd} {'/'.join(a.option_strings) or a.dest}" for cmd, a in walk(build_parser())
               if not a.help or not a.help.strip()]
    assert not missing, missing


def test_version(capsys):
    import qimg

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"qimg {qimg.__version__}"


def test_several_images(tmp_path, capsys):
    out = tmp_path / "pic.png"
    assert main(["generate", PROMPT, "-o", str(out), "-n", "2", "--seed", "1", "--quiet"]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["pic-1.png", "pic-2.png"]
    a, b = (Image.open(tmp_path / name) for name in written)
    assert a.tobytes() != b.tobytes()  # two pictures, not one twice
    assert main(["generate", PROMPT, "-o", str(out), "-n", "17", "--quiet"]) == 2
    assert "n must be an integer from 1 to 16, got 17" in capsys.readouterr().err


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_files_follow_the_umask(tmp_path, umask, mode):
    script = ("import os, sys; os.umask(int(sys.argv[1], 8)); from qimg.cli import main; "
              "sys.exit(main(['generate', sys.argv[2], '-o', sys.argv[3], '--steps', '1', '--quiet']))")
    out = tmp_path / "m.png"
    subprocess.run([sys.executable, "-c", script, oct(umask), PROMPT, str(out)], check=True)
    assert stat.S_IMODE(os.stat(out).st_mode) == mode


def test_the_embedded_model_says_what_it_draws(capsys, tmp_path):
    from qimg.tiny.grammar import EXAMPLES, understands

    assert main(["info", "qimg-tiny"]) == 0
    out = capsys.readouterr().out
    assert "3x3 grid" in out and EXAMPLES["generate"][0] in out and "qimg edit IN.png" in out
    assert all(understands(p) for p in EXAMPLES["generate"])
    assert all(understands(p, editing=True) for p in EXAMPLES["edit"])
    assert not understands("A red fox reading a newspaper")
    assert main(["generate", "A red fox reading a newspaper", "-o", str(tmp_path / "fox.png"), "--steps", "1",
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: the embedded qimg-tiny only knows" in err and "--model" in err
    assert main(["generate", PROMPT, "-o", str(tmp_path / "ok.png"), "--steps", "1", "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_tiny_train_never_writes_into_the_package(tmp_path, capsys, monkeypatch):
    import qimg

    package = Path(qimg.__file__).resolve().parent
    assert main(["tiny", "train", "--minutes", "0", "--work", str(tmp_path / "w"), "--out",
                 str(package / "tiny" / "weights" / "qimg-tiny")]) == 2
    assert "inside the installed qimg package" in capsys.readouterr().err
    monkeypatch.setenv("QIMG_HOME", str(tmp_path / "home"))
    from qimg.tiny.fit import user_dir

    assert user_dir() == tmp_path / "home" / "tiny"


def test_import_qimg_stays_light():
    """`import qimg` (and the CLI's parser) must not pull in transformers, diffusers, fastapi or the training code:
    every command pays for what it imports."""
    code = ("import sys, qimg, qimg.cli; qimg.cli.build_parser(); "
            "heavy = [m for m in ('transformers', 'diffusers', 'fastapi', 'qimg.tiny.train', 'qimg.tiny.fit', "
            "'qimg.serve.app', 'torch') if m in sys.modules]; print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
