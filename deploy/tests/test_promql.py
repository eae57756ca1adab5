"""Every PromQL expression of the chart and the dashboards (panels, variables, alerts, the KEDA
triggers, the Prometheus Adapter rules), evaluated by a real Prometheus that scrapes a real
router and shard group (the tiny model) after load: each parses, names only metrics the code
exports, and returns data.

One Prometheus, one router and one shard serve every check. The scrape jobs attach the labels
that the chart's ServiceMonitor and PodMonitor attach (namespace, app_kubernetes_io_instance),
so that the chart's own selectors are what is tested.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from shard.tests.tiny_model import write_tiny_model
from tests.chart import (CHART, NAMESPACE, RELEASE, dashboards, env_of, pod_spec, render,
                         render_values)
from tests.processes import start_router, start_shard
from tests.prometheus_server import Prometheus

# Grafana's variables, as a user looking at this release would have them.
GRAFANA_VARIABLES = {"$__rate_interval": "2m", "$namespace": NAMESPACE, "$release": RELEASE,
                     "$pod": ".*"}
SELECTOR = f'namespace="{NAMESPACE}",app_kubernetes_io_instance="{RELEASE}"'
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
LOAD_KEY, TINY_KEY = "sk-load", "sk-tiny"
KEYS = (f"keys: {{{LOAD_KEY}: {{tenant: load}}, "
        f"{TINY_KEY}: {{tenant: tiny, requests_per_minute: 1}}}}")
CATCH_UP_TIMEOUT_S = 60


@dataclass(frozen=True, slots=True)
class Expression:
    where: str  # file and item, for failure messages
    expr: str


def _grafana(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def panel_expressions() -> list[Expression]:
    return [Expression(f"{name}: {panel['title']} [{target['refId']}]", _grafana(target["expr"]))
            for name, board in dashboards().items() for panel in board["panels"]
            for target in panel["targets"]]


def variable_queries() -> list[Expression]:
    return [Expression(f"{name}: variable {v['name']}", _grafana(v["query"]["query"]))
            for name, board in dashboards().items() for v in board["templating"]["list"]
            if v["type"] == "query"]


def keda_expressions() -> list[Expression]:
    scaled = render("keda-values.yaml").one("ScaledObject", "-shard")
    return [Expression(f"ScaledObject trigger {t['name']}", t["metadata"]["query"])
            for t in scaled["spec"]["triggers"]]


def adapter_expressions() -> list[Expression]:
    """The adapter's metricsQuery as it would send it: its matchers are the HPA's namespace and
    selector; a custom (per pod) rule groups by pod."""
    config = yaml.safe_load(render("hpa-adapter-values.yaml").one(
        "ConfigMap", "-adapter-rules")["data"]["config.yaml"])
    found = []
    for kind in ("rules", "externalRules"):
        for rule in config[kind]:
            series = re.match(r"[a-z_:]+", rule["seriesQuery"]).group(0)
            expr = (rule["metricsQuery"].replace("<<.Series>>", series)
                    .replace("<<.LabelMatchers>>", SELECTOR).replace("<<.GroupBy>>", "pod"))
            found.append(Expression(f"adapter {kind} {rule['name']['as']}", expr))
    return found


def alert_rules() -> list[dict]:
    rule = render("keda-values.yaml").one("PrometheusRule", "sluice")
    return rule["spec"]["groups"][0]["rules"]


def operands(expr: str) -> list[str]:
    """The sides of an alert: split at top-level and/or/unless, each without its threshold."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(expr):
        char = expr[i]
        depth += char in "([{"
        depth -= char in ")]}"
        word = re.match(r" (and|or|unless) ", expr[i:])
        if depth == 0 and word:
            parts.append(expr[start:i])
            i = start = i + len(word.group(0))
            continue
        i += 1
    parts.append(expr[start:])
    # A threshold is the last top-level comparison with a number.
    return [re.sub(r"\s*(>|<|==|!=|>=|<=)\s*[0-9.e+-]+\s*$", "", p).strip() for p in parts]


def chart_expressions() -> list[Expression]:
    found = keda_expressions() + adapter_expressions()
    for rule in alert_rules():
        found += [Expression(f"alert {rule['alert']} operand {i}", side)
                  for i, side in enumerate(operands(rule["expr"]))]
    return found


def scrape(url: str) -> list:
    return list(text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text))


def sample_sum(families: list, name: str, **labels: str) -> float:
    return sum(s.value for f in families for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def exported_series(urls: list[str]) -> set[str]:
    """Every series name the processes export, as PromQL names them."""
    names = set()
    for url in urls:
        for family in scrape(url):
            kind = family.type if family.type in SUFFIXES else "gauge"
            names |= {family.name + suffix for suffix in SUFFIXES[kind]}
    return names


def load(router_url: str) -> None:
    """Requests of every kind the dashboards show: answers, streams, chats, refusals."""
    auth = {"Authorization": f"Bearer {LOAD_KEY}"}
    body = {"inputs": "the quick brown fox", "parameters": {"max_new_tokens": 8}}
    chat = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8,
            "temperature": 0, "ignore_eos": True}

    def generate(i: int) -> int:
        with httpx.Client(base_url=router_url, headers=auth, timeout=60) as client:
            if i % 3 == 0:
                with client.stream("POST", "/generate_stream", json=body) as answer:
                    events = [line for line in answer.iter_lines() if line.startswith("data:")]
                    assert len(events) == 8
                    return answer.status_code
            if i % 3 == 1:
                return client.post("/v1/chat/completions", json=chat).status_code
            return client.post("/generate", json=body).status_code

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(generate, range(24))) == {200}
    with httpx.Client(base_url=router_url, timeout=60) as client:
        assert client.post("/generate", json={"inputs": ""}, headers=auth).status_code == 422
        assert client.post("/generate", json=body).status_code == 401
        filtered = {"inputs": "a forbidden word", "parameters": {"max_new_tokens": 4}}
        assert client.post("/generate", json=filtered, headers=auth).status_code == 422
        tiny = {"Authorization": f"Bearer {TINY_KEY}"}
        # One request a minute: the second (and any in a later round) is refused.
        client.post("/generate", json=body, headers=tiny)
        assert client.post("/generate", json=body, headers=tiny).status_code == 429
        # A client that leaves mid-stream: its generation ends as `cancelled`.
        long = {"inputs": "the quick brown fox", "parameters": {"max_new_tokens": 400}}
        with client.stream("POST", "/generate_stream", json=long, headers=auth) as answer:
            next(line for line in answer.iter_lines() if line.startswith("data:"))


@dataclass(frozen=True, slots=True)
class Stack:
    router_url: str
    shard_metrics_url: str
    prometheus: Prometheus
    evaluated_at: float  # Prometheus has scraped everything the load did by then


# The counters whose values Prometheus must hold, as each process reports them, before the
# checks run: the router's and the shard's (each is scraped on its own, and may fall behind).
CAUGHT_UP = {"router": ("sluice_router_requests_total", "sluice_router_generations_total"),
             "shard": ("sluice_shard_step_duration_seconds_count",
                       "sluice_shard_decode_tokens_total")}


def _caught_up(prometheus: Prometheus, urls: dict[str, str]) -> bool:
    """Whether Prometheus's last sample of every CAUGHT_UP counter equals what its process says
    now, and each has two samples in the dashboards' 2m window (a rate needs two)."""
    for job, url in urls.items():
        direct = scrape(url)
        for name in CAUGHT_UP[job]:
            series = f"{name}{{{SELECTOR}}}"
            if not prometheus.query(f"sum({series}) == {sample_sum(direct, name)} and "
                                    f"min(count_over_time({series}[2m])) > 1"):
                return False
    return True


def _wait_until_scraped(urls: dict[str, str], prometheus: Prometheus, rounds: int) -> float:
    """Once the router has counted `rounds` cancelled streams and Prometheus holds the router's
    and the shard's counts (urls: job -> metrics URL)."""
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
    while time.monotonic() < deadline:
        cancelled = sample_sum(scrape(urls["router"]), "sluice_router_generations_total",
                               reason="cancelled")
        if cancelled >= rounds and _caught_up(prometheus, urls):
            return time.time()
        time.sleep(0.5)
    up = prometheus.query("up")
    raise AssertionError(f"Prometheus did not catch up with the counters; up: {up}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("promql")
    model = write_tiny_model(folder / "llama")
    rules = folder / "sluice-rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": render("keda-values.yaml").one(
        "PrometheusRule", "sluice")["spec"]["groups"]}))
    content_filter = folder / "filter.yaml"
    content_filter.write_text("prompt: {words: [forbidden]}\n")
    shard = start_shard(str(model), "--metrics-port", "0")
    router = start_router(shard, flags=("--api-keys", KEYS, "--content-filter",
                                        str(content_filter)))
    release = {"namespace": NAMESPACE, "app_kubernetes_io_instance": RELEASE}
    prometheus = Prometheus(folder, {
        "router": (router.address, release | {"app_kubernetes_io_component": "router",
                                              "pod": f"{RELEASE}-sluice-router-0"}),
        "shard": (shard.ready["metrics_address"], release | {"app_kubernetes_io_component": "shard",
                                                             "pod": f"{RELEASE}-sluice-shard-0"}),
    }, rule_files=(str(rules),))
    urls = {"router": router.url, "shard": f"http://{shard.ready['metrics_address']}"}
    try:
        # Twice: the first round creates every labelled series, the second moves them, so that
        # each rate window holds an increase, not a lone first sample.
        for rounds in (1, 2):
            load(router.url)
            evaluated_at = _wait_until_scraped(urls, prometheus, rounds)
        yield Stack(router.url, urls["shard"], prometheus, evaluated_at)
    finally:
        prometheus.stop()
        router.stop()
        shard.stop()


def test_every_query_names_only_metrics_the_code_exports(stack):
    series = exported_series([stack.router_url, stack.shard_metrics_url])
    alerts = [Expression(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    everything = panel_expressions() + variable_queries() + chart_expressions() + alerts
    assert len(everything) > 40
    for expression in everything:
        names = set(re.findall(r"\bsluice_[a-z0-9_]+", expression.expr))
        assert names, expression
        assert names <= series, (expression.where, names - series)


@pytest.mark.parametrize("expression", panel_expressions() + chart_expressions(),
                         ids=lambda e: e.where)
def test_query_parses_and_returns_data(stack, expression):
    result = stack.prometheus.query(expression.expr, at=stack.evaluated_at)
    assert result, f"{expression.where}: no data for {expression.expr}"


@pytest.mark.parametrize("expression", variable_queries(), ids=lambda e: e.where)
def test_dashboard_variable_finds_this_release(stack, expression):
    selector, label = re.fullmatch(r"label_values\((.*), (\w+)\)", expression.expr).groups()
    found = stack.prometheus.query(selector, at=stack.evaluated_at)
    values = {r["metric"].get(label) for r in found}
    assert values & {NAMESPACE, RELEASE, f"{RELEASE}-sluice-shard-0"}, (expression.where, values)


def test_alert_expressions_parse_and_prometheus_loads_every_rule(stack):
    for rule in alert_rules():
        stack.prometheus.query(rule["expr"], at=stack.evaluated_at)  # raises on a bad expression
    loaded = {r["name"]: r for r in stack.prometheus.rules()}
    assert set(loaded) == {r["alert"] for r in alert_rules()}
    assert {r["health"] for r in loaded.values()} == {"ok"}, loaded


def test_healthy_serving_fires_no_alert(stack):
    firing = stack.prometheus.query("ALERTS", at=stack.evaluated_at)
    assert firing == [], firing


def test_operands_split_an_alert_into_its_queries():
    assert operands('(a + (b or c)) > 16 and deriv((x)[10m:1m]) > 0') == [
        "(a + (b or c))", "deriv((x)[10m:1m])"]
    assert operands('1 - sum(rate(x{s!~"5.."}[5m])) / sum(rate(x[5m])) > 0.05') == [
        '1 - sum(rate(x{s!~"5.."}[5m])) / sum(rate(x[5m]))']


def test_kv_budget_usage_ratio_is_reserved_over_total_while_a_request_runs(stack):
    body = {"inputs": "the quick brown fox", "parameters": {"max_new_tokens": 600}}
    seen = []

    def watch() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not seen:
            families = scrape(stack.shard_metrics_url)
            used = sample_sum(families, "sluice_shard_kv_budget_used_tokens")
            if used:
                total = sample_sum(families, "sluice_shard_kv_budget_total_tokens")
                ratio = sample_sum(families, "sluice_shard_kv_budget_usage_ratio")
                seen.append((ratio, used, total))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    headers = {"Authorization": f"Bearer {LOAD_KEY}"}
    assert httpx.post(f"{stack.router_url}/generate", json=body, headers=headers,
                      timeout=120).status_code == 200
    watcher.join()
    assert seen, "the request's reservation was never seen"
    ratio, used, total = seen[0]
    assert 0 < ratio <= 1 and ratio == pytest.approx(used / total, rel=1e-12)
    idle = scrape(stack.shard_metrics_url)
    assert sample_sum(idle, "sluice_shard_kv_budget_usage_ratio") == 0


def test_every_allowed_ttft_slo_bound_is_a_bucket_the_router_exports(stack):
    """The SLO alerts read one histogram bucket by its `le` label, which must be written exactly
    as prometheus_client writes it (2.5, but 1.0 and 10.0)."""
    buckets = {s.labels["le"] for f in scrape(stack.router_url) for s in f.samples
               if s.name == "sluice_router_time_to_first_token_seconds_bucket"}
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = schema["properties"]["monitoring"]["properties"]["prometheusRule"]["properties"][
        "ttftSlo"]["properties"]["thresholdSeconds"]["enum"]
    for bound in allowed:
        values = {"monitoring": {"prometheusRule": {"enabled": True,
                                                    "ttftSlo": {"thresholdSeconds": bound}}}}
        rules = render_values(values).one("PrometheusRule", "sluice")["spec"]["groups"][0]["rules"]
        burn = next(r["expr"] for r in rules if r["alert"] == "SluiceTTFTSLOFastBurn")
        assert re.search(r'le="([^"]+)"', burn).group(1) in buckets, (bound, buckets)


def _wait_for(prometheus: Prometheus, expr: str, timeout_s: float = CATCH_UP_TIMEOUT_S) -> list:
    deadline = time.monotonic() + timeout_s
    while not (result := prometheus.query(expr)):
        assert time.monotonic() < deadline, f"no data in {timeout_s} s: {expr}"
        time.sleep(0.2)
    return result


def test_requests_held_with_zero_groups_wake_the_first_group_through_the_keda_trigger(tmp_path):
    """Scale to zero's idle state: routers and no shard group, so no shard series at all. The
    scale-to-zero ScaledObject's waiting-requests trigger is 0 then (KEDA keeps zero groups),
    and counts the requests a router holds (above the activation threshold: KEDA starts the
    first group); the KV trigger has no data, which it is told to ignore. The router runs with
    the environment the chart renders for it."""
    rendered = render("scale-to-zero-values.yaml")
    triggers = {t["name"]: t["metadata"]
                for t in rendered.one("ScaledObject", "-shard")["spec"]["triggers"]}
    waiting, kv = triggers["waiting-requests"], triggers["kv-budget-usage"]
    env = env_of(pod_spec(rendered, "router")["containers"][0])
    router = start_router(flags=("--shard-uri", "127.0.0.1:1"),  # nothing listens there
                          env={name: env[name] for name in ("HOLD_WITHOUT_GROUPS",
                                                            "REQUEST_TIMEOUT")})
    labels = {"namespace": NAMESPACE, "app_kubernetes_io_instance": RELEASE,
              "app_kubernetes_io_component": "router", "pod": f"{RELEASE}-sluice-router-0"}
    prometheus = Prometheus(tmp_path, {"router": (router.address, labels)})
    held_count = 3
    body = {"inputs": "abc", "parameters": {"max_new_tokens": 4}}
    held = []
    with ThreadPoolExecutor(held_count) as pool:
        try:
            _wait_for(prometheus, f"sluice_router_queue_size{{{SELECTOR}}}")
            [idle] = prometheus.query(waiting["query"])
            assert float(idle["value"][1]) <= float(waiting["activationThreshold"])
            held += [pool.submit(httpx.post, f"{router.url}/generate", json=body, timeout=120)
                     for _ in range(held_count)]
            [active] = _wait_for(prometheus, f"({waiting['query']}) == {held_count}")
            assert float(active["value"][1]) > float(waiting["activationThreshold"])
            assert prometheus.query(kv["query"]) == [] and kv["ignoreNullValues"] == "true"
        finally:
            router.stop()  # its drain ends the held requests
            prometheus.stop()
        assert [f.result().status_code for f in held] == [503] * held_count

