"""--load-format dummy: random weights of a bare config, served end to end.

The config has Llama 3's 128k vocabulary, so the stand-in tokenizer travels in a ~15 MB Info
message (over gRPC's 4 MB default) and every sampled id decodes to visible text.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import start_router, start_shard

CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 128256, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def dummy_stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dummy") / "llama-dummy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    shard = start_shard(str(folder), "--load-format", "dummy")
    router = start_router(shard)
    yield router
    router.stop()
    shard.stop()


def test_dummy_weights_serve_and_every_token_streams_text(dummy_stack):
    body = {"prompt": "abcdefgh", "max_tokens": 6, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{dummy_stack.url}/v1/completions", json=body,
                      timeout=60) as answer:
        chunks = [json.loads(line[6:]) for line in answer.iter_lines()
                  if line.startswith("data: {")]
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    usage = chunks[-1]["usage"]
    assert usage == {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14}
    assert len(texts) == 6 and all(texts)


def test_dummy_model_info_reports_its_shape(dummy_stack):
    info = httpx.get(f"{dummy_stack.url}/info").json()
    assert info["model_id"] == "llama-dummy"  # the folder's name
    assert info["model_dtype"] == "float32"
    assert info["max_total_tokens"] == 2048


def test_the_serving_benchmark_counts_every_request_and_token(dummy_stack, tmp_path):
    # benchmarks/serving.py through the real router: one character is one token here.
    script = Path(__file__).parents[1] / "benchmarks" / "serving.py"
    out = tmp_path / "serving.json"
    subprocess.run([sys.executable, str(script), "--base-url", f"{dummy_stack.url}/v1",
                    "--num-prompts", "6", "--max-concurrency", "3", "--input-len", "32",
                    "--output-len", "5", "--json-out", str(out)], check=True, timeout=120)
    result = json.loads(out.read_text())
    assert (result["requests"], result["failed"], result["errors"]) == (6, 0, [])
    assert result["mean_prompt_tokens"] == 32
    assert result["output_tokens"] == 6 * 5
    assert result["inter_token_intervals"] == 6 * 4  # every token after the first, timed
    assert 0 < result["ttft_ms"]["p50"] <= result["e2e_ms"]["p50"]
