"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over the paged KV cache.

Checked against transformers' implementation on the same weights (shard/tests). Linear and
embedding layers are tensor-parallel from the start, so several ranks change no code here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from shard import weights
from shard.models.config import ModelConfig
from shard.models.ops import EAGER, Ops
from shard.parallel import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear,
                            TensorParallel, VocabParallelEmbedding)


@dataclass(slots=True)
class Activations:
    """What passes between the pieces of one step's forward (LlamaForCausalLM.run).

    Eager steps rebind q, residual and hidden to each piece's new tensors. Graph captures set
    `static`: the fields are then fixed buffers of the step's rows that pieces write into, since
    a replayed graph reads and writes the addresses it was captured with."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]: cache slot of each token's key and value
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    q: torch.Tensor | None = None  # [T, heads, head_dim]: the latest layer's rotated queries
    attended: torch.Tensor | None = None  # [T, heads, head_dim]: its attention output
    residual: torch.Tensor | None = None  # [T, hidden]
    hidden: torch.Tensor | None = None  # [T, hidden]: after the final norm
    static: bool = False


class Added:
    """What a norm gets in place of its input x when the product before it already added x to
    the residual stream (LlamaDecoderLayer.after_attention, norms folded): the stream goes on
    as the residual, and the products after the norm take it as a scale of their own, with
    the squares that product summed as it stored the stream (shard/gemv.py's added_product;
    None at one row)."""

    def __init__(self, squares: torch.Tensor | None):
        self.squares = squares


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalize x (after adding residual, if given); returns (normed, new residual)."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps), x
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """The cos/sin tables of rotate-half rotary embedding, indexed by position (ops.rotary
    applies them)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        inv_freq = _scale_frequencies(inv_freq, config)
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float)
        freqs = torch.outer(positions, inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)


def _scale_frequencies(inv_freq: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / s.factor
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(middle, blended, scaled)


def split_error(config: ModelConfig, world_size: int) -> str | None:
    """Why `config` cannot be split over `world_size` tensor-parallel ranks, or None.

    Query heads and the MLP's intermediate size must divide; key/value heads must divide, or
    divide the ranks (then consecutive ranks share one, as vLLM replicates them); the
    vocabulary is padded instead."""
    n = world_size
    heads, kv_heads, inter = config.num_heads, config.num_kv_heads, config.intermediate_size
    problems = []
    if heads % n:
        problems.append(f"{heads} attention heads do not divide by {n}")
    if kv_heads % n and n % kv_heads:
        problems.append(f"{kv_heads} key/value heads neither divide by {n} nor divide {n}")
    if inter % n:
        problems.append(f"the intermediate size {inter} does not divide by {n}")
    if not problems:
        return None
    return (f"this model (attention heads {heads}, key/value heads {kv_heads}, intermediate "
            f"size {inter}) cannot be split over {n} tensor-parallel ranks: "
            + "; ".join(problems) + ". Use a --num-shard that divides them")


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, backend, ops: Ops):
        super().__init__()
        d = config.head_dim
        self.ops = ops
        self.num_heads = config.num_heads // tp.world_size
        # Fewer key/value heads than ranks: each rank holds the one its query heads read.
        kv_pieces = min(config.num_kv_heads, tp.world_size)
        self.num_kv_heads = config.num_kv_heads // kv_pieces
        self.head_dim = d
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size, [config.num_heads * d, config.num_kv_heads * d,
                                 config.num_kv_heads * d], config.qkv_bias, tp,
            pieces=[tp.world_size, kv_pieces, kv_pieces], product=ops.linear)
        self.o_proj = RowParallelLinear(config.num_heads * d, config.hidden_size, config.o_bias, tp,
                                        product=ops.linear)
        self.backend = backend

    @property
    def fuses_rotary(self) -> bool:
        """Whether steps (of the rows ops.qkv_rotary_rows takes) run the QKV product, rotary and
        the cache write as one kernel (--gemv): a plain weight without bias."""
        qkv_proj = self.qkv_proj
        return (self.ops.qkv_rotary is not None and qkv_proj.weight is not None
                and qkv_proj.bias is None)

    def project(self, h, positions, rotary, kv_cache, slot_mapping, q_out=None,
                norm_eps=None, squares=None):
        """q [T, Hq, D] of the normed hidden states h, rotated (into q_out if given); their keys
        (rotated) and values go to their cache slots. One kernel where it fuses the rotary and
        takes the step, else the QKV product, then rotate. With norm_eps, h is the stream
        itself and the product is of RMSNorm(h) with that eps (the norm's weight folded into
        QKV's), `squares` the sums the added product that wrote h returned with it."""
        if (self.fuses_rotary and h.dim() == 2 and h.stride(1) == 1
                and self.ops.qkv_rotary_rows(h.shape[0], self.head_dim)):
            return self.ops.qkv_rotary(h, self.qkv_proj.weight, positions, rotary.cos,
                                       rotary.sin, kv_cache[0], kv_cache[1], slot_mapping,
                                       self.num_heads, self.num_kv_heads, self.head_dim,
                                       out=q_out, norm_eps=norm_eps, squares=squares)
        qkv = (self.qkv_proj(h) if norm_eps is None
               else self.ops.scaled_linear(h, self.qkv_proj.weight, norm_eps, False, squares))
        return self.rotate(qkv, positions, rotary, kv_cache, slot_mapping, q_out)

    def rotate(self, qkv, positions, rotary, kv_cache, slot_mapping, q_out=None):
        """q [T, Hq, D] of the step's tokens from their QKV product, rotated (into q_out if
        given); their keys (rotated) and values go to their cache slots."""
        return self.ops.rotary_into_cache(qkv, positions, rotary.cos, rotary.sin,
                                          kv_cache[0], kv_cache[1], slot_mapping,
                                          self.num_heads, self.num_kv_heads, self.head_dim,
                                          out=q_out)

    def output(self, attended):
        return self.o_proj(attended.reshape(-1, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, ops: Ops):
        super().__init__()
        self.ops = ops
        inter = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [inter, inter],
                                                 config.mlp_bias, tp, product=ops.linear)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, config.mlp_bias, tp,
                                           product=ops.linear)

    @property
    def fuses_gate(self) -> bool:
        """Whether steps (of the sizes ops.swiglu_rows takes) take the gate/up product with
        SiLU × up in its epilogue: not with int4 weights (their weight is None once loaded), nor
        with a bias."""
        gate_up = self.gate_up_proj
        return (self.ops.swiglu_linear is not None and gate_up.weight is not None
                and gate_up.bias is None)

    def forward(self, x):
        gate_up = self.gate_up_proj
        if self.fuses_gate and self.ops.swiglu_rows(x.shape[0]):
            return self.down_proj(self.ops.swiglu_linear(x, gate_up.weight))
        return self.down_proj(self.ops.silu_mul(gate_up(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, backend, ops: Ops):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.self_attn = LlamaAttention(config, tp, backend, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.mlp = LlamaMLP(config, tp, ops)
        self.folded_norms = False  # fold_norms

    # The two halves around attention: the model's pieces (LlamaForCausalLM.piece) join them.
    def before_attention(self, x, residual, positions, rotary, kv_cache, slot_mapping,
                         q_out=None):
        """Norm, QKV and rotary; the new keys and values go to their cache slots. Returns
        (q, residual); q in q_out if given. x is an Added where after_attention made it so:
        the residual is then the stream already, and the norm a scale in the QKV product."""
        attn = self.self_attn
        if isinstance(x, Added):
            return attn.project(residual, positions, rotary, kv_cache, slot_mapping, q_out,
                                norm_eps=self.input_layernorm.eps,
                                squares=x.squares), residual
        h, residual = self.input_layernorm(x, residual)
        return attn.project(h, positions, rotary, kv_cache, slot_mapping, q_out), residual

    def after_attention(self, attended, residual, then_layer: bool = False):
        """Output projection, norm and MLP: (x, residual) for the next norm to add and
        normalize. With the norms folded (LlamaForCausalLM.fold_norms), a step of the rows
        ops.folded_rows takes runs the residual adds inside the O and down products
        (shard/gemv.py's added_product) and the post-attention norm inside gate/up (a
        product of RMSNorm(x)); then_layer (a layer's input norm, not the final one, reads the
        result): x is then an Added and the residual the stream."""
        attn, mlp = self.self_attn, self.mlp
        ops = mlp.ops
        if not (self.folded_norms and ops.folded_rows(attended.shape[0])
                and residual.is_contiguous()):
            h, residual = self.post_attention_layernorm(attn.output(attended), residual)
            return mlp(h), residual
        heads = attended.reshape(-1, attn.num_heads * attn.head_dim)
        stream, squares = ops.added_linear(heads, attn.o_proj.weight, residual)
        gated = ops.scaled_linear(stream, mlp.gate_up_proj.weight,
                                  self.post_attention_layernorm.eps, True, squares)
        if then_layer:
            stream, squares = ops.added_linear(gated, mlp.down_proj.weight, stream)
            return Added(squares), stream
        return mlp.down_proj(gated), stream

    def folds_norms(self) -> bool:
        """Whether fold_norms can: the folded products built (--gemv), one rank (a rank's
        products see only its slice of the inputs whose squares the norm sums), plain weights
        without bias."""
        projections = (self.self_attn.qkv_proj, self.self_attn.o_proj, self.mlp.gate_up_proj,
                       self.mlp.down_proj)
        return (self.mlp.ops.added_linear is not None
                and all(p.tp.world_size == 1 and p.weight is not None and p.bias is None
                        for p in projections))

    @torch.no_grad()
    def fold_norms(self) -> None:
        """Each norm's weight into the product that reads the norm (QKV's and gate/up's input
        columns: W[:, k] g[k], rounded once), the norms left as 1 / RMS alone (weight 1), for
        every step: what after_attention's folded steps need."""
        for norm, proj in ((self.input_layernorm, self.self_attn.qkv_proj),
                           (self.post_attention_layernorm, self.mlp.gate_up_proj)):
            weight = proj.weight
            weight.copy_((weight.float() * norm.weight.float()).to(weight.dtype))
            norm.weight.fill_(1)
        self.folded_norms = True


class LlamaForCausalLM(nn.Module):
    # HF checkpoint names of the separate projections we store stacked: (ours, index in stack).
    STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
               "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config: ModelConfig, tp: TensorParallel, backend, ops: Ops = EAGER):
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, tp, backend, ops) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp, ops.head_linear)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], attn_meta,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] of the step's T ragged tokens, final norm applied, run
        eagerly (a decode graph captures this too); with `rows` (indices into the T), only
        those rows' [len(rows), hidden], in that order (see `run`)."""
        a = Activations(input_ids, positions, attn_meta.slot_mapping, kv_caches)
        backend = self.layers[0].self_attn.backend

        def attend(index: int) -> None:
            a.attended = backend.attend(a.q, *kv_caches[index], attn_meta)

        return self.run(a, attend, rows)

    def run(self, a: Activations, attend: Callable[[int], None],
            rows: torch.Tensor | None = None, piece: Callable[[int], None] | None = None,
            tail: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The one layer loop of every step: piece 0, layer 0's attention, piece 1, ..., the
        last piece. attend(i) fills a.attended from a.q over layer i's cache. Eager steps
        compute the pieces (`piece` and `tail` default to this model's); piecewise CUDA graphs
        pass their replays of the same pieces.

        Past the last layer's attention a row affects no other row, so with `rows` only those
        rows go on (`tail`): the rows that nobody reads (a prompt's tokens before its last)
        skip that layer's output projection and MLP: 1/L of a prompt's products, less its QKV.
        (llama.cpp gathers the same rows one product later, after the output projection.)"""
        piece = piece or (lambda index: self.piece(index, a))
        tail = tail or (lambda chosen: self.tail(a, chosen))
        last = len(self.layers) - 1
        for index in range(last):
            piece(index)
            attend(index)
        piece(last)
        if rows is not None and rows.shape[0] == 0:
            # A step of prompt chunks that end no prompt: only the keys and values count (no
            # call on zero rows: compiled stages would compile again for them).
            return a.residual.new_empty((0, a.residual.shape[1]))
        attend(last)
        if rows is None:
            piece(last + 1)
            return a.hidden
        return tail(rows)

    def piece(self, index: int, a: Activations) -> None:
        """Piece `index` of the forward: the embedding (index 0) or layer index-1 past its
        attention, then layer `index` up to its attention (its keys and values written to the
        cache), or the final norm (index num_layers, into a.hidden)."""
        layers = self.layers
        if index == 0:
            x, residual = self.embed_tokens(a.input_ids), None
        else:
            x, residual = layers[index - 1].after_attention(a.attended, a.residual,
                                                            then_layer=index < len(layers))
        if index == len(layers):
            hidden = self.norm(x, residual)[0]
            a.hidden = a.hidden.copy_(hidden) if a.static else hidden
            return
        q, residual = layers[index].before_attention(
            x, residual, a.positions, self.rotary, a.kv_caches[index], a.slot_mapping,
            q_out=a.q if a.static else None)
        if a.static:  # q went straight into its buffer (or was copied there)
            a.residual.copy_(residual)
        else:
            a.q, a.residual = q, residual

    def tail(self, a: Activations, rows: torch.Tensor) -> torch.Tensor:
        """The last layer past its attention, and the final norm, on `rows` alone."""
        x, residual = self.layers[-1].after_attention(a.attended[rows], a.residual[rows])
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None
                       ) -> torch.Tensor:
        return self.lm_head(hidden, out)

    def load_weights(self, tensors: Iterable[tuple[str, object]]) -> None:
        """Load Hugging Face-named tensors (lazy ones of shard/weights.py, or torch tensors);
        each layer reads and keeps only this rank's slice."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded = set()
        for name, tensor in tensors:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied: the embedding is the head
            index = 0
            for hf_part, (ours, i) in self.STACKED.items():
                if f".{hf_part}." in name:
                    name, index = name.replace(hf_part, ours), i
                    break
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            module = self.get_submodule(name.rpartition(".")[0])
            if hasattr(module, "load_shard"):
                module.load_shard(param, tensor, index)
            else:
                param.data.copy_(weights.read(tensor))
            loaded.add(name)
        expected = {n for n in params if not (n == "lm_head.weight" and
                                              self.config.tie_word_embeddings)}
        missing = expected - loaded
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        for module in self.modules():
            if hasattr(module, "finish_loading"):
                module.finish_loading()
        if all(layer.folds_norms() for layer in self.layers):
            for layer in self.layers:
                layer.fold_norms()
