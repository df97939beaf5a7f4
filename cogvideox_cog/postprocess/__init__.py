"""Optional steps between the VAE decode and the mp4: upscale (Real-ESRGAN), then interpolate
(RIFE), each enabled by the deployment and asked for by the request.

A deployment enables a step with COGVIDEOX_UPSCALE=1 or COGVIDEOX_INTERPOLATE=1; only then
does setup fetch and load its weights, so images without them pay nothing. A request that
asks for a step the deployment did not enable is refused before any work, naming the variable.

Upscale comes first, as in upstream's composite demo: Real-ESRGAN costs far more per frame
than RIFE, so it runs on the generated frames, not on two or four times as many.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import cog
import numpy as np
import torch

from ..errors import ConfigError, InputError
from ..gpu_memory import out_of_memory
from ..settings import setting
from ..timing import Timed
from ..weights import download
from ..weights.manifest import SHA256_HEX
from . import rife, rrdbnet
from .weights import ModelSource, load_model

log = logging.getLogger(__name__)

CHOICES = ("none", "2x", "4x")
INTERPOLATE_ENV = "COGVIDEOX_INTERPOLATE"
INTERPOLATE_URL_ENV = "COGVIDEOX_INTERPOLATE_URL"
INTERPOLATE_SHA256_ENV = "COGVIDEOX_INTERPOLATE_SHA256"
UPSCALE_ENV = "COGVIDEOX_UPSCALE"
UPSCALE_URL_ENV = "COGVIDEOX_UPSCALE_URL"
UPSCALE_SHA256_ENV = "COGVIDEOX_UPSCALE_SHA256"
# Practical-RIFE publishes its weights on Google Drive only; vs-rife (MIT) hosts the same
# flownet.pkl files as release assets with stable URLs.
DEFAULT_RIFE_URL = "https://github.com/HolyWu/vs-rife/releases/download/model/flownet_v4.26.pkl"
PROGRESS_EVERY_S = 2.0  # a progress line at most this often, so the log keeps moving
DEFAULT_ESRGAN_URL = (
    "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth"
)
# The default files' sha256, pinned as the CogVideoX weights' manifests pin theirs: a release
# asset can be replaced, and a replacement of the same shapes would load without a word.
# Used only where the URL is the default and no *_SHA256 is set.
DEFAULT_RIFE_SHA256 = "45c7f74156704769dc9f85cfcaf8552e1e926f9399dcfa3a553dee88fac6f53f"
DEFAULT_ESRGAN_SHA256 = "4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1"


@dataclass(frozen=True)
class Steps:
    """What one request asked for, checked: 1 means the step does not run."""

    interpolate: int = 1
    upscale: int = 1


@dataclass(frozen=True)
class Offer:
    """What a deployment offers requests: all that checking a request's choices needs, so a
    process that holds no model (a rank other than 0) checks them as the one that does."""

    interpolate: bool = False
    upscale: int | None = None  # the Real-ESRGAN model's scale, the largest factor; None: off


class Postprocessor:
    """The loaded models of the enabled steps (None: not enabled), where they run, and what
    they offer (`offer`: a rank's copy of rank 0's, with no model of its own)."""

    def __init__(
        self,
        interpolator: rife.IFNet | None = None,
        upscaler: rrdbnet.RRDBNet | None = None,
        device: torch.device | None = None,
        offer: Offer | None = None,
    ):
        self.interpolator, self.upscaler = interpolator, upscaler
        scale = upscaler.scale if upscaler is not None else None
        self.offer = offer or Offer(interpolate=interpolator is not None, upscale=scale)
        self.device = device or torch.device("cpu")
        # fp16 on a GPU, as upstream's demo runs Real-ESRGAN and vs-rife runs RIFE; fp32 on a CPU.
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        for model in (interpolator, upscaler):
            if model is not None:
                model.eval().to(self.device, self.dtype)

    @classmethod
    def from_env(cls, device: torch.device) -> Postprocessor:
        interpolator = upscaler = None
        # Every setting is read before the first download: a mistyped one fails at once.
        rife_source = esrgan_source = None
        if _enabled(INTERPOLATE_ENV):
            rife_source = _source(
                "RIFE",
                INTERPOLATE_URL_ENV,
                INTERPOLATE_SHA256_ENV,
                DEFAULT_RIFE_URL,
                DEFAULT_RIFE_SHA256,
            )
        if _enabled(UPSCALE_ENV):
            esrgan_source = _source(
                "Real-ESRGAN",
                UPSCALE_URL_ENV,
                UPSCALE_SHA256_ENV,
                DEFAULT_ESRGAN_URL,
                DEFAULT_ESRGAN_SHA256,
            )
        if rife_source:
            interpolator = load_model(rife_source, _build_ifnet)
            log.info(f"setup: interpolate enabled, RIFE IFNet 4.25/4.26 from {rife_source.shown}")
        if esrgan_source:
            upscaler = load_model(esrgan_source, _build_rrdbnet)
            log.info(
                f"setup: upscale enabled, Real-ESRGAN RRDBNet x{upscaler.scale} from "
                f"{esrgan_source.shown}"
            )
        return cls(interpolator, upscaler, device)

    def check(self, interpolate: str, upscale: str) -> Steps:
        """The request's choices as factors; InputError for an unknown or disabled one."""
        offer = self.offer
        steps = Steps(
            interpolate=_factor("interpolate", interpolate, offer.interpolate, INTERPOLATE_ENV),
            upscale=_factor("upscale", upscale, offer.upscale is not None, UPSCALE_ENV),
        )
        if offer.upscale is not None and steps.upscale > offer.upscale:
            raise InputError(
                f"upscale={upscale!r}: this deployment's Real-ESRGAN model upscales "
                f"{offer.upscale}x at most."
            )
        return steps

    def apply(
        self,
        frames: np.ndarray,
        fps: int,
        steps: Steps,
        record_metric: Callable[[str, float], None] | None = None,
        on_progress: Callable[[], None] | None = None,
    ) -> Postprocessed:
        """The frames and fps after the requested steps, the frames made as they are read.

        record_metric: where each step's seconds go once the last frame is read (Cog's
        metrics unless given: a rank sends them to the Cog process). on_progress: called
        after each frame or pair (a rank's cancel check, which may raise).
        """
        if steps.upscale == steps.interpolate == 1:
            return Postprocessed(frames, len(frames), fps)
        count, made = len(frames), frames
        upscaled = interpolated = None
        if steps.upscale > 1:
            made = upscaled = Timed(self._upscale(frames, steps.upscale, on_progress))
        if steps.interpolate > 1:
            height, width = (side * steps.upscale for side in frames.shape[1:3])
            made = interpolated = Timed(
                self._interpolate(
                    made, count, fps, steps, f"{width}x{height}", on_progress=on_progress
                )
            )
            count, fps = rife.interpolated_count(count, steps.interpolate), fps * steps.interpolate
        recorded = _recorded(made, upscaled, interpolated, record_metric or _cog_metric)
        return Postprocessed(recorded, count, fps, made)

    def _upscale(
        self, frames: np.ndarray, factor: int, on_progress: Callable[[], None] | None
    ) -> Iterator[np.ndarray]:
        count, height, width = frames.shape[:3]
        out_h, out_w = rrdbnet.upscaled_size(height, width, factor)
        tiles = rrdbnet.tiles_per_frame(height, width)
        log.info(
            f"upscale {factor}x: {count} frames, {width}x{height} -> {out_w}x{out_h} "
            f"(Real-ESRGAN x{self.upscaler.scale}, {tiles} tile(s) a frame)"
        )
        try:
            yield from rrdbnet.upscale(
                self.upscaler,
                frames,
                factor,
                self.device,
                self.dtype,
                on_frame=_Progress("upscale", "frames", on_progress),
            )
        except torch.OutOfMemoryError as error:
            what = f"upscaling {count} frames {factor}x, {width}x{height} to {out_w}x{out_h}"
            # Not '2x' after a 4x: the 4x model then runs on the same tiles, and its output is
            # shrunk after, so 2x needs as much GPU memory as 4x.
            same = f": '2x' runs the same {self.upscaler.scale}x model on the same tiles"
            advice = "Ask for upscale='none'" + (same if factor > 2 else "")
            raise out_of_memory(error, what, f"{advice}.") from error
        finally:
            self._release_memory()

    def _interpolate(
        self,
        frames: Iterable[np.ndarray],
        count: int,
        fps: int,
        steps: Steps,
        size: str,
        on_progress: Callable[[], None] | None,
    ) -> Iterator[np.ndarray]:
        factor = steps.interpolate
        log.info(
            f"interpolate {factor}x: {count} -> {rife.interpolated_count(count, factor)} frames, "
            f"{fps} -> {fps * factor} fps (RIFE)"
        )
        try:
            yield from rife.interpolate(
                self.interpolator,
                frames,
                count,
                factor,
                self.device,
                self.dtype,
                on_pair=_Progress("interpolate", "frame pairs", on_progress),
            )
        except torch.OutOfMemoryError as error:
            what = f"interpolating {count} frames {factor}x at {size}"
            smaller = "interpolate='2x' or 'none'" if factor > 2 else "interpolate='none'"
            also = ", or a smaller upscale" if steps.upscale > 1 else ""
            raise out_of_memory(error, what, f"Ask for {smaller}{also}.") from error
        finally:
            self._release_memory()

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class Postprocessed:
    """The frames to encode and their fps. Upscaled or interpolated frames are made one at a
    time as the encoder reads them, never all held at once: 161 frames of 1.5 upscaled 4x
    and interpolated 4x would be 32 GB. Read them once.

    seconds: the time spent so far making them (0 when no step runs), for the encode's own.
    """

    def __init__(
        self, frames: Iterable[np.ndarray], count: int, fps: int, made: Timed | None = None
    ):
        self._frames, self.count, self.fps, self._made = frames, count, fps, made

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self._frames)

    def __len__(self) -> int:
        return self.count

    @property
    def seconds(self) -> float:
        return self._made.seconds if self._made is not None else 0.0

    def array(self) -> np.ndarray:
        """All the frames in one (count, H, W, 3) array, for tests and benchmarks."""
        if isinstance(self._frames, np.ndarray):
            return self._frames
        frames = None
        for index, frame in enumerate(self):
            if frames is None:
                frames = np.empty((self.count, *frame.shape), frame.dtype)
            frames[index] = frame
        return frames


def _recorded(
    frames: Iterator[np.ndarray],
    upscaled: Timed | None,
    interpolated: Timed | None,
    record: Callable[[str, float], None],
) -> Iterator[np.ndarray]:
    """The frames, then each step's own seconds recorded once the last one is read."""
    yield from frames
    if upscaled is not None:
        _record(record, "upscale_seconds", upscaled.seconds, "upscale")
    if interpolated is not None:
        own = interpolated.seconds - (upscaled.seconds if upscaled is not None else 0.0)
        _record(record, "interpolate_seconds", own, "interpolate")


class _Progress:
    """A log line every PROGRESS_EVERY_S: where a long step is, and that it is alive."""

    def __init__(self, step: str, unit: str, on_progress: Callable[[], None] | None = None):
        self.step, self.unit, self.on_progress = step, unit, on_progress
        self.started = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress()
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S and done < total:
            self.last = now
            log.info(f"{self.step}: {done}/{total} {self.unit}, {now - self.started:.1f} s elapsed")


def _record(record: Callable[[str, float], None], metric: str, seconds: float, what: str) -> None:
    record(metric, round(seconds, 3))
    log.info(f"{what} in {seconds:.1f} s")


def _cog_metric(name: str, value: float) -> None:
    cog.current_scope().record_metric(name, value)


def _factor(name: str, value: str, offered: bool, env: str) -> int:
    if value not in CHOICES:
        raise InputError(f"{name}={value!r} is not one of: {', '.join(CHOICES)}.")
    if value == "none":
        return 1
    if not offered:
        raise InputError(
            f"{name}={value!r}: this deployment does not offer {name}. Its operator enables it "
            f"with {env}=1 (the weights are fetched in setup)."
        )
    return int(value.removesuffix("x"))


def _enabled(env: str) -> bool:
    value = setting(env, "0")
    if value not in ("0", "1"):
        raise ConfigError(f"{env}={value!r}: use 1 to enable, 0 (the default) to leave it off")
    return value == "1"


def _source(
    name: str, url_env: str, sha256_env: str, default: str, default_sha256: str | None = None
) -> ModelSource:
    """Where `name`'s weights come from; the default URL is pinned to `default_sha256`."""
    url = setting(url_env, default)
    # Before any request: urllib takes a password for a port and quotes it in its error.
    if download.is_http(url) and (problem := download.url_problem(url)):
        raise ConfigError(f"{url_env}={download.shown(url)!r} {problem}.")
    raw = setting(sha256_env)
    if raw and not SHA256_HEX.fullmatch(raw):
        raise ConfigError(f"{sha256_env}={raw!r}: give the file's sha256, 64 hex digits")
    if not raw and url == default and default_sha256:
        pinned_by = f"the default {url_env} is known by (set {sha256_env} to pin another)"
        return ModelSource(name, url, default_sha256, url_env, sha256_env, pinned_by)
    return ModelSource(name, url, raw.lower() or None, url_env, sha256_env)


def _build_ifnet(state: dict[str, torch.Tensor]) -> rife.IFNet:
    model = rife.IFNet(rife.widths_of(state))
    _load_strict(model, state)
    return model


def _build_rrdbnet(state: dict[str, torch.Tensor]) -> rrdbnet.RRDBNet:
    model = rrdbnet.rrdbnet_for(state)
    if model.scale < 2:  # it would be offered, and every upscale choice refused
        raise ValueError(
            "it is a 1x model, which cleans frames without enlarging them; upscale needs a 2x "
            "or 4x one (RealESRGAN_x2plus.pth, RealESRGAN_x4plus.pth)"
        )
    _load_strict(model, state)
    return model


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every parameter of the model from the file; extra entries (a training run's teacher
    block, say) are ignored and counted in the log."""
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        shown = ", ".join(result.missing_keys[:3])
        raise ValueError(f"{len(result.missing_keys)} parameters missing, e.g. {shown}")
    if result.unexpected_keys:
        log.info(f"setup: {len(result.unexpected_keys)} unused entries in the weights file")
