"""upscale and interpolate end to end: a real Cog server whose setup fetches tiny random RIFE
and Real-ESRGAN files over HTTP; the mp4's frames, fps and size are what docs/postprocessing.md
says. Image-to-video upscaled and video-to-video interpolated, and each refusing the step its
deployment did not enable: tests/test_e2e_i2v.py and test_e2e_v2v.py."""

from __future__ import annotations

import uuid

import av
import numpy as np
import pytest

from cogvideox_cog.devtools.tiny import TINY
from cogvideox_cog.media.mp4 import probe_mp4
from tests.cog_server import CogServerError, WebhookReceiver, save_data_uri
from tests.conftest import optional_steps

pytestmark = pytest.mark.e2e

TINY_H, TINY_W = TINY[("1.0", "t2v")].height, TINY[("1.0", "t2v")].width
FAST = {"prompt": "a panda plays guitar", "num_inference_steps": 2, "num_frames": 9, "seed": 5}


@pytest.fixture(scope="module")
def t2v(start_server, weights_server):
    env = optional_steps(weights_server, interpolate=True, upscale=True)
    return start_server("predict_t2v.py", "cogvideox-5b", "1.0-t2v", **env)


def _video(response, tmp_path):
    assert response["status"] == "succeeded", response.get("error")
    return save_data_uri(response["output"], tmp_path / f"{uuid.uuid4().hex}.mp4")


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_interpolate_2x_gives_twice_the_frames_less_one_at_twice_the_fps(t2v, tmp_path):
    response = t2v.predict({**FAST, "interpolate": "2x"})
    info = probe_mp4(_video(response, tmp_path))
    assert (info["frames"], info["fps"]) == (17, 16)
    assert (info["codec"], info["pix_fmt"]) == ("h264", "yuv420p")
    assert "interpolate 2x: 9 -> 17 frames, 8 -> 16 fps" in response["logs"]
    assert response["metrics"]["interpolate_seconds"] > 0


def test_interpolate_4x_multiplies_a_given_fps(t2v, tmp_path):
    info = probe_mp4(_video(t2v.predict({**FAST, "interpolate": "4x", "fps": 10}), tmp_path))
    assert (info["frames"], info["fps"]) == (33, 40)


def test_upscale_4x_gives_four_times_the_width_and_height_and_logs_it(t2v, tmp_path):
    response = t2v.predict({**FAST, "upscale": "4x"})
    info = probe_mp4(_video(response, tmp_path))
    assert (info["width"], info["height"], info["frames"]) == (TINY_W * 4, TINY_H * 4, 9)
    assert f"{TINY_W}x{TINY_H} -> {TINY_W * 4}x{TINY_H * 4}" in response["logs"]
    assert response["metrics"]["upscale_seconds"] > 0


def test_upscale_and_interpolate_together(t2v, tmp_path):
    response = t2v.predict({**FAST, "upscale": "2x", "interpolate": "2x"})
    info = probe_mp4(_video(response, tmp_path))
    assert (info["width"], info["height"]) == (TINY_W * 2, TINY_H * 2)
    assert (info["frames"], info["fps"]) == (17, 16)
    phases = ("prepare", "denoise", "decode", "upscale", "interpolate", "encode")
    metrics = response["metrics"]
    total = sum(metrics[f"{name}_seconds"] for name in phases)
    assert abs(total - metrics["total_seconds"]) < 0.01


def test_none_gives_the_same_frames_as_leaving_the_inputs_out(t2v, tmp_path):
    plain = _frames(_video(t2v.predict(FAST), tmp_path))
    none = _frames(
        _video(t2v.predict({**FAST, "interpolate": "none", "upscale": "none"}), tmp_path)
    )
    assert np.array_equal(plain, none)
    assert plain.shape == (9, TINY_H, TINY_W, 3)


def test_cancel_stops_interpolation_between_frame_pairs(t2v, tmp_path):
    long = {**FAST, "num_frames": 49, "upscale": "4x", "interpolate": "4x"}
    with WebhookReceiver() as hooks:
        t2v.predict_async("cancel-interpolation", long, webhook=hooks.url)
        hooks.wait_until(
            lambda: "interpolate 4x:" in hooks.latest_logs("cancel-interpolation"), timeout=120
        )
        assert t2v.cancel("cancel-interpolation")
        final = hooks.wait_for("cancel-interpolation", timeout=60)
    assert final["status"] == "canceled"
    assert "interpolate in " not in (final.get("logs") or "")  # its line once all are made
    t2v.wait_idle()
    assert probe_mp4(_video(t2v.predict(FAST), tmp_path))["frames"] == 9


def test_weights_that_are_not_the_architecture_fail_setup_naming_the_variable(
    start_server, weights_server
):
    env = {"COGVIDEOX_UPSCALE": "1", "COGVIDEOX_UPSCALE_URL": weights_server.url("rife.pkl")}
    with pytest.raises(CogServerError, match="COGVIDEOX_UPSCALE_URL"):
        start_server("predict_t2v.py", "cogvideox-5b", "1.0-t2v", **env)
