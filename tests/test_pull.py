"""`qimg pull` and `--download` against a local stand-in for the Hub (tests/fake_hub.py): a whole repo, one
component, a single file, an interrupted download resumed, offline use afterwards, and the message that names
`qimg pull`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qimg.loading.files import embedded_model_path
from tests.fake_hub import FakeHub

pytestmark = pytest.mark.slow  # quick subset: python -m pytest -q -m 'not slow'

PROMPT = "a large red circle in the center on a blue background"


def qimg_cli(args, env, check=True):
    return subprocess.run([sys.executable, "-m", "qimg.cli", *args], env=env, capture_output=True, text=True,
                          check=check, timeout=300)


@pytest.fixture()
def hub(tmp_path):
    extra = tmp_path / "gguf-repo"
    extra.mkdir()
    (extra / "model-Q4_K_M.gguf").write_bytes(os.urandom(4096))
    (extra / "model-Q8_0.gguf").write_bytes(os.urandom(24 * 1024 * 1024))  # beyond the client's 10 MB chunks
    with FakeHub({"someone/tiny": embedded_model_path("qimg-tiny"), "city/files": extra}) as fake:
        env = {**os.environ, "HF_ENDPOINT": fake.url, "HF_HUB_CACHE": str(tmp_path / "cache"),
               "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HUB_ETAG_TIMEOUT": "5",
               "HF_HUB_DOWNLOAD_TIMEOUT": "10"}
        yield fake, env, tmp_path


def test_pull_then_generate_offline(hub):
    fake, env, tmp_path = hub
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing answers there
    missing = qimg_cli(["generate", PROMPT, "--model", "someone/tiny", "-o", str(tmp_path / "x.png")], offline,
                       check=False)
    assert missing.returncode == 2 and "qimg pull someone/tiny" in missing.stderr
    big = "someone/tiny/transformer/diffusion_pytorch_model.safetensors"
    fake.cut[big] = 50  # every connection for it drops half-way: the download gives up with a clear message
    first = qimg_cli(["pull", "someone/tiny", "--quiet"], env, check=False)
    assert first.returncode == 2 and "Run the same command again to resume" in first.stderr
    fake.cut.clear()
    second = qimg_cli(["pull", "someone/tiny", "--quiet"], env)
    assert "use it offline: qimg generate PROMPT --model someone/tiny" in second.stdout
    out = tmp_path / "pulled.png"
    done = qimg_cli(["generate", PROMPT, "--model", "someone/tiny", "-o", str(out), "--seed", "2", "--quiet"],
                    offline)
    assert out.is_file() and "wrote" in done.stdout
    embedded = tmp_path / "embedded.png"
    qimg_cli(["generate", PROMPT, "-o", str(embedded), "--seed", "2", "--quiet"], offline)
    assert out.read_bytes() != b"" and _pixels(out) == _pixels(embedded)  # the same model, fetched


def _pixels(path: Path) -> bytes:
    from PIL import Image

    return Image.open(path).tobytes()


def test_pull_parts_and_single_files(hub):
    fake, env, tmp_path = hub
    qimg_cli(["pull", "someone/tiny", "--include", "transformer/*", "--quiet"], env)
    snapshot = next((tmp_path / "cache" / "models--someone--tiny" / "snapshots").iterdir())
    assert sorted(p.name for p in snapshot.iterdir()) == ["transformer"]
    qimg_cli(["pull", "city/files", "--include", "model-Q4_K_M.gguf", "--quiet"], env)
    files = next((tmp_path / "cache" / "models--city--files" / "snapshots").iterdir())
    assert [p.name for p in files.iterdir()] == ["model-Q4_K_M.gguf"]
    bad = qimg_cli(["pull", "nobody/nothing", "--quiet"], env, check=False)
    assert bad.returncode == 2 and "'nobody/nothing' was not found" in bad.stderr
    bad = qimg_cli(["pull", "not a repo"], env, check=False)
    assert bad.returncode == 2 and "a repo id looks like 'owner/name'" in bad.stderr


def test_download_flag_fetches_what_is_missing(hub):
    fake, env, tmp_path = hub
    out = tmp_path / "d.png"
    qimg_cli(["generate", PROMPT, "--model", "someone/tiny", "--download", "-o", str(out), "--quiet"], env)
    assert out.is_file()
    assert any(p.endswith("model_index.json") for _, p, _ in fake.log)


def test_a_dropped_connection_resumes_where_it_stopped(hub):
    fake, env, tmp_path = hub
    fake.cut["city/files/model-Q8_0.gguf"] = 1  # the connection drops after 12 of 24 MB
    qimg_cli(["pull", "city/files", "--include", "model-Q8_0.gguf", "--quiet"], env)
    gets = [r for m, p, r in fake.log if m == "GET" and p.endswith("model-Q8_0.gguf")]
    assert len(gets) == 2 and gets[0] is None and gets[1].startswith("bytes=") and gets[1] != "bytes=0-"
    pulled = next((tmp_path / "cache" / "models--city--files" / "snapshots").iterdir()) / "model-Q8_0.gguf"
    assert pulled.read_bytes() == (fake.repos["city/files"] / "model-Q8_0.gguf").read_bytes()
