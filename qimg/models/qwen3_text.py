"""The Qwen3-VL language model's forward for prompts without pictures: what the 2.x condition encoder computes for a
text-only prompt, without importing transformers (importing it takes seconds, the forward milliseconds).

It runs on any module laid out as transformers' `Qwen3VLTextModel` (`embed_tokens`, `layers[i].input_layernorm`,
`.self_attn.{q,k,v,o}_proj`, `.self_attn.{q,k}_norm`, `.post_attention_layernorm`, `.mlp.{gate,up,down}_proj`):
`Qwen3Text` below, loaded from the checkpoint's language-model weights alone, or the loaded VLM's own language
model, so that there is never a second copy of the weights. Text-only positions are the same on Qwen3-VL's three
rotary axes, so its interleaved multimodal RoPE is the plain one-axis RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PREFIX = "model.language_model."  # where the language model's weights sit in the VLM's checkpoint


@dataclass(frozen=True)
class Qwen3TextConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    attention_bias: bool = False

    @classmethod
    def from_vlm_config(cls, config: dict) -> "Qwen3TextConfig":
        """From a Qwen3-VL `config.json` (its `text_config`)."""
        text = config.get("text_config", config)
        rope = text.get("rope_parameters") or {}
        heads = text["num_attention_heads"]
        return cls(hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
                   num_hidden_layers=text["num_hidden_layers"], num_attention_heads=heads,
                   num_key_value_heads=text.get("num_key_value_heads", heads),
                   head_dim=text.get("head_dim") or text["hidden_size"] // heads,
                   rms_norm_eps=text.get("rms_norm_eps", 1e-6),
                   rope_theta=rope.get("rope_theta", text.get("rope_theta", 5_000_000.0)),
                   vocab_size=text["vocab_size"], attention_bias=text.get("attention_bias", False))


class _Norm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class _Embedding(nn.Module):
    """A lookup table without nn.Embedding's random init (on the meta device that init imports torch._dynamo,
    about 1 s of start-up)."""

    def __init__(self, count: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(count, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class _Attention(nn.Module):
    def __init__(self, c: Qwen3TextConfig):
        super().__init__()
        bias = c.attention_bias
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=bias)
        self.q_norm, self.k_norm = _Norm(c.head_dim), _Norm(c.head_dim)


class _MLP(nn.Module):
    def __init__(self, c: Qwen3TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)


class _Layer(nn.Module):
    def __init__(self, c: Qwen3TextConfig):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = _Norm(c.hidden_size), _Norm(c.hidden_size)
        self.self_attn, self.mlp = _Attention(c), _MLP(c)


class Qwen3Text(nn.Module):
    """The language model's weights in transformers' layout (its `lm_head` and the vision tower are not here)."""

    def __init__(self, c: Qwen3TextConfig):
        super().__init__()
        self.embed_tokens = _Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([_Layer(c) for _ in range(c.num_hidden_layers)])
        self.norm = _Norm(c.hidden_size)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.no_grad()
def last_hidden_states(lm: nn.Module, c: Qwen3TextConfig, input_ids: torch.Tensor) -> torch.Tensor:
    """`[1, S]` token ids -> `[1, S, hidden]`, the last decoder layer's output (the final norm's input), as the VLM
    computes it for a text-only prompt with no padding."""
    x = lm.embed_tokens(input_ids)
    dtype, seq = x.dtype, input_ids.shape[1]
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float) / c.head_dim))
    freqs = torch.arange(seq, dtype=torch.float)[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1).to(x.device)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    groups = c.num_attention_heads // c.num_key_value_heads
    for layer in lm.layers:
        attn = layer.self_attn
        h = _rms(x, layer.input_layernorm.weight, c.rms_norm_eps)
        q = _rms(attn.q_proj(h).view(1, seq, -1, c.head_dim), attn.q_norm.weight, c.rms_norm_eps).transpose(1, 2)
        k = _rms(attn.k_proj(h).view(1, seq, -1, c.head_dim), attn.k_norm.weight, c.rms_norm_eps).transpose(1, 2)
        v = attn.v_proj(h).view(1, seq, -1, c.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=c.head_dim**-0.5)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(1, seq, -1))
        h = _rms(x, layer.post_attention_layernorm.weight, c.rms_norm_eps)
        x = x + layer.mlp.down_proj(F.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))
    return x
