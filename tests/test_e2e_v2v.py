"""Video-to-video end to end: the real Cog server with a clip sent as a data URI.

Its deployment enables interpolate and enhance_prompt (an OpenAI-compatible endpoint on
127.0.0.1) but not upscale, so one server shows both: the enabled inputs working, the other
refused. It also takes a LoRA (the rest of LoRAs end to end: tests/test_e2e_lora.py).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import av
import numpy as np
import pytest
from av.video.reformatter import ColorTrc

from cogvideox_cog.devtools.tiny import TINY
from cogvideox_cog.media.mp4 import encode_mp4, probe_mp4
from cogvideox_cog.prompts.instruction import instruction
from tests.chat_server import rewrite_of
from tests.cog_server import data_uri, save_data_uri
from tests.colour_clips import write_clip
from tests.conftest import optional_steps
from tests.file_server import FileServer
from tests.lora_files import served_lora

pytestmark = pytest.mark.e2e

TINY_H, TINY_W = TINY[("1.0", "t2v")].height, TINY[("1.0", "t2v")].width
FAST = {"prompt": "a panda plays guitar", "num_inference_steps": 4, "num_frames": 9, "seed": 3}


def _clip(tmp_path, frames: int, fps: int) -> str:
    """An mp4 of moving noise, 96x64 (not the model's shape), as a data URI."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (frames, 64, 96, 3), dtype=np.uint8)
    path = encode_mp4(pixels, tmp_path / f"{uuid.uuid4().hex}.mp4", fps=fps)
    return data_uri(path.read_bytes(), "video/mp4")


@pytest.fixture(scope="module")
def server(start_server, weights_server, chat_endpoint):
    return start_server(
        "predict_v2v.py",
        "cogvideox-5b",
        "1.0-t2v",
        **optional_steps(weights_server, interpolate=True, endpoint=chat_endpoint),
    )


@pytest.fixture(scope="module")
def lora(tiny_weights, tmp_path_factory):
    """A LoRA for the tiny text-to-video transformer, served over HTTP."""
    transformer = tiny_weights["1.0-t2v"] / "transformer"
    with served_lora(transformer, tmp_path_factory.mktemp("v2v-lora"), seed=2) as url:
        yield url


def _frames(response, tmp_path) -> np.ndarray:
    assert response["status"] == "succeeded", response.get("error")
    path = save_data_uri(response["output"], tmp_path / f"{uuid.uuid4().hex}.mp4")
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_strength_is_checked_before_the_clip_is_fetched(server, tmp_path):
    files = FileServer(tmp_path)
    try:
        response = server.predict({**FAST, "strength": 0.1, "video": files.url("clip.mp4")})
    finally:
        files.stop()
    assert response["status"] == "failed" and "leaves no denoising step" in response["error"]
    assert files.requests == []
    server.wait_idle(timeout=10)


def test_output_has_the_requested_frames_fps_and_the_model_size(server, tmp_path):
    response = server.predict(
        {**FAST, "video": _clip(tmp_path, 36, 30), "strength": 0.5, "fps": 12}
    )
    assert response["status"] == "succeeded", response.get("error")
    info = probe_mp4(save_data_uri(response["output"], tmp_path / "out.mp4"))
    assert (info["codec"], info["pix_fmt"], info["faststart"]) == ("h264", "yuv420p", True)
    assert (info["frames"], info["fps"]) == (9, 12)
    assert (info["width"], info["height"]) == (TINY_W, TINY_H)
    logs = response["logs"]
    assert "video: 1.2 s at 30 fps" in logs and f"96x64 -> {TINY_W}x{TINY_H}" in logs
    # strength 0.5 of 4 steps: 2 denoising steps.
    assert "step 2/2, " in logs and "step 3/" not in logs


def test_a_too_short_clip_fails_with_what_to_do(server, tmp_path):
    response = server.predict({**FAST, "num_frames": 17, "video": _clip(tmp_path, 10, 8)})
    assert response["status"] == "failed"
    assert "too short" in response["error"] and "num_frames=9" in response["error"]
    # coglet marks itself READY a moment after it answers a failed prediction.
    server.wait_idle(timeout=10)


def test_convert_colour_tone_maps_an_hdr_clip_that_is_otherwise_read_as_upstream_reads_it(
    server, tmp_path
):
    hlg = write_clip(tmp_path / "hlg.mp4", [(0.75,) * 3, (0.38,) * 3], ColorTrc.ARIB_STD_B67)
    inputs = {**FAST, "video": data_uri(Path(hlg).read_bytes(), "video/mp4")}
    as_upstream = server.predict(inputs)
    converted = server.predict({**inputs, "convert_colour": True})
    assert "colours read as they are, as upstream reads them" in as_upstream["logs"]
    assert "; HDR (HLG) tone-mapped to SDR BT.709" in converted["logs"]
    assert not np.array_equal(_frames(as_upstream, tmp_path), _frames(converted, tmp_path))


def test_a_file_that_is_not_a_video_fails_with_the_accepted_formats(server):
    response = server.predict({**FAST, "video": data_uri(b"just some text", "text/plain")})
    assert response["status"] == "failed"
    assert "mp4, webm, mov or gif" in response["error"]


def test_strength_out_of_range_is_refused_by_the_schema_with_422(server, tmp_path):
    response = server.predict({**FAST, "video": _clip(tmp_path, 9, 8), "strength": 0.0}, expect=422)
    assert response["detail"][0]["loc"][-1] == "strength"


def test_the_video_is_required(server):
    response = server.predict(FAST, expect=422)
    assert response["detail"][0]["loc"][-1] == "video"


def test_a_clip_on_the_server_disk_is_not_an_input(server, tmp_path):
    """A bare path (or file: URL) of a real clip next to the server is refused, not read."""
    clip = tmp_path / "clip.mp4"
    encode_mp4(np.zeros((9, 64, 96, 3), dtype=np.uint8), clip, fps=8)
    for value in (str(clip), clip.as_uri()):
        response = server.predict({**FAST, "video": value})
        assert response["status"] == "failed"
        assert "is not an http(s) URL or a data: URI of a video" in response["error"]
        server.wait_idle(timeout=10)


def test_upscale_where_the_deployment_did_not_enable_it_is_refused_naming_the_variable(
    server, tmp_path
):
    response = server.predict({**FAST, "video": _clip(tmp_path, 9, 8), "upscale": "4x"})
    assert response["status"] == "failed"
    assert "COGVIDEOX_UPSCALE=1" in response["error"]
    assert "step 1/" not in server.prediction_log(response["id"])  # refused before any work
    server.wait_idle(timeout=10)
    assert server.status() == "READY"


def test_interpolate_2x_gives_twice_the_frames_less_one_at_twice_the_fps(server, tmp_path):
    response = server.predict({**FAST, "video": _clip(tmp_path, 9, 8), "interpolate": "2x"})
    assert response["status"] == "succeeded", response.get("error")
    info = probe_mp4(save_data_uri(response["output"], tmp_path / "out.mp4"))
    assert (info["frames"], info["fps"]) == ((9 - 1) * 2 + 1, 8 * 2)
    assert (info["width"], info["height"]) == (TINY_W, TINY_H)
    assert response["metrics"]["interpolate_seconds"] > 0


def test_enhance_prompt_asks_the_endpoint_once_with_the_video_to_video_instruction(
    server, chat, tmp_path
):
    response = server.predict({**FAST, "video": _clip(tmp_path, 9, 8), "enhance_prompt": True})
    assert response["status"] == "succeeded", response.get("error")
    assert response["metrics"]["enhanced_prompt"] == rewrite_of(FAST["prompt"])
    (sent,) = chat.bodies()
    assert sent["messages"][0]["content"] == instruction("v2v")
    assert sent["messages"][-1]["content"] == FAST["prompt"]


def test_video_to_video_takes_a_lora_on_the_text_to_video_weights(server, lora, tmp_path):
    inputs = {**FAST, "video": _clip(tmp_path, 9, 8), "strength": 0.5}
    base = _frames(server.predict(inputs), tmp_path)
    with_lora = server.predict({**inputs, "lora_url": lora})
    assert not np.array_equal(_frames(with_lora, tmp_path), base)
    assert "lora: loaded" in with_lora["logs"]
