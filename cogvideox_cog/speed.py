"""The per-prediction fast paths (`speed_mode`): step caching with diffusers' cache hooks.

Both reuse work from earlier denoising steps instead of recomputing it, so they trade some
fidelity for speed (docs/performance.md, "`speed_mode`", has the measurements):

- "fast": Pyramid Attention Broadcast. In the middle of the schedule (timesteps 800 to 100),
  each block's attention is computed every second step and reused in between.
- "faster": FasterCache. From timestep 681 on, attention every second step, the skipped ones
  extrapolated from the last two; and the unconditional (negative prompt) half of classifier-
  free guidance computed every fifth step below timestep 781, approximated from the
  conditional half in between. Without guidance (guidance_scale 1) there is no such half, and
  it computes as much as "fast" does.

Settings are the ones diffusers documents for CogVideoX, but for one departure: FasterCache
approximates a skipped step from the steps before it, and diffusers fails (a TypeError) when
the very first step falls in its range, as video-to-video's does when its strength starts
the schedule below 681. Its range then starts after the first step; a schedule that starts
at 999 (text- and image-to-video) is unchanged. The hooks are attached for one prediction
and removed after it, and any a cancel left half attached before the next, so "default" never
runs through them.

With a compiled transformer (COGVIDEOX_COMPILE=1) these modes run each block eagerly and its
parts compiled (pipeline.compile_transformer): the hooks' Python state would split a compiled
block into pieces, each compiled on first use, inside requests (measured on the tiny model:
the first "fast" prediction compiled 12 graphs, the first at another frame count 8 more;
"faster" 51 and 14). The parts are compiled in setup's warm-up instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from diffusers import FasterCacheConfig, PyramidAttentionBroadcastConfig
from diffusers.hooks import HookRegistry
from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK
from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

from .pipeline import blocks_run_eagerly, compiled_blocks_back, is_compiled

SPEED_MODES = ("default", "fast", "faster")


def starting_timestep(scheduler, steps: int, denoise_steps: int) -> int:
    """The timestep a pipeline call starts at: video-to-video runs only the last
    `denoise_steps` of a `steps` schedule (diffusers' get_timesteps)."""
    fresh = type(scheduler).from_config(scheduler.config)  # the pipeline's own is left as is
    fresh.set_timesteps(steps)
    return int(fresh.timesteps[(steps - denoise_steps) * fresh.order])


def cache_config(
    mode: str, pipe, classifier_free_guidance: bool, first_timestep: int | None = None
):
    """The diffusers cache config for `mode` (None for "default"). first_timestep: where
    this prediction's schedule starts (starting_timestep()); None: a whole schedule."""
    if mode == "default":
        return None
    if mode == "fast":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=lambda: pipe.current_timestep,
        )
    if mode == "faster":
        # The first step outside the range: one at the range's upper end is (it is exclusive).
        upper = 681 if first_timestep is None else min(681, first_timestep)
        return FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, upper),
            current_timestep_callback=lambda: pipe.current_timestep,
            attention_weight_callback=lambda _: 0.3,
            unconditional_batch_skip_range=5,
            unconditional_batch_timestep_skip_range=(-1, 781),
            tensor_format="BFCHW",
            # guidance_scale 1 runs one branch: nothing to skip there.
            is_guidance_distilled=not classifier_free_guidance,
        )
    raise ValueError(f"speed_mode={mode!r} is not one of {', '.join(SPEED_MODES)}")


@contextmanager
def step_cache(
    pipe, mode: str, classifier_free_guidance: bool, first_timestep: int | None = None
) -> Iterator[None]:
    """The transformer with `mode`'s cache hooks for the duration of one prediction."""
    config = cache_config(mode, pipe, classifier_free_guidance, first_timestep)
    remove_cache_hooks(pipe.transformer)
    compiled_blocks_back(pipe.transformer)
    if config is None:
        yield
        return
    compiled = is_compiled(pipe.transformer)
    try:
        pipe.transformer.enable_cache(config)
        with blocks_run_eagerly(pipe.transformer) if compiled else nullcontext():
            yield
    finally:
        remove_cache_hooks(pipe.transformer)


_CACHE_HOOKS = (
    _PYRAMID_ATTENTION_BROADCAST_HOOK,
    _FASTER_CACHE_DENOISER_HOOK,
    _FASTER_CACHE_BLOCK_HOOK,
)


def remove_cache_hooks(transformer) -> None:
    """Every speed mode's hook off every module, wherever it got to.

    Not disable_cache(): it removes the hooks of a cache that enable_cache() finished setting
    up, and Cog raises a cancel wherever the worker is. One landing inside enable_cache() or
    disable_cache() leaves some blocks hooked, with diffusers taking no cache as enabled: every
    later "default" prediction would run through them, and every "fast" one fail to hook the
    blocks again. So each prediction starts by removing them all, by name.
    """
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    for name in _CACHE_HOOKS:
        registry.remove_hook(name, recurse=True)
    transformer._cache_config = None
