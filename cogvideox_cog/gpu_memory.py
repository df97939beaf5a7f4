"""A prediction that runs out of GPU memory: an error that says what ran out and what to
change, and none of the failed attempt's tensors left on the GPU."""

from __future__ import annotations

import gc
import logging
import traceback

import torch

from .errors import GpuMemoryError
from .pipeline import COMPILE_ENV, OFFLOAD_ENV, VAE_TILING_ENV
from .variants import Variant

log = logging.getLogger(__name__)

# The offload policy that keeps less on the GPU than each one (sequential keeps the least).
LESS_OFFLOAD = {"none": "model", "model": "sequential"}
VAE_PHASES = ("decoding", "encoding the image", "encoding the video")  # VAE tiling shrinks them


def out_of_memory(error: torch.OutOfMemoryError, what: str, advice: str) -> GpuMemoryError:
    """The error to raise from `error`: the GPU ran out of memory while `what`; `advice` says
    what to change.

    Until the error is dropped (Cog holds it while it reports it), its traceback's frames hold
    the failed attempt's tensors: the latents, the activations of the layer that failed, also
    through the closures of torch's hook calls, which clearing a frame leaves. So the
    traceback goes to the log as text, is dropped, and the memory is handed back: the next
    prediction finds the GPU as the last one left it.
    """
    where = "".join(traceback.format_exception(error)).rstrip()
    log.error(f"out of GPU memory while {what}:\n{where}")
    error.__traceback__ = None
    gc.collect()
    torch.cuda.empty_cache()  # does nothing where CUDA was never used
    return GpuMemoryError(f"The GPU ran out of memory while {what}. {advice}")


def drop_tracebacks(error: BaseException) -> None:
    """Drop the tracebacks of `error` and of the errors chained to it, and with them the
    frames they passed through: a cancel or failure inside a forward holds that layer's
    activations there, and the call's latents, for as long as its error lives. Clearing the
    frames would not do: torch's Module call keeps the layer's output in a closure's cell,
    which the function a frame ran keeps past frame.clear()."""
    pending, seen = [error], set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        error.__traceback__ = None
        pending += [error.__cause__, error.__context__]


def less_offload(policy: str) -> str:
    """For the operator: the COGVIDEOX_OFFLOAD value that needs less GPU memory than
    `policy`, or nothing where it is the least already."""
    setting = less_offload_setting(policy)
    return f"The deployment's operator can set {setting}." if setting else ""


def less_offload_setting(policy: str) -> str:
    """less_offload() as the setting alone, for a message the operator reads (setup's)."""
    if policy not in LESS_OFFLOAD:
        return ""
    return (
        f"{OFFLOAD_ENV}={LESS_OFFLOAD[policy]} (it runs with {policy}), which keeps less of "
        "the model on the GPU"
    )


def what_ran_out(phase: str, num_frames: int, width: int, height: int) -> str:
    """The phase and the size it ran at, as the error says it."""
    if phase == "encoding the image":
        return f"{phase} at {width}x{height}"
    if phase == "encoding the video":
        return f"{phase}'s {num_frames} frames at {width}x{height}"
    if phase == "encoding the prompt":
        return phase
    return f"{phase} {num_frames} frames at {width}x{height}"


def request_advice(
    variant: Variant, phase: str, num_frames: int, vae_tiled: bool, offload: str
) -> str:
    """For a user's request: fewer frames where they count, and for the operator the setting
    that needs less (VAE tiling for a VAE phase without it, else less offload)."""
    advice = []
    fewer = [n for n in variant.allowed_frames if n < min(num_frames, variant.default_frames + 1)]
    if fewer and phase not in ("encoding the prompt", "encoding the image"):
        advice.append(f"Ask for fewer frames: num_frames={fewer[-1]} or less.")
    if phase in VAE_PHASES and not vae_tiled:
        advice.append(
            f"The deployment's operator can set {VAE_TILING_ENV}=on, which runs the VAE in "
            f"tiles with less memory."
        )
    else:
        advice.append(less_offload(offload))
    return " ".join(a for a in advice if a) or "Its operator needs a GPU with more memory."


def setup_advice(phase: str, vae_tiled: bool, offload: str) -> str:
    """For the operator alone: setup's compile warm-up runs at sizes no user chose, so only a
    setting can change. Compiling off fits the denoise only: the VAE and the text encoder run
    uncompiled either way."""
    settings = []
    if phase in VAE_PHASES and not vae_tiled:
        settings.append(f"{VAE_TILING_ENV}=on, which runs the VAE in tiles with less memory")
    else:
        settings.append(less_offload_setting(offload))
    if phase == "denoising":
        settings.append(
            f"{COMPILE_ENV}=0, which skips this warm-up and runs the transformer uncompiled"
        )
    settings = [s for s in settings if s]
    if not settings:
        return "This model needs a GPU with more memory."
    return f"Set {', or '.join(settings)}."


def raised_in(error: BaseException, module: torch.nn.Module, method: str) -> bool:
    """Whether `error` was raised inside `module.method` (a frame of its traceback)."""
    return any(
        frame.f_code.co_name == method and frame.f_locals.get("self") is module
        for frame, _ in traceback.walk_tb(error.__traceback__)
    )
