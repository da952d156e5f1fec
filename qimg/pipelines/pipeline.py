"""The one generation path, shared by every family:

    options --plan--> Plan --encode--> Conditioning --noise--> x --sigmas--> sampler(model, x, sigmas) --decode-->
    pictures

A family (2.x, v1, Layered) is a subclass that supplies small hooks: which transformer/VAE/encoder it loads, its
conditioning (`encode`), its noise shape and token layout (`noise_shape`, `tokens`), the shift `mu` of its schedule,
its velocity (`velocity`) and its decode (`decode`). Everything else (loading and placement, defaults and presets,
the schedule, guidance, block hooks, the sampler, progress and cancellation, the pictures' parameters) is here, once.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from qimg.adapters.manager import Adapters
from qimg.errors import Cancelled, InputError
from qimg.loading.files import embedded_name, read_json
from qimg.loading.weights import load_module
from qimg.models.fused import fuse_projections
from qimg.models.hooks import BlockStep
from qimg.options import LoadOptions, SamplingOptions
from qimg.pipelines.base import (Clock, Defaults, ModelInfo, ProgressEvent, draw_noise, pick_device, pick_dtype,
                                 pick_seed)
from qimg.pipelines.placement import Placement, weights_home
from qimg.sampling.guidance import cfg_combine, guided
from qimg.sampling.presets import Preset, detect_preset, get_preset, preset_from_settings
from qimg.sampling.samplers import SAMPLERS
from qimg.sampling.schedule import SchedulerConfig, get_sigmas


@dataclass
class Plan:
    """A request settled against one model: sizes, defaults, preset, schedule and seed decided."""

    options: SamplingOptions
    prompt: str | None
    images: list[Image.Image]
    width: int
    height: int
    steps: int
    cfg: float
    cfg_normalize: bool
    negative_prompt: str | None
    scheduler: SchedulerConfig
    grid: tuple[float, ...] | None  # un-shifted sigmas (None: the scheduler's default grid for `steps`)
    seed: int
    n: int = 1
    preset: str | None = None
    extra: dict = field(default_factory=dict)  # the family's own settled values
    clock: Clock = field(default_factory=Clock)

    @property
    def guided(self) -> bool:
        return self.cfg > 1

    def report(self, event: ProgressEvent) -> None:
        if self.options.progress is not None:
            self.options.progress(event)

    def cancelled(self) -> bool:
        return self.options.cancel is not None and bool(self.options.cancel())


@dataclass
class Conditioning:
    """What encoding produced: the prompt's condition, the negative prompt's (None without guidance), the prompt
    actually used (Layered may caption), and family data shared by both branches (condition-image tokens)."""

    positive: Any
    negative: Any
    prompt: str | None
    extra: Any = None


def with_block_hook(velocity: Callable, hook: Callable | None, branch: str) -> Callable:
    """`velocity(x, sigma)` whose transformer calls `hook(BlockStep, index, state, run)` at every block; the
    evaluations of a branch are counted so that the hook knows the step."""
    if hook is None:
        return velocity
    calls = iter(range(10**9))

    def run(x, sigma):
        where = BlockStep(next(calls), branch, sigma)
        return velocity(x, sigma, block_hook=lambda index, state, step: hook(where, index, state, step))

    return run


def step_cache(text: str | None, inner: Callable | None, total: Callable):
    """The run's step cache around the block hook `inner` (None without one); `total` sums its statistics over
    the ranks that share the tokens."""
    if not text:
        return None
    from qimg.sampling.caches import KINDS, parse_cache

    spec = parse_cache(text)
    return KINDS[spec.name](spec, inner, total)


def stop_between_blocks(plan: Plan, hook: Callable | None) -> Callable | None:
    """A block hook that also polls the plan's cancel before every transformer block, so that a large step (a
    2048^2 one on a CPU) stops within a block, not after the whole step (the user's hook still runs)."""
    if plan.options.cancel is None:
        return hook

    def checked(where: BlockStep, index, state, run):
        if index > 0 and plan.cancelled():
            raise Cancelled(f"cancelled during model call {where.step + 1} (between transformer blocks)")
        return hook(where, index, state, run) if hook is not None else run(state)

    return checked


class Pipeline(ABC):
    """Components, their placement and defaults, and the shared path. Subclasses set the class attributes and
    implement the hooks below."""

    pipeline_class = "Pipeline"
    family: str  # "2.x" or "v1": which adapter files fit
    tasks: tuple[str, ...] = ()
    transformer_types: tuple[type, type]  # (config dataclass, module)
    vae_types: tuple[type, type]
    default_config: Defaults
    cfg_normalize_default = False
    batch_guidance = True  # both guidance branches in one call where the family can (LoadOptions.batch_guidance)

    def __init__(self, transformer, vae, conditioner, scheduler: SchedulerConfig, *, info: ModelInfo,
                 defaults: Defaults | None = None, sample_sigmas=None, placement: Placement | None = None,
                 preset: str | None = None, adapters: Adapters | None = None):
        self.transformer, self.vae, self.conditioner = transformer, vae, conditioner
        self.scheduler, self.info = scheduler, info
        self.defaults = defaults or self.default_config
        self.sample_sigmas = None if sample_sigmas is None else tuple(float(s) for s in sample_sigmas)
        self.placement = placement or Placement(info.device)
        self.named_preset = preset  # chosen by name at load time; wins over what files say
        self.adapters = adapters or Adapters(transformer, self.family, self.pipeline_class)
        self.preset = self.find_preset()
        self.mesh = None  # this rank's place in a parallel run (`qimg.parallel`), None on one process

    @property
    def fused_projections(self) -> bool:
        """Whether q/k/v and gate/up run as one matrix each (`qimg.models.fused`): on a GPU without offload, where
        the weights are the device's own copies. On the CPU they stay memory-mapped from the files (fusing would
        copy them), and offloaded weights move every phase, which would end the fusion."""
        return self.info.device.type != "cpu" and not self.placement.offload

    # -- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: Path, index: dict, options: LoadOptions):
        """Build the components on the meta device, fill them from the folder's weights, apply the weight
        transforms and LoRAs (on the CPU, before placement), then place them on the device."""
        device = pick_device(options.device)
        dtype = pick_dtype(options.dtype, device)
        mesh = None
        if options.parallel is not None:
            from qimg.parallel.mesh import join

            device, mesh = join(options.parallel, device, dtype)
        home = weights_home(device, options.offload)
        staged = bool(options.transforms or options.loras or options.quantize)
        staging = torch.device("cpu") if staged else None  # transforms and LoRAs see CPU weights
        tcfg = cls.transformer_types[0].from_dict(read_json(folder / "transformer" / "config.json"))
        vcfg = cls.vae_types[0].from_dict(read_json(folder / "vae" / "config.json"))
        cls.check_configs(tcfg, vcfg, folder)
        if mesh is not None:
            mesh.check_heads(tcfg.num_attention_heads)  # before any weight is read
        if options.transformer is not None:
            from qimg.lowbit.load import load_gguf_module, load_safetensors_module

            single = load_gguf_module if str(options.transformer).lower().endswith(".gguf") else \
                load_safetensors_module
            transformer = single(lambda: cls.transformer_types[1](tcfg), options.transformer, dtype=dtype,
                                 device=staging or home)
        else:
            transformer = load_module(lambda: cls.transformer_types[1](tcfg), folder / "transformer", dtype=dtype,
                                      device=staging or home)
        if options.vae is not None:
            from qimg.loading.single_files import vae_from_file

            vae = vae_from_file(lambda: cls.vae_types[1](vcfg), options.vae, dtype=dtype, device=staging or device)
        else:
            vae = load_module(lambda: cls.vae_types[1](vcfg), folder / "vae", dtype=dtype, device=staging or device)
        conditioner = cls.load_conditioner(folder, index, dtype=dtype, device=staging or home,
                                           file=options.text_encoder)
        if options.quantize_encoder:
            from qimg.lowbit.weight_only import quantize_linears

            conditioner.model = quantize_linears(conditioner.model, options.quantize_encoder)
        if options.transforms:
            transformer = apply_transforms(options.transforms, "transformer", transformer)
            vae = apply_transforms(options.transforms, "vae", vae)
            conditioner.model = apply_transforms(options.transforms, "text_encoder", conditioner.model)
        adapters = Adapters(transformer, cls.family, cls.pipeline_class)
        if options.loras:
            adapters.set(options.loras, fused=options.lora_mode == "fused", partial=options.lora_partial)
        if options.quantize:
            from qimg.lowbit.weight_only import quantize_linears

            transformer = quantize_linears(transformer, options.quantize)
        if staged:
            transformer, vae = transformer.to(home), vae.to(device)
            conditioner.to(home)
        if home != device and hasattr(conditioner, "text_module"):
            conditioner.model  # noqa: B018 - offload moves the whole VLM: load it now, not on the first picture
        transformer.set_attention(options.attention)
        if mesh is not None:
            mesh.attach(transformer)
        if options.compile:
            from qimg.models.compiled import compile_transformer

            compile_transformer(transformer, options.compile)
        scheduler = SchedulerConfig.from_dict(read_json(folder / "scheduler" / "scheduler_config.json"))
        mode = None if home == device else ("blocks" if options.offload == "blocks" else "model")
        placement = Placement.of_pipeline(device, mode, conditioner, transformer)
        if options.preset is not None:
            get_preset(options.preset).check_fits(cls.pipeline_class)
        pipe = cls(transformer, vae, conditioner, scheduler, info=ModelInfo(folder, cls.pipeline_class, dtype, device),
                   defaults=Defaults.read(index, cls.default_config), sample_sigmas=index.get("sample_sigmas"),
                   placement=placement, preset=options.preset, adapters=adapters)
        pipe.batch_guidance = options.batch_guidance
        pipe.mesh = mesh
        if pipe.fused_projections:  # before any step runs (a compiled graph is built on the first call)
            fuse_projections(transformer)
        return pipe

    # -- LoRAs and presets -------------------------------------------------------------------------------------
    def set_loras(self, loras, *, fused: bool = False, partial: bool = False) -> list[dict]:
        """Make `loras` (paths, "FILE:SCALE", (path, scale) pairs or LoraSpecs) the active adapters, fused into
        the weights or applied beside them; the previous set is replaced (its deltas are kept for a while, so
        switching back reads nothing). Returns what each adapts. Their sampling settings become the defaults."""
        return self._change_adapters(lambda: self.adapters.set(loras, fused=fused, partial=partial))

    def unload_loras(self) -> None:
        """Remove every adapter: the transformer's weights are again exactly the loaded ones."""
        self._change_adapters(self.adapters.clear)

    def _change_adapters(self, change):
        """With offload, weights change only at home (on the CPU), and the placement then learns the new ones."""
        self.placement.close()
        try:
            return change()
        finally:
            self.placement = Placement.of_pipeline(self.info.device, self.placement.mode, self.conditioner,
                                                   self.transformer)
            if self.fused_projections:  # a fused LoRA replaced weights: fuse them again
                fuse_projections(self.transformer)
            self.preset = self.find_preset()

    def find_preset(self) -> Preset | None:
        """What requests default to: the preset named at load time, else the active LoRAs' own sampling settings,
        else a preset their file names or the model's folder name point to."""
        if self.named_preset:
            return get_preset(self.named_preset)
        for name, settings in self.adapters.settings():
            return preset_from_settings(f"{name} settings", settings, self.pipeline_class)
        names = [Path(a.spec.path).name for a in self.adapters.attached.values() if a.spec.key in
                 self.adapters.active] + list(self.info.folder.parts[-3:])
        found = detect_preset(names, self.pipeline_class)
        return get_preset(found) if found else None

    @classmethod
    def check_configs(cls, tcfg, vcfg, folder: Path) -> None:
        """Refuse a transformer/VAE pair that cannot work together (CheckpointError naming the mismatch)."""

    @classmethod
    @abstractmethod
    def load_conditioner(cls, folder: Path, index: dict, *, dtype, device, file=None):
        """The family's condition encoder, loaded with its weights onto `device` (from one `file` when given)."""

    def describe(self) -> dict:
        return {"pipeline": self.pipeline_class, "folder": str(self.info.folder),
                "embedded": embedded_name(self.info.folder), "dtype": str(self.info.dtype),
                "device": str(self.info.device), "offload": self.placement.offload,
                "offload_mode": self.placement.mode,
                "default_resolution": self.defaults.resolution, "default_steps": self.defaults.steps,
                "default_cfg": self.defaults.cfg, "default_edit_cfg": self.defaults.cfg_for(True),
                "default_edit_steps": self.defaults.steps_for(True),
                "preset": self.preset.name if self.preset else None, "loras": self.adapters.describe(),
                "samplers": sorted(SAMPLERS), "tasks": list(self.tasks),
                "parallel": self.mesh.describe() if self.mesh is not None else None}

    # -- planning ----------------------------------------------------------------------------------------------
    def settle(self, options: SamplingOptions, *, editing: bool, **fields) -> Plan:
        """The sampling part of a plan: preset, defaults, guidance, schedule and seed; `fields` are the family's
        (prompt, images, width, height, n, extra)."""
        preset = get_preset(options.preset) if options.preset else self.preset
        if preset is not None:
            preset.check_fits(self.pipeline_class)
        grid = options.sigmas or (preset.sigmas if preset else None) or self.sample_sigmas
        steps = options.steps or (preset.steps if preset and preset.steps else None) or \
            self.defaults.steps_for(editing)
        if grid is not None:
            if options.steps is not None and options.steps != len(grid) and options.sigmas is None:
                raise InputError(f"this model samples on a fixed {len(grid)}-step grid ({list(grid)}); "
                                 f"steps={options.steps} cannot be honoured: pass sigmas for another grid")
            steps = len(grid)
        else:
            grid = self.default_grid(steps)
        cfg = options.cfg if options.cfg is not None else (preset.cfg if preset else self.defaults.cfg_for(editing))
        negative = options.negative_prompt if options.negative_prompt is not None or cfg <= 1 else " "
        scheduler = self.scheduler.with_overrides(preset.scheduler if preset else None)
        scheduler = scheduler.with_overrides(options.scheduler).with_shift(options.shift)
        normalize = self.cfg_normalize_default if options.cfg_normalize is None else options.cfg_normalize
        return Plan(options, steps=steps, cfg=cfg, cfg_normalize=normalize, negative_prompt=negative,
                    scheduler=scheduler, grid=grid, seed=pick_seed(options.seed),
                    preset=preset.name if preset else None, **fields)

    def default_grid(self, steps: int) -> tuple[float, ...] | None:
        """The un-shifted grid for `steps` when none is given (None: the scheduler's `linspace(1, 1/steps, steps)`)."""
        return None

    # -- the path ----------------------------------------------------------------------------------------------
    def run(self, plan: Plan) -> list[Image.Image]:
        """check (done by the plan) -> encode -> noise -> sigmas -> sample -> decode; returns the pictures with
        their parameters in `info["qimg"]`."""
        plan.report(ProgressEvent("encode", 0, 1, plan.clock()))
        self.placement.use(self.conditioner.encoder)
        with self.sharing_tiles():  # condition images larger than a tile: their VAE tiles shared by the ranks
            cond = self.encode(plan)
        plan.report(ProgressEvent("encode", 1, 1, plan.clock()))
        x = self.start_tokens(plan)
        schedule = self.schedule(plan, cond, x)
        self.placement.use(self.transformer)
        compiling = self.compile_clock()
        x = self.sample(plan, cond, x, torch.from_numpy(schedule).to(self.info.device))
        return self.pictures(plan, cond, x, schedule, **compiling())

    def compile_clock(self) -> Callable[[], dict]:
        """With compiled blocks: a function giving the seconds spent compiling since it was made (`compile_s`:
        the first run at a new size pays it)."""
        if not self.transformer.compiled_blocks:
            return lambda: {}
        from qimg.models.compiled import compile_seconds

        start = compile_seconds()
        return lambda: {"compiled": True, "compile_s": round(compile_seconds() - start, 3)}

    def start_tokens(self, plan: Plan) -> torch.Tensor:
        """The plan's starting noise (its own seed) as tokens on the device, in one memory layout whether it runs
        alone or batched (`batching`), so that both give the same numbers."""
        noise = draw_noise(self.noise_shape(plan), torch.Generator("cpu").manual_seed(plan.seed), self.info.dtype)
        return self.tokens(plan, noise).to(self.info.device).contiguous()

    def schedule(self, plan: Plan, cond: Conditioning, x: torch.Tensor) -> np.ndarray:
        return get_sigmas(plan.scheduler, steps=None if plan.grid is not None else plan.steps, sigmas=plan.grid,
                          mu=self.mu(plan, cond, x))

    def pictures(self, plan: Plan, cond: Conditioning, x: torch.Tensor, schedule: np.ndarray,
                 **recorded) -> list[Image.Image]:
        """Decode the final tokens; each picture carries the run's parameters (and `recorded`) in info["qimg"]."""
        plan.report(ProgressEvent("decode", 0, 1, plan.clock()))
        with self.sharing_tiles():
            out = self.decode(plan, x)
        plan.report(ProgressEvent("decode", 1, 1, plan.clock()))
        params = {**self.parameters(plan, cond, schedule), **recorded}
        for i, img in enumerate(out):
            img.info["qimg"] = {**params, "index": i}
        return out

    @contextlib.contextmanager
    def sharing_tiles(self):
        """Within: the VAE's tiles are shared by a parallel run's ranks (every rank must encode or decode the
        same)."""
        if self.mesh is None:
            yield
            return
        self.vae.run_tiles = self.mesh.run_tiles
        try:
            yield
        finally:
            self.vae.run_tiles = None

    def sample(self, plan: Plan, cond: Conditioning, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        hook = plan.options.block_hook
        if not self.transformer.compiled_step:  # a compiled step is one graph: cancel between steps
            hook = stop_between_blocks(plan, hook)
        cache = plan.extra["step_cache"] = step_cache(plan.options.cache, hook, self.transformer.sequence.total)
        if cache is not None:
            hook = cache.hook
        if self.mesh is not None and self.mesh.config.cfg > 1 and cond.negative is not None:
            velocity = self.guidance_across_ranks(plan, cond, hook)
        elif self.guidance_in_one_batch(plan, cond, cache):
            velocity = self.batched_guidance(plan, cond, hook)
        else:
            branches = [("cond", cond.positive)] + ([("uncond", cond.negative)] if cond.negative is not None else [])
            velocities = [with_block_hook(self.velocity(plan, c, cond.extra), hook, name) for name, c in branches]
            velocity = guided(velocities[0], velocities[1] if len(velocities) > 1 else None, plan.cfg,
                              plan.cfg_normalize)

        def model(x, sigma):  # the timestep the reference feeds its model: sigma * 1000 in the model's dtype, / 1000
            return velocity(x, (sigma * 1000).expand(x.shape[0]).to(x.dtype) / 1000)

        total = len(sigmas) - 1

        def callback(step, total, x, denoised):
            plan.report(ProgressEvent("denoise", step, total, plan.clock(), x,
                                      preview=lambda: self.preview(plan, denoised),
                                      skipped=cache.skipped if cache is not None else 0))
            if step < total and plan.cancelled():
                raise Cancelled(f"cancelled after {step} of {total} steps")

        if plan.cancelled():
            raise Cancelled(f"cancelled after 0 of {total} steps")
        return SAMPLERS[plan.options.sampler](model, x, sigmas, callback)

    def condition(self, prompt: str | None, images=()):
        """The conditioner's encoding of a prompt; a text-only prompt is encoded once per `sharing_texts()` scope
        (a batch whose requests share the negative prompt)."""
        memo = getattr(self, "_texts", None)
        if memo is None or images:
            return self.conditioner.encode(prompt, images)
        if prompt not in memo:
            memo[prompt] = self.conditioner.encode(prompt, images)
        return memo[prompt]

    @contextlib.contextmanager
    def sharing_texts(self):
        self._texts = {}
        try:
            yield
        finally:
            self._texts = None

    def guidance_in_one_batch(self, plan: Plan, cond: Conditioning, cache) -> bool:
        """Both guidance branches as one transformer call (a family with `velocity_batch`; not with a step cache
        or a user's block hook, which watch each branch): the same numbers as two calls, fewer, larger products."""
        return (cond.negative is not None and self.batch_guidance and cache is None
                and plan.options.block_hook is None and getattr(self, "velocity_batch", None) is not None
                and self.batchable(plan))

    def guidance_across_ranks(self, plan: Plan, cond: Conditioning, hook):
        """CFG parallelism: this rank computes its guidance group's branch; the peers exchange their velocities
        and each combines both."""
        mesh, branch = self.mesh, self.mesh.branch
        mine = with_block_hook(self.velocity(plan, cond.positive if branch == "cond" else cond.negative,
                                             cond.extra), hook, branch)
        plan.extra["branches_split"] = True

        def velocity(x, sigma):
            return cfg_combine(*mesh.combine_branches(mine(x, sigma)), plan.cfg, plan.cfg_normalize)

        return velocity

    def batched_guidance(self, plan: Plan, cond: Conditioning, hook):
        both = with_block_hook(self.velocity_batch([plan, plan], [cond.positive, cond.negative],
                                                   [cond.extra, cond.extra]), hook, "cond+uncond")

        def velocity(x, sigma):
            conditional, unconditional = both(torch.cat([x, x]), torch.cat([sigma, sigma])).chunk(2)
            return cfg_combine(conditional, unconditional, plan.cfg, plan.cfg_normalize)

        return velocity

    def parameters(self, plan: Plan, cond: Conditioning, schedule: np.ndarray) -> dict:
        """What a picture records about how it was made (PNG metadata, job results)."""
        options = plan.options
        return {"model": str(self.info.folder), "pipeline": self.pipeline_class, "prompt": cond.prompt,
                "negative_prompt": plan.negative_prompt if plan.guided else None, "width": plan.width,
                "height": plan.height, "steps": len(schedule) - 1, "seed": plan.seed, "cfg": plan.cfg,
                "sampler": options.sampler, "preset": plan.preset, "images": len(plan.images),
                "dtype": str(self.info.dtype).replace("torch.", ""),
                "sigmas": [round(float(s), 6) for s in schedule[:-1]] if options.sigmas is not None else None,
                "scheduler": options.scheduler, "shift": options.shift, **self.extra_parameters(plan),
                **self.cache_parameters(plan), **(self.mesh.describe() if self.mesh is not None else {}),
                "seconds": round(plan.clock(), 3)}

    def extra_parameters(self, plan: Plan) -> dict:
        return {}

    def cache_parameters(self, plan: Plan) -> dict:
        """The step cache's counts (summed over the ranks that split the guidance branches)."""
        cache = plan.extra.get("step_cache")
        if cache is None:
            return {}
        calls, skipped = cache.calls, cache.skipped
        if plan.extra.get("branches_split"):
            calls, skipped = self.mesh.sum_over_branches([calls, skipped])
        return {"cache": str(cache.spec), "model_calls": calls, "cache_skipped": skipped}

    def preview(self, plan: Plan, denoised: torch.Tensor) -> Image.Image:
        return self.decode(plan, denoised[:1])[0]

    # -- family hooks ------------------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, plan: Plan) -> Conditioning:
        """The prompt (and negative prompt when guided) with the condition images."""

    @abstractmethod
    def noise_shape(self, plan: Plan) -> tuple[int, ...]:
        """The shape of the starting noise, drawn as the reference draws it."""

    @abstractmethod
    def tokens(self, plan: Plan, noise: torch.Tensor) -> torch.Tensor:
        """Starting noise -> the token sequence the transformer denoises."""

    @abstractmethod
    def mu(self, plan: Plan, cond: Conditioning, x: torch.Tensor) -> float | None:
        """The schedule's resolution-dependent shift (used when the scheduler shifts dynamically)."""

    @abstractmethod
    def velocity(self, plan: Plan, condition, extra) -> Callable:
        """`(x, sigma, block_hook=None) -> v` for one guidance branch."""

    @abstractmethod
    def decode(self, plan: Plan, tokens: torch.Tensor) -> list[Image.Image]:
        """Final tokens -> pictures."""


def apply_transforms(transforms, component: str, module: torch.nn.Module) -> torch.nn.Module:
    for transform in transforms:
        module = transform(component, module) or module
    return module
