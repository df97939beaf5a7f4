"""enhance_prompt reaches the rewrite from every predictor, and is refused where it cannot
run: each predictor's run() called in this process on a tiny model, its rewrites asked of a
chat-completions server on 127.0.0.1 that answers HTTP 500, so no video is made.
(test_e2e_enhance.py runs t2v through the Cog server; test_predictor_inputs.py compares the
declarations.)"""

from __future__ import annotations

import importlib
import inspect
import io

import numpy as np
import pytest
import torch
from PIL import Image

from cogvideox_cog.devtools.tiny import TINY
from cogvideox_cog.errors import EnhanceError, InputError
from cogvideox_cog.generator import VideoGenerator
from cogvideox_cog.media.mp4 import encode_mp4
from cogvideox_cog.pipeline import build_pipeline
from cogvideox_cog.prompts.endpoint import EndpointRewriter
from cogvideox_cog.prompts.enhance import PromptEnhancer
from cogvideox_cog.prompts.instruction import instruction
from cogvideox_cog.variants import VARIANTS
from tests.chat_server import ChatServer
from tests.cog_server import data_uri

CPU = torch.device("cpu")
HEIGHT, WIDTH = TINY[("1.0", "i2v")].height, TINY[("1.0", "i2v")].width
PROMPT = "the leaves sway in the wind"


@pytest.fixture(scope="module")
def chat():
    """Answers HTTP 500: the request it received is the evidence, and no video is made."""
    with ChatServer(fault="500") as server:
        yield server


def _predictor(task: str, variant: str, weights, enhancer: PromptEnhancer | None):
    """The predictor of `task` with a generator on tiny weights, as setup() would leave it."""
    predictor = importlib.import_module(f"predict_{task}").Predictor()
    mode_variant = VARIANTS[variant]
    pipe = build_pipeline(mode_variant, weights, CPU, "none")
    predictor.generator = VideoGenerator(mode_variant, pipe, CPU, task, enhancer=enhancer)
    return predictor


def _run(predictor, **inputs):
    """run() with every input at its declared default but those given."""
    parameters = inspect.signature(predictor.run).parameters.values()
    defaults = {p.name: p.default.default for p in parameters if p.name not in inputs}
    return predictor.run(**defaults, **inputs)


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (WIDTH, HEIGHT), (90, 140, 60)).save(buffer, format="PNG")
    return data_uri(buffer.getvalue(), "image/png")


def _mp4(tmp_path) -> str:
    frames = np.full((9, HEIGHT, WIDTH, 3), 128, np.uint8)
    return data_uri(encode_mp4(frames, tmp_path / "clip.mp4", fps=8).read_bytes(), "video/mp4")


def _endpoint(chat) -> PromptEnhancer:
    return PromptEnhancer(EndpointRewriter(chat.base_url, "writer-1", None, timeout=5))


FAST = {"num_frames": 9, "num_inference_steps": 2, "seed": 3}


def test_image_to_video_asks_for_the_rewrite_with_its_own_instruction(tiny_weights, chat):
    predictor = _predictor("i2v", "cogvideox-5b-i2v", tiny_weights["1.0-i2v"], _endpoint(chat))
    with pytest.raises(EnhanceError, match="HTTP 500"):  # stops before denoising
        _run(predictor, image=_png(), prompt=PROMPT, enhance_prompt=True, **FAST)
    chat_sent = chat.bodies()[-1]["messages"]
    assert chat_sent[0]["content"] == instruction("i2v")
    assert chat_sent[-1]["content"] == PROMPT


def test_video_to_video_asks_for_the_rewrite_with_its_own_instruction(tiny_weights, chat, tmp_path):
    predictor = _predictor("v2v", "cogvideox-5b", tiny_weights["1.0-t2v"], _endpoint(chat))
    with pytest.raises(EnhanceError, match="HTTP 500"):
        _run(predictor, video=_mp4(tmp_path), prompt=PROMPT, enhance_prompt=True, **FAST)
    chat_sent = chat.bodies()[-1]["messages"]
    assert chat_sent[0]["content"] == instruction("v2v")
    assert chat_sent[-1]["content"] == PROMPT


def test_enhance_prompt_without_a_backend_is_refused_saying_what_to_do(tiny_weights):
    predictor = _predictor("t2v", "cogvideox-5b", tiny_weights["1.0-t2v"], enhancer=None)
    with pytest.raises(InputError, match=r"not available on this deployment.*enhance_prompt=false"):
        _run(predictor, prompt=PROMPT, enhance_prompt=True, **FAST)


def test_an_empty_image_to_video_prompt_has_nothing_to_enhance(tiny_weights, chat):
    predictor = _predictor("i2v", "cogvideox-5b-i2v", tiny_weights["1.0-i2v"], _endpoint(chat))
    chat.requests.clear()
    with pytest.raises(InputError, match="enhance_prompt needs a prompt to rewrite"):
        _run(predictor, image=_png(), prompt="", enhance_prompt=True, **FAST)
    assert chat.requests == []
