"""GGUF files: config from metadata, tensors under Hugging Face names, and the tokenizer.

The `gguf` package (llama.cpp's own reader) parses and dequantizes; this module only maps
llama.cpp's names and conventions onto the Hugging Face ones our model loads.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize

from shard.models.config import SUPPORTED, ModelConfig, RopeScaling
from shard.quantization import INT4_TYPES, Int4Groups, from_gguf_blocks
from shard.tokenizer import TokenizerSpec, bpe_tokenizer_json

_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


class _Reader(gguf.GGUFReader):
    """gguf's reader over the file's mapped bytes as a plain ndarray, not an np.memmap.

    The reader takes a slice of `data` for every value it parses (two per string: SmolLM2's
    vocabulary and merges are ~100,000), and each np.memmap slice runs Python-level
    __getitem__ and __array_finalize__. The same bytes, still mapped, without that: SmolLM2's
    file parses in 2.2 s instead of 5.9, and its tensors' rows slice faster as well."""

    @property
    def data(self) -> np.ndarray:
        return self._mapped

    @data.setter
    def data(self, mapped: np.memmap) -> None:
        self._mapped = mapped.view(np.ndarray)  # its base keeps the mapping open


class GGUFModel:
    """One open GGUF file."""

    def __init__(self, path: Path):
        self.path = path
        self.reader = _Reader(str(path))
        self.arch = str(self._get("general.architecture"))
        if self.arch not in SUPPORTED:
            raise ValueError(f"{path.name}: unsupported GGUF architecture {self.arch!r}")

    def _get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def _tensor_names(self) -> set[str]:
        return {t.name for t in self.reader.tensors}

    def config(self) -> ModelConfig:
        a = self.arch
        heads = int(self._get(f"{a}.attention.head_count"))
        hidden = int(self._get(f"{a}.embedding_length"))
        vocab = self._get(f"{a}.vocab_size") or len(self._get("tokenizer.ggml.tokens"))
        scaling = None
        if self._get(f"{a}.rope.scaling.type") == "linear":
            scaling = RopeScaling("linear", float(self._get(f"{a}.rope.scaling.factor")))
        if "rope_freqs.weight" in self._tensor_names():
            raise ValueError(f"{self.path.name}: GGUF rope frequency factors (Llama 3.1 style) are "
                             "not supported yet; use the Hugging Face folder of this model")
        has_bias = "blk.0.attn_q.bias" in self._tensor_names()
        return ModelConfig(
            family=SUPPORTED[a],
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self._get(f"{a}.feed_forward_length")),
            num_layers=int(self._get(f"{a}.block_count")),
            num_heads=heads,
            num_kv_heads=int(self._get(f"{a}.attention.head_count_kv", heads)),
            head_dim=int(self._get(f"{a}.attention.key_length", hidden // heads)),
            rms_norm_eps=float(self._get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self._get(f"{a}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(self._get(f"{a}.context_length", 4096)),
            tie_word_embeddings="output.weight" not in self._tensor_names(),
            qkv_bias=has_bias,
            o_bias=False,
            mlp_bias=False,
            rope_scaling=scaling,
        )

    def tensors(self, config: ModelConfig, int4: bool = False) -> Iterator[tuple[str, "GGUFTensor"]]:
        """Every tensor under its Hugging Face name, lazily (a rank dequantizes only the slices
        it holds): float32, or with `int4`, the Q4_0/Q4_1 weights of linear layers kept as
        their 4-bit groups."""
        for t in self.reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                continue
            permuted = self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight"))
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            as_int4 = int4 and t.tensor_type in INT4_TYPES and name.startswith("model.layers.")
            yield name, GGUFTensor(t, heads if permuted else 0, as_int4)

    def tokenizer(self) -> TokenizerSpec:
        tokens = self._get("tokenizer.ggml.tokens")
        eos_id = self._get("tokenizer.ggml.eos_token_id")
        bos_id = self._get("tokenizer.ggml.bos_token_id")
        eos_ids = [i for i in (eos_id, self._get("tokenizer.ggml.eot_token_id"),
                               self._get("tokenizer.ggml.eom_token_id")) if i is not None]
        kind = self._get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"{self.path.name}: GGUF tokenizer model {kind!r} is not supported "
                             "yet (byte-level BPE, 'gpt2', is); use the Hugging Face folder")
        tokenizer_json = bpe_tokenizer_json(
            tokens=tokens,
            merges=self._get("tokenizer.ggml.merges"),
            token_types=self._get("tokenizer.ggml.token_type"),
            pre=self._get("tokenizer.ggml.pre", "default"),
            bos_token=tokens[bos_id] if bos_id is not None else None,
            add_bos=bool(self._get("tokenizer.ggml.add_bos_token", False)),
        )
        return TokenizerSpec(
            tokenizer_json=tokenizer_json,
            chat_template=self._get("tokenizer.chat_template") or "",
            bos_token=tokens[bos_id] if bos_id is not None else "",
            eos_token=tokens[eos_id] if eos_id is not None else "",
            eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos_ids)),
        )


class GGUFTensor:
    """One tensor of the file. Rows, and columns at whole quantization blocks, are cut from the
    quantized data before it is dequantized; other column slices dequantize the whole tensor
    first. llama.cpp's rotary row order (q and k) is undone per head, so slices of whole heads
    need no other rows."""

    def __init__(self, tensor, permuted_heads: int, int4: bool):
        self._tensor = tensor
        self._heads = permuted_heads  # 0: rows in Hugging Face order already
        self._int4 = int4
        self.shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))

    def read(self) -> torch.Tensor | Int4Groups:
        return self._convert(self._tensor.data, self.shape[0])

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor | Int4Groups:
        data = self._tensor.data
        if dim == 0:
            return self._convert(data[start:start + length], length)
        block, block_bytes = GGML_QUANT_SIZES[self._tensor.tensor_type]
        if data.ndim == 2 and start % block == 0 and length % block == 0 and not self._int4:
            if data.dtype == np.uint8:  # quantized: whole blocks of bytes
                data = data[:, start // block * block_bytes:(start + length) // block * block_bytes]
            else:
                data = data[:, start:start + length]
            return self._convert(data, self.shape[0])
        return self.read().narrow(dim, start, length)

    def _convert(self, data: np.ndarray, rows: int) -> torch.Tensor | Int4Groups:
        heads = self._heads * rows // self.shape[0]  # the heads these rows hold
        if self._int4:
            groups = from_gguf_blocks(data, self._tensor.tensor_type)
            if heads:
                order = torch.from_numpy(_undo_rope_permutation(np.arange(rows)[:, None],
                                                                heads)[:, 0])
                groups = Int4Groups(groups.q[order], groups.scale[order], groups.zero[order])
            return groups
        array = dequantize(data, self._tensor.tensor_type)
        if heads:
            array = _undo_rope_permutation(array, heads)
        return torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy


def _hf_name(name: str) -> str | None:
    base, _, kind = name.rpartition(".")  # kind: weight or bias
    match = _LAYER.fullmatch(base)
    if match:
        part = _LAYER_NAMES.get(match.group(2))
        return part and f"model.layers.{match.group(1)}.{part}.{kind}"
    part = _GLOBAL_NAMES.get(base)
    return part and f"{part}.{kind}"


def _undo_rope_permutation(weight: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp stores q/k rows as interleaved rotary pairs; HF Llama uses rotate-half halves.
    rows = weight.shape[0]
    half = rows // heads // 2
    return (weight.reshape(heads, half, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))
