"""The image-to-video and video-to-video predictors pass upscale and interpolate on to the
output: their run() in-process, on tiny CogVideoX, RIFE and Real-ESRGAN models. Each covers the
input its server test does not (those refuse interpolate for i2v and upscale for v2v where the
deployment did not enable them); text-to-video: tests/test_e2e_postprocess.py."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

import predict_i2v
import predict_v2v
from cogvideox_cog.devtools.tiny import TINY
from cogvideox_cog.devtools.tiny_postprocess import tiny_ifnet, tiny_rrdbnet
from cogvideox_cog.generator import VideoGenerator
from cogvideox_cog.media.mp4 import encode_mp4, probe_mp4
from cogvideox_cog.pipeline import build_pipeline
from cogvideox_cog.postprocess import Postprocessor
from cogvideox_cog.variants import VARIANTS
from tests.cog_server import data_uri

CPU = torch.device("cpu")
TINY_H, TINY_W = TINY[("1.0", "i2v")].height, TINY[("1.0", "i2v")].width
SHARED = dict(
    negative_prompt="",
    num_frames=9,
    num_inference_steps=1,
    guidance_scale=6.0,
    use_dynamic_cfg=None,
    fps=None,
    seed=7,
    lora_url=None,
    lora_scale=1.0,
    speed_mode="default",
    interpolate="none",
    upscale="none",
)


def _predictor(cls, tiny_weights, variant_id: str, tiny: str):
    """cls() with the generator its setup() would make, built here from the tiny models."""
    variant = VARIANTS[variant_id]
    mode = "i2v" if cls is predict_i2v.Predictor else "v2v"
    pipe = build_pipeline(variant, tiny_weights[tiny], CPU, "none", mode=mode)
    predictor = cls()
    postprocessor = Postprocessor(tiny_ifnet(), tiny_rrdbnet(), CPU)
    predictor.generator = VideoGenerator(variant, pipe, CPU, mode, postprocessor=postprocessor)
    return predictor


def test_image_to_video_upscales(tiny_weights):
    predictor = _predictor(predict_i2v.Predictor, tiny_weights, "cogvideox-5b-i2v", "1.0-i2v")
    buffer = io.BytesIO()
    Image.new("RGB", (TINY_W, TINY_H), (90, 140, 200)).save(buffer, format="PNG")
    image = data_uri(buffer.getvalue(), "image/png")
    info = probe_mp4(predictor.run(**{**SHARED, "upscale": "2x"}, image=image, prompt="waves"))
    assert (info["width"], info["height"], info["frames"]) == (TINY_W * 2, TINY_H * 2, 9)


def test_video_to_video_interpolates(tiny_weights, tmp_path):
    predictor = _predictor(predict_v2v.Predictor, tiny_weights, "cogvideox-5b", "1.0-t2v")
    pixels = np.random.default_rng(1).integers(0, 256, (9, TINY_H, TINY_W, 3), np.uint8)
    clip = data_uri(encode_mp4(pixels, tmp_path / "clip.mp4", fps=8).read_bytes(), "video/mp4")
    inputs = {**SHARED, "interpolate": "2x", "video": clip, "prompt": "a cat", "strength": 1.0}
    info = probe_mp4(predictor.run(**inputs))
    assert (info["frames"], info["fps"], info["width"]) == (17, 16, TINY_W)
