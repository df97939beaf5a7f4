"""The three cog*.yaml files build one image: their build and environment blocks agree."""

from __future__ import annotations

import ast
import shlex
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.utils import canonicalize_name

from cogvideox_cog import settings

PROJECT = Path(__file__).resolve().parent.parent
FILES = {"t2v": "cog.yaml", "i2v": "cog-i2v.yaml", "v2v": "cog-v2v.yaml"}


def _config(name: str) -> dict:
    return yaml.safe_load((PROJECT / name).read_text())


@pytest.mark.parametrize("block", ["build", "environment"])
def test_every_cog_yaml_has_the_same_block(block):
    blocks = {name: _config(name)[block] for name in FILES.values()}
    assert blocks["cog-i2v.yaml"] == blocks["cog.yaml"]
    assert blocks["cog-v2v.yaml"] == blocks["cog.yaml"]


@pytest.mark.parametrize(("task", "name"), FILES.items())
def test_each_cog_yaml_runs_its_predictor_under_the_run_key(task, name):
    config = _config(name)
    assert config["run"] == f"predict_{task}.py:Predictor"
    assert "predict" not in config  # deprecated since Cog 0.20 in favour of run:


# The CUDA that each torch's Linux x86_64 wheel on PyPI is built for, from the wheel's
# Requires-Dist (torch 2.13.0: cuda-toolkit==13.0.3, nvidia-cudnn-cu13, ...).
PYPI_TORCH_CUDA = {"2.13.0": "13.0"}


def _pins(requirements: str) -> dict[str, str]:
    return dict(
        line.split("#")[0].strip().split("==")
        for line in (PROJECT / requirements).read_text().splitlines()
        if "==" in line
    )


def test_the_image_installs_the_cog_sdk_the_tests_run():
    """Without build.sdk_version, `cog build` installs the latest Cog SDK from PyPI, which
    the server tests have not run."""
    assert _config("cog.yaml")["build"]["sdk_version"] == _pins("requirements-dev.txt")["cog"]


def test_the_image_cuda_is_the_one_the_pinned_torch_is_built_for():
    """Cog's torch/CUDA table lacks torch 2.13, so `cog build` keeps build.cuda and installs
    the pinned torch from PyPI: a base of another CUDA would only let the image start on a
    driver too old for that torch (docs/operations.md#cuda-and-the-driver)."""
    torch = _pins("requirements.txt")["torch"]
    assert torch in PYPI_TORCH_CUDA, (
        f"torch=={torch}: add the CUDA its Linux wheel on PyPI requires to PYPI_TORCH_CUDA, "
        "and set build.cuda in the cog*.yaml files to it"
    )
    assert _config("cog.yaml")["build"]["cuda"] == PYPI_TORCH_CUDA[torch]


def test_the_image_is_built_for_a_gpu():
    """Without build.gpu Cog picks a base image without CUDA and runs the model without a GPU."""
    assert _config("cog.yaml")["build"]["gpu"] is True


def test_the_image_python_is_the_one_the_tests_run():
    """pyproject.toml allows one Python minor (the tested one); the image must build that one."""
    assert (
        _config("cog.yaml")["build"]["python_version"]
        == f"{sys.version_info.major}.{sys.version_info.minor}"
    )


# The pget that tests/test_weights.py's stand-in behaves like, for the x86_64 image Cog builds.
PGET_URL = "https://github.com/replicate/pget/releases/download/v0.8.2/pget_linux_x86_64"


def test_the_image_installs_pget_where_the_weights_download_finds_it():
    """cogvideox_cog.weights uses `pget` when it is on PATH, else the slower built-in download:
    the build fetches the stand-in's release, fails on an HTTP error instead of saving the
    error page, and leaves an executable in /usr/local/bin."""
    (command,) = _config("cog.yaml")["build"]["run"]
    words = shlex.split(command)
    assert words[:2] == ["curl", "-fsSL"]
    assert words[2:5] == ["-o", "/usr/local/bin/pget", PGET_URL]
    assert words[5:] == ["&&", "chmod", "+x", "/usr/local/bin/pget"]


def _third_party_imports() -> set[str]:
    """Top-level modules outside the standard library that the predictors and package import."""
    sources = [*PROJECT.glob("predict_*.py"), *(PROJECT / "cogvideox_cog").rglob("*.py")]
    modules = set()
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"__future__", "cogvideox_cog"}


def test_the_image_requirements_name_every_module_the_code_imports():
    """The image gets the build's python_requirements and the Cog SDK (sdk_version) only.
    A module imported here is pinned by name, not left to come with another package: that
    package may drop it, and its version would float with each build."""
    requirements = _config("cog.yaml")["build"]["python_requirements"]
    named = {canonicalize_name(name) for name in _pins(requirements)} | {"cog"}
    distributions = metadata.packages_distributions()
    missing = {
        module: distributions.get(module)
        for module in _third_party_imports()
        if not {canonicalize_name(d) for d in distributions.get(module, [])} & named
    }
    assert not missing, f"imported, not named in {requirements}: {missing}"


def test_the_image_requirements_pin_the_versions_the_tests_run():
    """Every line is pinned with ==, to the version installed here (script/setup installs
    requirements-dev.txt, which includes requirements.txt): the image runs what was tested."""
    lines = [
        line.split("#")[0].strip()
        for line in (PROJECT / "requirements.txt").read_text().splitlines()
    ]
    requirements = [line for line in lines if line]
    assert all("==" in line for line in requirements), requirements
    for name, version in _pins("requirements.txt").items():
        assert metadata.version(name).split("+")[0] == version, name
    assert "-r requirements.txt" in (PROJECT / "requirements-dev.txt").read_text().splitlines()


def test_the_image_environment_sets_only_known_settings():
    """setup warns about an unknown COGVIDEOX_* name and ignores its value."""
    names = [item.split("=", 1)[0] for item in _config("cog.yaml")["environment"]]
    unknown = [n for n in names if n.startswith(settings.PREFIX) and n not in settings.NAMES]
    assert not unknown
