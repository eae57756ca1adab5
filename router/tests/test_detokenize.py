"""TextStream: incremental text with stop strings that never leak and whole UTF-8 characters."""

from __future__ import annotations

import pytest

from router.detokenize import TextStream
from router.tokenizer import RouterTokenizer
from shard.tokenizer import CHATML, byte_tokenizer
from sluice.v1 import generate_pb2 as pb


@pytest.fixture(scope="module")
def tokenizer() -> RouterTokenizer:
    return RouterTokenizer(pb.Tokenizer(tokenizer_json=byte_tokenizer().to_str(),
                                        chat_template=CHATML, eos_token="<|im_end|>",
                                        eos_token_ids=[2]))


def feed(tokenizer, text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    """Push `text` one byte-token at a time; returns what each push released."""
    stream = TextStream(tokenizer, stop)
    return [stream.push(i) for i in tokenizer.encode(text)], stream


def test_without_stop_strings_text_comes_out_token_by_token(tokenizer):
    pieces, stream = feed(tokenizer, "hello world", [])
    assert pieces == list("hello world")
    assert stream.text == "hello world"


def test_multibyte_characters_split_over_tokens_come_out_whole(tokenizer):
    pieces, stream = feed(tokenizer, "añ😀b", [])
    # 'ñ' is 2 bytes and '😀' 4 bytes: nothing is released until a character is complete.
    assert pieces == ["a", "", "ñ", "", "", "", "😀", "b"]
    assert stream.text == "añ😀b"


def test_stop_string_split_over_tokens_is_matched_and_never_released(tokenizer):
    pieces, stream = feed(tokenizer, "one two STOP three", ["STOP"])
    assert stream.stopped_by == "STOP"
    assert stream.text == "one two "
    assert "".join(pieces) == "one two "
    assert not any("S" in p for p in pieces)


def test_text_that_might_start_a_stop_string_is_held_back_then_released(tokenizer):
    pieces, stream = feed(tokenizer, "a ST b", ["STOP"])
    assert stream.stopped_by is None
    assert pieces == ["a", " ", "", "", "ST ", "b"]  # "ST" waited until " " ruled STOP out
    assert stream.text + stream.flush() == "a ST b"


def test_held_back_tail_is_released_by_flush_at_the_end(tokenizer):
    pieces, stream = feed(tokenizer, "the end ST", ["STOP"])
    assert "".join(pieces) == "the end "
    assert stream.flush() == "ST"
    assert stream.text == "the end ST"


def test_earliest_of_several_stop_strings_wins(tokenizer):
    _, stream = feed(tokenizer, "xx END yy STOP", ["STOP", "END"])
    assert stream.stopped_by == "END"
    assert stream.text == "xx "


def test_stop_string_inside_a_multibyte_sequence_is_found_after_decoding(tokenizer):
    _, stream = feed(tokenizer, "café😀!", ["😀"])
    assert stream.stopped_by == "😀"
    assert stream.text == "café"


def test_token_bytes_are_the_raw_bytes_even_for_part_of_a_character(tokenizer):
    ids = tokenizer.encode("añ😀")
    assert [tokenizer.token_bytes(i) for i in ids] == [[0x61], [0xC3], [0xB1], [0xF0], [0x9F],
                                                       [0x98], [0x80]]
    assert tokenizer.token_text(ids[1]) == "\ufffd"  # its text alone cannot show it
    assert tokenizer.token_bytes(2) == list(b"<|im_end|>")  # special tokens: their text
