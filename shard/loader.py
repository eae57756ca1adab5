"""Build our model for a source and fill it with that source's weights."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from shard import tokenizer as tokenizers
from shard import weights
from shard.gguf_model import GGUFModel
from shard.models.config import ModelConfig
from shard.models.llama import LlamaForCausalLM, split_error
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


def read_config(source: ModelSource) -> ModelConfig:
    """The model's shape alone, without its weights."""
    if source.is_gguf:
        return GGUFModel(source.path).config()
    return ModelConfig.from_folder(source.path)


def load(source: ModelSource, tp: TensorParallel, device: torch.device, dtype: torch.dtype,
         attention, load_format: str = "auto", quantize: str = "none",
         compiled: bool = False, fused_rotary: bool = False,
         fused_mlp: bool = False, decode_gemm: bool = False, gemv: bool = False
         ) -> LoadedModel:
    """quantize="int4": on CPU, GGUF Q4_0/Q4_1 weights run as they are on torch's int4 kernel.
    compiled: the elementwise stages run as torch.compile'd fused kernels (shard/models/ops.py).
    fused_rotary: rotary and the KV-cache write are one Triton kernel (CUDA).
    fused_mlp: gate/up products apply SiLU × up in their epilogue (Hopper; shard/fused_mlp.py).
    decode_gemm: decode batches' products in quack's narrow tiles (Hopper; shard/decode_gemm.py).
    gemv: products of 1-16 rows in Triton matrix-vector kernels (CUDA; shard/gemv.py).
    Under tensor parallelism (tp) the rank reads only its slices of the weights."""
    int4 = quantize == "int4"
    if int4 and not (source.is_gguf and device.type == "cpu" and int4_available()):
        raise ValueError("--quantize int4 runs GGUF Q4_0/Q4_1 weights on a CPU (with torch's "
                         "_weight_int4pack_mm_for_cpu); this model or device is not that")
    if source.is_gguf:
        gguf_file = GGUFModel(source.path)
        config, tokenizer = gguf_file.config(), gguf_file.tokenizer()
        tensors = gguf_file.tensors(config, int4=int4)
    else:
        config = ModelConfig.from_folder(source.path)
        if load_format == "dummy" and not tokenizers.has_tokenizer(source.path):
            tokenizer = tokenizers.byte_spec(config.vocab_size)  # random weights: no vocabulary
        else:
            tokenizer = tokenizers.from_folder(source.path)
        tensors = (weights.dummy_tensors(config, device, dtype) if load_format == "dummy"
                   else weights.safetensors_tensors(source.path))
    error = split_error(config, tp.world_size)
    if error:
        raise ValueError(error)
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(config, tp, attention, Ops.build(
            compiled, fused_rotary, fused_mlp, decode_gemm, gemv))
    try:
        model.load_weights(tensors)
    except FileNotFoundError as exc:
        raise ModelNotFound(str(exc)) from exc
    quantization = "none"
    if any(getattr(m, "int4", None) is not None for m in model.modules()):
        quantization = "int4 weights (GGUF Q4 groups of 32), bfloat16 activations in linears"
        # Next to int4 layers the float32 LM head would dominate each step: bfloat16 halves it.
        model.lm_head.compute_weight = model.lm_head.weight.detach().to(torch.bfloat16)
    return LoadedModel(source, config, model.eval(), tokenizer, quantization)
