"""The content filter on real processes: prompts refused, outputs cut before a match."""

from __future__ import annotations

import json

import httpx
import pytest
import regex

from conftest import start_router, start_shard, wait_for_free_budget

PROMPT = "abc"
GREEDY = {"inputs": PROMPT, "parameters": {"max_new_tokens": 40, "details": True}}
HOOK = '''
from router.content_filter import Verdict

def check(direction, text, final):
    if direction == "prompt":
        return Verdict(blocked_at=0) if "xyzzy" in text else None
    # Everything from the 6th character on is withheld: held until 8 characters exist.
    if len(text) >= 8:
        return Verdict(blocked_at=5)
    return Verdict(hold_from=5) if len(text) > 5 and not final else None
'''


@pytest.fixture(scope="module")
def shard(tiny_model):
    shard = start_shard(str(tiny_model), "--max-batch-total-tokens", "128")
    yield shard
    shard.stop()


@pytest.fixture(scope="module")
def greedy_text(shard) -> str:
    """What the tiny model says to PROMPT, greedily, with no filter in the way."""
    router = start_router(shard)
    try:
        answer = httpx.post(f"{router.url}/generate", json=GREEDY, timeout=60).json()
    finally:
        router.stop()
    assert answer["details"]["generated_tokens"] == 40
    return answer["generated_text"]


@pytest.fixture(scope="module")
def blocked(greedy_text):
    """A regex for three characters in the middle of the greedy text (each character is at
    least one token of the byte-level tokenizer: the match is split across tokens), and where
    its first match starts."""
    for k in range(4, len(greedy_text) - 3):
        pattern = regex.escape(greedy_text[k:k + 3])
        start = regex.search(pattern, greedy_text, regex.IGNORECASE).start()
        if start >= 4:
            return pattern, start
    pytest.fail(f"no usable substring in {greedy_text!r}")


@pytest.fixture(scope="module")
def filtered_router(shard, blocked, tmp_path_factory):
    rules = tmp_path_factory.mktemp("filter") / "filter.yaml"
    rules.write_text(json.dumps({"prompt": {"words": ["forbidden"], "regex": [r"\d{3}-\d{4}"]},
                                 "output": {"regex": [blocked[0]]}}))  # JSON is YAML
    router = start_router(shard, flags=("--content-filter", str(rules)))
    yield router
    router.stop()


def test_prompt_matches_get_422_in_each_apis_shape(filtered_router):
    answer = httpx.post(f"{filtered_router.url}/generate",
                        json={"inputs": "a FORBIDDEN word", "parameters": {"max_new_tokens": 2}})
    assert answer.status_code == 422
    assert answer.json() == {"error": "the prompt was rejected by the content filter",
                             "error_type": "content_filter"}
    answer = httpx.post(f"{filtered_router.url}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "call 555-1234"}], "max_tokens": 2})
    assert answer.status_code == 422
    assert answer.json() == {"error": {"message": "the prompt was rejected by the content filter",
                                       "type": "invalid_request_error", "param": "messages",
                                       "code": "content_filter"}}
    # A word inside a longer word is no match.
    answer = httpx.post(f"{filtered_router.url}/generate",
                        json={"inputs": "unforbiddenly", "parameters": {"max_new_tokens": 2}})
    assert answer.status_code == 200


def test_output_stops_before_a_match_split_across_tokens(shard, filtered_router, greedy_text,
                                                         blocked):
    _, start = blocked
    answer = httpx.post(f"{filtered_router.url}/generate", json=GREEDY, timeout=60).json()
    assert answer["generated_text"] == greedy_text[:start]
    assert answer["details"]["finish_reason"] == "content_filter"
    # The sequence was cancelled on the shard: its budget is back.
    assert wait_for_free_budget(shard, 128) == 128


def test_streamed_output_never_sends_the_matched_text(shard, filtered_router, greedy_text,
                                                      blocked):
    _, start = blocked
    with httpx.stream("POST", f"{filtered_router.url}/generate_stream", json=GREEDY,
                      timeout=60) as answer:
        events = [json.loads(line[5:]) for line in answer.iter_lines()
                  if line.startswith("data:")]
    text = "".join(e["token"]["text"] for e in events)
    assert text == greedy_text[:start]
    last = events[-1]
    assert last["details"]["finish_reason"] == "content_filter"
    assert last["generated_text"] == greedy_text[:start]
    assert last["token"]["id"] == -1  # the token that completed the match is withheld too
    assert all(e["details"] is None for e in events[:-1])
    assert wait_for_free_budget(shard, 128) == 128


def test_openai_finish_reason_is_content_filter(filtered_router, greedy_text, blocked):
    _, start = blocked
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    answer = httpx.post(f"{filtered_router.url}/v1/completions", json=body, timeout=60).json()
    assert answer["choices"][0]["finish_reason"] == "content_filter"
    assert answer["choices"][0]["text"] == greedy_text[:start]
    with httpx.stream("POST", f"{filtered_router.url}/v1/completions",
                      json=body | {"stream": True}, timeout=60) as streamed:
        chunks = [json.loads(line[5:]) for line in streamed.iter_lines()
                  if line.startswith("data:") and line != "data: [DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy_text[:start]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "content_filter"
    metrics = httpx.get(f"{filtered_router.url}/metrics").text
    assert 'sluice_router_content_filtered_total{direction="prompt"} 2.0' in metrics
    assert 'sluice_router_content_filtered_total{direction="output"} 4.0' in metrics


def test_a_python_hook_replaces_the_rules(shard, greedy_text, tmp_path):
    (tmp_path / "filter_hook.py").write_text(HOOK)
    router = start_router(shard, flags=("--content-filter-hook", "filter_hook:check"),
                          env={"PYTHONPATH": str(tmp_path)})
    try:
        refused = httpx.post(f"{router.url}/generate", json={"inputs": "say xyzzy"})
        assert refused.status_code == 422
        assert refused.json()["error_type"] == "content_filter"
        answer = httpx.post(f"{router.url}/generate", json=GREEDY, timeout=60).json()
        assert answer["generated_text"] == greedy_text[:5]
        assert answer["details"]["finish_reason"] == "content_filter"
    finally:
        router.stop()
