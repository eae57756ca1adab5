"""The content filter's rules: words on word boundaries, regexes, case, and held-back text."""

from __future__ import annotations

import sys
import types

import pytest

from router.content_filter import ContentFilter, Verdict, load_filter, parse_rules

RULES = """
prompt: {words: [forbidden, "c++"], regex: ['\\d{3}-\\d{4}']}
output: {words: [secret, launch codes], regex: ['sk-[a-z0-9]{6}']}
"""


def rules() -> ContentFilter:
    return ContentFilter(parse_rules(RULES, "rules.yaml"))


@pytest.mark.parametrize("prompt, blocked", [
    ("a forbidden word", True),
    ("FORBIDDEN!", True),
    ("forbiddenness is fine", False),
    ("unforbidden too", False),
    ("I write C++ daily", True),
    ("call 555-1234 now", True),
    ("call 555-12 now", False),
    ("a secret is output-only", False),
])
def test_prompt_rules_match_words_on_boundaries_and_regexes_case_insensitively(prompt, blocked):
    assert rules().prompt_blocked(prompt) is blocked


def feed_all(pieces: list[str]) -> tuple[str, int | None]:
    """Feed pieces as a stream would, the last as final; the cleared text and the block."""
    guard = rules().output_guard()
    for i, piece in enumerate(pieces):
        guard.feed(piece, final=i == len(pieces) - 1)
    return guard.text[:guard.cleared], guard.blocked_at


def test_output_match_split_across_pieces_is_blocked_and_never_cleared():
    guard = rules().output_guard()
    cleared = []
    for piece in ["the ", "se", "cr", "et", " is"]:
        guard.feed(piece)
        cleared.append(guard.text[:guard.cleared])
    # "se" and "secr" could still become "secret": held back; "secret" then blocks.
    assert cleared == ["the ", "the ", "the ", "the ", "the "]
    assert guard.blocked_at == 4


def test_a_prefix_that_grows_into_a_longer_word_is_released():
    assert feed_all(["my secr", "etary", " works"]) == ("my secretary works", None)


def test_a_word_at_the_very_end_is_held_until_the_end_settles_it():
    guard = rules().output_guard()
    guard.feed("a secret")
    assert (guard.text[:guard.cleared], guard.blocked_at) == ("a ", None)
    guard.feed("", final=True)
    assert guard.blocked_at == 2


def test_regex_partial_match_is_held_then_blocked():
    assert feed_all(["key: sk-", "abc", "123", " ok"]) == ("key: ", 5)
    assert feed_all(["key: sk-", "ab!", " ok"]) == ("key: sk-ab! ok", None)


def test_multi_word_phrase_across_pieces():
    assert feed_all(["the launch", " codes", "!"]) == ("the ", 4)
    assert feed_all(["the launch", " pad", "!"]) == ("the launch pad!", None)


def test_clean_text_is_cleared_as_it_comes():
    guard = rules().output_guard()
    guard.feed("hello ")
    assert guard.cleared == len("hello ")


def test_hook_extends_rules_and_can_hold():
    def hook(direction, text, final):
        if direction == "output" and "bo" in text and not final:
            start = text.index("bo")
            if text[start:].startswith("bomb"):
                return Verdict(blocked_at=start)
            if "bomb".startswith(text[start:]):
                return Verdict(hold_from=start)
        return None

    f = ContentFilter(parse_rules(RULES, "rules.yaml"), hook)
    guard = f.output_guard()
    guard.feed("a bo")
    assert guard.text[:guard.cleared] == "a "
    guard.feed("mb")
    assert guard.blocked_at == 2
    assert f.prompt_blocked("forbidden")  # the rules still apply


def test_hook_alone_replaces_rules(monkeypatch):
    module = types.ModuleType("filter_hook_for_test")
    module.check = lambda direction, text, final: (
        Verdict(blocked_at=0) if direction == "prompt" and "xyz" in text else None)
    monkeypatch.setitem(sys.modules, "filter_hook_for_test", module)
    f = load_filter(None, "filter_hook_for_test:check")
    assert f.prompt_blocked("say xyz")
    assert not f.prompt_blocked("a forbidden word")  # no rules file: only the hook


@pytest.mark.parametrize("document, message", [
    ("prompt: {words: [ok], regexes: [x]}", "unknown fields"),
    ("prompt: {regex: ['(']}", "not a valid regex"),
    ("output: {regex: ['a*']}", "matches empty text"),
    ("prompt: {words: ['']}", "non-empty strings"),
    ("inputs: {words: [a]}", "'prompt' and/or 'output'"),
    ("prompt: [a]", "must be a mapping"),
])
def test_bad_rules_fail_with_a_clear_message(document, message):
    with pytest.raises(ValueError, match=message):
        parse_rules(document, "rules.yaml")


def test_bad_hook_fails_with_a_clear_message():
    with pytest.raises(ValueError, match="module:function"):
        load_filter(None, "nocolon")
    with pytest.raises(ValueError, match="cannot import"):
        load_filter(None, "no_such_module_anywhere:check")
