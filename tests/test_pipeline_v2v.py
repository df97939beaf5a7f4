"""Video-to-video in-process on the tiny t2v models: frame counts, strength, refusals."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cogvideox_cog.errors import InputError
from cogvideox_cog.generator import Request, VideoGenerator, WarmUpRender
from cogvideox_cog.media.mp4 import encode_mp4, probe_mp4
from cogvideox_cog.pipeline import build_pipeline
from cogvideox_cog.speed import cache_config, starting_timestep
from cogvideox_cog.variants import VARIANTS

CPU = torch.device("cpu")


def _generator(tiny_weights, variant_id: str, tiny: str, resolution=None) -> VideoGenerator:
    variant = VARIANTS[variant_id]
    pipe = build_pipeline(variant, tiny_weights[tiny], CPU, "none", mode="v2v")
    return VideoGenerator(variant, pipe, CPU, "v2v", resolution=resolution)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (48, 48, 80, 3), dtype=np.uint8)  # 2 s at 24 fps
    return encode_mp4(frames, tmp_path_factory.mktemp("clip") / "clip.mp4", fps=24)


def _request(clip, **overrides) -> Request:
    fields = dict(
        prompt="a cat walks",
        negative_prompt="",
        num_frames=9,
        num_inference_steps=4,
        guidance_scale=6.0,
        use_dynamic_cfg=None,
        fps=None,
        seed=5,
        video=clip,
        strength=0.5,
    )
    return Request(**{**fields, **overrides})


def test_1_0_gives_the_requested_frames(tiny_weights, clip):
    generator = _generator(tiny_weights, "cogvideox-5b", "1.0-t2v")
    for frames in (9, 17):
        info = probe_mp4(generator.render_mp4(_request(clip, num_frames=frames)))
        assert (info["frames"], info["fps"], info["width"], info["height"]) == (frames, 8, 80, 48)


def test_strength_sets_how_many_steps_run(tiny_weights, clip, caplog):
    caplog.set_level(logging.INFO, logger="cogvideox_cog")
    generator = _generator(tiny_weights, "cogvideox-5b", "1.0-t2v")
    generator.render_mp4(_request(clip, num_inference_steps=10, strength=0.3))
    assert "denoised in the last 3 of 10 steps, the clip re-noised 30% of the way" in caplog.text
    assert "step 3/3" in caplog.text and "step 4/" not in caplog.text


def test_the_log_gives_the_strength_that_whole_steps_make(tiny_weights, clip, caplog):
    caplog.set_level(logging.INFO, logger="cogvideox_cog")
    generator = _generator(tiny_weights, "cogvideox-5b", "1.0-t2v")
    generator.render_mp4(_request(clip, num_inference_steps=2, strength=0.8))
    assert "strength 0.8: denoised in the last 1 of 2 steps, the clip re-noised 50%" in caplog.text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strength": 0.1, "num_inference_steps": 4}, "leaves no denoising step"),
        ({"strength": None, "num_inference_steps": 1}, "strength=0.8 .* leaves no denoising"),
        ({"strength": 1.5}, "at most 1"),
        ({"video": None}, "video is required"),
        ({"num_frames": 49}, "too short"),
    ],
)
def test_bad_requests_are_refused(tiny_weights, clip, overrides, message):
    generator = _generator(tiny_weights, "cogvideox-5b", "1.0-t2v")
    with pytest.raises(InputError, match=message):
        generator.render_mp4(_request(clip, **overrides))


def test_an_i2v_variant_cannot_run_video_to_video(tiny_weights):
    with pytest.raises(ValueError, match="cannot run v2v"):
        build_pipeline(
            VARIANTS["cogvideox-5b-i2v"], tiny_weights["1.0-i2v"], CPU, "none", mode="v2v"
        )


def test_faster_without_guidance_runs_when_the_strength_starts_below_its_cache_range(
    tiny_weights, clip
):
    """FasterCache has nothing to reuse at the first step: diffusers raised a TypeError when
    that step fell in its attention range (below timestep 681, here from 8 steps at 0.5)."""
    generator = _generator(tiny_weights, "cogvideox-5b", "1.0-t2v")
    request = _request(
        clip, num_inference_steps=8, guidance_scale=1.0, use_dynamic_cfg=False, speed_mode="faster"
    )
    assert np.isfinite(generator.render_frames(request).frames).all()


@pytest.mark.parametrize(("steps", "strength"), [(8, 0.5), (50, 0.8), (4, 1.0)])
def test_the_starting_timestep_is_where_diffusers_starts_the_clip(tiny_weights, steps, strength):
    pipe = _generator(tiny_weights, "cogvideox-5b", "1.0-t2v").pipe
    pipe.scheduler.set_timesteps(steps)
    timesteps, denoise_steps = pipe.get_timesteps(steps, pipe.scheduler.timesteps, strength, CPU)
    assert starting_timestep(pipe.scheduler, steps, denoise_steps) == int(timesteps[0])


def test_faster_starts_its_cache_range_below_a_late_first_step_only():
    pipe = object()
    whole = cache_config("faster", pipe, False)
    assert whole.spatial_attention_timestep_skip_range == (-1, 681)
    assert cache_config("faster", pipe, False, 999).spatial_attention_timestep_skip_range == (
        -1,
        681,
    )
    assert cache_config("faster", pipe, False, 499).spatial_attention_timestep_skip_range == (
        -1,
        499,
    )


def test_1_5_pads_an_odd_latent_count_with_the_clips_last_frame(tiny_weights):
    """The padding is denoised beside the clip: a repeat of its last frame continues it,
    where its first frame would jump back to the start."""
    generator = _generator(tiny_weights, "cogvideox1.5-5b", "1.5-t2v", resolution="48x80")
    frames, added = generator._pad_for_latent_patches(list(range(17)))
    assert (frames, added) == ([*range(17), 16, 16, 16, 16], 1)


def test_a_rank_that_writes_no_video_does_not_decode_a_padded_1_5_clip(tiny_weights, clip):
    """Rank 0 alone decodes; a padded clip's decode on another rank cost it the VAE's time
    and memory for frames nobody reads."""
    generator = _generator(tiny_weights, "cogvideox1.5-5b", "1.5-t2v", resolution="48x80")
    decodes = []
    hook = generator.pipe.vae.decoder.register_forward_hook(lambda *_: decodes.append(1))
    try:
        generator.denoise_only(_request(clip, num_frames=17, num_inference_steps=2))
    finally:
        hook.remove()
    assert decodes == []


def test_a_warm_up_render_denoises_every_step_it_asks_for(tiny_weights):
    """Not the default strength's last 80%: "faster" needs its steps to reach both of its
    attention's compiled parts."""
    generator = _generator(tiny_weights, "cogvideox-5b", "1.0-t2v")
    renders = [WarmUpRender(9, steps=4)]
    generator.warm_up_renders = lambda: renders
    steps: list[int] = []
    generator.on_step = lambda step, seconds: steps.append(step)
    generator.warm_up()
    assert steps == [0, 1, 2, 3]
