"""enhance_prompt end to end: the real Cog server on a tiny text-to-video model, its prompts
rewritten by a chat-completions endpoint on 127.0.0.1 that answers or fails. Image-to-video
and video-to-video, each asking with its own instruction: tests/test_e2e_i2v.py and
test_e2e_v2v.py; refused where the deployment has no backend: tests/test_bad_inputs.py."""

from __future__ import annotations

import uuid

import av
import numpy as np
import pytest

from tests.chat_server import ChatServer, rewrite_of
from tests.cog_server import save_data_uri

pytestmark = pytest.mark.e2e

PROMPT = "a panda plays guitar"
FAST = {"prompt": PROMPT, "num_inference_steps": 2, "num_frames": 9, "seed": 5}


@pytest.fixture(scope="module")
def chat():
    with ChatServer(delay=3.0) as server:
        yield server


@pytest.fixture(scope="module")
def server(start_server, chat):
    return start_server(
        "predict_t2v.py",
        "cogvideox-5b",
        "1.0-t2v",
        COGVIDEOX_ENHANCE_PROMPT="openai",
        COGVIDEOX_ENHANCE_BASE_URL=chat.base_url,
        COGVIDEOX_ENHANCE_MODEL="writer-1",
        COGVIDEOX_ENHANCE_API_KEY="sk-e2e",
        COGVIDEOX_ENHANCE_TIMEOUT="1",
    )


@pytest.fixture(autouse=True)
def answering(chat):
    chat.fault = None
    chat.requests.clear()


def _frames(response, tmp_path) -> np.ndarray:
    assert response["status"] == "succeeded", response.get("error")
    path = save_data_uri(response["output"], tmp_path / f"{uuid.uuid4().hex}.mp4")
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_the_video_is_made_from_the_rewrite_which_is_returned_and_logged(server, tmp_path):
    enhanced = server.predict({**FAST, "enhance_prompt": True})
    written = server.predict({**FAST, "prompt": rewrite_of(PROMPT)})
    assert np.array_equal(_frames(enhanced, tmp_path), _frames(written, tmp_path))
    assert enhanced["metrics"]["enhanced_prompt"] == rewrite_of(PROMPT)
    assert (
        f"enhanced prompt by writer-1 at {server.env['COGVIDEOX_ENHANCE_BASE_URL']}"
        in (enhanced["logs"])
    )


def test_the_same_seed_and_inputs_ask_the_endpoint_the_same_question(server, chat):
    chat.fault = "500"  # the question is the point here, not the video
    for _ in range(2):
        server.predict({**FAST, "enhance_prompt": True})
        server.wait_idle(timeout=10)
    first, second = chat.bodies()
    assert first == second
    assert (first["seed"], first["temperature"], first["max_tokens"]) == (5, 0, 226)
    assert chat.requests[0]["headers"]["authorization"] == "Bearer sk-e2e"


def test_the_users_key_goes_to_the_endpoint_instead_of_the_deployments(server, chat):
    chat.fault = "500"
    response = server.predict({**FAST, "enhance_prompt": True, "enhance_prompt_api_key": "sk-u"})
    server.wait_idle(timeout=10)
    assert chat.requests[0]["headers"]["authorization"] == "Bearer sk-u"
    assert "sk-u" not in server.prediction_log(response["id"]) + response["error"]


def test_without_enhance_prompt_the_endpoint_is_not_asked(server, chat):
    response = server.predict(FAST)
    assert response["status"] == "succeeded"
    assert "enhanced_prompt" not in response["metrics"]
    assert chat.requests == []


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("slow", "did not answer within 1 s"),
        ("500", "answered HTTP 500"),
        ("garbage", "something other than JSON"),
        ("empty", "answered with no text"),
        ("refuse", "refused to rewrite the prompt"),
    ],
)
def test_a_failing_endpoint_fails_the_prediction_before_denoising(server, chat, fault, message):
    chat.fault = fault
    response = server.predict({**FAST, "enhance_prompt": True})
    assert response["status"] == "failed"
    assert message in response["error"]
    assert "step 1/" not in server.prediction_log(response["id"])
    server.wait_idle(timeout=10)
    assert server.status() == "READY"


def test_the_next_prediction_after_a_failed_rewrite_succeeds(server, chat):
    chat.fault = "500"
    assert server.predict({**FAST, "enhance_prompt": True})["status"] == "failed"
    server.wait_idle(timeout=10)
    chat.fault = None
    response = server.predict({**FAST, "enhance_prompt": True})
    assert response["status"] == "succeeded"
    assert response["metrics"]["enhanced_prompt"] == rewrite_of(PROMPT)
