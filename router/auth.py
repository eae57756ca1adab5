"""API keys: each names a tenant with its own rate limits.

The keys file (a Kubernetes Secret, mounted or given as an environment variable) is YAML:
`keys: {<key>: {tenant: <name>, requests_per_minute: <n>, tokens_per_minute: <n>}}`. Several
keys may name one tenant (say, while rotating a key); they share its limits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from router.errors import Unauthorized


@dataclass(slots=True, frozen=True)
class Tenant:
    name: str
    requests_per_minute: int  # 0: no limit
    tokens_per_minute: int


def _digest(key: str) -> bytes:
    # Keys are held and looked up by digest: no plain key in memory dumps, no timing leak
    # from comparing strings.
    return hashlib.sha256(key.encode()).digest()


class Keys:
    def __init__(self, tenants_by_key: dict[str, Tenant]):
        self._tenants = {_digest(k): t for k, t in tenants_by_key.items()}

    def __len__(self) -> int:
        return len(self._tenants)

    def tenant(self, authorization: str | None) -> Tenant:
        """The tenant of an `Authorization: Bearer KEY` header; Unauthorized otherwise."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'",
                               headers={"WWW-Authenticate": "Bearer"})
        tenant = self._tenants.get(_digest(key.strip()))
        if tenant is None:
            raise Unauthorized("the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
        return tenant


def _limit(entry: dict, field: str, default: int, where: str) -> int:
    value = entry.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: {field} must be a whole number >= 0, not {value!r}")
    return value


def parse_keys(document: str, where: str, default_rpm: int, default_tpm: int) -> Keys:
    """Keys from the YAML text of a keys file; ValueError says what is wrong and where."""
    try:
        data = yaml.safe_load(document)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys"), dict) or not data["keys"]:
        raise ValueError(f"{where} must hold a non-empty mapping "
                         f"'keys: {{<key>: {{tenant: ...}}}}'")
    tenants: dict[str, Tenant] = {}
    by_name: dict[str, Tenant] = {}
    for key, entry in data["keys"].items():
        named = entry.get("tenant") if isinstance(entry, dict) else "?"
        place = f"{where}: a key of tenant {named}"
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"{where}: every key must be a non-empty string")
        if not isinstance(entry, dict) or not isinstance(entry.get("tenant"), str):
            raise ValueError(f"{where}: every key needs a mapping with a 'tenant' name")
        unknown = set(entry) - {"tenant", "requests_per_minute", "tokens_per_minute"}
        if unknown:
            raise ValueError(f"{place}: unknown fields {sorted(unknown)}")
        tenant = Tenant(entry["tenant"], _limit(entry, "requests_per_minute", default_rpm, place),
                        _limit(entry, "tokens_per_minute", default_tpm, place))
        if by_name.setdefault(tenant.name, tenant) != tenant:
            raise ValueError(f"{where}: the keys of tenant {tenant.name} give different limits")
        tenants[key.strip()] = tenant
    return Keys(tenants)


def load_keys(path: str | None, inline: str | None, default_rpm: int,
              default_tpm: int) -> Keys | None:
    """The keys of --api-keys-file or --api-keys; None when neither is given (no auth)."""
    if path:
        return parse_keys(Path(path).read_text(), path, default_rpm, default_tpm)
    if inline:
        return parse_keys(inline, "--api-keys", default_rpm, default_tpm)
    return None
