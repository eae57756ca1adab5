"""Every flag also reads the environment variable of its name; the command line wins."""

from __future__ import annotations

import pytest

from router import config as router_config
from shard import config as shard_config


def test_environment_sets_defaults_and_flags_override_it():
    env = {"MAX_CONCURRENT_REQUESTS": "7", "SHARD_URI": "a:1,b:2", "PORT": "9000"}
    config = router_config.parse([], env)
    assert config.max_concurrent_requests == 7
    assert config.shard_uri == ["a:1", "b:2"]
    assert config.port == 9000
    config = router_config.parse(["--port", "9001", "--shard-uri", "c:3"], env)
    assert config.port == 9001
    assert config.shard_uri == ["c:3"]


def test_shard_flags_read_environment_with_types():
    config = shard_config.parse([], {"MAX_BATCH_TOTAL_TOKENS": "4096", "CPU_KV_CACHE_GIB": "0.5",
                                     "MODEL": "/models/x"})
    assert config.max_batch_total_tokens == 4096
    assert config.cpu_kv_cache_gib == 0.5
    assert config.model == "/models/x"


def test_bad_environment_value_fails_at_start_with_the_variable_named(capsys):
    with pytest.raises(SystemExit):
        shard_config.parse([], {"MAX_BATCH_TOTAL_TOKENS": "lots"})
    assert "max-batch-total-tokens" in capsys.readouterr().err


def test_required_flag_missing_fails_at_start():
    with pytest.raises(SystemExit):
        router_config.parse([], {})


def test_help_names_each_environment_variable(capsys):
    with pytest.raises(SystemExit):
        shard_config.parse(["--help"], {})
    help_text = capsys.readouterr().out
    for env in ("MODEL", "MAX_BATCH_TOTAL_TOKENS", "MAX_BATCH_PREFILL_TOKENS", "BLOCK_SIZE",
                "CUDA_MEMORY_FRACTION", "ATTENTION", "DTYPE"):
        assert f"[env: {env}]" in help_text


def test_router_choice_limits_read_the_environment_and_are_in_help(capsys):
    config = router_config.parse(["--shard-uri", "a:1"], {"MAX_BEST_OF": "3",
                                                          "MAX_CLIENT_BATCH_SIZE": "8"})
    assert (config.max_best_of, config.max_client_batch_size) == (3, 8)
    with pytest.raises(SystemExit):
        router_config.parse(["--shard-uri", "a:1", "--max-best-of", "0"], {})
    with pytest.raises(SystemExit):
        router_config.parse(["--help"], {})
    help_text = capsys.readouterr().out
    assert "[env: MAX_BEST_OF]" in help_text and "[env: MAX_CLIENT_BATCH_SIZE]" in help_text
