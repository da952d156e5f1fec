"""Named few-step recipes: the scheduler, step count, sigma grid and guidance a distilled model was made for.

A preset fills in what the user did not give (explicit options win). It is chosen by name (`--preset`, `preset=`)
or found from the names of the files a model is loaded from (a Lightning LoRA or merge names its step count).

Sources: Qwen-Image-Lightning (ModelTC) samples with the scheduler it was distilled on, a constant shift of 3
written as dynamic shifting with base_shift = max_shift = ln 3, the default `linspace(1, 1/N, N)` grid, and no CFG.
Qwen-Image-2.1-Turbo's `model_index.json` holds `sample_sigmas`, a fixed 8-step grid, on an unshifted scheduler
(shift 1, no dynamic shifting), run at CFG 1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from qimg.errors import InputError

V1 = ("QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline")
V21 = ("QwenImage21Pipeline",)

LIGHTNING_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True,
                       "base_shift": math.log(3), "max_shift": math.log(3), "base_image_seq_len": 256,
                       "max_image_seq_len": 8192, "shift_terminal": None, "time_shift_type": "exponential"}
TURBO_21_SIGMAS = (1.0, 0.978453, 0.95418, 0.926626, 0.89508, 0.845148, 0.704534, 0.414568)
TURBO_21_SCHEDULER = {"shift": 1.0, "use_dynamic_shifting": False, "shift_terminal": None}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    pipelines: tuple[str, ...]  # the pipeline classes it fits
    scheduler: dict  # overrides of the checkpoint's scheduler config
    cfg: float
    steps: int | None = None
    sigmas: tuple[float, ...] | None = None  # a fixed grid (its length is the step count)

    def check_fits(self, pipeline_class: str) -> None:
        if pipeline_class not in self.pipelines:
            raise InputError(f"preset {self.name!r} is for {', '.join(self.pipelines)}; this model is "
                             f"{pipeline_class}")


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("lightning-4", "Qwen-Image-Lightning 4-step (v1, Edit, Edit-2509/2511, 2512 Lightning LoRAs or merges)",
           V1, LIGHTNING_SCHEDULER, cfg=1.0, steps=4),
    Preset("lightning-8", "Qwen-Image-Lightning 8-step", V1, LIGHTNING_SCHEDULER, cfg=1.0, steps=8),
    Preset("turbo-2.1", "Qwen-Image-2.1-Turbo: its fixed 8-step grid, no CFG", V21, TURBO_21_SCHEDULER, cfg=1.0,
           sigmas=TURBO_21_SIGMAS),
)}


def preset_from_settings(name: str, settings: dict, pipeline_class: str) -> Preset:
    """A preset from the sampling settings an adapter file carries (steps, cfg, scheduler, sigmas, shift, and a
    named `preset` they refine)."""
    base = get_preset(settings["preset"]) if settings.get("preset") else None
    if base is not None:
        base.check_fits(pipeline_class)
    scheduler = dict(base.scheduler if base else {})
    scheduler.update(settings.get("scheduler") or {})
    if settings.get("shift") is not None:
        scheduler.update(shift=float(settings["shift"]), use_dynamic_shifting=False)
    sigmas = settings.get("sigmas", base.sigmas if base else None)
    return Preset(name, f"sampling settings of {name}", (pipeline_class,), scheduler,
                  cfg=float(settings.get("cfg", base.cfg if base else 1.0)),
                  steps=settings.get("steps", base.steps if base else None),
                  sigmas=None if sigmas is None else tuple(float(s) for s in sigmas))


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise InputError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def detect_preset(names, pipeline_class: str) -> str | None:
    """The preset the names of a model's files point to (a Lightning LoRA or merge, a 2.1 Turbo file), if one
    fits `pipeline_class`."""
    for name in names:
        text = str(name).lower()
        steps = re.search(r"(\d+)[-_ ]?steps?", text)
        if "lightning" in text and steps and f"lightning-{steps.group(1)}" in PRESETS:
            found = f"lightning-{steps.group(1)}"
        elif re.search(r"qwen[-_ ]?image[-_ ]?2[._]1[-_ ]?turbo", text):
            found = "turbo-2.1"
        else:
            continue
        if pipeline_class in PRESETS[found].pipelines:
            return found
    return None
