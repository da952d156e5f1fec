"""`qimg pull`: fetch a model repo (or some of its files) from the Hugging Face Hub into the standard cache, so that
`--model REPO` then works offline. Downloads resume where an interrupted one stopped; nothing else in qimg goes
online (unless `--download` asks a command to pull what it is missing first)."""

from __future__ import annotations

import re
from pathlib import Path

from qimg.errors import CheckpointError, InputError
from qimg.loading.files import hf_cache_dir

_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")


def pull(repo: str, *, revision: str | None = None, include: list[str] | None = None,
         progress: bool = True) -> Path:
    """Download `repo` (only the files matching `include` glob patterns when given) and return its snapshot
    folder in the cache. Errors name the repo and what went wrong (not found, offline, interrupted)."""
    if not isinstance(repo, str) or not _REPO.match(repo):
        raise InputError(f"a repo id looks like 'owner/name', got {repo!r}")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    except ModuleNotFoundError:
        raise InputError("qimg pull needs the huggingface_hub package (pip install huggingface_hub)") from None
    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=include or None,
                                   cache_dir=hf_cache_dir(), library_name="qimg")
    except RepositoryNotFoundError:
        raise CheckpointError(f"repo {repo!r} was not found on the Hub (or needs a token: `hf auth login`)") from None
    except LocalEntryNotFoundError as err:
        raise CheckpointError(f"cannot reach the Hub to fetch {repo!r} (offline? HF_HUB_OFFLINE is set?): "
                              f"{err}") from None
    except (HfHubHTTPError, OSError) as err:
        raise CheckpointError(f"downloading {repo!r} stopped: {err}. Run the same command again to resume") from None
    except Exception as err:  # the hub client raises transport errors of its HTTP library
        raise CheckpointError(f"downloading {repo!r} stopped: {type(err).__name__}: {err}. Run the same "
                              f"command again to resume") from None
    folder = Path(folder)
    if include is None and not any(folder.iterdir()):
        raise CheckpointError(f"repo {repo!r} has no files at revision {revision or 'main'}")
    return folder
