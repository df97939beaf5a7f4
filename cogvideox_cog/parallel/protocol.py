"""What the Cog process and its rank processes say to each other, over one pipe per rank.

Coordinator -> rank: a Render, a Check (rank 0 only), or None to stop. Rank -> coordinator:
LogLine at any time (rank 0's log lines, the warnings of the others); SettingUp as each step
of its setup begins, then Ready or SetupFailed once; then, per Render, Reading and Read
(every rank), Metric, Progress and StepEnded (rank 0 only) and one outcome: Done, Canceled
or Failed; per Check, Done or Failed.
RankExited is the coordinator's own note that a rank process ended.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from ..generator import Request


@dataclass(frozen=True)
class Render:
    request: Request  # its seed already drawn, so that every rank draws the same noise


@dataclass(frozen=True)
class Check:
    request: Request  # without its image or clip: those are fetched once it passes


@dataclass(frozen=True)
class Ready:
    rank: int


class SetupStep(enum.IntEnum):
    """A rank's setup, step by step, in the order every rank takes them: a rank that gave up
    waiting for the others in one waited for those still at an earlier one."""

    JOINING = 0  # the other ranks, at the rendezvous
    POSTPROCESSING = 1  # rank 0 loads the models and tells the others what they offer
    LOADING = 2  # the model, from the weights cache
    VAE_TILING = 3  # agreed by every rank
    WARM_UP = 4  # the compiled model's, split across the ranks

    def __str__(self) -> str:
        return _DOING[self]


_DOING = {
    SetupStep.JOINING: "joining the other ranks",
    SetupStep.POSTPROCESSING: "setting up post-processing",
    SetupStep.LOADING: "loading the model",
    SetupStep.VAE_TILING: "agreeing on VAE tiling",
    SetupStep.WARM_UP: "warming up the compiled model",
}


@dataclass(frozen=True)
class SettingUp:
    rank: int
    step: SetupStep  # begins


@dataclass(frozen=True)
class SetupFailed:
    rank: int
    error: str  # "ExceptionType: message"
    # It gave up waiting for the other ranks in a collective (the collective timeout): the
    # cause is a rank that did not come, not this one.
    timed_out: bool = False


@dataclass(frozen=True)
class LogLine:
    level: int
    text: str


@dataclass(frozen=True)
class Metric:
    name: str
    value: float


@dataclass(frozen=True)
class Progress:
    """Rank 0 is computing a denoising step (sent at most every second while it does)."""


@dataclass(frozen=True)
class Reading:
    """The rank is reading the request's inputs (an image, a clip: seconds for a long one),
    before any collective: slow, never stuck waiting for another rank."""

    rank: int


@dataclass(frozen=True)
class Read:
    """The rank has read the inputs; from here it meets the others in collectives."""

    rank: int


@dataclass(frozen=True)
class StepEnded:
    seconds: float  # how long that denoising step took on rank 0


@dataclass(frozen=True)
class Done:
    rank: int
    output: Path | None  # rank 0's mp4; None on the others


@dataclass(frozen=True)
class Canceled:
    rank: int
    step: int  # the step after which every rank stopped (0-based)


@dataclass(frozen=True)
class Failed:
    rank: int
    error: Exception  # the exception itself where it pickles, else a RuntimeError saying it
    # Why the rank's GPU is lost for good (errors.device_lost_reason): only the rank's own
    # process can ask its GPU. None: it is not.
    device_lost: str | None = None


@dataclass(frozen=True)
class RankExited:
    rank: int
    exitcode: int | None


Outcome = Done | Canceled | Failed
