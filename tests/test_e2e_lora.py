"""LoRAs end to end: real Cog servers fetch them from a loopback server by lora_url."""

from __future__ import annotations

import io
import tarfile
import uuid

import av
import numpy as np
import pytest
from PIL import Image

from cogvideox_cog.media.mp4 import encode_mp4
from tests.cog_server import data_uri, save_data_uri
from tests.file_server import FileServer
from tests.lora_files import lora_tensors, save_diffusers_lora, save_sat_lora

pytestmark = pytest.mark.e2e

T2V = {"prompt": "a panda plays guitar", "num_inference_steps": 2, "num_frames": 9, "seed": 11}


@pytest.fixture(scope="module")
def loras(tiny_weights, tmp_path_factory) -> FileServer:
    """A training run's output folder as a tar, a SAT export, a LoRA for a deeper model,
    and an image-to-video LoRA."""
    root = tmp_path_factory.mktemp("e2e-loras")
    t2v = tiny_weights["1.0-t2v"] / "transformer"
    run = root / "run" / "output"
    save_diffusers_lora(lora_tensors(t2v, 4, seed=1), run / "checkpoint-100")
    save_diffusers_lora(lora_tensors(t2v, 4, seed=2), run)
    with tarfile.open(root / "run.tar", "w") as archive:
        archive.add(run, arcname="output")
    save_sat_lora(lora_tensors(t2v, 4, seed=2), root / "sat")
    save_diffusers_lora(lora_tensors(t2v, 4, seed=3, num_layers=3), root / "deeper")
    i2v = tiny_weights["1.0-i2v"] / "transformer"
    save_diffusers_lora(lora_tensors(i2v, 4, seed=4), root / "i2v")
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


def test_sat_exported_lora_is_applied_at_one_over_rank(t2v, loras, tmp_path):
    url = loras.url("sat/pytorch_lora_weights.safetensors")
    sat = t2v.predict({**T2V, "lora_url": url})
    assert "SAT layout" in sat["logs"]
    assert "alpha/rank 0.25 = 0.25" in sat["logs"]
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


def test_image_to_video_takes_a_lora(start_server, loras, tmp_path):
    server = start_server("predict_i2v.py", "cogvideox-5b-i2v", "1.0-i2v")
    image = Image.linear_gradient("L").resize((80, 48)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    inputs = {**T2V, "image": data_uri(buffer.getvalue(), "image/png")}
    base = _frames(server.predict(inputs), tmp_path)
    url = loras.url("i2v/pytorch_lora_weights.safetensors")
    with_lora = _frames(server.predict({**inputs, "lora_url": url}), tmp_path)
    assert not np.array_equal(with_lora, base)


def test_video_to_video_takes_a_lora_on_the_text_to_video_weights(start_server, loras, tmp_path):
    server = start_server("predict_v2v.py", "cogvideox-5b", "1.0-t2v")
    pixels = np.random.default_rng(0).integers(0, 256, (12, 48, 80, 3), dtype=np.uint8)
    clip = encode_mp4(pixels, tmp_path / "clip.mp4", fps=8)
    inputs = {**T2V, "video": data_uri(clip.read_bytes(), "video/mp4"), "strength": 0.6}
    base = _frames(server.predict(inputs), tmp_path)
    with_lora = server.predict({**inputs, "lora_url": loras.url("run.tar")})
    assert not np.array_equal(_frames(with_lora, tmp_path), base)
    assert "lora: loaded" in with_lora["logs"]
