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


def test_the_image_installs_the_cog_sdk_the_tests_run():
    """Without build.sdk_version, `cog build` installs the latest Cog SDK from PyPI, which
    the server tests have not run."""
    pins = dict(
        line.split("#")[0].strip().split("==")
        for line in (PROJECT / "requirements-dev.txt").read_text().splitlines()
        if "==" in line
    )
    assert _config("cog.yaml")["build"]["sdk_version"] == pins["cog"]
