"""Text-to-video end to end: the real Cog server, setup's download, predictions over HTTP."""

from __future__ import annotations

import uuid
from pathlib import Path

import av
import numpy as np
import pytest

from cogvideox_cog.devtools.tiny import TINY
from cogvideox_cog.media.mp4 import probe_mp4
from tests.cog_server import CogServerError, WebhookReceiver, save_data_uri
from tests.http_peers import UploadServer

pytestmark = pytest.mark.e2e

TINY_H, TINY_W = TINY[("1.0", "t2v")].height, TINY[("1.0", "t2v")].width
FAST = {"prompt": "a panda plays guitar in a bamboo forest", "num_inference_steps": 2}


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("predict_t2v.py", "cogvideox-5b", "1.0-t2v")


def _video(response, tmp_path):
    assert response["status"] == "succeeded", response.get("error")
    return save_data_uri(response["output"], tmp_path / f"{uuid.uuid4().hex}.mp4")


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_output_is_a_browser_playable_h264_mp4_with_the_requested_frames(server, tmp_path):
    video = _video(server.predict({**FAST, "num_frames": 17, "seed": 1}), tmp_path)
    info = probe_mp4(video)
    assert (info["codec"], info["pix_fmt"], info["faststart"]) == ("h264", "yuv420p", True)
    assert info["frames"] == 17
    assert (info["width"], info["height"]) == (TINY_W, TINY_H)


def test_fps_is_the_variants_unless_given(server, tmp_path):
    default = probe_mp4(_video(server.predict({**FAST, "num_frames": 9}), tmp_path))
    given = probe_mp4(_video(server.predict({**FAST, "num_frames": 9, "fps": 24}), tmp_path))
    assert (default["fps"], given["fps"]) == (8, 24)


def test_default_frame_count_is_the_variants(server, tmp_path):
    assert probe_mp4(_video(server.predict(FAST), tmp_path))["frames"] == 49


def test_same_seed_gives_identical_frames(server, tmp_path):
    inputs = {**FAST, "num_frames": 9, "seed": 1234}
    first = _frames(_video(server.predict(inputs), tmp_path))
    second = _frames(_video(server.predict(inputs), tmp_path))
    other = _frames(_video(server.predict({**inputs, "seed": 4321}), tmp_path))
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


def test_seed_is_logged_and_recorded_as_a_metric(server):
    response = server.predict({**FAST, "num_frames": 9, "seed": 77})
    assert response["metrics"]["seed"] == 77
    assert "seed: 77" in response["logs"]


def test_empty_seed_draws_a_random_one_and_reports_it(server):
    first = server.predict({**FAST, "num_frames": 9})["metrics"]["seed"]
    second = server.predict({**FAST, "num_frames": 9})["metrics"]["seed"]
    assert first != second
    assert 0 <= first < 2**32


def test_each_denoising_step_is_logged_with_progress(server):
    logs = server.predict({**FAST, "num_frames": 9, "num_inference_steps": 3})["logs"]
    for step in (1, 2, 3):
        assert f"step {step}/3, " in logs


def test_timings_are_recorded_as_metrics(server):
    metrics = server.predict({**FAST, "num_frames": 9})["metrics"]
    phases = ("prepare_seconds", "denoise_seconds", "decode_seconds", "encode_seconds")
    for name in (*phases, "total_seconds"):
        assert metrics[name] >= 0
    # Rounded to the millisecond each.
    assert abs(sum(metrics[name] for name in phases) - metrics["total_seconds"]) < 0.01


def test_frame_count_off_the_rule_fails_with_the_allowed_values(server):
    response = server.predict({**FAST, "num_frames": 20})
    assert response["status"] == "failed"
    assert "num_frames=20" in response["error"]
    assert "9, 17, 25, 33, 41, 49" in response["error"]
    # coglet marks itself READY a moment after it answers a failed prediction.
    server.wait_idle(timeout=10)


@pytest.mark.parametrize(
    ("name", "value"),
    [("guidance_scale", 50.0), ("num_inference_steps", 0), ("num_frames", 200), ("seed", -1)],
)
def test_out_of_range_input_is_refused_by_the_schema_with_422(server, name, value):
    response = server.predict({**FAST, name: value}, expect=422)
    assert response["detail"][0]["loc"][-1] == name
    assert server.status() == "READY"


def test_missing_prompt_is_refused_by_the_schema_with_422(server):
    response = server.predict({"num_inference_steps": 2}, expect=422)
    assert response["detail"][0]["loc"][-1] == "prompt"


def test_blank_prompt_fails_with_what_to_do(server):
    response = server.predict({**FAST, "prompt": "   "})
    assert response["status"] == "failed"
    assert "prompt is empty" in response["error"]


def test_cancel_stops_between_steps_and_the_next_prediction_works(server, tmp_path):
    with WebhookReceiver() as hooks:
        server.predict_async(
            "cancel-me",
            {**FAST, "num_frames": 49, "num_inference_steps": 500},
            webhook=hooks.url,
        )
        hooks.wait_until(lambda: "step 2/500" in hooks.latest_logs("cancel-me"), timeout=120)
        assert server.cancel("cancel-me")
        final = hooks.wait_for("cancel-me", timeout=60)
    assert final["status"] == "canceled"
    assert "step 500/500" not in (final.get("logs") or "")
    server.wait_idle()
    assert probe_mp4(_video(server.predict({**FAST, "num_frames": 9}), tmp_path))["frames"] == 9


def test_a_1_5_variant_takes_16n_plus_1_frames_at_16_fps(start_server, tmp_path):
    server = start_server(
        "predict_t2v.py", "cogvideox1.5-5b", "1.5-t2v", COGVIDEOX_RESOLUTION=f"{TINY_H}x{TINY_W}"
    )
    info = probe_mp4(_video(server.predict({**FAST, "num_frames": 33}), tmp_path))
    assert (info["frames"], info["fps"]) == (33, 16)
    assert (info["width"], info["height"]) == (TINY_W, TINY_H)
    refused = server.predict({**FAST, "num_frames": 25})
    assert "16*N+1" in refused["error"]


def test_a_2b_server_sets_up_on_2b_weights_and_renders_with_constant_guidance(
    start_server, tmp_path
):
    """COGVIDEOX_MODEL=cogvideox-2b on weights without rotary embeddings: setup's download,
    checks and DDIM swap, then a prediction with 2B's constant guidance by default."""
    server = start_server("predict_t2v.py", "cogvideox-2b", "1.0-t2v-2b")
    response = server.predict({**FAST, "num_frames": 9})
    assert probe_mp4(_video(response, tmp_path))["frames"] == 9
    assert "guidance 6, constant" in response["logs"]


def test_an_i2v_variant_fails_setup_of_the_t2v_predictor(start_server):
    with pytest.raises(CogServerError, match="is for image-to-video"):
        start_server("predict_t2v.py", "cogvideox-5b-i2v", "1.0-i2v")


def test_weights_that_cannot_make_the_variants_size_fail_setup_naming_the_override(start_server):
    """The tiny 1.5 weights bound their rotary grid below 1.5's 768x1360."""
    with pytest.raises(CogServerError, match="COGVIDEOX_RESOLUTION"):
        start_server("predict_t2v.py", "cogvideox1.5-5b", "1.5-t2v")


@pytest.mark.parametrize("mode", ["fast", "faster"])
def test_speed_mode_runs_and_is_logged(server, tmp_path, mode):
    inputs = {**FAST, "num_frames": 9, "num_inference_steps": 6, "seed": 3}
    response = server.predict({**inputs, "speed_mode": mode})
    assert probe_mp4(_video(response, tmp_path))["frames"] == 9
    assert f"speed_mode {mode}: step caching" in response["logs"]


def test_one_process_renders_in_the_worker_itself_with_no_rank_processes(server):
    """Without CUDA and without COGVIDEOX_GPUS, today's path: the model in Cog's worker."""
    assert server.predict({**FAST, "num_frames": 9})["status"] == "succeeded"
    tasks = Path(f"/proc/{server.worker_pid()}/task").iterdir()
    assert [pid for task in tasks for pid in (task / "children").read_text().split()] == []
    assert "ranks ready" not in server.log_text()


def test_a_requests_output_file_prefix_is_ignored_and_the_output_comes_back_inline(server):
    """Older Cog servers uploaded to a request's `output_file_prefix`; Cog 0.23.1 drops it
    without a word (docs/http-api.md): only the server's --upload-url uploads."""
    with UploadServer() as prefix:
        body = {"input": {**FAST, "num_frames": 9}, "output_file_prefix": prefix.url}
        response = server.send(body=body)
        assert response.status_code == 200, response.text
        assert response.json()["output"].startswith("data:video/mp4;base64,")
        assert prefix.uploads == []
