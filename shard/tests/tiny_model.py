"""Tiny random models written by tests: config.json, safetensors weights and a tokenizer (and
the bare ModelConfig of one, for modules built in memory).

The weights come from transformers' own classes (the oracle) with a fixed seed, so our model
and transformers' can be compared on exactly the same checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shard.models.config import ModelConfig
from shard.tokenizer import CHATML, byte_tokenizer


def tiny_config(**overrides) -> ModelConfig:
    """A tiny Llama's ModelConfig, for modules built in memory without a checkpoint."""
    fields = dict(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5,
                  rope_theta=1e4, max_position_embeddings=64, tie_word_embeddings=False,
                  qkv_bias=False, o_bias=False, mlp_bias=False)
    return ModelConfig(**(fields | overrides))

def write_tiny_model(folder: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random Llama (or Qwen2) checkpoint in `folder`; `overrides` change config fields."""
    from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                              Qwen2Config, Qwen2ForCausalLM)

    fields = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    fields.update(overrides)
    config_class, model_class = ((Qwen2Config, Qwen2ForCausalLM) if family == "qwen2"
                                 else (LlamaConfig, LlamaForCausalLM))
    torch.manual_seed(seed)
    model = model_class(config_class(**fields)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    PreTrainedTokenizerFast(
        tokenizer_object=byte_tokenizer(), bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", chat_template=CHATML,
    ).save_pretrained(folder)
    return folder
