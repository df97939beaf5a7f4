"""Every manifest under deploy/ validates against the Kubernetes schemas, strictly (an unknown
or misspelt field is an error), with kubernetes-validate's bundled schemas: no network."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from cogvideox_cog.health import CHECKS
from tests.conftest import PROJECT

KUBERNETES_VERSION = "1.33.0"
MANIFESTS = sorted((PROJECT / "deploy").rglob("*.yaml"))


def _resources(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _validate(resource: dict) -> None:
    """Raise unless `resource` is valid; a kind without a schema raises too (the command line
    tool only warns about it)."""
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_there_are_manifests_to_validate():
    assert MANIFESTS, "no *.yaml under deploy/"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(PROJECT)))
def test_manifest_validates_against_the_kubernetes_schemas(path):
    resources = _resources(path)
    assert resources, f"{path} holds no resource"
    for resource in resources:
        _validate(resource)


def test_the_validator_rejects_a_misspelt_field():
    """The check above can fail: the same Deployment with one key misspelt does not pass."""
    deployment = next(r for p in MANIFESTS for r in _resources(p) if r["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    spec = broken["spec"]["template"]["spec"]
    spec["terminationGracePeriod"] = spec.pop("terminationGracePeriodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)


def test_the_deployment_probes_run_the_health_command_and_allow_cogs_stop_time():
    deployments = [r for path in MANIFESTS for r in _resources(path) if r["kind"] == "Deployment"]
    assert deployments
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        # Cog waits 10 s for a busy worker when SIGTERM does not reach it; allow for that.
        assert pod["terminationGracePeriodSeconds"] >= 15
        (container,) = pod["containers"]
        for probe, check in (("livenessProbe", "live"), ("readinessProbe", "ready")):
            command = container[probe]["exec"]["command"]
            assert command == ["python", "-m", "cogvideox_cog.health", check]
            assert check in CHECKS
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        mounts = {m["name"] for m in container["volumeMounts"]}
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert mounts & claims, "the weights cache is not on a persistent volume"
