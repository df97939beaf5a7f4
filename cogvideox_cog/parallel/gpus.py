"""COGVIDEOX_GPUS: how many processes render one video, and the generator that follows.

One (the default without CUDA, or with one GPU) is today's path: the model in the Cog worker
itself, no other process. More starts a RankGroup (group.py): one rank process per GPU,
each with a full model copy, splitting every denoising step. On a machine without CUDA,
COGVIDEOX_GPUS=N runs N CPU processes over gloo, for tests and development.
"""

from __future__ import annotations

import torch

from ..attention import ATTENTION_BACKEND_ENV, attention_backend, check_splittable
from ..errors import ConfigError
from ..generator import VideoGenerator
from ..inputs import resolution_setting
from ..pipeline import Mode
from ..settings import count_from_env, setting, warn_unknown_settings

GPUS_ENV = "COGVIDEOX_GPUS"


def gpus_from_env(visible_cuda: int) -> int:
    """The number of ranks: COGVIDEOX_GPUS, else every visible CUDA GPU (1 without CUDA)."""
    if not setting(GPUS_ENV):
        return max(visible_cuda, 1)
    count = count_from_env(GPUS_ENV, 1)
    if visible_cuda and count > visible_cuda:
        raise ConfigError(
            f"{GPUS_ENV}={count}, but {visible_cuda} CUDA GPU(s) are visible: run the "
            f"container with more (docker run --gpus all) or lower {GPUS_ENV}"
        )
    return count


def start_generator(mode: Mode):
    """What a predictor's setup() keeps: a VideoGenerator, or a RankGroup over several GPUs.
    Both have predict(request) -> Path and healthcheck() -> bool."""
    warn_unknown_settings()
    count = gpus_from_env(torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if count == 1:
        return VideoGenerator.from_env(mode)
    # Before any rank process starts: each would fail the same way, after loading a model.
    check_splittable(attention_backend(setting(ATTENTION_BACKEND_ENV)))
    resolution_setting()
    from .group import RankGroup

    return RankGroup.start(mode, count)
