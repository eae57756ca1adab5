"""The router's incremental decoding: ByteLevelStream gives what tokens' DecodeStream gives,
release by release, for byte-level tokenizers (random ids: invalid UTF-8, split characters,
special, added and unknown tokens); other decoders keep DecodeStream."""

from __future__ import annotations

import random

import pytest
from tokenizers import decoders, pre_tokenizers
from tokenizers.decoders import DecodeStream

from router.tokenizer import ByteLevelStream, RouterTokenizer
from shard.tokenizer import bpe_tokenizer_json, byte_spec, byte_tokenizer
from sluice.v1 import generate_pb2 as pb

PIECES = ["héllo", " wörld", "😀", "漢字", "\ufffd", "a", " ", "\n", "<|im_end|>", "ß", "<|300|>",
          "<x>", " he", "llo", "é"]


def byte_level_with_added_tokens() -> str:
    """One token per byte, three special tokens, and non-special added tokens up to id 320."""
    return byte_spec(320).tokenizer_json


def bpe_with_merges() -> str:
    """Byte-level BPE as the shard builds it from GGUF (SmolLM2's kind): merged tokens of
    several bytes, one that is part of a character (ðŁ: the first half of 😀), special and
    user-defined tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = {"Ġh": "Ġ h", "Ġhe": "Ġh e", "ll": "l l", "llo": "ll o", "Ã©": "Ã ©",
              "ðŁ": "ð Ł", "ðŁĺ": "ðŁ ĺ", "ðŁĺĢ": "ðŁĺ Ģ"}
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + alphabet + list(merged) + ["<x>"]
    types = [3, 3, 3] + [1] * (len(alphabet) + len(merged)) + [4]
    return bpe_tokenizer_json(tokens=tokens, merges=list(merged.values()), token_types=types,
                              pre="gpt2", bos_token=None, add_bos=False)


def id_sequences(tokenizer: RouterTokenizer, rng: random.Random, count: int):
    vocab = tokenizer.tokenizer.get_vocab_size()
    for trial in range(count):
        n = rng.randrange(1, 40)
        if trial % 3 == 0:  # anything, ids past the vocabulary included
            yield [rng.randrange(0, vocab + 10) for _ in range(n)]
        elif trial % 3 == 1:  # mostly single bytes: split and invalid UTF-8
            yield [rng.randrange(0, min(vocab, 400)) for _ in range(n)]
        else:  # real text, special and added tokens, a literal U+FFFD
            text = "".join(rng.choice(PIECES) for _ in range(n))
            yield tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("tokenizer_json", [byte_level_with_added_tokens, bpe_with_merges],
                         ids=["bytes-and-added-tokens", "bpe-with-merges"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_byte_level_stream_releases_what_decode_stream_releases(tokenizer_json,
                                                               skip_special_tokens):
    tokenizer = RouterTokenizer(pb.Tokenizer(tokenizer_json=tokenizer_json()))
    rng = random.Random(7)
    steps = 0
    for ids in id_sequences(tokenizer, rng, 600):
        ours = tokenizer.decode_stream(skip_special_tokens)
        assert isinstance(ours, ByteLevelStream)
        theirs = DecodeStream(skip_special_tokens=skip_special_tokens)
        for token_id in ids:
            steps += 1
            assert ours.step(tokenizer.tokenizer, token_id) == \
                theirs.step(tokenizer.tokenizer, token_id), (ids, token_id)
    assert steps > 5000


def test_a_decoder_other_than_byte_level_alone_keeps_decode_stream():
    tok = byte_tokenizer()
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    tokenizer = RouterTokenizer(pb.Tokenizer(tokenizer_json=tok.to_str()))
    assert isinstance(tokenizer.decode_stream(), DecodeStream)
