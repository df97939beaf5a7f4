"""A prediction that runs out of GPU memory: an error that says what to change, and none of
the failed attempt's tensors left on the GPU."""

from __future__ import annotations

import gc
import logging
import traceback

import torch

from .errors import GpuMemoryError
from .pipeline import OFFLOAD_ENV

log = logging.getLogger(__name__)

# The offload policy that keeps less on the GPU than each one (sequential keeps the least).
LESS_OFFLOAD = {"none": "model", "model": "sequential"}


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
