"""The chart rendered by Helm for every values file of the matrix: lint, Kubernetes 1.33 schemas,
the custom resources' CRD schemas, and the invariants a GPU cluster relies on."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import referencing.jsonschema
import yaml

from router import config as router_config
from tests.chart import (CHART, MATRIX, NAMESPACE, RELEASE, containers, env_of, pod_spec, render,
                         render_values, values_of)

KUBERNETES_VERSION = "1.33"
CRD_SCHEMAS = Path(__file__).parent / "crd-schemas"
CUSTOM_KINDS = {  # apiVersion, kind: the vendored schema (crd-schemas/README.md)
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_v1alpha1_scaledobject.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_v1_podmonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_v1_prometheusrule.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "gateway.networking.k8s.io_v1_httproute.json",
}
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def rendered_values(values_name: str) -> dict:
    """The values a release would use: the chart's defaults under the values file."""
    with helm.Chart.load(CHART) as chart:
        return chart.merge_values(values_of(values_name))


@pytest.mark.parametrize("values_name", MATRIX)
def test_helm_lint_is_clean(values_name):
    report = helm.lint(str(CHART), values_of(values_name), strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBERNETES_VERSION}.0")
    assert report["errors"] == [] and report["messages"] == [], report


@pytest.mark.parametrize("values_name", MATRIX)
def test_every_manifest_validates_strictly_against_kubernetes_schemas(values_name):
    core = [m for m in render(values_name).manifests
            if (m["apiVersion"], m["kind"]) not in CUSTOM_KINDS]
    assert core
    for manifest in core:
        # Strict: an unknown or misspelled field fails, as the API server's strict validation does.
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def _strict(schema):
    """The CRD schema with unknown fields refused, as a structural schema prunes or rejects them."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


def _crd_validator(schema_file: str) -> jsonschema.Validator:
    definitions = kubernetes_validate.utils.schema_contents(
        f"kubernetes-json-schema/v{KUBERNETES_VERSION}.0-local-strict/_definitions.json",
        KUBERNETES_VERSION)
    schema = _strict(json.loads((CRD_SCHEMAS / schema_file).read_text()))
    # The models point metadata at ObjectMeta; Kubernetes' own strict definition serves it.
    schema["properties"]["metadata"] = {"$ref": f"{definitions['$id']}#/$defs/{OBJECT_META}"}
    registry = referencing.Registry().with_resource(
        definitions["$id"], referencing.jsonschema.DRAFT202012.create_resource(definitions))
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.mark.parametrize("values_name", MATRIX)
def test_custom_resources_validate_against_their_crd_schemas(values_name):
    for manifest in render(values_name).manifests:
        key = (manifest["apiVersion"], manifest["kind"])
        if key in CUSTOM_KINDS:
            _crd_validator(CUSTOM_KINDS[key]).validate(manifest)


def test_crd_schemas_refuse_a_misspelled_field():
    scaled = copy.deepcopy(render("keda-values.yaml").one("ScaledObject", "-shard"))
    scaled["spec"]["maxReplicas"] = scaled["spec"].pop("maxReplicaCount")
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        _crd_validator(CUSTOM_KINDS[("keda.sh/v1alpha1", "ScaledObject")]).validate(scaled)


def test_the_matrix_covers_every_custom_kind_and_switch():
    kinds = {(m["apiVersion"], m["kind"]) for name in MATRIX for m in render(name).manifests}
    assert set(CUSTOM_KINDS) <= kinds
    for needed in ("tp4", "keda", "hpa-adapter", "redis", "ingress", "auth", "scale-to-zero"):
        assert f"{needed}-values.yaml" in MATRIX


@pytest.mark.parametrize("values_name", MATRIX)
def test_routers_request_no_gpu_and_shard_gpus_equal_tensor_parallel(values_name):
    rendered = render(values_name)
    tensor_parallel = rendered_values(values_name)["shard"]["tensorParallel"]
    for workload, container in containers(rendered):
        resources = container["resources"]
        gpus = {part.get("nvidia.com/gpu") for part in (resources.get("requests", {}),
                                                         resources.get("limits", {}))}
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        if component == "router":
            assert gpus == {None}, workload["metadata"]["name"]
        else:
            assert gpus == {tensor_parallel}
            env = env_of(container)
            assert env["NUM_SHARD"] == str(tensor_parallel)
    if values_name == "tp4-values.yaml":
        assert tensor_parallel == 4


@pytest.mark.parametrize("values_name", MATRIX)
def test_every_container_has_resources_probes_and_a_locked_down_security_context(values_name):
    rendered = render(values_name)
    for workload, container in containers(rendered):
        pod = workload["spec"]["template"]["spec"]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests["cpu"] and requests["memory"] and limits["memory"]
        assert "readinessProbe" in container and "livenessProbe" in container
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] >= 10000
        # A read-only root filesystem needs somewhere to write: /tmp is an emptyDir.
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}


@pytest.mark.parametrize("values_name", MATRIX)
def test_selectors_match_the_pods_they_mean(values_name):
    rendered = render(values_name)
    pods = {d["metadata"]["name"].rsplit("-", 1)[1]: d["spec"]["template"]["metadata"]["labels"]
            for d in rendered.of_kind("Deployment")}
    assert set(pods) == {"router", "shard"}
    for deployment in rendered.of_kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    def component(name: str) -> str:
        return name.rsplit("-", 1)[1]

    for service in rendered.of_kind("Service"):
        assert service["spec"]["selector"] == pods[component(service["metadata"]["name"])]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for item in rendered.of_kind(kind):
            selector = item["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"]
            assert selector["matchLabels"] == pods[component(item["metadata"]["name"])]
    for monitor in rendered.of_kind("ServiceMonitor") + rendered.of_kind("PodMonitor"):
        selected = monitor["spec"]["selector"]["matchLabels"]
        assert selected == pods[component(monitor["metadata"]["name"])]
    for policy in rendered.of_kind("NetworkPolicy"):
        if component(policy["metadata"]["name"]) == "shard":
            grpc, metrics = policy["spec"]["ingress"]
            assert grpc["from"] == [{"podSelector": {"matchLabels": pods["router"]}}]
    deployments = {d["metadata"]["name"] for d in rendered.of_kind("Deployment")}
    for scaler in rendered.of_kind("HorizontalPodAutoscaler") + rendered.of_kind("ScaledObject"):
        assert scaler["spec"]["scaleTargetRef"]["name"] in deployments


def test_shard_service_is_headless_and_names_the_grpc_port():
    service = render("default").one("Service", "-shard")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [{"name": "grpc", "port": 50051, "targetPort": "grpc"}]


@pytest.mark.parametrize("values_name", MATRIX)
def test_router_role_grants_list_and_watch_on_endpointslices_and_nothing_more(values_name):
    rendered = render(values_name)
    router = pod_spec(rendered, "router")
    env = env_of(router["containers"][0])
    roles = rendered.of_kind("Role")
    assert rendered.of_kind("ClusterRole") == [] and rendered.of_kind("ClusterRoleBinding") == []
    if "SHARD_SERVICE" in env:
        assert env["SHARD_SERVICE"] == f"{NAMESPACE}/{RELEASE}-sluice-shard"
        assert [r["rules"] for r in roles] == [[{"apiGroups": ["discovery.k8s.io"],
                                                  "resources": ["endpointslices"],
                                                  "verbs": ["list", "watch"]}]]
        binding = rendered.one("RoleBinding", "-router")
        assert binding["roleRef"]["name"] == roles[0]["metadata"]["name"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "namespace": NAMESPACE,
                                        "name": router["serviceAccountName"]}]
        assert router["automountServiceAccountToken"] is True
    else:
        # DNS discovery: no API access at all, so no token in the pod.
        assert env["SHARD_DNS"] == f"{RELEASE}-sluice-shard.{NAMESPACE}.svc:50051"
        assert roles == [] and router["automountServiceAccountToken"] is False
    assert pod_spec(rendered, "shard")["automountServiceAccountToken"] is False


@pytest.mark.parametrize("values_name", MATRIX)
def test_shard_pods_outlive_their_drain_and_probe_grpc_health(values_name):
    values = rendered_values(values_name)["shard"]
    pod = pod_spec(render(values_name), "shard")
    container = pod["containers"][0]
    env = env_of(container)
    assert env["SHUTDOWN_GRACE"] == str(values["shutdownGraceSeconds"])
    assert pod["terminationGracePeriodSeconds"] > values["shutdownGraceSeconds"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": values["port"]}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= values["startupTimeoutSeconds"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            in pod["tolerations"])


def test_hugging_face_token_is_a_mounted_secret_file_never_an_environment_value():
    pod = render("auth-values.yaml").one("Deployment", "-shard")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert "HF_TOKEN" not in env and env["HF_TOKEN_PATH"]["value"] == "/etc/sluice/hf/token"
    token = next(v for v in pod["volumes"] if v["name"] == "hf-token")
    assert token["secret"] == {"secretName": "hf-token",
                               "items": [{"key": "token", "path": "token"}]}
    assert all("valueFrom" not in e for e in container["env"])


def test_router_config_reaches_the_router():
    rendered = render("auth-values.yaml")
    env = env_of(pod_spec(rendered, "router")["containers"][0])
    keys = yaml.safe_load(rendered.one("Secret", "-api-keys")["stringData"]["keys.yaml"])
    assert keys["keys"]["sk-team-b"] == {"tenant": "team-b", "requests_per_minute": 30}
    assert env["API_KEYS_FILE"] == "/etc/sluice/keys/keys.yaml"
    rules = yaml.safe_load(rendered.one("ConfigMap", "-content-filter")["data"]["filter.yaml"])
    assert rules["prompt"]["words"] == ["forbidden"]
    assert env["CONTENT_FILTER"] == "/etc/sluice/filter/filter.yaml"
    assert env["OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    redis_env = env_of(pod_spec(render("redis-values.yaml"), "router")["containers"][0])
    assert redis_env["RATE_LIMIT_REDIS_URL"] == "redis://redis-master.redis.svc:6379/0"
    assert redis_env["REQUESTS_PER_MINUTE"] == "600"


def _behavior(scaler: dict) -> dict:
    if scaler["kind"] == "ScaledObject":
        return scaler["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    return scaler["spec"]["behavior"]


@pytest.mark.parametrize("values_name,kind", [
    ("keda-values.yaml", "ScaledObject"), ("hpa-adapter-values.yaml", "HorizontalPodAutoscaler")])
def test_shard_scale_down_is_stabilized_and_scale_up_is_immediate(values_name, kind):
    behavior = _behavior(render(values_name).one(kind, "-shard"))
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]


def test_autoscaled_shards_leave_the_replica_count_to_the_autoscaler():
    assert render("default").one("Deployment", "-shard")["spec"]["replicas"] == 1
    for name in ("keda-values.yaml", "hpa-adapter-values.yaml", "scale-to-zero-values.yaml"):
        assert "replicas" not in render(name).one("Deployment", "-shard")["spec"]


def test_scale_to_zero_starts_at_zero_and_wakes_on_requests_waiting_in_routers():
    rendered = render("scale-to-zero-values.yaml")
    scaled = rendered.one("ScaledObject", "-shard")["spec"]
    assert scaled["minReplicaCount"] == 0
    waiting = next(t for t in scaled["triggers"] if t["name"] == "waiting-requests")
    assert waiting["metadata"]["activationThreshold"] == "0"
    assert "sluice_router_queue_size" in waiting["metadata"]["query"]
    assert float(env_of(pod_spec(rendered, "router")["containers"][0])["REQUEST_TIMEOUT"]) > 0
    rules = rendered.one("PrometheusRule", "sluice")["spec"]["groups"][0]["rules"]
    alerts = [r["alert"] for r in rules]
    assert "SluiceNoShardGroupReady" not in alerts  # zero groups is the idle state here
    assert render("keda-values.yaml").one("ScaledObject", "-shard")["spec"]["minReplicaCount"] == 1


@pytest.mark.parametrize("values_name", MATRIX)
def test_routers_hold_requests_without_groups_exactly_when_shards_scale_to_zero(values_name):
    """Zero shard groups is scale to zero's idle state: routers then hold requests (and stay
    Ready) rather than refuse them, or nothing would ever wake the first group; they hold them
    up to a request timeout. The router's own flag parser reads the environment the chart
    gives it (files mounted in the pod, which do not exist here, left out)."""
    rendered = render(values_name)
    env = {name: value for name, value in env_of(pod_spec(rendered, "router")["containers"][0])
           .items() if name not in ("API_KEYS_FILE", "CONTENT_FILTER")}
    config = router_config.parse([], env)
    scalers = rendered.of_kind("ScaledObject")
    to_zero = bool(scalers) and scalers[0]["spec"]["minReplicaCount"] == 0
    assert config.hold_without_groups == to_zero
    if to_zero:
        assert config.request_timeout_s == rendered_values(values_name)["router"][
            "requestTimeoutSeconds"] > 0
    assert to_zero == (values_name == "scale-to-zero-values.yaml")


def test_router_hpa_scales_on_cpu_and_on_requests_in_flight_through_the_adapter():
    rendered = render("hpa-adapter-values.yaml")
    metrics = rendered.one("HorizontalPodAutoscaler", "-router")["spec"]["metrics"]
    assert metrics[0]["resource"]["name"] == "cpu"
    assert metrics[1]["pods"] == {"metric": {"name": "sluice_router_requests_in_flight"},
                                  "target": {"type": "AverageValue", "averageValue": "64"}}
    adapter = yaml.safe_load(rendered.one("ConfigMap", "-adapter-rules")["data"]["config.yaml"])
    served = {r["name"]["as"] for r in adapter["rules"] + adapter["externalRules"]}
    shard_hpa = rendered.one("HorizontalPodAutoscaler", "-shard")["spec"]["metrics"]
    shard_metrics = {m["external"]["metric"]["name"] for m in shard_hpa}
    assert {"sluice_router_requests_in_flight"} | shard_metrics == served


def test_dashboards_ship_as_configmaps_for_the_grafana_sidecar():
    maps = [m for m in render("keda-values.yaml").of_kind("ConfigMap")
            if m["metadata"]["labels"].get("grafana_dashboard") == "1"]
    files = {name for m in maps for name in m["data"]}
    assert files == {"sluice-router.json", "sluice-shards.json"}
    for m in maps:
        (name, text), = m["data"].items()
        assert json.loads(text) == json.loads((CHART / "dashboards" / name).read_text())
        assert m["metadata"]["annotations"] == {"grafana_folder": "Sluice"}


@pytest.mark.parametrize("values,path,message", [
    ({"shard": {"replicas": -1}}, "/shard/replicas", "minimum: got -1, want 0"),
    ({"router": {"port": "eighty"}}, "/router/port", "got string, want integer"),
    ({"shard": {"tensorParallel": 0}}, "/shard/tensorParallel", "minimum: got 0, want 1"),
    ({"shard": {"replicaz": 2}}, "/shard", "additional properties 'replicaz' not allowed"),
    ({"shard": {"autoscaling": {"backend": "hpa", "scaleToZero": True}}},
     "/shard/autoscaling/backend", "value must be 'keda'"),
    ({"shard": {"autoscaling": {"backend": "keda", "scaleToZero": True}}},
     "/router/requestTimeoutSeconds", "exclusiveMinimum: got 0, want 0"),
])
def test_values_schema_rejects_bad_values_with_a_clear_message(values, path, message):
    with pytest.raises(helm.HelmValuesError) as error:
        render_values(values)
    assert f"at '{path}'" in str(error.value) and message in str(error.value), str(error.value)


def test_startup_probe_covers_the_startup_timeout_rounding_up():
    container = render_values({"shard": {"startupTimeoutSeconds": 1234}}).one(
        "Deployment", "-shard")["spec"]["template"]["spec"]["containers"][0]
    assert container["startupProbe"]["failureThreshold"] == math.ceil(1234 / 10)
