"""LoRAs end to end: a real Cog server fetches them from a loopback server by lora_url.

Image-to-video and video-to-video taking a LoRA, each on its own predictor's server:
tests/test_e2e_i2v.py and test_e2e_v2v.py.
"""

from __future__ import annotations

import tarfile
import uuid

import av
import numpy as np
import pytest

from tests.cog_server import save_data_uri
from tests.file_server import FileServer
from tests.lora_files import lora_tensors, save_diffusers_lora, save_sat_lora

pytestmark = pytest.mark.e2e

T2V = {"prompt": "a panda plays guitar", "num_inference_steps": 2, "num_frames": 9, "seed": 11}


@pytest.fixture(scope="module")
def loras(tiny_weights, tmp_path_factory) -> FileServer:
    """A training run's output folder as a tar, a SAT export and a LoRA for a deeper model."""
    root = tmp_path_factory.mktemp("e2e-loras")
    t2v = tiny_weights["1.0-t2v"] / "transformer"
    run = root / "run" / "output"
    save_diffusers_lora(lora_tensors(t2v, 4, seed=1), run / "checkpoint-100")
    save_diffusers_lora(lora_tensors(t2v, 4, seed=2), run)
    with tarfile.open(root / "run.tar", "w") as archive:
        archive.add(run, arcname="output")
    save_sat_lora(lora_tensors(t2v, 4, seed=2), root / "sat")
    save_diffusers_lora(lora_tensors(t2v, 4, seed=3, num_layers=3), root / "deeper")
    server = FileServer(root)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def t2v(start_server):
    return start_server("predict_t2v.py", "cogvideox-5b", "1.0-t2v")


def _frames(response, tmp_path) -> np.ndarray:
    assert response["status"] == "succeeded", response.get("error")
    path = save_data_uri(response["output"], tmp_path / f"{uuid.uuid4().hex}.mp4")
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_lora_from_a_training_runs_tar_changes_the_video_and_is_logged(t2v, loras, tmp_path):
    base = _frames(t2v.predict(T2V), tmp_path)
    response = t2v.predict({**T2V, "lora_url": loras.url("run.tar"), "lora_scale": 1.0})
    assert not np.array_equal(_frames(response, tmp_path), base)
    assert "using output/pytorch_lora_weights.safetensors from the tar" in response["logs"]
    assert "lora: scale applied = lora_scale 1 x alpha/rank 1 = 1" in response["logs"]


def test_prediction_after_a_lora_one_is_the_base_model_exactly(t2v, loras, tmp_path):
    base = _frames(t2v.predict(T2V), tmp_path)
    _frames(t2v.predict({**T2V, "lora_url": loras.url("run.tar")}), tmp_path)
    np.testing.assert_array_equal(_frames(t2v.predict(T2V), tmp_path), base)


def test_sat_exported_lora_is_applied_as_cli_demo_applies_it(t2v, loras, tmp_path):
    """No alpha in the file: alpha = rank, as for the training run's own LoRA (same tensors)."""
    url = loras.url("sat/pytorch_lora_weights.safetensors")
    t2v.predict(T2V)  # no LoRA on the model: the same one (same bytes) would only be rescaled
    sat = t2v.predict({**T2V, "lora_url": url, "lora_scale": 0.25})
    assert "pipeline layout" in sat["logs"]
    assert "lora_scale 0.25 x alpha/rank 1 = 0.25" in sat["logs"]
    same = t2v.predict({**T2V, "lora_url": loras.url("run.tar"), "lora_scale": 0.25})
    np.testing.assert_array_equal(_frames(sat, tmp_path), _frames(same, tmp_path))


def test_lora_for_another_model_fails_clearly_and_the_server_stays_healthy(t2v, loras, tmp_path):
    url = loras.url("deeper/pytorch_lora_weights.safetensors")
    response = t2v.predict({**T2V, "lora_url": url})
    assert response["status"] == "failed"
    assert "does not fit cogvideox-5b's transformer" in response["error"]
    t2v.wait_idle(timeout=10)  # coglet marks itself READY a moment after it answers
    _frames(t2v.predict(T2V), tmp_path)


def test_pickle_lora_url_fails_before_any_download(t2v, loras):
    requests = len(loras.requests)
    response = t2v.predict({**T2V, "lora_url": loras.url("output/adapter_model.bin")})
    assert response["status"] == "failed"
    assert "pickle" in response["error"]
    assert len(loras.requests) == requests
