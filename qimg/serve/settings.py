"""Server settings: one frozen object built by the CLI (or a test) and handed to `create_app`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from qimg.options import LoadOptions

DEFAULT_MODEL_NAME = "qimg-tiny"
LAYERED_MODEL_NAME = "qimg-tiny-layered"


def default_models() -> dict[str, str | None]:
    """The embedded models: qimg-tiny (generate, edit) and, when shipped, qimg-tiny-layered (layers)."""
    from qimg.loading.files import embedded_model_path

    models: dict[str, str | None] = {DEFAULT_MODEL_NAME: None}
    if (embedded_model_path(LAYERED_MODEL_NAME) / "model_index.json").is_file():
        models[LAYERED_MODEL_NAME] = LAYERED_MODEL_NAME
    return models


def default_data_dir() -> Path:
    """$QIMG_DATA_DIR, else $XDG_DATA_HOME/qimg/serve, else ~/.local/share/qimg/serve."""
    if os.environ.get("QIMG_DATA_DIR"):
        return Path(os.environ["QIMG_DATA_DIR"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base).expanduser() / "qimg" / "serve"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; everything beyond is refused with HTTP 400 (413 for the body size)."""

    max_request_bytes: int = 128 * 1024 * 1024  # whole HTTP body (multipart forms; also capped by the image limits)
    max_json_bytes: int = 1024 * 1024  # whole body of a JSON route (and of any non-multipart request)
    max_image_bytes: int = 32 * 1024 * 1024  # one uploaded file
    max_image_pixels: int = 4096 * 4096  # decoded pixels of one uploaded image (checked from the header)
    max_images: int = 10  # images in one edit request
    max_prompt_chars: int = 32000
    max_n: int = 10
    max_layers: int = 16
    max_job_cost: float | None = 1000.0  # megapixel-steps (qimg.serve.budget); None: no limit

    def max_form_bytes(self) -> int:
        """A multipart body: the pictures at their limit, the text fields and the form's own framing."""
        return min(self.max_request_bytes, self.max_images * self.max_image_bytes + self.max_prompt_chars * 8 +
                   256 * 1024)


@dataclass(frozen=True)
class Settings:
    """`models` maps a served name to a checkpoint (a folder, a cached repo id, or None for the embedded tiny model).

    `preload`: load every model in the worker thread when the server starts (jobs wait in the queue meanwhile);
    with False a model is loaded by the first job that uses it. Either way a model stays loaded.
    `max_queue`: jobs that may wait for the worker (the running one not counted); one more gets HTTP 429.
    `requeue`: jobs still queued when the server stops (or is killed) stay queued and run when it starts again;
    with False they are marked failed. A job that was running is always marked failed (it may be what stopped it).
    `load`: how every model is loaded (dtype, device, offload, attention, LoRAs every job gets, ...); its `model` is
    each entry's source. LoRAs run unfused by default, so that jobs with other LoRA sets share one loaded model.
    """

    models: dict[str, str | None] = field(default_factory=default_models)
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = field(default_factory=default_data_dir)
    api_keys: tuple[str, ...] = ()
    max_queue: int = 16
    cors_origins: tuple[str, ...] = ()
    preload: bool = True
    requeue: bool = True
    load: LoadOptions = field(default_factory=lambda: LoadOptions(lora_mode="unfused"))
    lora_dir: Path | None = None  # LoRAs requests may name (see qimg.serve.loras)
    limits: Limits = field(default_factory=Limits)
    preview_interval: float = 0.5  # seconds between live previews sent to /v1/jobs/{id}/events
    preview_side: int = 256  # longest side of those previews
    job_timeout: float | None = 600.0  # seconds a job may run before it is stopped (None: no limit)
    max_batch: int = 8  # queued generations denoised together (same model, size, schedule, LoRAs); 1: off
    batch_megapixels: float = 4.0  # output pixels a batch may hold (sum of n x width x height), in millions
    store: str | None = None  # "postgresql://...": job rows in PostgreSQL (qimg.serve.store_postgres); None: SQLite
    owner: str | None = None  # this process's name in a shared store (default: host name and process id)
    run_jobs: bool = True  # False: this process serves the API only; workers on the shared store run its jobs
    poll_s: float = 0.5  # a worker on a shared store looks for queued jobs this often when idle
    heartbeat_s: float = 2.0  # shared store: heartbeats, cancels from other processes, take-over of stopped workers
    stale_after_s: float = 30.0  # a running job whose worker sent no heartbeat for this long is taken back
    max_attempts: int = 2  # times a job is run before a worker's death fails it instead of queueing it again

    def __post_init__(self):
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.lora_dir is not None:
            object.__setattr__(self, "lora_dir", Path(self.lora_dir))
        object.__setattr__(self, "api_keys", tuple(k for k in self.api_keys if k))
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if self.max_batch < 1 or not self.batch_megapixels > 0:
            raise ValueError(f"max_batch must be >= 1 and batch_megapixels > 0, got {self.max_batch} and "
                             f"{self.batch_megapixels}")
        if self.store is not None and not self.store.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"store must be a postgresql:// URL (or none for SQLite in the data folder), got "
                             f"{self.store.split('@')[-1]!r}")
        if not self.run_jobs and self.store is None:
            raise ValueError("a server that runs no jobs needs a shared store (store=postgresql://...) whose workers "
                             "run them")
        if not (0 < self.heartbeat_s < self.stale_after_s) or self.poll_s <= 0 or self.max_attempts < 1:
            raise ValueError(f"shared-store timing: need 0 < heartbeat_s ({self.heartbeat_s}) < stale_after_s "
                             f"({self.stale_after_s}), poll_s > 0 ({self.poll_s}), max_attempts >= 1 "
                             f"({self.max_attempts})")
        if self.job_timeout is not None and not self.job_timeout > 0:
            raise ValueError(f"job_timeout must be > 0 seconds (or None for no limit), got {self.job_timeout}")
