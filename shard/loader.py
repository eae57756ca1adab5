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
from shard.models.ops import Ops
from shard.parallel import TensorParallel
from shard.quantization import int4_available
from shard.source import ModelNotFound, ModelSource
from shard.tokenizer import TokenizerSpec


@dataclass(slots=True)
class LoadedModel:
    source: ModelSource
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: TokenizerSpec
    quantization: str  # "none", or how the weights run quantized


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
         attention, load_format: str = "auto", quantize: str = "none",
         compiled: bool = False, fused_rotary: bool = False,
         fused_mlp: bool = False, decode_gemm: bool = False) -> LoadedModel:
    """quantize="int4": on CPU, GGUF Q4_0/Q4_1 weights run as they are on torch's int4 kernel.
    compiled: the elementwise stages run as torch.compile'd fused kernels (shard/models/ops.py).
    fused_rotary: rotary and the KV-cache write are one Triton kernel (CUDA).
    fused_mlp: gate/up products apply SiLU × up in their epilogue (Hopper; shard/fused_mlp.py).
    decode_gemm: decode batches' products in quack's narrow tiles (Hopper; shard/decode_gemm.py)."""
    int4 = quantize == "int4"
    if int4 and not (source.is_gguf and device.type == "cpu" and int4_available()):
        raise ValueError("--quantize int4 runs GGUF Q4_0/Q4_1 weights on a CPU (with torch's "
                         "_weight_int4pack_mm_for_cpu); this model or device is not that")
    if source.is_gguf:
        gguf_file = GGUFModel(source.path)
        config, tokenizer = gguf_file.config(), gguf_file.tokenizer()
        weights = gguf_file.tensors(config, int4=int4)
    else:
        config = ModelConfig.from_folder(source.path)
        if load_format == "dummy" and not tokenizers.has_tokenizer(source.path):
            tokenizer = tokenizers.byte_spec(config.vocab_size)  # random weights: no vocabulary
        else:
            tokenizer = tokenizers.from_folder(source.path)
        weights = None if load_format == "dummy" else _safetensors(source.path)
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(config, tp, attention, Ops.build(compiled, fused_rotary,
                                                                     fused_mlp, decode_gemm))
    if load_format == "dummy":
        _randomize(model)
    else:
        model.load_weights(weights)
    quantization = "none"
    if any(getattr(m, "int4", None) is not None for m in model.modules()):
        quantization = "int4 weights (GGUF Q4 groups of 32), bfloat16 activations in linears"
        # Next to int4 layers the float32 LM head would dominate each step: bfloat16 halves it.
        model.lm_head.compute_weight = model.lm_head.weight.detach().to(torch.bfloat16)
    return LoadedModel(source, config, model.eval(), tokenizer, quantization)


def _randomize(model: torch.nn.Module) -> None:
    """Random weights of the right shapes, for benchmarks that need no real checkpoint."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=generator)
