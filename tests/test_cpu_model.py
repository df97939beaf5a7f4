"""`python -m cogvideox_cog.devtools.cpu_model`, which `script/serve` runs before it starts the
server: a variant the predictor cannot serve must stop it there, named as the server would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def cpu_model(task: str, model: str, weights_dir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGVIDEOX_")}
    env |= {"COGVIDEOX_MODEL": model, "COGVIDEOX_WEIGHTS_DIR": str(weights_dir)}
    return subprocess.run(
        [sys.executable, "-m", "cogvideox_cog.devtools.cpu_model", task],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_an_image_to_video_variant_for_video_to_video_fails_naming_the_v2v_predictor(tmp_path):
    done = cpu_model("v2v", "cogvideox-5b-i2v", tmp_path)
    assert done.returncode != 0
    assert done.stdout == ""  # no exports for script/serve to run a server with
    assert "predict_v2v.py (cog-v2v.yaml)" in done.stderr
    assert "predict_t2v.py" not in done.stderr
    assert "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())  # no tiny model built for a server that cannot start
