"""Bad input gets a clear error with the right status and body, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

GOOD_TGI = {"inputs": "hello", "parameters": {"max_new_tokens": 3}}
GOOD_CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "ignore_eos": True}

TGI_CASES = [
    # (description, body, status, field the message must name)
    ("wrong type", {"inputs": 5}, 422, "inputs"),
    ("missing inputs", {"parameters": {}}, 422, "inputs"),
    ("empty prompt", {"inputs": ""}, 422, "prompt"),
    ("max_new_tokens zero", {"inputs": "hi", "parameters": {"max_new_tokens": 0}}, 422,
     "max_new_tokens"),
    ("max_new_tokens negative", {"inputs": "hi", "parameters": {"max_new_tokens": -4}}, 422,
     "max_new_tokens"),
    ("max_new_tokens a string", {"inputs": "hi", "parameters": {"max_new_tokens": "3"}}, 422,
     "max_new_tokens"),
    ("max_new_tokens over the limit", {"inputs": "hi", "parameters": {"max_new_tokens": 10**6}},
     422, "max_new_tokens"),
    ("prompt over max_input_tokens", {"inputs": "x" * 5000}, 422, "prompt"),
    ("negative temperature", {"inputs": "hi", "parameters": {"temperature": -0.5}}, 422,
     "temperature"),
    ("top_p zero", {"inputs": "hi", "parameters": {"top_p": 0.0}}, 422, "top_p"),
    ("top_p above one", {"inputs": "hi", "parameters": {"top_p": 1.5}}, 422, "top_p"),
    ("too many stop sequences", {"inputs": "hi", "parameters": {"stop": list("abcdefg")}}, 422,
     "stop"),
]

CHAT_CASES = [
    ("messages not a list", {"messages": "hello"}, 422, "messages"),
    ("no messages", {"messages": []}, 422, "messages"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 422, "role"),
    ("max_tokens zero", GOOD_CHAT | {"max_tokens": 0}, 422, "max_tokens"),
    ("max_tokens over the limit", GOOD_CHAT | {"max_tokens": 10**6}, 422, "max_new_tokens"),
    ("negative temperature", GOOD_CHAT | {"temperature": -1}, 422, "temperature"),
    ("top_p zero", GOOD_CHAT | {"top_p": 0}, 422, "top_p"),
    ("top_p above one", GOOD_CHAT | {"top_p": 2}, 422, "top_p"),
    ("n above max_client_batch_size", GOOD_CHAT | {"n": 5}, 422, "n"),
    ("n zero", GOOD_CHAT | {"n": 0}, 422, "n"),
]

# TGI parameters Sluice refuses, or accepts only in some combinations, as TGI does.
TGI_REFUSED = [
    ("watermark", {"watermark": True}, "/generate", "watermark"),
    ("adapter_id", {"adapter_id": "my-lora"}, "/generate", "adapter_id"),
    ("grammar", {"grammar": {"type": "json", "value": {}}}, "/generate", "grammar"),
    ("best_of above max_best_of", {"best_of": 3, "do_sample": True}, "/generate", "best_of"),
    ("best_of without sampling", {"best_of": 2}, "/generate", "best_of"),
    ("best_of with a seed", {"best_of": 2, "do_sample": True, "seed": 1}, "/generate", "seed"),
    ("best_of when streaming", {"best_of": 2, "do_sample": True}, "/generate_stream",
     "best_of"),
    ("decoder_input_details when streaming", {"decoder_input_details": True},
     "/generate_stream", "decoder_input_details"),
]


def _assert_still_serves(url: str) -> None:
    answer = httpx.post(f"{url}/generate", json=GOOD_TGI, timeout=60)
    assert answer.status_code == 200, answer.text
    assert isinstance(answer.json()["generated_text"], str)
    answer = httpx.post(f"{url}/v1/chat/completions", json=GOOD_CHAT, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/"])
@pytest.mark.parametrize("case", TGI_CASES, ids=[c[0] for c in TGI_CASES])
def test_tgi_route_rejects_bad_input_then_serves(tiny_stack, route, case):
    _, router = tiny_stack
    _, body, status, field = case
    answer = httpx.post(f"{router.url}{route}", json=body, timeout=60)
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert set(error) == {"error", "error_type"}
    assert error["error_type"] == "validation"
    assert field in error["error"]
    _assert_still_serves(router.url)


@pytest.mark.parametrize("case", TGI_REFUSED, ids=[c[0] for c in TGI_REFUSED])
def test_tgi_parameters_refused_in_some_combinations_get_a_clear_422(tiny_stack, case):
    _, router = tiny_stack
    _, parameters, route, field = case
    answer = httpx.post(f"{router.url}{route}", timeout=60,
                        json={"inputs": "hi", "parameters": {"max_new_tokens": 2} | parameters})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error_type"] == "validation"
    assert field in answer.json()["error"]
    _assert_still_serves(router.url)


@pytest.mark.parametrize("case", CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_chat_route_rejects_bad_input_in_openai_shape_then_serves(tiny_stack, case):
    _, router = tiny_stack
    _, body, status, field = case
    answer = httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "validation"
    assert field in error["message"]
    _assert_still_serves(router.url)


@pytest.mark.parametrize("route", ["/generate", "/v1/chat/completions", "/v1/completions"])
def test_unparsable_json_is_400_then_serves(tiny_stack, route):
    _, router = tiny_stack
    answer = httpx.post(f"{router.url}{route}", content=b'{"inputs": "hi",',
                        headers={"content-type": "application/json"}, timeout=60)
    assert answer.status_code == 400
    body = answer.json()
    if route.startswith("/v1"):
        assert body["error"]["code"] == "validation"
        assert "JSON" in body["error"]["message"]
    else:
        assert body["error_type"] == "validation"
        assert "JSON" in body["error"]
    _assert_still_serves(router.url)


def test_completion_route_rejects_bad_input_then_serves(tiny_stack):
    _, router = tiny_stack
    for body, field in [({"prompt": 3}, "prompt"), ({"prompt": "hi", "max_tokens": -1},
                                                     "max_tokens"),
                        ({"prompt": ""}, "prompt"), ({"prompt": "hi", "top_p": 0}, "top_p"),
                        ({"prompt": []}, "prompt"), ({"prompt": [5, -1]}, "prompt"),
                        ({"prompt": [5, 10**6]}, "vocabulary"),
                        ({"prompt": ["a", "b", "c"], "n": 2}, "max_client_batch_size"),
                        ({"prompt": [[5], ["x"]]}, "prompt")]:
        answer = httpx.post(f"{router.url}/v1/completions", json=body, timeout=60)
        assert answer.status_code == 422, answer.text
        assert field in answer.json()["error"]["message"]
    _assert_still_serves(router.url)


def test_unknown_route_is_404_json(tiny_stack):
    _, router = tiny_stack
    answer = httpx.get(f"{router.url}/nope")
    assert answer.status_code == 404
    assert answer.json()["error_type"] == "http"
