"""deploy/k8s/: each overlay rendered by ``kubectl kustomize`` and validated against Kubernetes' schemas.

``kubernetes-validate`` (dev extra) checks every rendered resource, strictly (no unknown fields), against
the OpenAPI schemas of KUBERNETES_VERSION; then the tests check what the manifests promise: a Deployment
and a headless Service per stage, native gRPC probes, resources, a PodDisruptionBudget, GPUs in the gpu
overlay, and the gateway addressing every stage through DNS for client-side balancing. Without kubectl
(or its standalone twin, kustomize) the rendering tests skip, and fail under CI=true.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.config import DEFAULT_PORTS

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31.0"  # native gRPC probes are GA since 1.27
STAGES = ("vad", "stt", "translate", "tts", "gateway")
OVERLAYS = ("cpu", "gpu")


def render(overlay: str) -> list[dict[str, Any]]:
    if kubectl := shutil.which("kubectl"):
        command = [kubectl, "kustomize", str(K8S / "overlays" / overlay)]
    elif kustomize := shutil.which("kustomize"):
        command = [kustomize, "build", str(K8S / "overlays" / overlay)]
    else:
        reason = "neither kubectl nor kustomize is installed: they render deploy/k8s/"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def by_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def test_every_resource_is_valid_for_the_stated_kubernetes_version(rendered):
    from kubernetes_validate import utils

    _, resources = rendered
    for resource in resources:
        utils.validate(resource, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_an_unknown_field():
    from kubernetes_validate import utils

    resource = next(r for r in render("cpu") if r["kind"] == "Deployment")
    resource["spec"]["template"]["spec"]["containers"][0]["gpus_please"] = 1
    with pytest.raises(utils.ValidationError):
        utils.validate(resource, KUBERNETES_VERSION, strict=True)


def test_a_deployment_a_headless_service_and_a_budget_per_stage(rendered):
    _, resources = rendered
    deployments, services = by_kind(resources, "Deployment"), by_kind(resources, "Service")
    budgets = by_kind(resources, "PodDisruptionBudget")
    for stage in STAGES:
        pod = deployments[stage]["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        port = DEFAULT_PORTS[stage]
        assert container["args"][:4] == ["serve", stage, "--port", str(port)]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port}, (stage, probe)
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), stage
        assert services[stage]["spec"]["clusterIP"] == "None", stage
        assert services[stage]["spec"]["selector"] == pod["metadata"]["labels"]
        assert budgets[stage]["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    env = {
        e["name"]: e["value"]
        for e in deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    for stage in STAGES[:-1]:
        assert env[f"PARLEY_{stage.upper()}_ADDRESS"] == f"dns:///{stage}:{DEFAULT_PORTS[stage]}"


def test_gpus_only_in_the_gpu_overlay_and_only_for_stt_and_translate(rendered):
    overlay, resources = rendered
    for name, deployment in by_kind(resources, "Deployment").items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        if overlay == "gpu" and name in ("stt", "translate"):
            assert gpus == 1 and env["PARLEY_DEVICE"] == "cuda", name
            assert container["image"].endswith(":gpu")
        else:
            assert gpus is None and env.get("PARLEY_DEVICE", "cpu") == "cpu", (overlay, name)


def test_the_autoscaling_example_scales_stt_on_its_queue_depth():
    hpa = by_kind(render("gpu"), "HorizontalPodAutoscaler")["stt"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "stt"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "parley_batch_queue_depth"
    assert "parley_batch_queue_depth" in (K8S.parents[1] / "docs" / "deploy.md").read_text()
