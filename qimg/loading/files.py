"""Find a model folder (a path or a repo id in the local Hugging Face cache) and read its JSON files.

qimg downloads nothing unless asked (`qimg pull`, `--download`): a repo id is looked up in the local cache.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import qimg
from qimg.errors import CheckpointError

MODEL_INDEX = "model_index.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


EMBEDDED = {"qimg-tiny": "generate and edit", "qimg-tiny-layered": "layers"}  # name -> what it does
TASK_DEFAULTS = {"layers": "qimg-tiny-layered"}  # other tasks: qimg-tiny


def embedded_model_path(name: str = "qimg-tiny") -> Path:
    """Where an embedded tiny model lives inside the package."""
    if name not in EMBEDDED:
        raise CheckpointError(f"no embedded model named {name!r}; qimg embeds {sorted(EMBEDDED)}")
    return Path(qimg.__file__).parent / "tiny" / "weights" / name


def embedded_name(folder: Path) -> str | None:
    """The embedded model's name when `folder` is one, else None."""
    for name in EMBEDDED:
        if Path(folder).resolve() == embedded_model_path(name).resolve():
            return name
    return None


def default_model_path(task: str | None = None) -> Path:
    """The embedded model used when no model is named: qimg-tiny-layered for `task="layers"`, else qimg-tiny."""
    return embedded_model_path(TASK_DEFAULTS.get(task or "", "qimg-tiny"))


def hf_cache_dir() -> Path:
    """The local HF hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve_model(model: str | os.PathLike | None, task: str | None = None, download: bool = False) -> Path:
    """Return the folder holding `model_index.json` for a folder path, a cached repo id, an embedded model's name
    ("qimg-tiny", "qimg-tiny-layered"), or None (the embedded model for `task`). With `download`, a repo id that is
    not cached is pulled from the Hub first."""
    if model is None or (isinstance(model, str) and model in EMBEDDED and not Path(model).exists()):
        folder = default_model_path(task) if model is None else embedded_model_path(model)
        if not folder.is_dir():
            raise CheckpointError(
                f"the embedded tiny model is not present at {folder}; pass a model folder or a cached repo id"
            )
        return _check_folder(folder)
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"model path is not a folder: {path}")
        return _check_folder(path)
    if isinstance(model, str) and _REPO_ID.match(text):
        found = _from_hf_cache(text)
        if found is not None:
            return found
        if download:
            from qimg.loading.pull import pull

            return _check_folder(pull(text))
        cache = hf_cache_dir()
        raise CheckpointError(
            f"model {text!r} is neither a folder nor a repo id in the local Hugging Face cache "
            f"(searched {cache / _repo_folder_name(text)}; cache dirs: $HF_HUB_CACHE, else $HF_HOME/hub, "
            f"else ~/.cache/huggingface/hub). qimg stays offline unless asked: fetch it with `qimg pull {text}` (or "
            f"add --download), or pass the path of a diffusers-layout folder containing {MODEL_INDEX}"
        )
    raise CheckpointError(f"model folder not found: {path.absolute()}")


def _check_folder(folder: Path) -> Path:
    if not (folder / MODEL_INDEX).is_file():
        raise CheckpointError(f"not a diffusers-layout model folder: {folder / MODEL_INDEX} is missing")
    return folder


def _repo_folder_name(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def _from_hf_cache(repo_id: str) -> Path | None:
    repo = hf_cache_dir() / _repo_folder_name(repo_id)
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    snapshot = None
    ref = repo / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if candidate.is_dir():
            snapshot = candidate
    if snapshot is None:
        candidates = [p for p in snapshots.iterdir() if p.is_dir()]
        if not candidates:
            return None
        snapshot = max(candidates, key=lambda p: p.stat().st_mtime)
    if not (snapshot / MODEL_INDEX).is_file():
        raise CheckpointError(
            f"cached snapshot of {repo_id!r} is incomplete: {snapshot / MODEL_INDEX} is missing "
            f"(finish the download or pass a model folder)"
        )
    return snapshot


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object from `path`; CheckpointError names the file and, for bad JSON, the position."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"invalid JSON in {path} at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_model_index(folder: str | os.PathLike) -> dict:
    """Read `model_index.json` of a diffusers-layout folder."""
    return read_json(Path(folder) / MODEL_INDEX)
