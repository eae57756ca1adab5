"""API keys: the keys file names tenants and limits; unknown or missing keys are refused."""

from __future__ import annotations

import pytest

from router.auth import Tenant, parse_keys
from router.errors import Unauthorized

KEYS = """
keys:
  sk-alpha-1: {tenant: alpha, requests_per_minute: 10, tokens_per_minute: 1000}
  sk-alpha-2: {tenant: alpha, requests_per_minute: 10, tokens_per_minute: 1000}
  sk-beta: {tenant: beta}
"""


def test_each_key_names_its_tenant_and_limits_default_to_the_flags():
    keys = parse_keys(KEYS, "keys.yaml", default_rpm=5, default_tpm=0)
    assert keys.tenant("Bearer sk-alpha-1") == Tenant("alpha", 10, 1000)
    assert keys.tenant("bearer  sk-alpha-2 ") == Tenant("alpha", 10, 1000)
    assert keys.tenant("Bearer sk-beta") == Tenant("beta", 5, 0)


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic sk-beta",
                                    "Bearer sk-gamma", "sk-beta"])
def test_missing_or_unknown_keys_are_unauthorized(header):
    keys = parse_keys(KEYS, "keys.yaml", 0, 0)
    with pytest.raises(Unauthorized) as caught:
        keys.tenant(header)
    assert caught.value.status == 401
    assert caught.value.headers == {"WWW-Authenticate": "Bearer"}


@pytest.mark.parametrize("document, message", [
    ("keys: {}", "non-empty mapping"),
    ("not yaml: [", "not valid YAML"),
    ("keys: {k: alpha}", "'tenant' name"),
    ("keys: {k: {tenant: a, requests_per_minute: -1}}", "whole number"),
    ("keys: {k: {tenant: a, rpm: 3}}", "unknown fields"),
    ("keys: {k1: {tenant: a, tokens_per_minute: 1}, k2: {tenant: a, tokens_per_minute: 2}}",
     "different limits"),
])
def test_bad_keys_files_fail_at_start_with_a_clear_message(document, message):
    with pytest.raises(ValueError, match=message):
        parse_keys(document, "keys.yaml", 0, 0)


def test_errors_never_show_a_key():
    with pytest.raises(ValueError) as caught:
        parse_keys("keys: {sk-very-secret: {tenant: a, rpm: 3}}", "keys.yaml", 0, 0)
    assert "sk-very-secret" not in str(caught.value)
