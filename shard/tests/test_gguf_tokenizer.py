"""The embedded SmolLM2 GGUF file: the tokenizer we build from it, and the q/k row order."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from shard.gguf_model import GGUFModel, _undo_rope_permutation
from shard.source import resolve


@pytest.fixture(scope="module")
def spec():
    return GGUFModel(resolve(None).path).tokenizer()


@pytest.fixture(scope="module")
def tokenizer(spec) -> Tokenizer:
    return Tokenizer.from_str(spec.tokenizer_json)


def test_no_bos_is_added(tokenizer):
    assert tokenizer.encode("hello world").ids == [28120, 905]
    assert tokenizer.encode("hello world", add_special_tokens=True).ids == [28120, 905]


def test_digits_are_split_one_by_one(tokenizer):
    assert tokenizer.encode("2024").tokens == ["2", "0", "2", "4"]
    for text in ("x = 31415926", "1000000 tokens", "v1.25"):
        tokens = tokenizer.encode(text).tokens
        # Every digit is a token of its own; no token holds a digit and anything else.
        assert [t for t in tokens if any(c.isdigit() for c in t)] == [
            c for c in text if c.isdigit()], tokens


def test_chat_special_tokens_are_single_ids(tokenizer):
    assert tokenizer.token_to_id("<|im_start|>") == 1
    assert tokenizer.token_to_id("<|im_end|>") == 2
    ids = tokenizer.encode("<|im_start|>user\nHi there<|im_end|>\n").ids
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(2) == 1
    assert ids[ids.index(2) + 1:] == tokenizer.encode("\n").ids
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    assert decoded == "<|im_start|>user\nHi there<|im_end|>\n"


@pytest.mark.parametrize("text", [
    "Grüße aus Köln — naïve café, 東京タワー, 🚀🔥👩‍👩‍👧 emoji!",
    "  leading spaces\n\ttabs and\r\nnewlines  ",
    "numbers 3.14159 and code: def f(x): return x**2",
])
def test_decode_inverts_encode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_eos_bos_and_chat_template(spec, tokenizer):
    assert spec.eos_token_ids == (2,)
    assert spec.eos_token == "<|im_end|>"
    assert spec.bos_token == "<|im_start|>"
    assert "<|im_start|>" in spec.chat_template and "add_generation_prompt" in spec.chat_template


# -- llama.cpp's q/k row permutation ----------------------------------------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, the oracle."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@pytest.mark.parametrize("n_head, head_dim, columns", [(9, 64, 576), (3, 64, 576), (4, 16, 64),
                                                        (2, 8, 5), (1, 4, 3)])
def test_undo_rope_permutation_inverts_llama_cpps_permutation(n_head, head_dim, columns):
    w = np.random.default_rng(n_head).standard_normal((n_head * head_dim, columns)).astype(
        np.float32)
    permuted = llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(_undo_rope_permutation(permuted, n_head), w)
    # And the other way round: undoing then permuting gives the GGUF rows back.
    assert np.array_equal(llama_cpp_permute(_undo_rope_permutation(w, n_head), n_head), w)
