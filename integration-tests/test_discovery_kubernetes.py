"""--shard-service: a router finds shard groups as the ready endpoints of a Service's
EndpointSlices, listed and watched through the real `kubernetes` client (kubeconfig), against a
local test double of the API server. Endpoints added are used, removed or not-ready ones are
dropped, an unset ready condition counts as ready, as the API says."""

from __future__ import annotations


import httpx
import pytest

from conftest import Service, sluice, start_shard, wait_until
from kube_api import FakeKubeAPI, endpoint_slice

NAMESPACE, SERVICE = "serving", "sluice-shard"


@pytest.fixture(scope="module")
def shards(tiny_model):
    shards = [start_shard(str(tiny_model)) for _ in range(2)]
    yield shards
    for shard in shards:
        shard.stop()


@pytest.fixture(scope="module")
def api():
    api = FakeKubeAPI(NAMESPACE)
    yield api
    api.stop()


def port(shard: Service) -> int:
    return int(shard.address.rsplit(":", 1)[1])


def groups(router: Service) -> dict[str, str]:
    answer = httpx.get(f"{router.url}/info", timeout=10)
    if answer.status_code != 200:  # no group is ready: /info has no model to describe
        return {}
    return {g["uri"]: g["state"] for g in answer.json()["shard_groups"]}


def wait_groups(router: Service, expected: dict[str, str], timeout_s: float = 15) -> None:
    wait_until(lambda: groups(router) == expected, f"the router's groups {expected}", timeout_s,
               report=lambda: groups(router))


def generate_ok(router: Service) -> bool:
    answer = httpx.post(f"{router.url}/generate",
                        json={"inputs": "abc", "parameters": {"max_new_tokens": 3}}, timeout=60)
    return answer.status_code == 200


def test_endpointslices_added_removed_and_not_ready(shards, api, tmp_path):
    first, second = shards
    # Each slice names its own gRPC port: both groups listen on 127.0.0.1.
    api.put(endpoint_slice("shard-a", SERVICE, port(first), [("127.0.0.1", True)]))
    api.put(endpoint_slice("other-service", "something-else", 1, [("127.0.0.1", True)]))
    router = Service(sluice("router", "--port", "0", "--workers", "1", "--shard-service",
                            SERVICE, "--discovery-interval", "0.5"),
                     env={"KUBECONFIG": str(api.kubeconfig(tmp_path))})
    try:
        wait_groups(router, {first.address: "ready"})
        assert generate_ok(router)
        # The router listed once, then watches from the list's version, in its own namespace.
        assert any("watch=true" in r and f"/namespaces/{NAMESPACE}/" in r for r in api.requests)

        api.put(endpoint_slice("shard-b", SERVICE, port(second), [("127.0.0.1", None)]))
        wait_groups(router, {first.address: "ready", second.address: "ready"})

        api.put(endpoint_slice("shard-b", SERVICE, port(second), [("127.0.0.1", False)]))
        wait_groups(router, {first.address: "ready"})
        assert generate_ok(router)

        api.delete("shard-a")
        wait_groups(router, {})
        assert httpx.get(f"{router.url}/health", timeout=10).status_code == 503

        api.put(endpoint_slice("shard-b", SERVICE, port(second), [("127.0.0.1", True)]))
        wait_groups(router, {second.address: "ready"})
        assert generate_ok(router)
    finally:
        router.stop()
