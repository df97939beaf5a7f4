"""speed_mode on the tiny 1.0 model: the caches skip work, change the video a little, and
leave no trace on the default path."""

from __future__ import annotations

import logging

import cog
import numpy as np
import pytest
import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK as FASTER_HOOK
from diffusers.hooks.pyramid_attention_broadcast import (
    _PYRAMID_ATTENTION_BROADCAST_HOOK as PAB_HOOK,
)
from PIL import Image

from cogvideox_cog.errors import InputError
from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.pipeline import build_pipeline
from cogvideox_cog.speed import cache_config
from cogvideox_cog.variants import VARIANTS

CPU = torch.device("cpu")
STEPS = 20


@pytest.fixture(scope="module")
def generator(tiny_weights) -> VideoGenerator:
    variant = VARIANTS["cogvideox-5b"]
    return VideoGenerator(
        variant, build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none"), CPU
    )


def _render(generator, **overrides) -> np.ndarray:
    fields = dict(prompt="a cat walks", negative_prompt="", num_frames=9)
    fields |= dict(num_inference_steps=STEPS, guidance_scale=6.0, use_dynamic_cfg=None)
    fields |= dict(fps=None, seed=5)
    return generator.render_frames(Request(**{**fields, **overrides})).frames


@pytest.fixture(scope="module")
def default(generator) -> np.ndarray:
    return _render(generator)


def _attention_rows(generator, **overrides) -> tuple[int, int]:
    """(calls, batch rows) of the first block's attention query projection in one render:
    what attention was actually computed."""
    calls = rows = 0

    def count(module, args):
        nonlocal calls, rows
        calls, rows = calls + 1, rows + args[0].shape[0]

    handle = generator.pipe.transformer.transformer_blocks[0].attn1.to_q.register_forward_pre_hook(
        count
    )
    try:
        _render(generator, **overrides)
    finally:
        handle.remove()
    return calls, rows


@pytest.mark.parametrize("mode", ["fast", "faster"])
def test_default_after_a_speed_mode_is_the_default_output_exactly(generator, default, mode):
    _render(generator, speed_mode=mode)
    np.testing.assert_array_equal(_render(generator), default)
    assert not generator.pipe.transformer._diffusers_hook.hooks


@pytest.mark.parametrize(("mode", "hook"), [("fast", PAB_HOOK), ("faster", FASTER_HOOK)])
def test_a_cancel_inside_the_hooks_set_up_leaves_no_hook_for_the_next_prediction(
    generator, default, monkeypatch, mode, hook
):
    """Cog raises a cancel at the worker's next bytecode: here, after the second block got
    its hook, before diffusers counts the cache as enabled."""
    hooked = []

    def hook_then_cancel(self, module_hook, name):
        register(self, module_hook, name)
        hooked.append(name)
        if hooked.count(hook) == 2:
            raise cog.CancelationException()

    register = HookRegistry.register_hook
    with monkeypatch.context() as patched:
        patched.setattr(HookRegistry, "register_hook", hook_then_cancel)
        with pytest.raises(cog.CancelationException):
            _render(generator, speed_mode=mode)
    assert np.array_equal(_render(generator), default)
    assert not np.array_equal(_render(generator, speed_mode=mode), default)
    assert np.array_equal(_render(generator), default)


@pytest.mark.parametrize(("mode", "hook"), [("fast", PAB_HOOK), ("faster", FASTER_HOOK)])
def test_a_cancel_inside_the_hooks_removal_leaves_no_hook_for_the_next_prediction(
    generator, default, monkeypatch, mode, hook
):
    """A cancel after the last step lands in the removal of the hooks: here, once the first
    block's hook is off, so the other blocks keep theirs."""
    steps_done = []

    def unhook_then_cancel(self, name, recurse=True):
        hooked = name in self.hooks
        remove(self, name, recurse)
        if len(steps_done) == STEPS and hooked and name == hook and not recurse:
            steps_done.append("canceled")
            raise cog.CancelationException()

    remove = HookRegistry.remove_hook
    generator.on_step = lambda step, seconds: steps_done.append(step)
    try:
        with monkeypatch.context() as patched:
            patched.setattr(HookRegistry, "remove_hook", unhook_then_cancel)
            with pytest.raises(cog.CancelationException):
                _render(generator, speed_mode=mode)
    finally:
        generator.on_step = None
    assert steps_done[-1] == "canceled"
    np.testing.assert_array_equal(_render(generator), default)


@pytest.mark.parametrize("mode", ["fast", "faster"])
def test_a_speed_mode_prediction_cut_short_keeps_no_hook_and_no_cache(generator, mode):
    """The hooks hold the steps' attention they reuse: a prediction that ends in an error
    takes them off then, not when the next prediction starts."""

    def cut_short(step, seconds):
        raise cog.CancelationException()

    generator.on_step = cut_short
    try:
        with pytest.raises(cog.CancelationException):
            _render(generator, speed_mode=mode)
    finally:
        generator.on_step = None
    registries = [getattr(m, "_diffusers_hook", None) for m in generator.pipe.transformer.modules()]
    assert not [r for r in registries if r is not None and r.hooks]


def test_an_unknown_speed_mode_is_refused_not_run_as_default():
    """Not the default's None: a mode offered but not wired would run as `default`."""
    with pytest.raises(ValueError, match="speed_mode='turbo' is not one of default, fast"):
        cache_config("turbo", object(), True)


@pytest.mark.parametrize("mode", ["fast", "faster"])
def test_speed_mode_changes_the_video(generator, default, mode):
    assert np.abs(_render(generator, speed_mode=mode) - default).max() > 1e-4


def test_default_computes_attention_at_every_step_for_both_guidance_branches(generator):
    assert _attention_rows(generator) == (STEPS, 2 * STEPS)


def test_fast_reuses_attention_in_the_middle_of_the_schedule(generator):
    calls, rows = _attention_rows(generator, speed_mode="fast")
    assert calls < STEPS
    assert rows == 2 * calls  # both branches whenever it is computed


def test_faster_also_skips_most_unconditional_branches(generator):
    fast_calls, _ = _attention_rows(generator, speed_mode="fast")
    calls, rows = _attention_rows(generator, speed_mode="faster")
    assert rows < 2 * calls  # some steps ran the conditional branch alone
    assert rows < 2 * fast_calls


def test_faster_without_guidance_runs(generator):
    frames = _render(generator, speed_mode="faster", guidance_scale=1.0, use_dynamic_cfg=False)
    assert np.isfinite(frames).all()


def test_faster_without_guidance_computes_the_attention_fast_does(generator):
    """No negative-prompt half to skip: what docs/performance.md says of guidance_scale 1."""
    no_guidance = dict(guidance_scale=1.0, use_dynamic_cfg=False)
    faster = _attention_rows(generator, speed_mode="faster", **no_guidance)
    assert faster == _attention_rows(generator, speed_mode="fast", **no_guidance)


def test_a_faster_prediction_logs_no_experimental_feature_notice(generator):
    """diffusers' notice asks users to report issues: in a prediction's log it reads as a fault."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    notices = logging.getLogger("diffusers.hooks.faster_cache")
    notices.addHandler(handler)
    try:
        _render(generator, speed_mode="faster")
    finally:
        notices.removeHandler(handler)
    assert not [message for message in seen if "experimental" in message]


def test_fast_is_pyramid_attention_broadcast_as_diffusers_documents_it_for_cogvideox():
    """Every second step from timestep 800 to 100, as docs/performance.md describes it."""
    config = cache_config("fast", object(), True)
    assert config.spatial_attention_block_skip_range == 2
    assert config.spatial_attention_timestep_skip_range == (100, 800)


def test_faster_is_fastercache_as_diffusers_documents_it_for_cogvideox():
    """As docs/performance.md describes it: attention every second step below 681, weighted 0.3;
    the unconditional branch every fifth below 781; latents as batch, frames, channels."""
    config = cache_config("faster", object(), True)
    assert config.spatial_attention_block_skip_range == 2
    assert config.spatial_attention_timestep_skip_range == (-1, 681)
    assert config.attention_weight_callback(None) == 0.3
    assert config.unconditional_batch_skip_range == 5
    assert config.unconditional_batch_timestep_skip_range == (-1, 781)
    assert config.tensor_format == "BFCHW"


def test_unknown_speed_mode_is_refused(generator):
    with pytest.raises(InputError, match=r"speed_mode='turbo' is not one of: default, fast"):
        _render(generator, speed_mode="turbo")


@pytest.mark.parametrize(
    ("tiny", "variant_id", "num_frames"),
    [
        ("1.0-i2v", "cogvideox-5b-i2v", 9),
        ("1.5-t2v", "cogvideox1.5-5b", 17),
        ("1.0-t2v-2b", "cogvideox-2b", 9),
    ],
)
def test_faster_runs_on_other_variants_and_leaves_default_exact(
    tiny_weights, tmp_path, tiny, variant_id, num_frames
):
    variant = VARIANTS[variant_id]
    pipe = build_pipeline(variant, tiny_weights[tiny], CPU, "none")
    generator = VideoGenerator(variant, pipe, CPU, resolution="48x80")
    image = None
    if variant.task == "i2v":
        image = tmp_path / "first.png"
        Image.new("RGB", (80, 48), (90, 30, 20)).save(image)
    fields = dict(num_frames=num_frames, num_inference_steps=8, image=image)
    default = _render(generator, **fields)
    faster = _render(generator, speed_mode="faster", **fields)
    assert np.isfinite(faster).all() and np.abs(faster - default).max() > 1e-4
    np.testing.assert_array_equal(_render(generator, **fields), default)
