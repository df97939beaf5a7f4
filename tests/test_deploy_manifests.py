"""Every manifest under deploy/ validates against the Kubernetes schemas, strictly (an unknown
or misspelt field is an error), with kubernetes-validate's bundled schemas: no network.

The deployment examples (the manifests, and the `docker run` with a health check in
docs/operations.md) agree with the code: the COGVIDEOX_* names they set are settings, the
weights cache they name is on the volume they mount, and each probe is given longer than the
probe command waits for Cog.
"""

from __future__ import annotations

import copy
import itertools
import re
import shlex
import urllib.parse
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from cogvideox_cog import settings
from cogvideox_cog.health import CHECKS, TIMEOUT_S, default_url
from cogvideox_cog.weights.cache import WEIGHTS_DIR_ENV
from tests.conftest import PROJECT
from tests.test_docs import code_commands

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


# In a Cog image the project is /src, so the cache is /src/weights unless the setting moves it.
IMAGE_WEIGHTS_DIR = PurePosixPath("/src/weights")
PROBES = ("livenessProbe", "readinessProbe", "startupProbe")


def _setting_problems(names: list[str]) -> list[str]:
    """COGVIDEOX_* names that are not settings: setup only warns, and the value is ignored."""
    return [
        f"{name} is not a setting: it would be ignored"
        for name in names
        if name.startswith(settings.PREFIX) and name not in settings.NAMES
    ]


def _cache_problems(cache: str | None, volumes: list[str]) -> list[str]:
    folder = PurePosixPath(cache) if cache else IMAGE_WEIGHTS_DIR
    mounts = [PurePosixPath(v) for v in volumes]
    if any(folder == m or m in folder.parents for m in mounts):
        return []
    return [f"{WEIGHTS_DIR_ENV}: the cache {folder} is on no volume: each container downloads"]


def deployment_problems(deployment: dict) -> list[str]:
    """What in a Deployment disagrees with the code (see the module docstring)."""
    pod = deployment["spec"]["template"]["spec"]
    claims = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
    problems = []
    for container in pod["containers"]:
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        problems += _setting_problems(list(env))
        mounts = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in claims]
        problems += _cache_problems(env.get(WEIGHTS_DIR_ENV), mounts)
        for probe in PROBES:
            seconds = container.get(probe, {}).get("timeoutSeconds", 1)  # Kubernetes' default
            if probe in container and seconds <= TIMEOUT_S:
                problems.append(
                    f"{probe}: timeoutSeconds {seconds} cuts short the probe's {TIMEOUT_S:g} s wait"
                )
    return problems


def docker_run_problems(command: str) -> list[str]:
    """The same checks for a `docker run` command line."""
    words = shlex.split(command)

    def values(flag: str) -> list[str]:
        return [value for word, value in itertools.pairwise(words) if word == flag]

    env = dict(v.partition("=")[::2] for v in values("-e"))
    problems = _setting_problems(list(env))
    problems += _cache_problems(env.get(WEIGHTS_DIR_ENV), [v.split(":")[1] for v in values("-v")])
    for timeout in values("--health-timeout"):
        if float(timeout.removesuffix("s")) <= TIMEOUT_S:
            problems.append(f"--health-timeout {timeout} cuts short the probe's {TIMEOUT_S:g} s")
    return problems


def _deployments() -> list[dict]:
    return [r for path in MANIFESTS for r in _resources(path) if r["kind"] == "Deployment"]


def test_the_deployments_keep_the_cache_on_their_volume_and_wait_for_the_probe():
    problems = [p for deployment in _deployments() for p in deployment_problems(deployment)]
    assert not problems, "\n".join(problems)


def test_a_deployment_whose_cache_is_off_its_volume_or_probe_too_short_is_reported():
    broken = copy.deepcopy(_deployments()[0])
    (container,) = broken["spec"]["template"]["spec"]["containers"]
    container["volumeMounts"][0]["mountPath"] = "/cache"
    container["livenessProbe"]["timeoutSeconds"] = 5
    container["env"].append({"name": "COGVIDEOX_OFLOAD", "value": "none"})
    assert [p.split(" ")[0] for p in deployment_problems(broken)] == [
        "COGVIDEOX_OFLOAD",
        "COGVIDEOX_WEIGHTS_DIR:",
        "livenessProbe:",
    ]


def service_link_problems(resources: list[dict]) -> list[str]:
    """Services whose link variables (NAME_SERVICE_HOST, NAME_PORT, ...: Kubernetes sets them
    in every pod of the namespace unless its spec says enableServiceLinks: false) would start
    with COGVIDEOX_, which setup then warns about as unknown settings."""
    linked = [
        r["metadata"]["name"]
        for r in resources
        if r["kind"] == "Deployment"
        and r["spec"]["template"]["spec"].get("enableServiceLinks", True)
    ]
    return [
        f"{deployment}: Service {name} sets {variable}_SERVICE_HOST, ..."
        for deployment in linked
        for name in (r["metadata"]["name"] for r in resources if r["kind"] == "Service")
        if (variable := name.upper().replace("-", "_")).startswith(settings.PREFIX)
    ]


def test_no_service_gives_the_pods_variables_that_look_like_settings():
    problems = [p for path in MANIFESTS for p in service_link_problems(_resources(path))]
    assert not problems, "\n".join(problems)


def test_a_service_whose_link_variables_look_like_settings_is_reported():
    resources = copy.deepcopy(_resources(MANIFESTS[0]))
    for resource in resources:
        if resource["kind"] == "Deployment":
            resource["spec"]["template"]["spec"].pop("enableServiceLinks", None)
    assert [p.split(" ")[2] for p in service_link_problems(resources)] == ["cogvideox-5b"]


def operations_docker_runs() -> list[str]:
    commands = code_commands((PROJECT / "docs" / "operations.md").read_text())
    return [c for _, c in commands if re.match(r"docker run\b.*--health-cmd", c)]


def test_the_documented_docker_run_keeps_the_cache_on_its_volume_and_waits_for_the_probe():
    runs = operations_docker_runs()
    assert runs, "no docker run with --health-cmd in docs/operations.md"
    problems = [p for run in runs for p in docker_run_problems(run)]
    assert not problems, "\n".join(problems)


def test_a_docker_run_without_the_cache_on_its_volume_is_reported():
    command = "docker run -v /srv/w:/weights -e COGVIDEOX_WEIGHTS_DIR=/data --health-timeout 10s x"
    assert [p.split(" ")[0] for p in docker_run_problems(command)] == [
        "COGVIDEOX_WEIGHTS_DIR:",
        "--health-timeout",
    ]


def _kinds(kind: str) -> list[dict]:
    return [r for path in MANIFESTS for r in _resources(path) if r["kind"] == kind]


def test_a_deployment_on_a_read_write_once_volume_replaces_its_pod_by_recreating_it():
    """A rolling update starts the new pod while the old one holds the volume and the GPU: the
    new pod never starts."""
    once = {
        c["metadata"]["name"]
        for c in _kinds("PersistentVolumeClaim")
        if "ReadWriteOnce" in c["spec"]["accessModes"]
    }
    for deployment in _deployments():
        claims = {
            v["persistentVolumeClaim"]["claimName"]
            for v in deployment["spec"]["template"]["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        if claims & once:
            assert deployment["spec"]["strategy"]["type"] == "Recreate"


def test_every_claim_a_pod_mounts_is_in_the_manifests():
    """A claim name with no PersistentVolumeClaim leaves the pod Pending, which no schema sees."""
    claims = {c["metadata"]["name"] for c in _kinds("PersistentVolumeClaim")}
    for deployment in _deployments():
        for volume in deployment["spec"]["template"]["spec"]["volumes"]:
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_no_container_requests_more_than_its_limit():
    """The API server refuses a request above the limit (the schemas do not), and a GPU's
    request must equal its limit."""
    for deployment in _deployments():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
            for name in set(requests) & set(limits):
                assert _quantity(requests[name]) <= _quantity(limits[name]), name


def _quantity(value: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}
    text = str(value)
    for unit, factor in units.items():
        if text.endswith(unit):
            return float(text.removesuffix(unit)) * factor
    return float(text)


def test_the_service_reaches_the_port_cog_listens_on():
    """The Service selects the Deployment's pods and targets the container port Cog serves
    (5000, the port the health probe asks too)."""
    port = urllib.parse.urlsplit(default_url()).port
    for service in _kinds("Service"):
        (deployment,) = [
            d
            for d in _deployments()
            if service["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for service_port in service["spec"]["ports"]:
            assert ports[service_port["targetPort"]] == port


def test_the_kubernetes_section_of_the_operations_guide_gives_the_manifests_figures():
    """docs/operations.md describes the manifest setting by setting; these are its numbers."""
    page = (PROJECT / "docs" / "operations.md").read_text()
    section = page.split("\n## Kubernetes\n", 1)[1].split("\n## ", 1)[0]
    (claim,) = _kinds("PersistentVolumeClaim")
    (deployment,) = _deployments()
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    live, ready = container["livenessProbe"], container["readinessProbe"]
    resources = container["resources"]
    stated = {
        f"({claim['spec']['resources']['requests']['storage'].removesuffix('Gi')} Gi, "
        f"{claim['spec']['accessModes'][0]})",
        f"{resources['requests']['cpu']} CPUs and "
        f"{resources['requests']['memory'].removesuffix('Gi')}-"
        f"{resources['limits']['memory'].removesuffix('Gi')} Gi of memory",
        f"live` every {live['periodSeconds']} s, {live['failureThreshold']} failures",
        f"ready` every {ready['periodSeconds']} s",
        f"`terminationGracePeriodSeconds: {pod['terminationGracePeriodSeconds']}`",
    }
    assert not {s for s in stated if s not in " ".join(section.split())}
