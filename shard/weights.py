"""Checkpoint tensors read lazily: a tensor-parallel rank reads only the slices it holds.

Every source yields (Hugging Face name, lazy tensor). A lazy tensor has the full tensor's
`shape`; `narrow(dim, start, length)` reads that slice alone (what parallel layers call), and
`read(t)` the whole tensor (norms, and anything replicated). Plain torch tensors fit the same
interface, so tests may pass those.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from shard.models.config import ModelConfig


def read(tensor) -> torch.Tensor:
    """The whole tensor."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor.read()


class SafetensorsSlice:
    """One tensor of an open safetensors file; slices come off the file, nothing else."""

    def __init__(self, handle, name: str):
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self._slice[index]

    def read(self) -> torch.Tensor:
        return self._slice[:]


def safetensors_tensors(folder: Path) -> Iterator[tuple[str, SafetensorsSlice]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield name, SafetensorsSlice(handle, name)


class DummyTensor:
    """Random weights of a checkpoint that does not exist (--load-format dummy): a pure
    function of the tensor's name, so every tensor-parallel layout sees the same model."""

    def __init__(self, name: str, shape: tuple[int, ...], device: torch.device,
                 dtype: torch.dtype, fill: float | None = None):
        self.name, self.shape, self.device, self.dtype, self.fill = name, shape, device, dtype, fill

    def read(self) -> torch.Tensor:
        out = torch.empty(self.shape, device=self.device, dtype=self.dtype)
        if self.fill is not None:
            return out.fill_(self.fill)
        seed = int.from_bytes(hashlib.sha256(self.name.encode()).digest()[:7], "little")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return out.normal_(0.0, 0.02, generator=generator)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        # Generated whole on the device, one tensor at a time, then cut: the same values on
        # every rank whatever the split.
        return self.read().narrow(dim, start, length)


def dummy_tensors(config: ModelConfig, device: torch.device,
                  dtype: torch.dtype) -> Iterator[tuple[str, DummyTensor]]:
    """Every tensor a Llama-family checkpoint of `config` holds, under its Hugging Face name."""
    for name, shape in hf_shapes(config).items():
        fill = 1.0 if name.endswith("norm.weight") else None
        yield name, DummyTensor(name, shape, device, dtype, fill)


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    c = config
    h, d = c.hidden_size, c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (c.num_heads * d, h),
                   p + "self_attn.k_proj.weight": (c.num_kv_heads * d, h),
                   p + "self_attn.v_proj.weight": (c.num_kv_heads * d, h),
                   p + "self_attn.o_proj.weight": (h, c.num_heads * d),
                   p + "post_attention_layernorm.weight": (h,),
                   p + "mlp.gate_proj.weight": (c.intermediate_size, h),
                   p + "mlp.up_proj.weight": (c.intermediate_size, h),
                   p + "mlp.down_proj.weight": (h, c.intermediate_size)}
        if c.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (c.num_heads * d,),
                       p + "self_attn.k_proj.bias": (c.num_kv_heads * d,),
                       p + "self_attn.v_proj.bias": (c.num_kv_heads * d,)}
        if c.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if c.mlp_bias:
            shapes |= {p + "mlp.gate_proj.bias": (c.intermediate_size,),
                       p + "mlp.up_proj.bias": (c.intermediate_size,),
                       p + "mlp.down_proj.bias": (h,)}
    shapes["model.norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    return shapes

