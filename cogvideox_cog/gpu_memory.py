"""A prediction that runs out of GPU memory: an error that says what to change."""

from __future__ import annotations

import logging

import torch

from .errors import GpuMemoryError

log = logging.getLogger(__name__)


def out_of_memory(error: torch.OutOfMemoryError, what: str, advice: str) -> GpuMemoryError:
    """The error to raise from `error`: the GPU ran out of memory while `what`; `advice` says
    what to change. torch's own text (how much it tried to allocate, how much was free) is
    for the operator: it goes to the log."""
    log.error(f"out of GPU memory while {what}: {error}")
    return GpuMemoryError(f"The GPU ran out of memory while {what}. {advice}")
