"""Read-ahead (llama.READ_AHEAD_BYTES): the weights each layer's one-row decode attention asks
L2 for, and the step passing them to the attention backend. The prefetch itself is a GPU hint
(test_pdl_cuda.py checks it changes no result)."""

from __future__ import annotations

import pytest
import torch

from shard.attention import StepLayout, TorchAttention
from shard.models import llama
from shard.models.llama import LlamaForCausalLM
from shard.parallel import TensorParallel
from shard.tests.tiny_model import tiny_config

MIB = 2**20


def _model(backend=None) -> LlamaForCausalLM:
    # O: 32 x 32 bfloat16 (2 KiB); gate/up: 2 x 48 x 32 (6 KiB, 3 KiB a half).
    with torch.device("cpu"):
        return LlamaForCausalLM(tiny_config(num_layers=2), TensorParallel(),
                                backend or TorchAttention()).to(torch.bfloat16)


def test_reads_o_first_then_the_gate_and_up_halves_alike(monkeypatch):
    model = _model()
    layer = model.layers[1]
    o, gate_up = layer.self_attn.o_proj.weight, layer.mlp.gate_up_proj.weight
    assert (o.nbytes, gate_up.nbytes) == (2048, 6144)
    monkeypatch.setattr(llama, "READ_AHEAD_BYTES", 1000)  # less than O: O's first 992 bytes
    assert model.read_ahead(1, 1) == [(o, 0, 992)]
    monkeypatch.setattr(llama, "READ_AHEAD_BYTES", 2048 + 2 * 1000 + 8)  # halves of 1,000: 992
    assert model.read_ahead(1, 1) == [(o, 0, 2048), (gate_up, 0, 992), (gate_up, 3072, 992)]
    monkeypatch.setattr(llama, "READ_AHEAD_BYTES", 64 * MIB)  # more than the layer holds
    assert model.read_ahead(1, 1) == [(o, 0, 2048), (gate_up, 0, 3072), (gate_up, 3072, 3072)]


def test_reads_nothing_past_its_rows_or_when_off(monkeypatch):
    model = _model()
    monkeypatch.setattr(llama, "READ_AHEAD_BYTES", 64 * MIB)
    assert model.read_ahead(0, llama.READ_AHEAD_ROWS + 1) == []
    monkeypatch.setattr(llama, "READ_AHEAD_BYTES", 0)
    assert model.read_ahead(0, 1) == []


class Recording(TorchAttention):
    def __init__(self):
        super().__init__()
        self.aheads = []

    def attend(self, q, k_cache, v_cache, meta, out=None, ahead=()):
        self.aheads.append(ahead)
        return super().attend(q, k_cache, v_cache, meta, out)


@pytest.mark.parametrize("rows", [1, 2])
def test_each_layers_attention_gets_that_layers_weights(monkeypatch, rows):
    monkeypatch.setattr(llama, "READ_AHEAD_BYTES", 2048)
    backend = Recording()
    model = _model(backend)
    config = model.config
    blocks = 2 * rows
    caches = [(torch.zeros(blocks, 16, config.num_kv_heads, config.head_dim,
                           dtype=torch.bfloat16),) * 2 for _ in model.layers]
    layout = StepLayout(rows, list(range(rows + 1)), [1] * rows,
                        torch.arange(rows + 1, dtype=torch.int32),
                        torch.ones(rows, dtype=torch.int32),
                        torch.arange(rows, dtype=torch.int32)[:, None],
                        torch.arange(rows) * 16, 16)
    model(torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.long), caches,
          backend.prepare(layout))
    wanted = [[(layer.self_attn.o_proj.weight, 0, 2048)] if rows == 1 else []
              for layer in model.layers]
    assert backend.aheads == wanted
