"""Each tensor-parallel rank reads only its own slices of the checkpoint, and the slices of
all ranks make up the model one rank loads. Loading needs no process group: every rank of a
split is loaded here in one process."""

from __future__ import annotations

import pytest
import torch

from shard import loader, weights
from shard.attention import TorchAttention
from shard.gguf_model import GGUFModel
from shard.parallel import TensorParallel
from shard.source import ModelSource, embedded_default
from shard.tests.tiny_model import write_tiny_model

CPU = torch.device("cpu")


class Counting:
    """A lazy checkpoint tensor that counts the elements read through it."""

    def __init__(self, tensor, counter: list[int]):
        self._tensor, self._counter = tensor, counter
        self.shape = tensor.shape

    def narrow(self, dim: int, start: int, length: int):
        part = self._tensor.narrow(dim, start, length)
        self._counter[0] += part.numel() if isinstance(part, torch.Tensor) else part.q.numel()
        return part

    def read(self):
        whole = weights.read(self._tensor)
        self._counter[0] += whole.numel()
        return whole


def load_counting(source: ModelSource, tp: TensorParallel, monkeypatch, dtype=torch.float32):
    """The rank's model, and how many checkpoint elements it read."""
    counter = [0]
    for module, name in ((weights, "safetensors_tensors"), (GGUFModel, "tensors")):
        real = getattr(module, name)

        def counted(*args, real=real, **kwargs):
            return ((n, Counting(t, counter)) for n, t in real(*args, **kwargs))

        monkeypatch.setattr(module, name, counted)
    model = loader.load(source, tp, CPU, dtype, TorchAttention()).model
    monkeypatch.undo()
    return model, counter[0]


def held(model) -> int:
    """Checkpoint elements a rank holds: its parameters, less the vocabulary's padding rows."""
    total = sum(p.numel() for p in model.parameters())  # a tied head counts once
    for table in {id(m.weight): m for m in (model.embed_tokens, model.lm_head)}.values():
        total -= (table.local_vocab - table.real_rows) * table.weight.shape[1]
    return total


@pytest.mark.parametrize("ranks, shape", [
    (2, dict(vocab_size=321)),
    (4, dict(num_attention_heads=4, num_key_value_heads=2)),
    (2, dict(tie_word_embeddings=True)),
], ids=["padded-vocabulary", "shared-kv-heads", "tied-embeddings"])
def test_each_rank_reads_exactly_the_slices_it_holds(tmp_path, monkeypatch, ranks, shape):
    source = ModelSource("tiny", write_tiny_model(tmp_path / "llama", **shape))
    whole, read_alone = load_counting(source, TensorParallel(), monkeypatch)
    assert read_alone == held(whole)
    for rank in range(ranks):
        model, read = load_counting(source, TensorParallel(rank, ranks), monkeypatch)
        assert read == held(model), rank
        assert read < 0.75 * read_alone  # its share, plus what every rank keeps whole


def test_the_ranks_slices_of_smollm2_gguf_make_up_the_whole_model(monkeypatch):
    """The embedded GGUF file (Q4_1 and Q8_0 blocks, llama.cpp's rotary row order) at three
    ranks: rows and whole blocks are cut before dequantizing, and each rank's weights equal
    its slice of the model one rank loads."""
    source = embedded_default()
    whole, read_alone = load_counting(source, TensorParallel(), monkeypatch)
    parts = []
    for rank in range(3):
        model, read = load_counting(source, TensorParallel(rank, 3), monkeypatch)
        assert read == held(model)
        parts.append(dict(model.named_parameters()))
    for name, param in whole.named_parameters():
        pieces = [p[name] for p in parts]
        if "qkv_proj" in name:  # q, k and v stacked: each rank holds a third of each
            sizes = [576, 192, 192]
            expected = torch.cat([torch.cat([piece.split([s // 3 for s in sizes])[i]
                                             for piece in pieces]) for i in range(3)])
        elif "gate_up_proj" in name:
            expected = torch.cat([torch.cat([piece.chunk(2)[i] for piece in pieces])
                                  for i in range(2)])
        elif pieces[0].shape == param.shape:  # norms: every rank holds them whole
            expected = pieces[0]
        else:
            dim = 1 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0
            expected = torch.cat(pieces, dim=dim)
        assert torch.equal(expected, param), name


def test_dummy_weights_are_one_model_whatever_the_split(tmp_path):
    folder = write_tiny_model(tmp_path / "llama", vocab_size=321)
    load = lambda tp: dict(loader.load(ModelSource("tiny", folder), tp, CPU, torch.float32,  # noqa: E731
                                       TorchAttention(), load_format="dummy")
                           .model.named_parameters())
    whole, halves = load(TensorParallel()), [load(TensorParallel(r, 2)) for r in range(2)]
    assert torch.equal(torch.cat([h["layers.0.mlp.down_proj.weight"] for h in halves], dim=1),
                       whole["layers.0.mlp.down_proj.weight"])
    assert torch.equal(torch.cat([h["embed_tokens.weight"] for h in halves])[:321],
                       whole["embed_tokens.weight"])
    assert torch.equal(whole["norm.weight"], torch.ones(64))
    assert whole["layers.1.self_attn.o_proj.weight"].std() == pytest.approx(0.02, rel=0.1)
