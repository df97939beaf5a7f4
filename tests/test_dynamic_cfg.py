"""Dynamic CFG is diffusers' schedule, as the model's authors run it, and the log says so.

diffusers takes the cosine of the timestep value, not of the step index, so the scale swings
between 1 and 1 + guidance_scale from step to step. The authors call the wave intended
(zai-org/CogVideo issue 267); tests/test_reference.py shows the frames equal theirs.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.pipeline import build_pipeline
from cogvideox_cog.variants import VARIANTS

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def generator(tiny_weights) -> VideoGenerator:
    variant = VARIANTS["cogvideox-5b"]
    return VideoGenerator(
        variant, build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none"), CPU
    )


def _render(generator, **overrides):
    fields = dict(
        prompt="a cat walks",
        negative_prompt="",
        num_frames=9,
        num_inference_steps=2,
        guidance_scale=6.0,
        use_dynamic_cfg=None,
        fps=None,
        seed=5,
    )
    return generator.render_frames(Request(**{**fields, **overrides}))


def _scales_per_step(pipe, steps: int) -> tuple[list[float], list[int]]:
    """The guidance the pipeline applied at each step, and the timesteps, as render runs it."""
    scales, timesteps = [], []

    def record(pipe, step, timestep, callback_kwargs):
        scales.append(pipe.guidance_scale)
        timesteps.append(int(timestep))
        return {}

    pipe(
        prompt="a cat walks",
        num_frames=9,
        num_inference_steps=steps,
        guidance_scale=6.0,
        use_dynamic_cfg=True,
        output_type="latent",
        callback_on_step_end=record,
    )
    return scales, timesteps


def test_5b_guidance_swings_between_1_and_7_over_50_steps_averaging_about_3_8(generator):
    scales, timesteps = _scales_per_step(generator.pipe, steps=50)
    expected = [1 + 6.0 * (1 - math.cos(math.pi * ((50 - t) / 50) ** 5)) / 2 for t in timesteps]
    assert scales == pytest.approx(expected)
    assert min(scales) == pytest.approx(1.0, abs=0.05) and max(scales) > 6.9
    assert sum(scales) / 50 == pytest.approx(3.82, abs=0.01)


@pytest.mark.parametrize("variant_id", ["cogvideox-5b", "cogvideox-5b-i2v"])
def test_5b_models_default_to_dynamic_cfg(variant_id):
    assert VARIANTS[variant_id].dynamic_cfg


@pytest.mark.parametrize("variant_id", ["cogvideox1.5-5b", "cogvideox1.5-5b-i2v"])
def test_1_5_models_default_to_dynamic_cfg_as_upstreams_cli_demo(variant_id):
    assert VARIANTS[variant_id].dynamic_cfg


def test_the_log_names_the_dynamic_schedule(generator, caplog):
    caplog.set_level(logging.INFO, logger="cogvideox_cog")
    _render(generator)
    assert "guidance 6, dynamic (diffusers' timestep schedule, as upstream)" in caplog.text


def test_the_log_says_constant_guidance_when_dynamic_cfg_is_off(generator, caplog):
    caplog.set_level(logging.INFO, logger="cogvideox_cog")
    _render(generator, use_dynamic_cfg=False)
    assert "guidance 6, constant" in caplog.text


def test_the_log_says_no_guidance_at_scale_1(generator, caplog):
    caplog.set_level(logging.INFO, logger="cogvideox_cog")
    _render(generator, guidance_scale=1.0)
    assert "guidance 1, no classifier-free guidance" in caplog.text
