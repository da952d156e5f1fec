"""Adapter files as the tools that train them write them, read into one form: {module name: Delta}.

Formats (what each means follows diffusers' Qwen-Image LoRA loader, the reference, and LyCORIS for LoKr/LoHa):
- diffusers / PEFT: `transformer.<module>.lora_A.weight` / `lora_B.weight` (an adapter name such as `.default.` may
  sit before `weight`); scale alpha / rank from a `<module>.alpha` tensor, else from the file's
  `lora_adapter_metadata` (PEFT's LoraConfig: r, lora_alpha, rank_pattern, alpha_pattern, use_rslora), else 1.
- kohya / ComfyUI / DiffSynth / Lightning: `lora_unet_<module with _>`, `diffusion_model.<module>`,
  `transformer.<module>` or bare names, with `lora_down`/`lora_up` (or `lora_A`/`lora_B`) and `.alpha`: alpha / rank.
- full deltas: `<module>.diff` (weight) and `<module>.diff_b` (bias), scale 1.
- LyCORIS LoKr (`lokr_w1`, `lokr_w2`, or their `_a`/`_b` factors) and LoHa (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`,
  `hada_w2_b`): scale alpha / (the factors' inner dimension) when a factor is decomposed, else 1, as LyCORIS does.
Only the transformer is adapted; text-encoder entries and DoRA magnitudes are refused with what they are.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qimg.adapters.deltas import Dense, Delta, Hadamard, Kronecker, LowRank
from qimg.errors import InputError

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.")
FLAT_PREFIX = "lora_unet_"
TEXT_PREFIXES = ("text_encoder.", "lora_te_", "lora_te1_", "lora_te2_", "te.", "text_model.")
# suffix -> (family of delta, role); longest first when matching
ROLES = {
    ".lora_A.weight": ("lora", "down"), ".lora_B.weight": ("lora", "up"), ".lora_B.bias": ("lora", "up_bias"),
    ".lora_down.weight": ("lora", "down"), ".lora_up.weight": ("lora", "up"), ".alpha": (None, "alpha"),
    ".diff": ("diff", "diff"), ".diff_b": ("diff", "diff_b"),
    ".lokr_w1": ("lokr", "w1"), ".lokr_w2": ("lokr", "w2"), ".lokr_w1_a": ("lokr", "w1_a"),
    ".lokr_w1_b": ("lokr", "w1_b"), ".lokr_w2_a": ("lokr", "w2_a"), ".lokr_w2_b": ("lokr", "w2_b"),
    ".lokr_t2": ("lokr", "t2"), ".hada_w1_a": ("loha", "w1_a"), ".hada_w1_b": ("loha", "w1_b"),
    ".hada_w2_a": ("loha", "w2_a"), ".hada_w2_b": ("loha", "w2_b"), ".hada_t1": ("loha", "t1"),
    ".hada_t2": ("loha", "t2"), ".dora_scale": ("dora", "dora"), ".lora_magnitude_vector": ("dora", "dora"),
}
_PEFT_ADAPTER = re.compile(r"\.(lora_[AB])\.[^.]+\.(weight|bias)$")  # lora_A.<adapter name>.weight
V1_MARKERS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "img_mod", "txt_mod", "txt_mlp", "img_mlp.net")
V21_MARKERS = ("img_mlp.gate_layer", "img_mlp.proj", "img_mlp.out", "txt_in.in_layer", "txt_in.out_layer",
               "modulation.1")
OTHER_MODELS = {"single_transformer_blocks": "Flux", "down_blocks": "Stable Diffusion (UNet)",
                "double_blocks": "Flux (BFL names)", "joint_blocks": "Stable Diffusion 3", "self_attn": "Wan",
                "layers.": "a Lumina/Z-Image style DiT"}
FAMILIES = {"v1": "Qwen-Image v1 (Qwen-Image, 2512, Edit, 2509, 2511, Layered)", "2.x": "Qwen-Image 2.x"}


@dataclass
class AdapterFile:
    """One adapter file, read: its deltas by module name (official diffusers names) and what it looks like."""

    path: Path
    deltas: dict[str, Delta]
    format: str
    family: str | None  # "v1", "2.x", or None (unknown)
    settings: dict = field(default_factory=dict)  # sampling defaults it carries (steps, cfg, scheduler, ...)
    looks_like: str | None = None  # another model family's name, when the names say so

    def ranks(self) -> list[int]:
        return sorted({r for d in self.deltas.values() if (r := d.rank()) is not None})

    def describe(self) -> str:
        family = FAMILIES.get(self.family) if self.family else (f"not Qwen-Image (looks like {self.looks_like})"
                                                                 if self.looks_like else "an unknown model")
        ranks = self.ranks()
        rank = f", rank {ranks[0]}" if len(ranks) == 1 else (f", ranks {ranks[0]}-{ranks[-1]}" if ranks else "")
        return f"{self.format}, {len(self.deltas)} layers{rank}, for {family}"

    def summary(self) -> dict:
        return {"format": self.format, "family": self.family, "layers": len(self.deltas), "ranks": self.ranks(),
                "settings": self.settings}


def read_adapter(path: str | Path, flat_names: dict[str, str] | None = None, *,
                 header_only: bool = False) -> AdapterFile:
    """Read a .safetensors adapter. `flat_names` maps a model's module names with `_` for `.` to the real names
    (kohya's flattened keys are resolved against it; without it they are resolved by the known Qwen-Image names).
    `header_only`: the weights stay on disk (meta tensors of their shapes): enough to describe the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"adapter file not found: {path}")
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"{path}: adapters are read from .safetensors files only (pickled .pt/.ckpt files can run "
                         f"code when loaded)")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: torch.empty(f.get_slice(k).get_shape(), device="meta")
                       if header_only and not k.endswith(".alpha") else f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise InputError(f"{path} is not a readable safetensors file: {err}") from None
    if not tensors:
        raise InputError(f"{path} holds no tensors")
    grouped, fmt = _group(tensors, flat_names or {}, path)
    config = _peft_config(metadata, path)
    deltas = {module: _delta(module, parts, config, path) for module, parts in grouped.items()}
    family, other = _family(deltas)
    return AdapterFile(path, deltas, fmt, family, _settings(path, metadata), other)


def _strip(key: str) -> tuple[str, bool]:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):], False
    if key.startswith(FLAT_PREFIX):
        return key[len(FLAT_PREFIX):], True
    return key, False


def _split_role(key: str) -> tuple[str, str, str] | None:
    key = _PEFT_ADAPTER.sub(r".\1.\2", key)
    for suffix in sorted(ROLES, key=len, reverse=True):
        if key.endswith(suffix):
            kind, role = ROLES[suffix]
            return key[: -len(suffix)], kind, role
    return None


def _group(tensors: dict, flat_names: dict[str, str], path: Path) -> tuple[dict, str]:
    grouped: dict[str, dict] = {}
    unknown, text = [], []
    flat_seen = prefixed = False
    up_down = a_b = False
    for key, tensor in tensors.items():
        if key.startswith(TEXT_PREFIXES):
            text.append(key)
            continue
        name, flat = _strip(key)
        prefixed |= name != key and not flat
        parsed = _split_role(name)
        if parsed is None:
            unknown.append(key)
            continue
        module, kind, role = parsed
        if flat:
            flat_seen = True
            module = flat_names.get(module, _unflatten(module))
        entry = grouped.setdefault(module, {"kinds": set()})
        if kind is not None:
            entry["kinds"].add(kind)
        entry[role] = tensor
        up_down |= ".lora_down." in key or ".lora_up." in key
        a_b |= ".lora_A." in key or ".lora_B." in key
    if text:
        raise InputError(f"{path} adapts the text encoder ({len(text)} tensors such as {text[0]!r}); qimg applies "
                         f"adapters to the transformer only")
    if unknown:
        shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise InputError(f"{path}: {len(unknown)} tensor names are not adapter weights qimg knows: {shown}")
    kinds = set().union(*(e["kinds"] for e in grouped.values())) if grouped else set()
    if "dora" in kinds:
        raise InputError(f"{path} is a DoRA adapter (magnitude vectors); qimg does not apply DoRA")
    fmt = ("kohya (lora_unet_, lora_down/lora_up)" if flat_seen else
           "LyCORIS LoKr" if "lokr" in kinds else "LyCORIS LoHa" if "loha" in kinds else
           "full deltas (diff)" if kinds == {"diff"} else
           "ComfyUI/DiffSynth (lora_down/lora_up)" if up_down else
           "diffusers/PEFT (lora_A/lora_B)" if a_b else "unknown")
    if prefixed and fmt.startswith("diffusers") and any(k.startswith("diffusion_model.") for k in tensors):
        fmt = "ComfyUI (diffusion_model., lora_A/lora_B)"
    return grouped, fmt


BLOCK_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out", "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj", "img_mlp.net.2",
                 "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out")
TOP_LINEARS = ("img_in", "txt_in", "proj_out", "norm_out.linear", "txt_in.in_layer", "txt_in.out_layer", "modulation.1",
               "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2")
_FLAT = {n.replace(".", "_"): n for n in TOP_LINEARS} | {n.replace(".", "_"): n for n in BLOCK_LINEARS}


def _unflatten(flat: str) -> str:
    """kohya's flattened name without a model to look it up in, by the Qwen-Image layouts' Linear names."""
    block = re.match(r"transformer_blocks_(\d+)_(.+)$", flat)
    if block:
        return f"transformer_blocks.{block.group(1)}.{_FLAT.get(block.group(2), block.group(2))}"
    return _FLAT.get(flat, flat)


def _json_object(text: str | None, path: Path, what: str) -> dict:
    """A JSON object the file carries ({} when there is none), or InputError naming `what` is wrong with it."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: its {what} is not JSON ({err})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: its {what} must be a JSON object, got {value!r}")
    return value


def _peft_config(metadata: dict, path: Path) -> dict:
    config = _json_object(metadata.get("lora_adapter_metadata"), path, "lora_adapter_metadata")
    # a pipeline's save prefixes the component ("transformer.r"); a model's save does not
    prefixed = {k[len("transformer."):]: v for k, v in config.items() if k.startswith("transformer.")}
    return prefixed or config


def _pattern(patterns: dict, module: str):
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return None


def _delta(module: str, parts: dict, config: dict, path: Path) -> Delta:
    kinds = parts["kinds"]
    if len(kinds) != 1:
        raise InputError(f"{path}: layer {module} mixes adapter kinds {sorted(kinds)}")
    kind = next(iter(kinds))
    alpha = parts.get("alpha")
    alpha = None if alpha is None else float(alpha.float().reshape(-1)[0])
    if kind == "lora":
        if "down" not in parts or "up" not in parts:
            missing = "lora_A/lora_down" if "down" not in parts else "lora_B/lora_up"
            raise InputError(f"{path}: layer {module} has no {missing} weight")
        down, up = parts["down"].flatten(1), parts["up"].flatten(1)
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise InputError(f"{path}: layer {module}: lora down {tuple(down.shape)} and up {tuple(up.shape)} do not "
                             f"share a rank")
        if alpha is not None:
            scale = alpha / rank
        elif config:
            r = _pattern(config.get("rank_pattern"), module) or config.get("r", rank)
            lora_alpha = _pattern(config.get("alpha_pattern"), module) or config.get("lora_alpha", r)
            scale = lora_alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        else:
            scale = 1.0
        return LowRank(scale, down, up, parts.get("up_bias"))
    if kind == "diff":
        return Dense(1.0, parts.get("diff"), parts.get("diff_b"))
    if "t1" in parts or "t2" in parts:
        raise InputError(f"{path}: layer {module} uses a Tucker/CP factor (for convolutions); qimg's adapted layers "
                         f"are all Linear")
    if kind == "lokr":
        decomposed = [parts[f"{w}_b"].shape[0] for w in ("w1", "w2") if f"{w}_b" in parts]
        for w in ("w1", "w2"):
            if w not in parts and not (f"{w}_a" in parts and f"{w}_b" in parts):
                raise InputError(f"{path}: LoKr layer {module} has neither lokr_{w} nor lokr_{w}_a/_b")
        scale = alpha / decomposed[-1] if alpha is not None and decomposed else 1.0
        factors = {k: v for k, v in parts.items() if k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")}
        return Kronecker(scale, factors, _kron_shape(factors))
    missing = [w for w in ("w1_a", "w1_b", "w2_a", "w2_b") if w not in parts]
    if missing:
        raise InputError(f"{path}: LoHa layer {module} lacks hada_{', hada_'.join(missing)}")
    scale = alpha / parts["w1_b"].shape[0] if alpha is not None else 1.0
    return Hadamard(scale, {k: parts[k] for k in ("w1_a", "w1_b", "w2_a", "w2_b")})


def _kron_shape(factors: dict) -> tuple[int, int]:
    def dims(w):
        if w in factors:
            return tuple(factors[w].shape[:2])
        return factors[f"{w}_a"].shape[0], factors[f"{w}_b"].shape[1]

    (a, b), (c, d) = dims("w1"), dims("w2")
    return a * c, b * d


def _family(deltas: dict) -> tuple[str | None, str | None]:
    names = list(deltas)
    v1 = sum(any(m in n for m in V1_MARKERS) for n in names)
    v21 = sum(any(m in n for m in V21_MARKERS) for n in names)
    if v1 or v21:
        return ("v1" if v1 >= v21 else "2.x"), None
    for marker, model in OTHER_MODELS.items():
        if any(marker in n for n in names):
            return None, model
    return None, None


def _settings(path: Path, metadata: dict) -> dict:
    """Sampling defaults the file carries: `qimg.settings` (JSON) in its metadata, or a sidecar `<file>.json`."""
    text = metadata.get("qimg.settings")
    sidecar = path.with_suffix(".json")
    if text is None and sidecar.is_file():
        text = sidecar.read_text()
    settings = _json_object(text, path, "sampling settings")
    allowed = {"steps", "cfg", "scheduler", "sigmas", "shift", "preset"}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise InputError(f"{path}: unknown sampling settings {unknown}; known: {sorted(allowed)}")
    return settings
