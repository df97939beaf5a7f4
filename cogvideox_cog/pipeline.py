"""Build a CogVideoX pipeline with the variant's dtype, scheduler and memory policy, and run it."""

from __future__ import annotations

import gc
import logging
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cog
import numpy as np
import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXImageToVideoPipeline,
    CogVideoXPipeline,
    CogVideoXVideoToVideoPipeline,
)
from PIL import Image

from . import inputs, leftovers
from .errors import ConfigError, InputError
from .logs import drop_diffusers_prompt_echo
from .lora.file import LoraSlot
from .lora.store import LoraCache, check_lora_url
from .media.clip import load_video
from .media.mp4 import encode_mp4
from .speed import SPEED_MODES, step_cache
from .variants import PREDICTOR_FILES, Task, Variant, variant_from_env
from .weights import load_weights

log = logging.getLogger(__name__)
drop_diffusers_prompt_echo()

OFFLOAD_ENV = "COGVIDEOX_OFFLOAD"
OFFLOAD_POLICIES = ("auto", "none", "model", "sequential")
COMPILE_ENV = "COGVIDEOX_COMPILE"
TEMP_PREFIX = "cogvideox-"  # our folders in TMPDIR: outputs and warm-up inputs
OUTPUT_PREFIX = TEMP_PREFIX + "output-"
WARM_UP_PREFIX = TEMP_PREFIX + "warm-up-"
SCHEDULERS = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}


# What a generator does; video-to-video runs the text-to-video variants' weights.
Mode = Literal["t2v", "i2v", "v2v"]
PIPELINES: dict[Mode, type] = {
    "t2v": CogVideoXPipeline,
    "i2v": CogVideoXImageToVideoPipeline,
    "v2v": CogVideoXVideoToVideoPipeline,
}
MODE_TASK: dict[Mode, Task] = {"t2v": "t2v", "i2v": "i2v", "v2v": "t2v"}
DEFAULT_STRENGTH = 0.8


def choose_offload(requested: str, variant: Variant, device: torch.device) -> str:
    """Resolve COGVIDEOX_OFFLOAD: `auto` keeps everything on the GPU when it fits."""
    if requested not in OFFLOAD_POLICIES:
        raise ConfigError(
            f"{OFFLOAD_ENV}={requested!r} is not one of {', '.join(OFFLOAD_POLICIES)}"
        )
    if device.type != "cuda":
        if requested not in ("auto", "none"):
            log.warning(f"{OFFLOAD_ENV}={requested} needs a CUDA GPU; running without offload")
        return "none"
    if requested != "auto":
        return requested
    return offload_for_free_memory(variant, torch.cuda.mem_get_info(device)[0] / 2**30)


def offload_for_free_memory(variant: Variant, free_gib: float) -> str:
    """The fastest policy whose measured peak fits: none, then model, then sequential."""
    if free_gib >= variant.vram_no_offload_gib:
        return "none"
    if free_gib >= variant.vram_model_offload_gib:
        return "model"
    return "sequential"


def pipeline_dtype(variant: Variant, device: torch.device) -> torch.dtype:
    # bf16/fp16 matmuls on CPU are slow and CPU runs are tiny test models: keep float32 there.
    return getattr(torch, variant.dtype) if device.type == "cuda" else torch.float32


def build_pipeline(
    variant: Variant,
    weights: Path,
    device: torch.device,
    offload: str,
    compile_transformer: bool = False,
    mode: Mode | None = None,
):
    """mode: the variant's task unless given ("v2v" runs a t2v variant's weights)."""
    pipe = load_pipeline(variant, weights, device, mode)
    return configure_pipeline(pipe, variant, device, offload, compile_transformer)


def load_pipeline(variant: Variant, weights: Path, device: torch.device, mode: Mode | None = None):
    """The pipeline read from `weights`, not yet placed: the step that fails on bad files."""
    mode = mode or variant.task
    if MODE_TASK[mode] != variant.task:
        raise ConfigError(f"{variant.id} is a {variant.task} variant and cannot run {mode}")
    dtype = pipeline_dtype(variant, device)
    log.info(f"pipeline: {variant.id} ({mode}) from {weights}, {dtype} on {device}")
    return PIPELINES[mode].from_pretrained(weights, dtype=dtype)


def configure_pipeline(
    pipe, variant: Variant, device: torch.device, offload: str, compile_transformer: bool = False
):
    """Scheduler, VAE memory savers and placement: everything after the weights are loaded."""
    log.info(f"pipeline: offload={offload}")
    pipe.scheduler = SCHEDULERS[variant.scheduler].from_config(
        pipe.scheduler.config, timestep_spacing="trailing"
    )
    pipe.vae.enable_tiling()
    pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    # Offload hooks move each component to the GPU when it runs; moving the whole pipeline
    # there first would defeat them, so exactly one of these places the weights.
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    if compile_transformer:
        if device.type != "cuda":
            log.warning(f"{COMPILE_ENV}=1 is for CUDA GPUs; running uncompiled on {device}")
        else:
            # In place, so offload hooks and the pipeline keep the same module. Compiling
            # happens on the first calls (about 140 s a graph for 5B on an H100): warm_up().
            pipe.transformer.compile()
    return pipe


@dataclass(frozen=True)
class Request:
    prompt: str
    negative_prompt: str
    num_frames: int | None
    num_inference_steps: int
    guidance_scale: float
    use_dynamic_cfg: bool | None
    fps: int | None
    seed: int | None
    image: Path | None = None
    # Video-to-video: the input clip, and how much of it is re-noised (None: DEFAULT_STRENGTH).
    video: Path | None = None
    strength: float | None = None
    # A fine-tune's LoRA (see lora.py) and its strength; no URL: the base model.
    lora_url: str | None = None
    lora_scale: float = 1.0
    speed_mode: str = "default"  # see speed.py


@dataclass(frozen=True)
class RenderedVideo:
    frames: np.ndarray  # (frames, height, width, 3) floats in [0, 1]
    fps: int
    seed: int
    progress: _StepProgress
    received: float  # time.monotonic() when the request came in
    decoded: float  # time.monotonic() when the VAE finished


class VideoGenerator:
    """One loaded pipeline and everything needed to turn a request into an mp4."""

    def __init__(self, variant: Variant, pipe, device: torch.device, mode: Mode | None = None):
        self.variant, self.pipe, self.device = variant, pipe, device
        self.mode: Mode = mode or variant.task
        config = pipe.transformer.config
        scale = pipe.vae_scale_factor_spatial
        self.native_size = inputs.native_resolution(
            variant, config, scale, os.environ.get(inputs.RESOLUTION_ENV)
        )
        self.size_multiple = scale * config.patch_size
        self.max_prompt_tokens = config.max_text_seq_length
        self._last_output: Path | None = None
        self.lora = LoraSlot(pipe, variant.id)
        self.lora_cache = LoraCache.from_env()

    @classmethod
    def from_env(cls, mode: Mode) -> VideoGenerator:
        started = time.monotonic()
        variant = variant_from_env(MODE_TASK[mode], PREDICTOR_FILES[mode])
        # Output and warm-up folders of a worker that was killed (they outlive a restart).
        leftovers.remove_dead(Path(tempfile.gettempdir()), TEMP_PREFIX)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        offload = choose_offload(os.environ.get(OFFLOAD_ENV, "auto"), variant, device)
        compile_transformer = os.environ.get(COMPILE_ENV, "0") == "1"
        pipe = load_weights(variant, lambda weights: load_pipeline(variant, weights, device, mode))
        pipe = configure_pipeline(pipe, variant, device, offload, compile_transformer)
        generator = cls(variant, pipe, device, mode)
        if compile_transformer and device.type == "cuda":
            warm_up = time.monotonic()
            generator.warm_up()
            log.info(
                f"setup: transformer compiled and warmed up in {time.monotonic() - warm_up:.0f} s"
            )
        log.info("setup: %s ready in %.1f s", variant.id, time.monotonic() - started)
        return generator

    def warm_up(self) -> None:
        """Short generations, so that compiling happens in setup and never in a request.

        The first frame count compiles a graph for its shapes; the second makes torch
        recompile with the frame dimension dynamic ("automatic dynamic shapes"), and that
        graph serves every other count. So: the default count, then the smallest one. Where
        the video takes the image's aspect ratio (1.5 I2V), the second image is portrait, so
        height and width become dynamic as well.
        """
        height, width = self.native_size
        default, smallest = self.variant.default_frames, self.variant.allowed_frames[0]
        turn = self.mode == "i2v" and self.variant.resolution == "image_aspect"
        folder = leftovers.claim(Path(tempfile.gettempdir()), WARM_UP_PREFIX)
        try:
            for second, num_frames in enumerate(dict.fromkeys((default, smallest))):
                clip = image = None
                if self.mode == "v2v":
                    frames = np.full((num_frames, height, width, 3), 128, np.uint8)
                    clip = encode_mp4(frames, Path(folder) / "warm-up.mp4", fps=self.variant.fps)
                elif self.mode == "i2v":
                    image = Path(folder) / "warm-up.png"
                    size = (height, width) if turn and second else (width, height)
                    Image.new("RGB", size, (128, 128, 128)).save(image)
                request = Request(
                    prompt="warm-up",
                    negative_prompt="",
                    num_frames=num_frames,
                    num_inference_steps=2,
                    guidance_scale=6.0,
                    use_dynamic_cfg=None,
                    fps=None,
                    seed=0,
                    image=image,
                    video=clip,
                    strength=1.0,
                )
                self.render(request)
        finally:
            leftovers.release(folder)

    def generate(self, request: Request) -> Path:
        """render(), then the mp4 on a path no other prediction uses."""
        video = self.render(request)
        # The file name is unique too: an upload (--upload-url) keeps only the name, and the
        # same seed may come twice.
        output_dir = leftovers.claim(Path(tempfile.gettempdir()), OUTPUT_PREFIX)
        output = output_dir / f"{self.variant.id}-{video.seed}-{secrets.token_hex(4)}.mp4"
        try:
            encode_mp4(video.frames, output, fps=video.fps)
        except BaseException:  # including a cancel
            leftovers.release(output_dir)
            raise
        finished = time.monotonic()
        started, last_step = video.progress.started, video.progress.last_step
        for name, value in (
            ("prepare_seconds", started - video.received),  # inputs decoded, LoRA fetched
            ("denoise_seconds", last_step - started),
            ("decode_seconds", video.decoded - last_step),
            ("encode_seconds", finished - video.decoded),
            ("total_seconds", finished - video.received),
        ):
            cog.current_scope().record_metric(name, round(value, 3))
        log.info(
            f"wrote {output.name}: {len(video.frames)} frames at {video.fps} fps in "
            f"{finished - video.received:.1f} s"
        )
        return output

    def render(self, request: Request) -> RenderedVideo:
        """Check the request, then denoise and decode: the frames as floats in [0, 1]."""
        received = time.monotonic()
        # 1. Check every input before any heavy work. Cog passes JSON numbers through as
        # they came (2.0 for an int input), so settle the types first.
        variant = self.variant
        steps, guidance_scale = int(request.num_inference_steps), float(request.guidance_scale)
        prompt = inputs.check_prompt(request.prompt, required=variant.task == "t2v")
        negative_prompt = inputs.check_text_length("negative_prompt", request.negative_prompt or "")
        num_frames = inputs.check_num_frames(variant, request.num_frames)
        fps = inputs.check_fps(variant, request.fps)
        seed = inputs.resolve_seed(request.seed)
        lora_url = (request.lora_url or "").strip()
        lora_url = check_lora_url(lora_url) if lora_url else None
        lora_scale = float(request.lora_scale)
        speed_mode = inputs.check_choice("speed_mode", request.speed_mode, SPEED_MODES)
        dynamic_cfg = request.use_dynamic_cfg
        if dynamic_cfg is None:
            dynamic_cfg = variant.dynamic_cfg
        extra = {}
        height, width = self.native_size
        if variant.task == "i2v":
            if request.image is None:
                raise InputError("image is required: the first frame of the video.")
            image = inputs.open_image(request.image)
            if variant.resolution == "image_aspect":
                height, width = inputs.image_aspect_size(
                    image.size, self.native_size, self.size_multiple
                )
            extra["image"] = inputs.fit_image(image, height, width)
            log.info(
                f"image: {image.width}x{image.height} scaled to cover {width}x{height}, cropped"
            )
        denoise_steps = steps
        if self.mode == "v2v":
            strength = inputs.check_strength(request.strength, DEFAULT_STRENGTH, steps)
            # diffusers skips the first (1 - strength) of the schedule: it noises the clip's
            # latents to the level of the step it starts at and denoises from there.
            denoise_steps = min(int(steps * strength), steps)
            if request.video is None:
                raise InputError("video is required: the clip to transform.")
            clip = load_video(
                request.video, num_frames, variant.fps, height, width, variant.allowed_frames
            )
            log.info(clip.summary)
            # What runs is whole steps: the clip is re-noised to the level of the first one.
            log.info(
                f"strength {strength:g}: denoised in the last {denoise_steps} of {steps} steps, "
                f"the clip re-noised {denoise_steps / steps:.0%} of the way"
            )
            extra["video"] = self._pad_for_latent_patches(clip.frames)
            extra["strength"] = strength
        else:
            extra["num_frames"] = num_frames
        for text, name in ((prompt, "prompt"), (negative_prompt, "negative_prompt")):
            tail = inputs.truncated_prompt_tail(self.pipe.tokenizer, text, self.max_prompt_tokens)
            if tail:
                if len(tail) > 300:  # user text in a log line stays short
                    tail = f"{tail[:300]}... ({len(tail):,} characters)"
                log.warning(
                    f"{name} is longer than the text encoder's {self.max_prompt_tokens} tokens; "
                    f"this part is ignored: {tail!r}"
                )

        # 2. The LoRA, fetched (or found in the cache) and checked before it touches the model.
        self.lora.use(self.lora_cache.get(lora_url) if lora_url else None, lora_scale)

        # 3. Denoise and decode.
        log.info(f"seed: {seed}")
        scope = cog.current_scope()
        scope.record_metric("seed", seed)
        log.info(
            f"generating {num_frames} frames at {width}x{height}, {steps} steps, "
            f"guidance {guidance_scale:g}, {_guidance_schedule(dynamic_cfg, guidance_scale)}"
        )
        progress = _StepProgress(denoise_steps)
        if speed_mode != "default":
            log.info(f"speed_mode {speed_mode}: step caching, faster and slightly less faithful")
        try:
            with step_cache(self.pipe, speed_mode, guidance_scale > 1):
                frames = self.pipe(
                    prompt=prompt,
                    negative_prompt=negative_prompt or None,
                    height=height,
                    width=width,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    use_dynamic_cfg=dynamic_cfg,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    max_sequence_length=self.max_prompt_tokens,
                    output_type="np",
                    callback_on_step_end=progress,
                    **extra,
                ).frames[0]
        finally:
            self.release_memory()
        decoded = time.monotonic()
        # Video-to-video makes as many frames as it was given, padding included (see below).
        frames = frames[:num_frames]
        if len(frames) != num_frames:
            raise RuntimeError(f"pipeline returned {len(frames)} frames, expected {num_frames}")
        return RenderedVideo(frames, fps, seed, progress, received, decoded)

    def _pad_for_latent_patches(self, frames: list) -> list:
        """Repeat the last frame until the latent frame count suits the transformer.

        CogVideoXVideoToVideoPipeline makes one output frame per input frame, and for 1.5
        models (patch_size_t 2) refuses an odd latent count, which every 16N+1 clip has. The
        text-to-video pipeline pads latents for the same reason; here the clip gets 4 more
        frames (one latent frame) and the extra output frames are dropped after decoding.
        """
        patch_t = self.pipe.transformer.config.patch_size_t
        temporal = self.pipe.vae_scale_factor_temporal
        frames = list(frames)
        while patch_t and ((len(frames) - 1) // temporal + 1) % patch_t:
            frames += [frames[-1]] * temporal
        return frames

    def predict(self, request: Request) -> Path:
        """generate() for the Cog predictors: one output on disk at a time.

        Cog reads an output file (and uploads it, with --upload-url) before the prediction
        completes, and runs one prediction at a time; so the previous prediction's folder is
        deleted when the next one starts, and a long-running server does not fill /tmp.
        """
        if self._last_output is not None:
            leftovers.release(self._last_output.parent)
            self._last_output = None
        self._last_output = self.generate(request)
        return self._last_output

    def release_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _guidance_schedule(dynamic_cfg: bool, guidance_scale: float) -> str:
    """Which guidance schedule runs, for the log."""
    if guidance_scale <= 1:
        return "no classifier-free guidance"
    if dynamic_cfg:
        # diffusers' use_dynamic_cfg, as the model's authors call it (cli_demo.py): the cosine
        # is taken of the timestep value, so the scale swings between 1 and 1 + guidance_scale.
        return "dynamic (diffusers' timestep schedule, as upstream)"
    return "constant"


class _StepProgress:
    """callback_on_step_end: one log line per denoising step."""

    def __init__(self, total: int):
        self.total = total
        self.started = self.last_step = time.monotonic()

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self.last_step = time.monotonic()
        elapsed = self.last_step - self.started
        log.info(f"step {step + 1}/{self.total}, {elapsed:.1f} s elapsed")
        return {}
