"""The three cog*.yaml files build one image: their build and environment blocks agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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
