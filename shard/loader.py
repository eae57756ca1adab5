"""Build our model for a source and fill it with that source's weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from shard import tokenizer as tokenizers
from shard.gguf_model import GGUFModel
from shard.models.config import ModelConfig
from shard.models.llama import LlamaForCausalLM
from shard.parallel import TensorParallel
from shard.source import ModelNotFound, ModelSource
from shard.tokenizer import TokenizerSpec


@dataclass(slots=True)
class LoadedModel:
    source: ModelSource
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: TokenizerSpec


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFound(f"{folder} holds no *.safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load(source: ModelSource, tp: TensorParallel, device: torch.device, dtype: torch.dtype,
         attention, load_format: str = "auto") -> LoadedModel:
    if source.is_gguf:
        gguf_file = GGUFModel(source.path)
        config, tokenizer = gguf_file.config(), gguf_file.tokenizer()
        weights = gguf_file.tensors(config)
    else:
        config = ModelConfig.from_folder(source.path)
        tokenizer = tokenizers.from_folder(source.path)
        weights = None if load_format == "dummy" else _safetensors(source.path)
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(config, tp, attention)
    if load_format == "dummy":
        _randomize(model)
    else:
        model.load_weights(weights)
    return LoadedModel(source, config, model.eval(), tokenizer)


def _randomize(model: torch.nn.Module) -> None:
    """Random weights of the right shapes, for benchmarks that need no real checkpoint."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=generator)
