"""Deployment files, checked as far as a machine without Docker or a cluster can: hadolint, strict
Kubernetes schema validation (base and the rendered CPU overlay), `docker compose config`, yamllint,
and the facts the service relies on (probe paths, ports, GPU limits, security, setting names, metric)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.metrics import QUEUE_DEPTH_METRIC
from service.models import split_model_spec
from service.settings import Settings
from tests.support import ROOT

BIN = Path(sys.executable).parent
K8S = ROOT / "k8s"


def _tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or pytest.fail(f"{name} is not installed"))


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def _base_resources() -> dict[str, dict[str, Any]]:
    kustomization = _load(K8S / "base" / "kustomization.yaml")
    docs = [_load(K8S / "base" / name) for name in kustomization["resources"]]
    return {doc["kind"]: doc for doc in docs}


def _apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add/remove/replace, as kustomize applies the overlay's patches."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = int(last) if isinstance(node, list) else last
        if op["op"] == "remove":
            del node[key]
        elif op["op"] in ("replace", "add"):
            if op["op"] == "replace":
                assert (key < len(node)) if isinstance(node, list) else (key in node), op["path"]
            node[key] = op["value"]
    return doc


def _cpu_overlay() -> dict[str, dict[str, Any]]:
    resources = _base_resources()
    overlay = _load(K8S / "overlays" / "cpu" / "kustomization.yaml")
    assert overlay["resources"] == ["../../base"]
    for patch in overlay["patches"]:
        kind = patch["target"]["kind"]
        ops = json.loads((K8S / "overlays" / "cpu" / patch["path"]).read_text())
        resources[kind] = _apply_json_patch(resources[kind], ops)
    return resources


def test_hadolint_finds_nothing() -> None:
    result = _run(_tool("hadolint"), "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_targets_run_as_non_root_with_the_service_as_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for target in ("cpu", "gpu", "export"):
        assert f" AS {target}\n" in text
    assert text.count("USER 10001") == 3
    assert text.count('ENTRYPOINT ["python", "-m", "service"]') == 2
    assert text.count("HEALTHCHECK") == 2
    assert "/healthz" in text
    assert ":latest" not in text


@pytest.mark.parametrize("overlay", ["base", "cpu"])
def test_manifests_pass_strict_schema_validation(overlay: str, tmp_path: Path) -> None:
    resources = _base_resources() if overlay == "base" else _cpu_overlay()
    files = []
    for kind, doc in resources.items():
        path = tmp_path / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(doc))
        files.append(str(path))
    result = _run(_tool("kubernetes-validate"), "--strict", *files)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_file_is_valid(profile: str) -> None:
    result = _run(_tool("docker-compose"), "--profile", profile, "config", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_passes_on_all_yaml() -> None:
    result = _run(_tool("yamllint"), "--strict", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def _container(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = resources["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def test_probes_ports_and_gpu_limits() -> None:
    resources = _base_resources()
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    container = _container(resources)
    port, grpc = container["ports"]
    config = resources["ConfigMap"]["data"]
    assert (port["name"], port["containerPort"]) == ("http", int(config["FOCAL_PORT"]))
    assert (grpc["name"], grpc["containerPort"]) == ("grpc", int(config["FOCAL_GRPC_PORT"]))
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["grpc"] == {"port": grpc["containerPort"], "service": "live"}  # HealthServicer
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # load + warm-up
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["initContainers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "export.engine" in pod["initContainers"][0]["command"]
    annotations = resources["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert [p["targetPort"] for p in resources["Service"]["spec"]["ports"]] == ["http", "grpc"]


def test_security_context_and_graceful_termination() -> None:
    resources = _base_resources()
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in pod["initContainers"] + pod["containers"]:
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])  # writable scratch
    pre_stop_command = _container(resources)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop_command[0] == "sleep"
    pre_stop = float(pre_stop_command[1])
    drain = float(resources["ConfigMap"]["data"]["FOCAL_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    assert pod["topologySpreadConstraints"] or pod["affinity"]["podAntiAffinity"]


def test_images_and_compose_expose_the_grpc_port() -> None:
    assert (ROOT / "Dockerfile").read_text().count("EXPOSE 8000 8001") == 2
    compose = _load(ROOT / "docker-compose.yml")
    assert compose["x-service-env"]["FOCAL_GRPC_PORT"] == "8001"
    for name in ("focal", "focal-cpu"):
        assert "8001:8001" in compose["services"][name]["ports"], name


def test_every_setting_named_in_the_deployment_exists() -> None:
    known = {f"FOCAL_{name.upper()}" for name in Settings.model_fields}
    for resources in (_base_resources(), _cpu_overlay()):
        assert set(resources["ConfigMap"]["data"]) <= known
        Settings(**{k.removeprefix("FOCAL_").lower(): v for k, v in resources["ConfigMap"]["data"].items()})
    compose = _load(ROOT / "docker-compose.yml")
    for name, service in compose["services"].items():
        names = set(service.get("environment", {})) - {"<<"}
        assert names <= known, name
    assert set(compose["x-service-env"]) <= known
    assert "replicas" not in _base_resources()["Deployment"]["spec"]  # the HPA owns it


def test_hpa_scales_on_a_metric_the_service_exports() -> None:
    hpa = _base_resources()["HorizontalPodAutoscaler"]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Pods"]["pods"]["metric"]["name"] == QUEUE_DEPTH_METRIC == "focal_queue_depth"
    assert metrics["Resource"]["resource"]["name"] == "cpu"  # the documented fallback
    assert hpa["spec"]["scaleTargetRef"]["name"] == _base_resources()["Deployment"]["metadata"]["name"]


def test_cpu_overlay_has_no_gpu_in_it() -> None:
    resources = _cpu_overlay()
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert "nvidia.com/gpu" not in json.dumps(pod)
    assert _container(resources)["image"].startswith("focal-serve:cpu")
    mounts = {m["mountPath"]: m["name"] for m in _container(resources)["volumeMounts"]}
    assert resources["ConfigMap"]["data"]["FOCAL_MODELS"].startswith("/models/")
    assert mounts["/models"] == "models"
    assert {v["name"] for v in pod["volumes"]} == {"models", "tmp"}


# -- KServe ------------------------------------------------------------------------------------------------
def _kserve() -> dict[str, dict[str, Any]]:
    docs = [_load(path) for path in sorted((K8S / "kserve").glob("*.yaml"))]
    return {doc["kind"]: doc for doc in docs}


def test_kserve_inference_service_is_a_v2_runtime_with_both_ports_probes_and_a_gpu() -> None:
    """Structural: the KServe CRDs' schemas are not in kubernetes-validate's bundle. The pod they make is
    validated strictly below."""
    from service.api import router
    from service.v2.rest import router as v2_router

    resources = _kserve()
    runtime, service = resources["ServingRuntime"], resources["InferenceService"]
    assert (runtime["apiVersion"], service["apiVersion"]) == ("serving.kserve.io/v1alpha1", "serving.kserve.io/v1beta1")
    assert set(runtime["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
    predictor = service["spec"]["predictor"]
    model = predictor["model"]
    assert model["protocolVersion"] == "v2"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}

    (container,) = runtime["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    Settings(**{k.removeprefix("FOCAL_").lower(): v for k, v in env.items()})  # every setting exists and parses
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http1": int(env["FOCAL_PORT"]), "h2c": int(env["FOCAL_GRPC_PORT"])}
    routes = {getattr(r, "path", "") for r in [*router.routes, *v2_router.routes]}
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in routes
        assert container[probe]["httpGet"]["port"] == ports["http1"]
    assert container["livenessProbe"]["grpc"] == {"port": ports["h2c"], "service": "live"}

    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (init,) = predictor["initContainers"]
    assert init["command"][-1] == "export.engine"
    assert init["resources"]["limits"]["nvidia.com/gpu"] == "1"
    name, folder = split_model_spec(env["FOCAL_MODELS"])
    assert str(folder) == init["args"][init["args"].index("--model") + 1]  # serves what the init built
    assert name == service["metadata"]["name"]  # under the name KServe clients address
    assert predictor["terminationGracePeriodSeconds"] > float(env["FOCAL_DRAIN_TIMEOUT_S"])
    assert predictor["securityContext"]["runAsNonRoot"] is True


def test_kserve_pod_passes_strict_schema_validation(tmp_path: Path) -> None:
    """The pod KServe would make (the runtime's container with the model's overrides, the predictor's
    init containers, volumes and pod settings), validated as a core/v1 Pod."""
    resources = _kserve()
    predictor = resources["InferenceService"]["spec"]["predictor"]
    (container,) = resources["ServingRuntime"]["spec"]["containers"]
    overrides = {k: v for k, v in predictor["model"].items() if k not in ("modelFormat", "runtime", "protocolVersion")}
    pod_keys = ("initContainers", "volumes", "securityContext", "nodeSelector", "tolerations",
                "terminationGracePeriodSeconds")  # fmt: skip
    spec: dict[str, Any] = {"containers": [{**container, **overrides}], **{k: predictor[k] for k in pod_keys}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "focal-tiny-predictor"}, "spec": spec}
    mounts = {m["name"] for c in spec["containers"] + spec["initContainers"] for m in c["volumeMounts"]}
    assert mounts == {v["name"] for v in spec["volumes"]}
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(pod))
    result = _run(_tool("kubernetes-validate"), "--strict", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_pins_admit_the_versions_the_code_is_written_for() -> None:
    """cuda-python 12.6.0 has no `cuda.bindings` (12.6.1 has); TensorRT 10.4 is the first with strongly
    typed networks, and the 11.x branch is written for too."""
    import tomllib
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {r.name: r.specifier for r in map(Requirement, extras["gpu"])}
    assert "12.6.0" not in pins["cuda-python"]
    assert "12.6.1" in pins["cuda-python"]
    assert "10.3.0" not in pins["tensorrt-cu12"]
    for version in ("10.4.0", "10.16.0", "11.1.0"):
        assert version in pins["tensorrt-cu12"], version
    assert '"tensorrt-cu12>=10.4,<11"' in (ROOT / "Dockerfile").read_text()  # the CUDA 12.6 image's own pin
