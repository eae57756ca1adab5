"""Weight-only int4 linear layers on CPU, for GGUF files whose weights are Q4_0 or Q4_1.

A GGUF Q4 tensor is groups of 32 weights, each w = d·q + m (Q4_1) or d·(q − 8) (Q4_0) with
4-bit q. torch's own CPU int4 kernel computes with w = (q − 8)·scale + zero in groups of 32,
so the file's weights run as they are, without widening them to floats: one eighth of the
memory traffic per step, which is what bounds decoding on a CPU.

Activations, scales and zeros enter the kernel in bfloat16, the precision GPU servers run in:
on SmolLM2 the logits differ from the float32 model by about 2% (relative). float16 would be
ten times closer, but the kernel has a fast path only for bfloat16 (AVX512-BF16): in float16
a decode step at batch 8 took 1.2 s instead of 35 ms. Everything else stays in the model's
dtype; `--quantize none` runs the dequantized weights in float32 instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType

GROUP_SIZE = 32
ACTIVATION_DTYPE = torch.bfloat16
INT4_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)


@dataclass(slots=True)
class Int4Groups:
    """An [N, K] weight as 4-bit values with a scale and a zero per group of 32 along K."""

    q: torch.Tensor  # [N, K] uint8 in 0..15
    scale: torch.Tensor  # [N, K // 32] float32
    zero: torch.Tensor  # [N, K // 32] float32: w = (q - 8) * scale + zero

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def narrow(self, dim: int, start: int, length: int) -> "Int4Groups":
        if dim == 0:
            return Int4Groups(self.q.narrow(0, start, length), self.scale.narrow(0, start, length),
                              self.zero.narrow(0, start, length))
        if start % GROUP_SIZE or length % GROUP_SIZE:
            raise ValueError(f"an int4 weight splits along its inputs only at multiples of "
                             f"{GROUP_SIZE}; {length} per rank is not")
        g0, gn = start // GROUP_SIZE, length // GROUP_SIZE
        return Int4Groups(self.q.narrow(1, start, length), self.scale.narrow(1, g0, gn),
                          self.zero.narrow(1, g0, gn))

    def dequantize(self) -> torch.Tensor:
        expand = lambda t: t.repeat_interleave(GROUP_SIZE, dim=1)  # noqa: E731
        return (self.q.float() - 8) * expand(self.scale) + expand(self.zero)


def from_gguf_blocks(data: np.ndarray, qtype: GGMLQuantizationType) -> Int4Groups:
    """Split GGUF Q4_0/Q4_1 blocks ([N, K/32 * block bytes] uint8) into values and groups."""
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, 20 if qtype == GGMLQuantizationType.Q4_1 else 18)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype == GGMLQuantizationType.Q4_1:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        packed = blocks[..., 4:]
        zero = m + 8 * d  # d·q + m = (q − 8)·d + (m + 8d)
    else:
        packed = blocks[..., 2:]
        zero = np.zeros_like(d)  # d·(q − 8)
    # Each block's 16 bytes hold weights 0-15 in their low nibbles and 16-31 in their high ones.
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)
    return Int4Groups(torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(zero))


class Int4Weight:
    """Packed for torch's CPU kernel; stands in for a dense weight in a linear layer."""

    def __init__(self, groups: Int4Groups):
        self.out_features, self.in_features = groups.shape
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(groups.q.int(), 1)
        # [K/32, N, 2]: (scale, zero) per group and output feature, in the activation dtype.
        self.scales_and_zeros = torch.stack([groups.scale.T, groups.zero.T], dim=-1).to(
            ACTIVATION_DTYPE).contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T for x [..., K]."""
        flat = x.reshape(-1, self.in_features).to(ACTIVATION_DTYPE)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP_SIZE,
                                                       self.scales_and_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
