"""Attention over the paged KV cache: one interface, chosen once at start.

Every backend reads and writes the same layout: per layer, `k_cache` and `v_cache` of shape
[num_blocks, block_size, num_kv_heads, head_dim]; token t of a sequence lives in block
`block_table[t // block_size]` at offset `t % block_size`.

A step is one ragged batch: the first `num_decodes` sequences bring one new token each, the
rest bring prefill chunks. `prepare` turns the step's layout into whatever the backend's kernels
need, once per step. Per layer, `write_kv` stores the step's new keys and values in their slots,
then the backend's `attend` reads the pages (those new tokens included).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepLayout:
    """Where a step's tokens come from and go to; all tensors already on the device."""

    num_decodes: int
    query_starts: list[int]  # host copy of cu_seqlens_q: sequence i owns rows [s_i, s_{i+1})
    context_lens: list[int]  # host copy: tokens in cache for each sequence after this step
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    seqused_k: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    block_size: int

    @property
    def max_query_len(self) -> int:
        return max(b - a for a, b in zip(self.query_starts, self.query_starts[1:]))

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens)


@dataclass(slots=True)
class _Prefill:
    rows: slice  # this sequence's query rows in the step
    slots: torch.Tensor  # [context_len] cache slots of its whole context
    causal_mask: torch.Tensor | None  # None when the chunk is the whole context


@dataclass(slots=True)
class TorchMetadata:
    slot_mapping: torch.Tensor
    num_decodes: int
    decode_slots: torch.Tensor | None  # [num_decodes, max_context] slots; past its end: its first
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_context] True where attended
    prefills: list[_Prefill]


def _context_slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions 0..length-1 for each row of `block_table`: [rows, length]."""
    positions = torch.arange(length, device=block_table.device)
    blocks = block_table[:, positions // block_size].long()
    return blocks * block_size + positions % block_size


class TorchAttention:
    """Plain PyTorch over the pages: gather each sequence's context, then SDPA.

    Decodes share one batched SDPA call (padded to the longest context, masked); each prefill
    chunk gets its own call, causal with its offset in the context.
    """

    name = "torch"
    decode_graphs = False  # its decode metadata depends on the contexts' lengths

    def prepare(self, layout: StepLayout) -> TorchMetadata:
        nd = layout.num_decodes
        decode_slots = decode_mask = None
        if nd:
            lens = layout.seqused_k[:nd]
            longest = max(layout.context_lens[:nd])
            slots = _context_slots(layout.block_table[:nd], longest, layout.block_size)
            inside = torch.arange(longest, device=lens.device) < lens[:, None]
            # Padding reads the sequence's own first slot, never another's: masked scores still
            # multiply the values they skip by 0, and 0 × a foreign NaN would leak.
            decode_slots = torch.where(inside, slots, slots[:, :1])
            decode_mask = inside[:, None, None, :]
        prefills = []
        for i in range(nd, len(layout.context_lens)):
            start, end = layout.query_starts[i], layout.query_starts[i + 1]
            context = layout.context_lens[i]
            slots = _context_slots(layout.block_table[i:i + 1], context, layout.block_size)[0]
            mask = None
            if end - start != context:  # a later chunk: it also sees the cached earlier ones
                q_pos = torch.arange(context - (end - start), context, device=slots.device)
                mask = torch.arange(context, device=slots.device)[None, :] <= q_pos[:, None]
            prefills.append(_Prefill(slice(start, end), slots, mask))
        return TorchMetadata(layout.slot_mapping, nd, decode_slots, decode_mask, prefills)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: TorchMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
        """q: [T, Hq, D] for the step's new tokens, whose K/V are in the cache already.
        Returns [T, Hq, D] (in `out` when given)."""
        heads, dim = k_cache.shape[-2:]
        flat_k = k_cache.view(-1, heads, dim)
        flat_v = v_cache.view(-1, heads, dim)
        out = torch.empty_like(q) if out is None else out
        nd = meta.num_decodes
        if nd:
            keys = flat_k[meta.decode_slots].transpose(1, 2)  # [nd, Hkv, ctx, D]
            values = flat_v[meta.decode_slots].transpose(1, 2)
            out[:nd] = F.scaled_dot_product_attention(
                q[:nd].unsqueeze(2), keys, values, attn_mask=meta.decode_mask, enable_gqa=True,
            ).squeeze(2)
        for p in meta.prefills:
            keys = flat_k[p.slots].transpose(0, 1).unsqueeze(0)  # [1, Hkv, ctx, D]
            values = flat_v[p.slots].transpose(0, 1).unsqueeze(0)
            query = q[p.rows].transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
            result = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=p.causal_mask, is_causal=p.causal_mask is None,
                enable_gqa=True)
            out[p.rows] = result[0].transpose(0, 1)
        return out


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Store the step's new keys and values in their cache slots."""
    heads, dim = k_cache.shape[-2:]
    k_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, v)


@dataclass(slots=True)
class DecodeSplit:
    """How a CUDA step's rows divide: [0, num_decodes) through the Triton kernel (0 when the
    backend's own kernel takes every row), the rest from first_row on."""

    num_decodes: int
    decode_table: torch.Tensor | None
    decode_lens: torch.Tensor | None
    first_row: int
    cu_seqlens_q: torch.Tensor | None  # the rest's, counting from first_row; None: no rest

    def parts(self) -> dict:
        """The split's fields, to build a backend's metadata (which extends this) from."""
        return {f.name: getattr(self, f.name) for f in fields(DecodeSplit)}


class _TritonDecodeRows:
    """What the CUDA backends share: decode rows through `self.decode` (our Triton kernel, or
    None), the other rows through the backend's `_rest`."""

    def _split(self, layout: StepLayout) -> DecodeSplit:
        nd = layout.num_decodes if self.decode is not None else 0
        table = lens = cu_q = None
        if nd:
            table, lens = layout.block_table[:nd], layout.seqused_k[:nd]
        first_row = layout.query_starts[nd]
        if nd < len(layout.context_lens):
            cu_q = layout.cu_seqlens_q[nd:] - first_row if nd else layout.cu_seqlens_q
        return DecodeSplit(nd, table, lens, first_row, cu_q)

    def attend(self, q, k_cache, v_cache, meta, out=None) -> torch.Tensor:
        out = torch.empty_like(q) if out is None else out
        nd = meta.num_decodes
        if nd:
            self.decode(q[:nd], k_cache, v_cache, meta.decode_table, meta.decode_lens, out[:nd])
        if meta.cu_seqlens_q is not None:
            first = meta.first_row
            self._rest(q[first:], k_cache, v_cache, meta, out[first:])
        return out

    def _rest(self, q, k_cache, v_cache, meta, out) -> None:
        raise NotImplementedError


@dataclass(slots=True)
class VarlenMetadata(DecodeSplit):
    """The rows past the decodes go through varlen_attn over their gathered contexts."""

    slot_mapping: torch.Tensor
    cu_seqlens_k: torch.Tensor | None
    context_slots: torch.Tensor | None  # [sum of their contexts]: their cache slots, packed
    max_query_len: int
    max_context_len: int


class TorchVarlenAttention(_TritonDecodeRows):
    """CUDA without FlashAttention-4 (GPUs before Hopper, or FA4 not installed): torch's
    varlen FlashAttention (varlen_attn's kernel) for prefill chunks, over their contexts gathered
    from the pages into one packed tensor per layer; decode rows through our Triton kernel
    (shard/paged_decode.py), which reads the pages in place, or through varlen_attn as well when
    `decode` is "flash" or Triton is missing.

    With the Triton kernel, a decode-only step's metadata is the block table and the context
    lengths alone, of fixed shape, so decode steps replay CUDA graphs as under the flash
    backend. Gathering instead would copy every context per layer and depend on their lengths.

    torch 2.13's varlen_attn could read the pages itself (block_table); that path is not used
    because no GPU with torch 2.13 was at hand to test it (the lent H100 runs torch 2.11).
    """

    name = "torch"

    def __init__(self, decode: str = "auto"):
        # The kernel varlen_attn runs (torch.nn.attention.varlen), torch's FlashAttention-2
        # forward, called directly. Around it varlen_attn is a custom op that allocates a
        # tensor and logs on every call: ~100 us of host a layer on the H100 (gpu.sh prefill,
        # cProfile), the most of what a 512-token prefill step waits on. And torch 2.11's
        # takes no GQA, which the kernel does (keys and values were repeated per query head).
        self._flash_forward = torch.ops.aten._flash_attention_forward
        self.decode = _triton_decode(decode, "varlen_attn")
        self.decode_graphs = self.decode is not None

    def prepare(self, layout: StepLayout) -> VarlenMetadata:
        split = self._split(layout)
        nd = split.num_decodes
        cu_k = slots = None
        lens = layout.context_lens[nd:]
        if lens:  # FlashAttention takes the rest: prefill chunks (and decodes, without Triton)
            device = layout.block_table.device
            # From the lengths already on the device: a copy of the host's would come from
            # pageable memory, and wait for all queued GPU work (the step before's too).
            used = layout.seqused_k[nd:]
            cu_k = F.pad(used.cumsum(0, dtype=torch.int32), (1, 0))
            row = torch.repeat_interleave(torch.arange(len(lens), device=device), used.long(),
                                          output_size=sum(lens))
            position = torch.arange(sum(lens), device=device) - cu_k[:-1].long()[row]
            blocks = layout.block_table[nd:][row, position // layout.block_size].long()
            slots = blocks * layout.block_size + position % layout.block_size
        # Decodes bring one row each: the step's longest query is the longest of these rows.
        return VarlenMetadata(**split.parts(), slot_mapping=layout.slot_mapping,
                              cu_seqlens_k=cu_k, context_slots=slots,
                              max_query_len=layout.max_query_len,
                              max_context_len=max(lens, default=0))

    def _rest(self, q, k_cache, v_cache, meta: VarlenMetadata, out) -> None:
        heads, dim = k_cache.shape[-2:]
        keys = k_cache.view(-1, heads, dim)[meta.context_slots]
        values = v_cache.view(-1, heads, dim)[meta.context_slots]
        # Causal from the end of each context (the chunk's queries are its last rows); the
        # softmax scale 1/sqrt(dim) by default.
        attended, *_ = self._flash_forward(q, keys, values, meta.cu_seqlens_q, meta.cu_seqlens_k,
                                           meta.max_query_len, meta.max_context_len, 0.0, True,
                                           False)
        out.copy_(attended)


@dataclass(slots=True)
class FlashMetadata(DecodeSplit):
    """The rows past the decodes go through FA4, reading the pages by block table."""

    slot_mapping: torch.Tensor
    seqused_k: torch.Tensor | None
    block_table: torch.Tensor | None
    max_query_len: int
    # The kernel and arguments the step's first layer resolved, replayed by the other layers.
    launch: tuple | None = None


class _LaunchRecorder:
    """Stands in for FlashAttention-4's cache of compiled forward kernels and remembers the
    last kernel handed out with the arguments it was called with."""

    def __init__(self, cache):
        self.cache = cache
        self.last: tuple | None = None

    def __contains__(self, key) -> bool:
        return key in self.cache

    def __setitem__(self, key, kernel) -> None:
        self.cache[key] = kernel

    def __getitem__(self, key):
        kernel = self.cache[key]

        def launch(*args):
            self.last = (kernel, args)
            return kernel(*args)

        return launch

    def __getattr__(self, name):
        return getattr(self.cache, name)


class FlashAttention(_TritonDecodeRows):
    """FlashAttention-4 (flash_attn.cute) on Hopper and newer for prefill chunks, one varlen call
    per layer over the pages through the block table (causal, bottom-right aligned, so a query
    sees its cached context); decode rows through our Triton kernel (shard/paged_decode.py),
    or through FA4 as well when `decode` is "flash" or Triton is missing.

    Why two kernels: FA4 has no split-KV on Hopper and reads a decode batch's pages at 1.6–2.5
    TB/s; the Triton kernel reached 2.65–2.8 TB/s on the H100 on the same batches (114 against
    188 µs per call at batch 256 and d=64, 108 against 122 µs at batch 128 and d=128) and, with
    split-KV, 6 against 9.6 µs at batch 1 (benchmarks/decode_attention.py, H100).

    FA4's Python interface spends ~0.3 ms per call choosing and checking its kernel, which a
    step outside CUDA graphs pays on every layer. All layers of a step share the metadata, so
    only the first goes through the interface; the others launch the kernel it chose with the
    same arguments but their own q, KV cache and output. That is checked on the first call (the
    recorded arguments must be exactly those tensors); where it does not hold, for instance in
    another FA4 version, every layer takes the interface.

    The interface entry is FA4's `_flash_attn_fwd` (what `flash_attn_varlen_func` calls, minus
    autograd): it takes the output buffer and the tile shape. When FA4 runs decode-only steps
    on Hopper it uses 64×128 tiles: a decode's query rows (its heads per KV head, packed) fill a
    few rows of the default 128- or 192-row tile, and the smaller tile was faster at every
    batch measured, 1 to 256."""

    name = "flash"

    def __init__(self, decode: str = "auto"):
        from flash_attn.cute import interface

        forward = interface._flash_attn_fwd
        self._forward = forward
        hopper = torch.cuda.get_device_capability()[0] == 9
        self.decode_tile = (64, 128) if hopper else None
        self.decode = _triton_decode(decode, "FlashAttention-4")
        self.decode_graphs = True  # FA4 or Triton: decode metadata of fixed shape either way
        if not isinstance(forward.compile_cache, _LaunchRecorder):
            forward.compile_cache = _LaunchRecorder(forward.compile_cache)
        self._recorder = forward.compile_cache
        self.replay = True  # off once a recorded launch does not look as expected

    def prepare(self, layout: StepLayout) -> FlashMetadata:
        split = self._split(layout)
        nd = split.num_decodes
        seqused_k = block_table = None
        if split.cu_seqlens_q is not None:  # FA4 takes the rest (and decodes, without Triton)
            seqused_k, block_table = layout.seqused_k[nd:], layout.block_table[nd:]
        # Decodes bring one row each, so the longest query is the step's, FA4's rows or not.
        return FlashMetadata(**split.parts(), slot_mapping=layout.slot_mapping,
                             seqused_k=seqused_k, block_table=block_table,
                             max_query_len=layout.max_query_len)

    def _rest(self, q, k_cache, v_cache, meta: FlashMetadata, out) -> None:
        if meta.launch is not None and meta.launch[0] == (q.shape, q.dtype):
            _, kernel, args = meta.launch
            kernel(q.detach(), k_cache.detach(), v_cache.detach(), out, *args[4:])
            return
        self._recorder.last = None
        tile = self.decode_tile if meta.max_query_len == 1 else None
        self._forward(q, k_cache, v_cache, cu_seqlens_q=meta.cu_seqlens_q,
                      max_seqlen_q=meta.max_query_len, seqused_k=meta.seqused_k,
                      page_table=meta.block_table, causal=True, tile_mn=tile, out=out)
        if self.replay and self._recorder.last is not None:
            kernel, args = self._recorder.last
            expected = (q, k_cache, v_cache, out)
            if len(args) > 4 and all(isinstance(a, torch.Tensor) and
                                     a.data_ptr() == t.data_ptr() and a.shape == t.shape
                                     for a, t in zip(args, expected)):
                meta.launch = ((q.shape, q.dtype), kernel, args)
            else:
                self.replay = False
                log.warning("FlashAttention-4's launch is not the expected one; each layer "
                            "goes through its Python interface")


def _triton_decode(requested: str, fallback: str):
    """The Triton decode kernel for --decode-attention, or None where the backend's own
    FlashAttention kernel (`fallback`) takes decode rows too."""
    if requested == "flash":
        return None
    try:
        from shard.paged_decode import PagedDecode
    except ImportError as exc:
        if requested == "triton":
            raise ValueError(f"--decode-attention triton: Triton is not importable: {exc}")
        log.info("Triton is not importable (%s): %s takes decode rows too", exc, fallback)
        return None
    return PagedDecode(torch.device("cuda", torch.cuda.current_device()))


def flash_unavailable(device: torch.device) -> str | None:
    """Why the flash backend cannot run on `device`, or None when it can."""
    if device.type != "cuda":
        return "FlashAttention needs a CUDA GPU"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 9:
        # flash-attn 2 reads pages only in blocks of 256 tokens; not wired up yet.
        return "the flash backend runs FlashAttention-4, which needs compute capability 9.0+"
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as exc:  # not installed, or a CUTLASS DSL without its CUDA libraries
        # (a RuntimeError at import): auto then takes the torch backend, as it does without
        return f"FlashAttention-4 (pip install flash-attn-4) is not importable: {exc}"
    return None


def select_backend(requested: str, device: torch.device, decode: str = "auto"):
    """The backend for --attention: flash where FlashAttention-4 runs, else torch. `decode`
    (--decode-attention) picks the kernel for decode rows on CUDA: our Triton kernel, or the
    backend's FlashAttention (FA4, or the one inside torch's varlen_attn)."""
    reason = flash_unavailable(device)
    if requested == "flash" and reason:
        raise ValueError(f"--attention flash: {reason} (use --attention torch)")
    if requested in ("auto", "flash") and reason is None:
        return FlashAttention(decode)
    if device.type == "cuda":
        return TorchVarlenAttention(decode)
    return TorchAttention()
