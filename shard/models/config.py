"""A model's shape, read from a Hugging Face config.json or from GGUF metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Architectures that share our Llama implementation (GGUF names and HF class names).
SUPPORTED = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
    "llama": "llama", "qwen2": "qwen2",
}


@dataclass(slots=True, frozen=True)
class RopeScaling:
    """Llama 3's frequency-dependent rope scaling ("llama3"), or plain "linear" scaling."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(slots=True, frozen=True)
class ModelConfig:
    family: str  # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope_scaling: RopeScaling | None = None

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        arch = (cfg.get("architectures") or [cfg.get("model_type", "?")])[0]
        family = SUPPORTED.get(arch)
        if family is None:
            raise ValueError(f"unsupported architecture {arch!r}; supported: "
                             + ", ".join(k for k in SUPPORTED if k[0].isupper()))
        heads = cfg["num_attention_heads"]
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", 10000.0),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            rope_scaling=_rope_scaling(cfg.get("rope_scaling")),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> "ModelConfig":
        return cls.from_hf_dict(json.loads((folder / "config.json").read_text()))


def _rope_scaling(raw: dict[str, Any] | None) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type") or raw.get("type")
    if kind == "default":
        return None
    if kind == "llama3":
        return RopeScaling("llama3", raw["factor"], raw.get("low_freq_factor", 1.0),
                           raw.get("high_freq_factor", 4.0),
                           raw.get("original_max_position_embeddings", 8192))
    if kind == "linear":
        return RopeScaling("linear", raw["factor"])
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: llama3, linear)")
