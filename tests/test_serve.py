"""`script/serve`, as the README offers it to a newcomer on a machine without a GPU: the real
Cog server, on a tiny random model, with the shell's COGVIDEOX_* paths taken from the
repository although the server runs in a folder of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cogvideox_cog.media.mp4 import probe_mp4
from tests.cog_server import CogServer, free_port, save_data_uri

pytestmark = pytest.mark.e2e

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def weights_dir() -> Iterator[Path]:
    """A weights folder given relative to the repository, in its ignored .cog folder."""
    relative = Path(".cog") / f"test-serve-{uuid.uuid4().hex[:8]}" / "weights"
    yield relative
    shutil.rmtree(PROJECT / relative.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def served(weights_dir, tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGVIDEOX_")}
    env.pop("PYTHON", None)  # script/setup then keeps the .venv running this suite
    env["COGVIDEOX_WEIGHTS_DIR"] = str(weights_dir)
    port = free_port()
    server = CogServer(
        "predict_t2v.py:Predictor",
        cwd=PROJECT,
        log_path=tmp_path_factory.mktemp("serve") / "server.log",
        port=port,
        command=["script/serve", "t2v", "--port", str(port)],
    )
    server.env = env | {"LOG_FORMAT": "console", "NO_COLOR": "1"}
    with server:
        yield server


def test_without_a_gpu_or_weights_url_it_serves_a_tiny_model_and_says_the_video_is_noise(
    served, tmp_path
):
    response = served.predict({"prompt": "a panda", "num_inference_steps": 2, "num_frames": 9})
    assert response["status"] == "succeeded", response.get("error")
    info = probe_mp4(save_data_uri(response["output"], tmp_path / "served.mp4"))
    assert (info["frames"], info["codec"]) == (9, "h264")
    assert "the video is NOISE" in served.log_text()


def test_a_relative_weights_dir_is_taken_from_the_repository_not_the_server_folder(
    served, weights_dir
):
    assert (PROJECT / weights_dir / "tiny-1.0-t2v" / "model_index.json").is_file()


def test_a_variant_the_predictor_cannot_serve_stops_it_before_a_server_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGVIDEOX_")}
    env.pop("PYTHON", None)
    env |= {"COGVIDEOX_MODEL": "cogvideox-5b-i2v", "COGVIDEOX_WEIGHTS_DIR": str(tmp_path)}
    done = subprocess.run(
        ["script/serve", "v2v", "--port", str(free_port())],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # a server that started would hold it here
    )
    assert done.returncode != 0
    assert "predict_v2v.py (cog-v2v.yaml)" in done.stderr
    assert "serving" not in done.stdout
