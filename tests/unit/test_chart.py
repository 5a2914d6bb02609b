"""The Helm chart charts/freemask, checked with no cluster and no helm binary (DESIGN §3).

For the chart's defaults and every values file in charts/freemask/ci/, the chart is linted
and rendered with helm-python-sdk (the Helm 4 SDK), and every rendered object is validated:
core kinds with kubernetes-validate --strict against Kubernetes 1.30, the custom resources
(KEDA, Strimzi, Prometheus Operator) against the hand-written subsets of their CRDs in
tests/fixtures/crd_schemas.json. The tests then assert what the platform relies on, and
every service's rendered config is loaded through load_config, with the files and env its
pod would have, so a value the services would refuse fails here.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from freemask.placement.publish import repository_url
from freemask.shared.bus import Topics
from freemask.shared.config import SERVICE_NAMES, ConfigError, FreemaskConfig, load_config
from freemask.shared.metrics import ServiceMetrics

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "freemask"
CRD_SCHEMAS = json.loads((REPO / "tests" / "fixtures" / "crd_schemas.json").read_text())
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "rel", "ml"
FULLNAME = f"{RELEASE}-freemask"
DEFAULTS = "defaults"
VALUES_FILES = [DEFAULTS, *sorted(path.name for path in (CHART / "ci").glob("*.yaml"))]

# What each stage worker consumes (README "Topics"); the coordinator consumes several and never scales.
STAGE_TOPICS = {
    "attention_mask": Topics.GENERATE,
    "thesaurus": Topics.COMPOSE,
    "placement": Topics.PLACE,
    "harmonization": Topics.HARMONIZE,
    "scoring": Topics.COMPOSED,
}
GPU_SERVICES = {"attention-mask", "harmonization", "scoring", "triton"}


def component_of(service: str) -> str:
    return service.replace("_", "-")


def values_key(service: str) -> str:
    head, *rest = service.split("_")
    return head + "".join(part.title() for part in rest)


@functools.cache
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    manifests = chart().render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [doc for path, text in sorted(manifests.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


@dataclass(frozen=True)
class Release:
    """One rendering of the chart: its objects, and the values given and coalesced."""

    values_file: str
    given: dict[str, Any]
    values: dict[str, Any]
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [obj for obj in self.of_kind(kind) if obj["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.values_file}: expected one {kind} {name}, found {len(found)}"
        return found[0]

    def workloads(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(Deployment or Job, its pod spec) for every workload of the release."""
        for obj in self.of_kind("Deployment") + self.of_kind("Job"):
            yield obj, obj["spec"]["template"]["spec"]

    def freemask_pods(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """The workloads that run a freemask image and read its config (all but Triton)."""
        for workload, pod in self.workloads():
            if workload["metadata"]["labels"]["app.kubernetes.io/component"] != "triton":
                yield workload, pod

    def service_deployment(self, service: str) -> dict[str, Any]:
        return self.get("Deployment", f"{FULLNAME}-{component_of(service)}")

    def service_values(self, service: str) -> dict[str, Any]:
        return self.values[values_key(service)]

    @property
    def config_file(self) -> str:
        return self.get("ConfigMap", FULLNAME)["data"]["freemask.yaml"]


def given_values(values_file: str) -> dict[str, Any]:
    return {} if values_file == DEFAULTS else yaml.safe_load((CHART / "ci" / values_file).read_text())


def release_of(name: str, given: dict[str, Any]) -> Release:
    return Release(name, given, chart().merge_values(given), render(given))


@functools.cache
def rendered(values_file: str) -> Release:
    return release_of(values_file, given_values(values_file))


@pytest.fixture(params=VALUES_FILES)
def release(request: pytest.FixtureRequest) -> Release:
    return rendered(request.param)


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm_python.HelmError) as caught:
        render(values)
    return str(caught.value)


# --- lint and schemas --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_chart_lints_without_warnings(values_file: str) -> None:
    report = helm_python.lint(CHART, given_values(values_file), strict=True, kube_version=f"v{KUBE_VERSION}")

    assert report["errors"] == []
    # severity 1 is informational (Helm's "icon is recommended")
    assert [m for m in report["messages"] if m["severity"] > 1] == []


def _validate_custom_resource(obj: dict[str, Any]) -> None:
    key = f"{obj['apiVersion']}/{obj['kind']}"
    assert key in CRD_SCHEMAS, f"{key} is neither a core kind nor described in tests/fixtures/crd_schemas.json"
    jsonschema.validate(obj, CRD_SCHEMAS[key], cls=jsonschema.Draft202012Validator)


def test_every_object_is_valid_for_kubernetes_1_30(release: Release) -> None:
    for obj in release.objects:
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            _validate_custom_resource(obj)


def test_an_unknown_field_fails_validation() -> None:
    deployment = json.loads(json.dumps(rendered(DEFAULTS).service_deployment("thesaurus")))
    deployment["spec"]["template"]["spec"]["containers"][0]["grpcProbe"] = {}
    scaled = json.loads(json.dumps(rendered("keda.yaml").of_kind("ScaledObject")[0]))
    scaled["spec"]["triggers"][0]["lagTreshold"] = "5"

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)
    with pytest.raises(jsonschema.ValidationError, match="lagTreshold"):
        _validate_custom_resource(scaled)


@pytest.mark.parametrize(("values", "named"), [
    ({"image": {"gpu": {"tag": "latest"}}}, "/image/gpu/tag"),
    ({"image": {"cpu": {"tag": ""}}}, "/image/cpu/tag"),
    ({"placement": {"image": {"tag": "latest"}}}, "/placement/image/tag"),
    ({"config": {"store": {"endpoitn": "minio:9000"}}}, "endpoitn"),
    ({"config": {"scoring": {"preset": "huge"}}}, "/config/scoring/preset"),
    ({"config": {"bus": {"partitions": 0}}}, "/config/bus/partitions"),
    ({"config": {"store": {"secret_key": "hunter2"}}}, "/config/store/secret_key"),
    ({"thesaurus": {"weights": {"existingClaim": "x", "subPath": "", "mountPath": "/w"}}}, "/thesaurus"),
    ({"coordinator": {"replicaCount": 2}}, "/coordinator/replicaCount"),
    ({"scoring": {"gpu": "one"}}, "/scoring/gpu"),
])
def test_the_values_schema_names_the_bad_value(values: dict[str, Any], named: str) -> None:
    assert named in render_error(values)


def test_the_values_schema_carries_the_current_config_schema() -> None:
    spec = importlib.util.spec_from_file_location("sync_config_schema", REPO / "charts" / "sync_config_schema.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    on_disk = (CHART / "values.schema.json").read_text()

    assert sync.render(sync.synced(json.loads(on_disk))) == on_disk, "run charts/sync_config_schema.py"


def test_validate_values_reports_every_problem_at_once() -> None:
    message = render_error({
        "storeCredentials": {"existingSecret": ""},
        "config": {"attention_mask": {"device": "cuda"}, "bus": {"security_protocol": "SASL_SSL"}},
        "attentionMask": {"gpu": 0},
        "scoring": {"resources": {"limits": {"nvidia.com/gpu": 1}}},
        "thesaurus": {"autoscaling": {"maxReplicas": 9}},
        "placement": {"terminationGracePeriodSeconds": 10},
        "triton": {"gpu": 0},
    })

    assert "VALUES VALIDATION" in message
    for problem in ["storeCredentials.existingSecret", "kafkaCredentials.existingSecret", "config.bus.sasl_mechanism",
                    "attentionMask.gpu", "scoring.resources", "thesaurus.autoscaling.maxReplicas",
                    "placement.terminationGracePeriodSeconds", "triton.gpu"]:
        assert f"freemask: {problem}\n" in message


@pytest.mark.parametrize(("values", "problem"), [
    ({"triton": {"enabled": False}}, "config.triton.url"),
    ({"config": {"bus": {"topic_partitions": {"freemask.typo.v1": 4}}}}, "config.bus.topic_partitions"),
    ({"strimzi": {"enabled": True}}, "strimzi.clusterName"),
    ({"kafkaCredentials": {"existingSecret": "kafka"}}, "kafkaCredentials.existingSecret"),
    ({"thesaurus": {"autoscaling": {"minReplicas": 0}}}, "thesaurus.autoscaling.minReplicas"),
    ({"scoring": {"autoscaling": {"enabled": False}, "replicaCount": 7}}, "scoring.replicaCount"),
    ({"grpcTls": {"enabled": True}}, "grpcTls.existingSecret"),
    ({"config": {"server": {"tls_cert_file": "/tls/tls.crt"}}}, "config.server.tls_cert_file"),
])
def test_validate_values_catches(values: dict[str, Any], problem: str) -> None:
    assert f"freemask: {problem}\n" in render_error(values)


# --- every value documented ----------------------------------------------------------------------------------------


def _leaf_paths(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaf_paths(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def test_every_value_is_documented_with_a_param() -> None:
    text = (CHART / "values.yaml").read_text()
    documented = set(re.findall(r"^\s*## @param (\S+) \S", text, re.MULTILINE))
    values = yaml.safe_load(text)

    def covered(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1))

    assert [path for path in _leaf_paths(values) if not covered(path)] == []
    paths = set(_leaf_paths(values))
    assert [p for p in documented if not any(leaf == p or leaf.startswith(f"{p}.") for leaf in paths)] == []


# --- what each service is given ------------------------------------------------------------------------------------


def _localised(value: Any, mounts: dict[str, Path]) -> Any:
    """`value` with every path under a mount point moved to where that mount was laid out."""
    if isinstance(value, dict):
        return {key: _localised(item, mounts) for key, item in value.items()}
    if isinstance(value, list):
        return [_localised(item, mounts) for item in value]
    if isinstance(value, str):
        for mount_path in sorted(mounts, key=len, reverse=True):
            if value == mount_path or value.startswith(f"{mount_path}/"):
                return str(mounts[mount_path]) + value[len(mount_path):]
    return value


def pod_config(release: Release, pod: dict[str, Any], root: Path) -> FreemaskConfig:
    """The config one pod's container would load: its mounted files laid out under `root`, its env.

    Mount paths in the env and in the config file are rewritten to where the files were laid
    out, so a setting that points at a file the pod does not mount fails as it would there.
    """
    container = pod["containers"][0]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts: dict[str, Path] = {}
    for mount in container["volumeMounts"]:
        volume, local = volumes[mount["name"]], root / mount["mountPath"].lstrip("/")
        local.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            for name, content in release.get("ConfigMap", volume["configMap"]["name"])["data"].items():
                (local / name).write_text(content)
        elif "secret" in volume:
            for item in volume["secret"]["items"]:
                (local / item["path"]).write_text(f"secret {item['key']} of {volume['secret']['secretName']}")
        mounts[mount["mountPath"]] = local
    for config_file in (root / "etc").rglob("freemask.yaml"):
        config_file.write_text(yaml.safe_dump(_localised(yaml.safe_load(config_file.read_text()), mounts)))
    environ = {}
    for variable in container["env"]:
        if "value" in variable:
            environ[variable["name"]] = _localised(variable["value"], mounts)
        else:
            environ[variable["name"]] = f"secret {variable['valueFrom']['secretKeyRef']['key']}"
    return load_config(environ=environ)


def service_config(release: Release, service: str, root: Path) -> FreemaskConfig:
    return pod_config(release, release.service_deployment(service)["spec"]["template"]["spec"], root / service)


def test_every_pods_config_loads(release: Release, tmp_path: Path) -> None:
    for workload, pod in release.freemask_pods():
        config = pod_config(release, pod, tmp_path / workload["kind"] / workload["metadata"]["name"])

        assert config.store.access_key is not None and config.store.secret_key is not None
        if release.values["config"]["bus"]["security_protocol"].startswith("SASL_"):
            assert config.bus.sasl_username is not None and config.bus.sasl_password is not None


def test_services_listen_where_their_deployment_and_service_say(release: Release, tmp_path: Path) -> None:
    for service in SERVICE_NAMES:
        pod = release.service_deployment(service)["spec"]["template"]["spec"]
        config = service_config(release, service, tmp_path)
        ports = {port["name"]: port["containerPort"] for port in pod["containers"][0]["ports"]}
        k8s_service = release.get("Service", f"{FULLNAME}-{component_of(service)}")

        assert config.server.host == "0.0.0.0"
        assert ports == {"grpc": config.server.ports[service].grpc_port,
                         "metrics": config.server.ports[service].metrics_port}
        assert {port["name"]: port["port"] for port in k8s_service["spec"]["ports"]} == ports
        assert pod["containers"][0]["args"] == ["serve", service]


def test_services_reach_scoring_and_triton_through_their_services(release: Release, tmp_path: Path) -> None:
    config = service_config(release, "coordinator", tmp_path)
    scoring = release.get("Service", f"{FULLNAME}-scoring")
    scoring_grpc = next(port["port"] for port in scoring["spec"]["ports"] if port["name"] == "grpc")

    assert config.coordinator.scoring_target == f"{FULLNAME}-scoring:{scoring_grpc}"
    if release.values["triton"]["enabled"]:
        assert config.triton.url == f"{FULLNAME}-triton:8001"
    else:
        assert config.triton.url == release.given["config"]["triton"]["url"]


def test_weights_come_from_the_claimed_volume() -> None:
    release = rendered("gpu-production.yaml")
    weights = release.given["attentionMask"]["weights"]
    pod = release.service_deployment("attention_mask")["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "weights")
    volume = next(v for v in pod["volumes"] if v["name"] == "weights")

    assert volume["persistentVolumeClaim"] == {"claimName": weights["existingClaim"], "readOnly": True}
    assert (mount["subPath"], mount["readOnly"]) == (weights["subPath"], True)
    assert yaml.safe_load(release.config_file)["attention_mask"]["weights"] == mount["mountPath"]


def test_a_config_the_services_would_refuse_fails_here(tmp_path: Path) -> None:
    # The schema cannot see that a prompt template lacks its {background} slot; the services can.
    release = release_of("bad", {"config": {"world": {"prompt_templates": ["a photo of a {cls}"]}}})
    pod = release.service_deployment("coordinator")["spec"]["template"]["spec"]

    with pytest.raises(ConfigError, match="prompt templates must contain"):
        pod_config(release, pod, tmp_path)


# --- GPUs, probes, shutdown ----------------------------------------------------------------------------------------


def test_gpus_are_requested_exactly_where_expected(release: Release) -> None:
    with_gpus = {}
    for deployment in release.of_kind("Deployment"):
        resources = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
        requested = resources.get("requests", {}).get("nvidia.com/gpu")
        assert requested == resources.get("limits", {}).get("nvidia.com/gpu")
        if requested:
            with_gpus[deployment["metadata"]["labels"]["app.kubernetes.io/component"]] = requested

    expected = set() if release.values_file == "cpu-minimal.yaml" else GPU_SERVICES
    assert set(with_gpus) == expected
    for component, count in with_gpus.items():
        key = "triton" if component == "triton" else values_key(component.replace("-", "_"))
        assert count == release.values[key]["gpu"]


def test_every_service_has_grpc_health_probes_on_its_grpc_port(release: Release) -> None:
    for service in SERVICE_NAMES:
        container = release.service_deployment(service)["spec"]["template"]["spec"]["containers"][0]
        grpc_port = next(port["containerPort"] for port in container["ports"] if port["name"] == "grpc")

        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if release.values["grpcTls"]["enabled"]:
                # the kubelet's gRPC probe has no TLS: the container asks itself, within the probe's timeout
                timeout = int(container[probe]["exec"]["command"][-1])
                assert container[probe]["exec"]["command"][:-1] == ["freemask", "health", service, "--timeout"]
                assert 1 <= timeout < container[probe]["timeoutSeconds"] and "grpc" not in container[probe]
            else:
                assert container[probe]["grpc"] == {"port": grpc_port}, f"{service} {probe}"


def test_grpc_tls_comes_from_one_mounted_secret(release: Release, tmp_path: Path) -> None:
    """With grpcTls every service's server and clients read the certificate, key and CA the pod
    mounts read-only from the Secret (pod_config writes each item as 'secret <key> of <Secret>')."""
    tls = release.values["grpcTls"]
    for service in SERVICE_NAMES:
        server = service_config(release, service, tmp_path).server
        pod = release.service_deployment(service)["spec"]["template"]["spec"]
        if not tls["enabled"]:
            assert (server.tls_cert_file, server.tls_ca_file) == (None, None)
            assert "grpc-tls" not in {volume["name"] for volume in pod["volumes"]}
            continue
        files = {"tls_cert_file": tls["certKey"], "tls_key_file": tls["keyKey"], "tls_ca_file": tls["caKey"]}
        if tls["mutual"]:
            files |= {"tls_client_ca_file": tls["caKey"], "tls_client_cert_file": tls["certKey"],
                      "tls_client_key_file": tls["keyKey"]}
        for setting in ("tls_cert_file", "tls_key_file", "tls_ca_file", "tls_client_ca_file", "tls_client_cert_file",
                        "tls_client_key_file"):
            path = getattr(server, setting)
            if setting not in files:
                assert path is None, f"{service}: {setting}"
                continue
            assert path.read_text() == f"secret {files[setting]} of {tls['existingSecret']}", f"{service}: {setting}"
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "grpc-tls")
        assert mount["readOnly"] is True


def test_triton_is_probed_on_readiness_and_grpc_health(release: Release) -> None:
    if not release.values["triton"]["enabled"]:
        assert not [d for d in release.of_kind("Deployment") if d["metadata"]["name"] == f"{FULLNAME}-triton"]
        return
    container = release.get("Deployment", f"{FULLNAME}-triton")["spec"]["template"]["spec"]["containers"][0]

    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["grpc"] == {"port": 8001}
    assert {port["name"]: port["containerPort"] for port in container["ports"]} == {
        "http": 8000, "grpc": 8001, "metrics": 8002}


def test_pods_get_longer_to_stop_than_the_services_drain(release: Release, tmp_path: Path) -> None:
    drain = service_config(release, "coordinator", tmp_path).server.grace_period_s
    for service in SERVICE_NAMES:
        grace = release.service_deployment(service)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > drain, service


# --- security and images -------------------------------------------------------------------------------------------


def test_every_pod_runs_as_bitnami_does(release: Release) -> None:
    for workload, pod in release.workloads():
        name = workload["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False, name
        context = pod["securityContext"]
        assert (context["runAsNonRoot"], context["runAsUser"], context["fsGroup"]) == (True, 1001, 1001), name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["runAsNonRoot"] is True and security["runAsUser"] == 1001, name
            assert "/tmp" in {mount["mountPath"] for mount in container["volumeMounts"]}, name
    for account in release.of_kind("ServiceAccount"):
        assert account["automountServiceAccountToken"] is False


def test_every_image_is_pinned(release: Release) -> None:
    for workload, pod in release.workloads():
        for container in pod["containers"]:
            name, _, digest = container["image"].partition("@")
            repository, _, tag = name.rpartition(":")
            assert repository and "/" not in tag, f"{container['image']} has no tag"
            assert tag not in ("", "latest"), container["image"]
            if release.values_file == "gpu-production.yaml":
                assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), container["image"]


def test_services_run_the_image_of_their_kind() -> None:
    release = rendered(DEFAULTS)
    for service in SERVICE_NAMES:
        image = release.service_deployment(service)["spec"]["template"]["spec"]["containers"][0]["image"]
        kind = "cpu" if service in ("thesaurus", "coordinator") else "gpu"
        assert image == f"ghcr.io/free-mask/freemask-{kind}:0.1.0", service


def test_a_service_can_run_its_own_image() -> None:
    values = {"scoring": {"image": {"repository": "team/scoring-experiment", "tag": "0.2.0-rc1"}}}
    release = release_of("override", values)
    container = release.service_deployment("scoring")["spec"]["template"]["spec"]["containers"][0]

    assert container["image"] == "ghcr.io/team/scoring-experiment:0.2.0-rc1"


# --- scaling and topics --------------------------------------------------------------------------------------------


def test_stages_scale_on_their_consumer_lag_with_keda(release: Release, tmp_path: Path) -> None:
    scaled = {obj["spec"]["scaleTargetRef"]["name"]: obj for obj in release.of_kind("ScaledObject")}
    hpas = {obj["spec"]["scaleTargetRef"]["name"]: obj for obj in release.of_kind("HorizontalPodAutoscaler")}
    config = service_config(release, "coordinator", tmp_path)
    autoscaled = {f"{FULLNAME}-{component_of(s)}": s for s in STAGE_TOPICS
                  if release.service_values(s)["autoscaling"]["enabled"]}

    if not release.values["keda"]["enabled"]:
        assert scaled == {} and set(hpas) == set(autoscaled)
        return
    assert hpas == {} and set(scaled) == set(autoscaled)
    for deployment, service in autoscaled.items():
        spec, scaling = scaled[deployment]["spec"], release.service_values(service)["autoscaling"]
        (trigger,) = spec["triggers"]
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (scaling["minReplicas"], scaling["maxReplicas"])
        assert trigger["type"] == "kafka"
        assert trigger["metadata"]["topic"] == STAGE_TOPICS[service]
        assert trigger["metadata"]["consumerGroup"] == f"{config.bus.group_prefix}.{service}"
        assert trigger["metadata"]["bootstrapServers"] == config.bus.bootstrap_servers
        assert trigger["metadata"]["lagThreshold"] == str(scaling["lagThreshold"])
        assert ("tls" in trigger["metadata"]) == config.bus.security_protocol.endswith("SSL")
        if config.bus.sasl_mechanism:
            auth = release.get("TriggerAuthentication", trigger["authenticationRef"]["name"])
            assert {ref["name"] for ref in auth["spec"]["secretTargetRef"]} == {
                release.values["kafkaCredentials"]["existingSecret"]}


def test_scaled_deployments_leave_their_replicas_to_the_autoscaler(release: Release) -> None:
    for service in SERVICE_NAMES:
        values = release.service_values(service)
        spec = release.service_deployment(service)["spec"]
        if values["autoscaling"]["enabled"]:
            assert "replicas" not in spec, service
        else:
            assert spec["replicas"] == values["replicaCount"], service
    assert release.service_deployment("coordinator")["spec"]["strategy"] == {"type": "Recreate"}


def _is_hook(obj: dict[str, Any]) -> bool:
    return obj["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-install,pre-upgrade"


def test_topics_are_created_before_any_consumer(release: Release, tmp_path: Path) -> None:
    jobs = {job["metadata"]["name"]: job for job in release.of_kind("Job")}
    topics = release.of_kind("KafkaTopic")
    config = service_config(release, "coordinator", tmp_path)

    if release.values["strimzi"]["enabled"]:
        assert f"{FULLNAME}-topics" not in jobs
        by_name = {topic["spec"]["topicName"]: topic for topic in topics}
        assert sorted(by_name) == sorted(Topics.ALL)
        for name, topic in by_name.items():
            assert topic["spec"]["partitions"] == config.bus.partitions_of(name)
            assert topic["spec"]["replicas"] == config.bus.replication_factor
            assert topic["metadata"]["labels"]["strimzi.io/cluster"] == release.values["strimzi"]["clusterName"]
            assert topic["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        return
    assert topics == []
    job = jobs[f"{FULLNAME}-topics"]
    assert _is_hook(job)
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["topics", "create"]
    job_config = pod_config(release, job["spec"]["template"]["spec"], tmp_path / "job")
    mounted_apart = {"sasl_password_file"}
    assert job_config.bus.model_dump(exclude=mounted_apart) == config.bus.model_dump(exclude=mounted_apart)


def test_hooks_run_without_what_the_release_has_not_created_yet(release: Release) -> None:
    hook_config = release.get("ConfigMap", f"{FULLNAME}-hooks")

    assert _is_hook(hook_config)
    assert hook_config["data"] == release.get("ConfigMap", FULLNAME)["data"]
    assert int(hook_config["metadata"]["annotations"]["helm.sh/hook-weight"]) < 0
    for job in release.of_kind("Job"):
        pod = job["spec"]["template"]["spec"]
        assert _is_hook(job) and int(job["metadata"]["annotations"]["helm.sh/hook-weight"]) == 0
        assert pod["serviceAccountName"] == "default"
        assert {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v} == {f"{FULLNAME}-hooks"}


def test_triton_loads_the_model_the_publish_job_uploads(release: Release, tmp_path: Path) -> None:
    if not release.values["triton"]["enabled"]:
        assert f"{FULLNAME}-triton-publish" not in {job["metadata"]["name"] for job in release.of_kind("Job")}
        return
    prefix = release.values["triton"]["modelRepository"]["prefix"]
    publish = release.get("Job", f"{FULLNAME}-triton-publish")["spec"]["template"]["spec"]
    container = release.get("Deployment", f"{FULLNAME}-triton")["spec"]["template"]["spec"]["containers"][0]
    store = pod_config(release, publish, tmp_path).store
    secret = release.values["storeCredentials"]

    assert publish["containers"][0]["args"] == ["placement", "publish", "--prefix", prefix]
    assert f"--model-repository={repository_url(store, prefix)}" in container["args"]
    assert container["image"].startswith("nvcr.io/nvidia/tritonserver:")
    credentials = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in container["env"] if "valueFrom" in v}
    assert credentials == {
        "AWS_ACCESS_KEY_ID": {"name": secret["existingSecret"], "key": secret["accessKeyKey"]},
        "AWS_SECRET_ACCESS_KEY": {"name": secret["existingSecret"], "key": secret["secretKeyKey"]},
    }


# --- disruption, network, monitoring -------------------------------------------------------------------------------


def test_every_deployment_has_a_disruption_budget(release: Release) -> None:
    budgets = {pdb["metadata"]["name"]: pdb for pdb in release.of_kind("PodDisruptionBudget")}
    for deployment in release.of_kind("Deployment"):
        budget = budgets[deployment["metadata"]["name"]]
        assert budget["spec"]["selector"] == deployment["spec"]["selector"]
        assert budget["spec"]["maxUnavailable"] >= 1


def _selected_by(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    wanted = policy["spec"]["podSelector"].get("matchLabels", {})
    return all(labels.get(key) == value for key, value in wanted.items())


def _pods_of(release: Release, component: str) -> dict[str, Any]:
    """The peer that selects one component's pods."""
    deployment = release.get("Deployment", f"{FULLNAME}-{component}")
    return {"podSelector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]}}


def _ingress_from(policy: dict[str, Any], peer: dict[str, Any]) -> list[int]:
    """The ports a rule naming exactly `peer` admits."""
    return [port["port"] for rule in policy["spec"].get("ingress", []) if rule["from"] == [peer]
            for port in rule["ports"]]


def test_every_pod_is_fenced_by_one_network_policy(release: Release) -> None:
    policies = release.of_kind("NetworkPolicy")
    for workload, _pod in release.workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        (policy,) = [p for p in policies if _selected_by(p, labels)]
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from") and rule.get("ports"), f"{policy['metadata']['name']} admits any source or port"
        for rule in policy["spec"]["egress"]:
            assert rule.get("ports"), f"{policy['metadata']['name']} lets out any port"


def _egress_ports(policy: dict[str, Any], peer_component: str | None = None) -> set[int]:
    ports = set()
    for rule in policy["spec"]["egress"]:
        peers = [peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
                 for peer in rule.get("to", [])]
        if peer_component is None or peer_component in peers:
            ports |= {port["port"] for port in rule["ports"]}
    return ports


def test_network_policies_allow_the_declared_flows(release: Release, tmp_path: Path) -> None:
    policy = {p["metadata"]["name"]: p for p in release.of_kind("NetworkPolicy")}
    config = service_config(release, "coordinator", tmp_path)
    kafka_ports = {int(address.rpartition(":")[2]) for address in config.bus.bootstrap_servers.split(",")}
    store_port = int(config.store.endpoint.rpartition(":")[2])

    for service in SERVICE_NAMES:
        egress = _egress_ports(policy[f"{FULLNAME}-{component_of(service)}"])
        assert {53, store_port} | kafka_ports <= egress, service
    coordinator_to_scoring = _egress_ports(policy[f"{FULLNAME}-coordinator"], "scoring")
    assert coordinator_to_scoring == {config.server.ports["scoring"].grpc_port}
    assert _ingress_from(policy[f"{FULLNAME}-scoring"], _pods_of(release, "coordinator")) == [
        config.server.ports["scoring"].grpc_port]
    if release.values["triton"]["enabled"]:
        assert _egress_ports(policy[f"{FULLNAME}-placement"], "triton") == {8001}
        assert _ingress_from(policy[f"{FULLNAME}-triton"], _pods_of(release, "placement")) == [8001]
        # Triton's HTTP port serves only the kubelet's probes, which come from the node and need no rule
        assert 8000 not in {port["port"] for rule in policy[f"{FULLNAME}-triton"]["spec"]["ingress"]
                            for port in rule["ports"]}
        assert _egress_ports(policy[f"{FULLNAME}-triton"]) == {53, store_port}


def test_the_service_monitor_scrapes_every_metrics_port(release: Release) -> None:
    monitors = release.of_kind("ServiceMonitor")
    if not release.values["metrics"]["serviceMonitor"]["enabled"]:
        assert monitors == []
        return
    (monitor,) = monitors
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [s for s in release.of_kind("Service") if all(s["metadata"]["labels"].get(k) == v
                                                              for k, v in selector.items())]

    assert len(services) == len(release.of_kind("Deployment"))
    for service in services:
        assert "metrics" in {port["name"] for port in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True  # keeps the services' own `service` label


def _metric_names() -> set[str]:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {family.name + suffix for family in ServiceMetrics("any").registry.collect()
            for suffix in suffixes[family.type]}


def test_the_grafana_dashboard_shows_lag_throughput_and_gpus() -> None:
    dashboard = json.loads((CHART / "dashboards" / "freemask.json").read_text())
    panels = {panel["title"]: panel for panel in dashboard["panels"] if panel["type"] != "row"}
    expressions = [target["expr"] for panel in panels.values() for target in panel["targets"]]
    ours = {name for expr in expressions for name in re.findall(r"\bfreemask_[a-z_]+", expr)}

    assert ours <= _metric_names(), ours - _metric_names()
    assert "freemask_stage_lag_messages" in ours
    assert {"Stage lag", "Throughput", "GPU memory per service", "GPU utilisation"} <= set(panels)
    shipped = rendered("gpu-production.yaml").get("ConfigMap", f"{FULLNAME}-dashboard")
    assert json.loads(shipped["data"]["freemask.json"]) == dashboard
