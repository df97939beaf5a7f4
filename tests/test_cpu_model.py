"""`python -m cogvideox_cog.devtools.cpu_model`, which `script/serve` runs before it starts the
server: its exports must give a predictor that sets up, and a variant the predictor cannot
serve must stop it there, named as the server would."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent


def settings(model: str, weights_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGVIDEOX_")}
    return env | {"COGVIDEOX_MODEL": model, "COGVIDEOX_WEIGHTS_DIR": str(weights_dir)}


def run_python(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def cpu_model(task: str, model: str, weights_dir: Path) -> subprocess.CompletedProcess:
    command = ["-m", "cogvideox_cog.devtools.cpu_model", task]
    return run_python(command, settings(model, weights_dir))


def test_an_image_to_video_variant_for_video_to_video_fails_naming_the_v2v_predictor(tmp_path):
    done = cpu_model("v2v", "cogvideox-5b-i2v", tmp_path)
    assert done.returncode != 0
    assert done.stdout == ""  # no exports for script/serve to run a server with
    assert "predict_v2v.py (cog-v2v.yaml)" in done.stderr
    assert "predict_t2v.py" not in done.stderr
    assert "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())  # no tiny model built for a server that cannot start


@pytest.mark.parametrize(
    ("task", "model"),
    [
        ("t2v", "cogvideox1.5-5b"),
        ("i2v", "cogvideox1.5-5b-i2v"),
        ("v2v", "cogvideox1.5-5b"),
        ("t2v", "cogvideox-2b"),
    ],
)
def test_the_exports_for_a_variant_set_its_predictor_up(task, model, tmp_path):
    """The tiny 1.5 model's rotary grid cannot hold 1.5's own 768x1360, and setup refuses
    weights of another shape than the variant's (2B has no rotary embeddings)."""
    done = cpu_model(task, model, tmp_path)
    assert done.returncode == 0, done.stderr
    exported = dict(shlex.split(line)[1].split("=", 1) for line in done.stdout.splitlines())
    setup = run_python(
        ["-c", f"import predict_{task}; predict_{task}.Predictor().setup()"],
        settings(model, tmp_path) | exported,
    )
    assert setup.returncode == 0, setup.stderr[-3000:]
