"""Image-to-video end to end: the real Cog server with an image sent as a data URI or URL.

Its deployment enables upscale and enhance_prompt (an OpenAI-compatible endpoint on 127.0.0.1)
but not interpolate, so one server shows both: the enabled inputs working, the other refused.
It also takes a LoRA (the rest of LoRAs end to end: tests/test_e2e_lora.py).
"""

from __future__ import annotations

import io
import uuid

import av
import numpy as np
import pytest
from PIL import Image

from cogvideox_cog.devtools.tiny import TINY
from cogvideox_cog.media.mp4 import probe_mp4
from cogvideox_cog.prompts.instruction import instruction
from tests.chat_server import rewrite_of
from tests.cog_server import CogServerError, data_uri, save_data_uri
from tests.conftest import optional_steps
from tests.file_server import FileServer
from tests.icc_profiles import adobe_rgb_profile
from tests.lora_files import served_lora

pytestmark = pytest.mark.e2e

TINY_H, TINY_W = TINY[("1.0", "i2v")].height, TINY[("1.0", "i2v")].width
FAST = {"prompt": "the waves roll in", "num_inference_steps": 2, "num_frames": 9, "seed": 3}


def _photo(width: int, height: int, fmt: str = "JPEG") -> bytes:
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _video(response, tmp_path):
    assert response["status"] == "succeeded", response.get("error")
    return save_data_uri(response["output"], tmp_path / f"{uuid.uuid4().hex}.mp4")


@pytest.fixture(scope="module")
def server(start_server, weights_server, chat_endpoint):
    return start_server(
        "predict_i2v.py",
        "cogvideox-5b-i2v",
        "1.0-i2v",
        **optional_steps(weights_server, upscale=True, endpoint=chat_endpoint),
    )


@pytest.fixture(scope="module")
def lora(tiny_weights, tmp_path_factory):
    """A LoRA for the tiny image-to-video transformer, served over HTTP."""
    transformer = tiny_weights["1.0-i2v"] / "transformer"
    with served_lora(transformer, tmp_path_factory.mktemp("i2v-lora"), seed=4) as url:
        yield url


def _frames(response, tmp_path) -> np.ndarray:
    with av.open(str(_video(response, tmp_path))) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_image_is_fitted_to_the_model_resolution(server, tmp_path):
    response = server.predict({**FAST, "image": data_uri(_photo(300, 300), "image/jpeg")})
    info = probe_mp4(_video(response, tmp_path))
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (TINY_W, TINY_H, 9, 8)
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert f"scaled to cover {TINY_W}x{TINY_H}" in response["logs"]


def test_image_can_be_an_http_url(server, tmp_path):
    (tmp_path / "photo.png").write_bytes(_photo(120, 90, "PNG"))
    files = FileServer(tmp_path)
    try:
        response = server.predict({**FAST, "image": files.url("photo.png")})
    finally:
        files.stop()
    assert probe_mp4(_video(response, tmp_path))["frames"] == 9


@pytest.mark.parametrize(
    ("bad", "problem"),
    [({"num_frames": 10}, "num_frames"), ({"interpolate": "2x"}, "interpolate")],
    ids=["frames-rule", "step-not-enabled"],
)
def test_the_other_inputs_are_checked_before_the_image_is_fetched(server, tmp_path, bad, problem):
    (tmp_path / "photo.png").write_bytes(_photo(120, 90, "PNG"))
    files = FileServer(tmp_path)
    try:
        response = server.predict({**FAST, **bad, "image": files.url("photo.png")})
    finally:
        files.stop()
    assert response["status"] == "failed" and problem in response["error"]
    assert files.requests == []
    server.wait_idle(timeout=10)


def test_empty_prompt_is_allowed_for_image_to_video(server, tmp_path):
    response = server.predict({**FAST, "prompt": "", "image": data_uri(_photo(90, 60))})
    assert probe_mp4(_video(response, tmp_path))["frames"] == 9


def test_convert_colour_applies_the_image_profile_that_is_otherwise_left_as_upstream_leaves_it(
    server, tmp_path
):
    buffer = io.BytesIO()
    Image.new("RGB", (TINY_W, TINY_H), (200, 100, 50)).save(
        buffer, "PNG", icc_profile=adobe_rgb_profile()
    )
    inputs = {**FAST, "image": data_uri(buffer.getvalue(), "image/png")}
    as_upstream = server.predict(inputs)
    converted = server.predict({**inputs, "convert_colour": True})
    assert "'Adobe RGB (1998)' is not applied" in as_upstream["logs"]
    assert "converted from its colour profile 'Adobe RGB (1998)' to sRGB" in converted["logs"]
    assert not np.array_equal(_frames(as_upstream, tmp_path), _frames(converted, tmp_path))


def test_a_file_that_is_not_an_image_fails_with_the_accepted_formats(server):
    response = server.predict({**FAST, "image": data_uri(b"just some text", "text/plain")})
    assert response["status"] == "failed"
    assert "JPEG, PNG" in response["error"]
    # coglet marks itself READY a moment after it answers a failed prediction.
    server.wait_idle(timeout=10)


def test_15_i2v_follows_the_image_aspect_ratio(start_server, tmp_path):
    server = start_server(
        "predict_i2v.py", "cogvideox1.5-5b-i2v", "1.5-i2v", COGVIDEOX_RESOLUTION="48x80"
    )
    portrait = data_uri(_photo(90, 160), "image/jpeg")
    info = probe_mp4(
        _video(server.predict({**FAST, "num_frames": 17, "image": portrait}), tmp_path)
    )
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (48, 80, 17, 16)


def test_a_t2v_variant_fails_setup_of_the_i2v_predictor(start_server):
    with pytest.raises(CogServerError, match="is for text-to-video"):
        start_server("predict_i2v.py", "cogvideox-5b", "1.0-t2v")


def test_interpolate_where_the_deployment_did_not_enable_it_is_refused_naming_the_variable(
    server,
):
    image = data_uri(_photo(80, 48, "PNG"), "image/png")
    response = server.predict({**FAST, "image": image, "interpolate": "2x"})
    assert response["status"] == "failed"
    assert "COGVIDEOX_INTERPOLATE=1" in response["error"]
    assert "step 1/" not in server.prediction_log(response["id"])  # refused before any work
    server.wait_idle(timeout=10)
    assert server.status() == "READY"


def test_upscale_2x_doubles_the_width_and_height_and_keeps_the_frames(server, tmp_path):
    image = data_uri(_photo(TINY_W, TINY_H, "PNG"), "image/png")
    response = server.predict({**FAST, "image": image, "upscale": "2x"})
    info = probe_mp4(_video(response, tmp_path))
    assert (info["width"], info["height"], info["frames"]) == (TINY_W * 2, TINY_H * 2, 9)
    assert response["metrics"]["upscale_seconds"] > 0


def test_enhance_prompt_asks_the_endpoint_once_with_the_image_to_video_instruction(server, chat):
    image = data_uri(_photo(TINY_W, TINY_H, "PNG"), "image/png")
    response = server.predict({**FAST, "image": image, "enhance_prompt": True})
    assert response["status"] == "succeeded", response.get("error")
    assert response["metrics"]["enhanced_prompt"] == rewrite_of(FAST["prompt"])
    (sent,) = chat.bodies()
    assert sent["messages"][0]["content"] == instruction("i2v")
    assert sent["messages"][-1]["content"] == FAST["prompt"]


def test_enhance_prompt_with_an_empty_prompt_is_refused_without_asking_the_endpoint(server, chat):
    image = data_uri(_photo(TINY_W, TINY_H, "PNG"), "image/png")
    response = server.predict({**FAST, "prompt": "", "image": image, "enhance_prompt": True})
    assert response["status"] == "failed"
    assert "enhance_prompt needs a prompt to rewrite" in response["error"]
    assert chat.requests == []
    server.wait_idle(timeout=10)


def test_image_to_video_takes_a_lora(server, lora, tmp_path):
    inputs = {**FAST, "image": data_uri(_photo(TINY_W, TINY_H, "PNG"), "image/png")}
    base = _frames(server.predict(inputs), tmp_path)
    with_lora = server.predict({**inputs, "lora_url": lora})
    assert not np.array_equal(_frames(with_lora, tmp_path), base)
    assert "lora: loaded" in with_lora["logs"]
