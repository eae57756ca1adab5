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


PRODUCTION_FLAGS = ("MAX_CONCURRENT_REQUESTS", "API_KEYS_FILE", "API_KEYS", "CONTENT_FILTER",
                    "CONTENT_FILTER_HOOK", "RATE_LIMIT_REDIS_URL", "REQUESTS_PER_MINUTE",
                    "TOKENS_PER_MINUTE", "OTLP_ENDPOINT", "OTLP_PROTOCOL", "REQUEST_TIMEOUT",
                    "SHUTDOWN_GRACE", "LOG_FORMAT", "LOG_PROMPTS")


@pytest.mark.parametrize("command", ["router", "serve"])
def test_production_flags_are_in_help_with_their_environment_variables(command, capsys):
    from sluice import serve

    with pytest.raises(SystemExit) as exited:
        (router_config.parse if command == "router" else serve.parse)(["--help"], {})
    assert exited.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for env in PRODUCTION_FLAGS + (("METRICS_PORT",) if command == "serve" else ()):
        assert f"[env: {env}]" in help_text, env


def test_production_settings_come_from_the_environment(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys: {sk-1: {tenant: a, tokens_per_minute: 50}}")
    rules = tmp_path / "filter.yaml"
    rules.write_text("prompt: {words: [nope]}")
    config = router_config.parse([], {
        "SHARD_URI": "a:1", "API_KEYS_FILE": str(keys), "CONTENT_FILTER": str(rules),
        "RATE_LIMIT_REDIS_URL": "redis://r:6379/0", "REQUEST_TIMEOUT": "30",
        "SHUTDOWN_GRACE": "5", "REQUESTS_PER_MINUTE": "9", "LOG_PROMPTS": "true",
        "OTLP_ENDPOINT": "http://collector:4317"})
    assert config.keys.tenant("Bearer sk-1").requests_per_minute == 9  # the default limit
    assert config.keys.tenant("Bearer sk-1").tokens_per_minute == 50
    assert config.content_filter.prompt_blocked("nope")
    assert config.rate_limit_redis_url == "redis://r:6379/0"
    assert (config.request_timeout_s, config.shutdown_grace_s) == (30.0, 5.0)
    assert config.log_prompts
    assert config.tracing.enabled and config.tracing.endpoint == "http://collector:4317"
    assert config.tracing.protocol == "grpc" and config.tracing.service_name == "sluice-router"


def test_standard_otel_variables_turn_tracing_on():
    config = shard_config.parse([], {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                     "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                                     "OTEL_SERVICE_NAME": "llama-shard"})
    assert config.tracing.enabled and config.tracing.endpoint is None  # the SDK reads it
    assert (config.tracing.protocol, config.tracing.service_name) == ("http/protobuf",
                                                                      "llama-shard")
    assert not shard_config.parse([], {}).tracing.enabled


@pytest.mark.parametrize("env, message", [
    ({"API_KEYS_FILE": "/no/such/keys.yaml"}, "No such file"),
    ({"API_KEYS": "keys: {}"}, "non-empty mapping"),
    ({"API_KEYS": "keys: {k: {tenant: a}}", "API_KEYS_FILE": "/x"}, "not both"),
    ({"CONTENT_FILTER_HOOK": "nocolon"}, "module:function"),
    ({"REQUEST_TIMEOUT": "-1"}, "must not be negative"),
])
def test_bad_production_settings_fail_at_start_with_a_clear_message(env, message, capsys):
    with pytest.raises(SystemExit):
        router_config.parse([], {"SHARD_URI": "a:1", **env})
    assert message in capsys.readouterr().err
