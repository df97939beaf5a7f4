"""A request in, an mp4 out: prepare (check and condition) -> denoise -> decode -> encode.

`VideoGenerator` holds one configured pipeline (pipeline.py) and turns a `Request` into
frames (`render_frames`), into an mp4 on a path of its own (`render_mp4`), or, for the Cog
predictors, into the one mp4 kept on disk (`predict`). Every input is checked first
(`_checked`, which `check` runs alone before an image or clip is fetched), before the LoRA is
fetched or the model runs.
"""

from __future__ import annotations

import functools
import gc
import logging
import secrets
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cog
import numpy as np
import torch
from PIL import Image

from . import compile_cache, gpu_memory, inputs, leftovers
from .attention import ATTENTION_BACKEND_ENV, attention_backend, check_runs
from .errors import (
    EXPLAINED,
    DeviceLost,
    EnhanceError,
    GpuMemoryError,
    InputError,
    LoraError,
    device_lost_reason,
)
from .gpu_memory import out_of_memory
from .lora.fetch import check_lora_url
from .lora.file import adapted_layers
from .lora.slot import LoraSlot
from .lora.store import LoraCache
from .media import fetch
from .media.clip import load_video
from .media.image import fit_image, open_image
from .media.mp4 import above_level_5_1, encode_mp4
from .pipeline import (
    COMPILE_ENV,
    MODE_TASK,
    OFFLOAD_ENV,
    Mode,
    check_compiled_if_flex,
    check_weights_match,
    choose_compile,
    choose_offload,
    choose_vae_tiling,
    compile_setting,
    configure_pipeline,
    is_compiled,
    load_pipeline,
    no_offload_peak_gib,
    pipeline_dtype,
    vae_tiling_setting,
)
from .postprocess import Postprocessed, Postprocessor, Steps
from .prompts.endpoint import check_api_key
from .prompts.enhance import ENHANCE_ENV, PromptEnhancer, config_from_env, load_enhancer
from .settings import setting
from .speed import SPEED_MODES, starting_timestep, step_cache
from .variants import PREDICTOR_FILES, Variant, variant_from_env
from .weights import check_settings, load_weights, weights_root

if TYPE_CHECKING:
    from .parallel.engine import ContextParallel

log = logging.getLogger(__name__)

OUTPUT_PREFIX = leftovers.TEMP_PREFIX + "output-"
WARM_UP_PREFIX = leftovers.TEMP_PREFIX + "warm-up-"
DEFAULT_STRENGTH = 0.8
LOGGED_TEXT_CHARS = 300  # user text in a log line stays short


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
    # Convert the image's colour profile, or the clip's HDR or BT.2020 colours, to the SDR
    # sRGB/BT.709 the model was trained on; off: read as upstream reads them (media/).
    convert_colour: bool = False
    # A fine-tune's LoRA (see lora/) and its strength; no URL: the base model.
    lora_url: str | None = None
    lora_scale: float = 1.0
    speed_mode: str = "default"  # see speed.py
    # After decoding (postprocess/): "none", "2x" or "4x" each.
    interpolate: str = "none"
    upscale: str = "none"
    # Rewrite the prompt with the deployment's language model first (see prompts/), with the
    # user's key for its endpoint if given (a cog.Secret: its repr shows no key).
    enhance_prompt: bool = False
    enhance_prompt_api_key: cog.Secret | None = None


@dataclass
class Plan:
    """A checked request: what the denoise needs, with nothing left to validate."""

    prompt: str
    negative_prompt: str
    num_frames: int
    fps: int
    seed: int
    steps: int
    guidance_scale: float
    dynamic_cfg: bool
    speed_mode: str
    lora_url: str | None
    lora_scale: float
    height: int
    width: int
    received: float  # time.monotonic() when the request came in
    denoise_steps: int = 0  # fewer than steps for video-to-video
    postprocess: Steps = field(default_factory=Steps)  # upscale, interpolate; 1: off
    # The pipeline's conditioning arguments: num_frames, or image, or video and strength.
    conditioning: dict = field(default_factory=dict)
    # Latent frames the clip was padded with for the transformer (1.5 video-to-video), dropped
    # before decoding.
    padding_latents: int = 0


@dataclass(frozen=True)
class RenderedVideo:
    frames: np.ndarray  # decoded: (frames, height, width, 3) floats in [0, 1]
    output: Postprocessed  # to encode: the frames upscaled and interpolated as asked, and fps
    seed: int
    progress: _StepProgress
    received: float  # time.monotonic() when the request came in
    decoded: float  # time.monotonic() when the VAE finished


@dataclass(frozen=True)
class WarmUpRender:
    """One render of setup's warm-up: a short request at these settings."""

    num_frames: int
    portrait: bool = False  # the image turned, where the video takes its aspect (1.5 I2V)
    guidance_scale: float = 6.0
    speed_mode: str = "default"
    steps: int = 2


class VideoGenerator:
    """One loaded pipeline and everything needed to turn a request into an mp4.

    resolution: a deployment's HEIGHTxWIDTH (COGVIDEOX_RESOLUTION), None for the variant's.
    lora_cache: where lora_url files are kept; None serves the base model only.
    postprocessor: the enabled upscale and interpolate models; None offers neither.
    enhancer: rewrites prompts for enhance_prompt; None: the deployment has no backend.
    """

    def __init__(
        self,
        variant: Variant,
        pipe,
        device: torch.device,
        mode: Mode | None = None,
        *,
        resolution: str | None = None,
        lora_cache: LoraCache | None = None,
        postprocessor: Postprocessor | None = None,
        enhancer: PromptEnhancer | None = None,
    ):
        self.variant, self.pipe, self.device = variant, pipe, device
        self.mode: Mode = mode or variant.task
        config = pipe.transformer.config
        scale = pipe.vae_scale_factor_spatial
        self.render_size = inputs.choose_render_size(variant, config, scale, resolution)
        self.size_multiple = scale * config.patch_size
        self.max_prompt_tokens = config.max_text_seq_length
        self._last_output: Path | None = None
        self._negative: tuple[str, torch.Tensor] | None = None  # (text, embedding)
        self.lora = LoraSlot(pipe, variant.id)
        self.lora_cache = lora_cache
        self.postprocessor = postprocessor or Postprocessor()
        self.enhancer = enhancer
        self.offload = self.lora.offload or "none"  # the policy that placed the weights
        self._warming_up = False  # in warm_up(): setup's renders, which no user asked for
        # Why, once CUDA failed for good (errors.device_lost_reason): a rank reports it.
        self.device_lost: str | None = None
        # What a rank of a multi-GPU group (parallel/) changes; one process leaves them be.
        self.engine: ContextParallel | None = None  # splits each denoise over ranks
        # After each step's log line, with the step and its seconds.
        self.on_step: Callable[[int, float], None] | None = None
        # After each post-processed frame or pair: rank 0's own cancel check (no other rank
        # takes part in post-processing, so none is agreed with).
        self.on_postprocess_progress: Callable[[], None] | None = None
        self.on_inputs_read: Callable[[], None] | None = None  # after the image or clip
        self.record_metric: Callable[[str, float], None] = _record_cog_metric

    @classmethod
    def from_env(
        cls,
        mode: Mode,
        device: torch.device | None = None,
        warm_up: bool = True,
        rewrites_prompts: bool = True,
        engine: ContextParallel | None = None,
        postprocessing: Callable[[torch.device], Postprocessor] = Postprocessor.from_env,
    ) -> VideoGenerator:
        """The generator a deployment's environment describes, weights fetched if needed.

        device: the first CUDA GPU, else the CPU, unless given (a rank's own GPU).
        warm_up: False leaves compile_warm_up() to the caller (a rank first puts in its
        cancel check and the LoRA and prompt it shares with the other ranks).
        rewrites_prompts: False loads no enhance_prompt model (a rank that receives rank 0's
        rewrite instead).
        engine: a rank's ContextParallel, installed before the weights are placed.
        postprocessing: the upscale and interpolate models on `device`, or (on a rank other
        than 0, which never post-processes) only what they offer.
        """
        started = time.monotonic()
        variant = variant_from_env(MODE_TASK[mode], PREDICTOR_FILES[mode])
        enhance = config_from_env()  # checked before any download
        if mode != "t2v":
            fetch.check_settings()  # image and video inputs are fetched by URL
        lora_cache = LoraCache.from_env()
        check_settings(variant)
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        resolution = inputs.resolution_setting()
        vae_tiling = choose_vae_tiling(
            vae_tiling_setting(), variant, device, resized=resolution is not None
        )
        offload = choose_offload(setting(OFFLOAD_ENV, "auto"), variant, device, vae_tiling)
        compiled = choose_compile(compile_setting(), device)
        attention = attention_backend(setting(ATTENTION_BACKEND_ENV))
        check_runs(attention, device, pipeline_dtype(variant, device))
        check_compiled_if_flex(attention, compiled)
        # Output and warm-up folders of a worker that was killed (they outlive a restart).
        leftovers.remove_dead(Path(tempfile.gettempdir()), leftovers.TEMP_PREFIX)
        # First: its weights are small, so a bad URL fails setup in seconds, not after 20 GB.
        postprocessor = postprocessing(device)
        pipe = load_weights(variant, lambda weights: load_pipeline(variant, weights, device, mode))
        check_weights_match(pipe, variant)  # kept if not: they are what the source serves
        pipe = configure_pipeline(
            pipe,
            variant,
            device,
            offload,
            compiled,
            attention,
            vae_tiling=vae_tiling,
            before_placing=engine.install if engine else None,
        )
        generator = cls(
            variant,
            pipe,
            device,
            mode,
            resolution=resolution,
            lora_cache=lora_cache,
            postprocessor=postprocessor,
            enhancer=load_enhancer(
                enhance if rewrites_prompts else None,
                device,
                no_offload_peak_gib(variant, vae_tiling) if offload == "none" else None,
            ),
        )
        generator.engine = engine
        if warm_up:
            generator.compile_warm_up()
        log.info("setup: %s ready in %.1f s", variant.id, time.monotonic() - started)
        return generator

    def compile_warm_up(self) -> None:
        """warm_up() with the compile cache, when the transformer was compiled."""
        if not is_compiled(self.pipe.transformer):
            return
        started = time.monotonic()
        compile_cache.warm_up_with_cache(self, weights_root())
        log.info(f"setup: transformer compiled and warmed up in {time.monotonic() - started:.0f} s")

    def warm_up(self) -> None:
        """Short generations, so that compiling happens in setup and never in a request.

        The first frame count compiles a graph for its shapes; the second makes torch
        recompile with the frame dimension dynamic ("automatic dynamic shapes"), and that
        graph serves every other count. So: the default count, then the smallest one. Where
        the video takes the image's aspect ratio (1.5 I2V), the second image is portrait, so
        height and width become dynamic as well. Then one render at guidance 1 (a batch of
        one: torch specialises sizes 0 and 1, so the dynamic graph does not serve it), and
        the speed modes' compiled parts: "faster" at both counts, with steps enough to run
        its attention on the guidance batch and on the conditional half alone ("fast" runs
        the same parts on the guidance batch).
        """
        folder = leftovers.claim(Path(tempfile.gettempdir()), WARM_UP_PREFIX)
        self._warming_up = True
        try:
            for index, render in enumerate(self.warm_up_renders()):
                # The VAE is not compiled: one decode loads its kernels, the rest would only
                # cost setup time (4 s each for 5B on an H100).
                run = self.render_frames if index == 0 else self.denoise_only
                run(self._warm_up_request(folder, render))
        finally:
            self._warming_up = False
            leftovers.release(folder)

    def warm_up_renders(self) -> list[WarmUpRender]:
        """What warm_up() renders: part of the compile cache's key."""
        default, smallest = self.variant.default_frames, self.variant.allowed_frames[0]
        counts = list(dict.fromkeys((default, smallest)))
        plan = [WarmUpRender(n, portrait=second) for second, n in enumerate(counts)]
        plan.append(WarmUpRender(smallest, guidance_scale=1.0))
        plan += [
            WarmUpRender(n, portrait=second, speed_mode="faster", steps=4)
            for second, n in enumerate(counts)
        ]
        return plan

    def warm_up_key(self) -> list[list]:
        """Each warm-up render as [frames, height, width, guidance, speed_mode, steps]: part of
        the compile cache's key."""
        height, width = self.render_size
        turn = self.mode == "i2v" and self.variant.resolution == "image_aspect"
        return [
            [
                r.num_frames,
                *((width, height) if r.portrait and turn else (height, width)),
                r.guidance_scale,
                r.speed_mode,
                r.steps,
            ]
            for r in self.warm_up_renders()
        ]

    def _warm_up_request(self, folder: Path, render: WarmUpRender) -> Request:
        num_frames = render.num_frames
        height, width = self.render_size
        clip = image = None
        if self.mode == "v2v":
            frames = np.full((num_frames, height, width, 3), 128, np.uint8)
            clip = encode_mp4(frames, folder / "warm-up.mp4", fps=self.variant.fps)
        elif self.mode == "i2v":
            image = folder / "warm-up.png"
            turn = render.portrait and self.variant.resolution == "image_aspect"
            Image.new("RGB", (height, width) if turn else (width, height), (128,) * 3).save(image)
        return Request(
            prompt="warm-up",
            negative_prompt="",
            num_frames=num_frames,
            num_inference_steps=render.steps,
            guidance_scale=render.guidance_scale,
            use_dynamic_cfg=None,
            fps=None,
            seed=0,
            image=image,
            video=clip,
            strength=1.0,
            speed_mode=render.speed_mode,
        )

    def healthcheck(self) -> bool:
        """Cog's health check: True, or DeviceLost once the GPU failed for good (Cog then
        reports UNHEALTHY with its text). The worker itself Cog watches on its own."""
        self._fail_if_device_lost()
        return True

    def predict(self, request: Request) -> Path:
        """render_kept() for the Cog predictors. A cancel or failure goes on without what
        its traceback held: Cog reports its type and text alone, so the traceback of a
        failure no message explains goes into the prediction's log first."""
        try:
            return self.render_kept(request)
        except BaseException as error:
            if isinstance(error, Exception) and not isinstance(error, EXPLAINED):
                # As text: a record's exc_info would hold the frames for as long as a
                # handler keeps the record.
                log.error("prediction failed\n%s", "".join(traceback.format_exception(error)))
            self.let_go_of(error)
            raise

    def let_go_of(self, error: BaseException) -> None:
        """Drop what `error` holds (the tensors of the frames it passed through), then hand
        their memory back: the pipeline's own release ran while the error still held them."""
        gpu_memory.drop_tracebacks(error)
        if self.device_lost is None:  # else a CUDA call would fail and replace `error`
            self.release_memory()

    def render_kept(self, request: Request) -> Path:
        """render_mp4(), one output on disk at a time.

        Cog reads an output file (and uploads it, with --upload-url) before the prediction
        completes, and runs one prediction at a time; so the previous prediction's folder is
        deleted when the next one starts, and a long-running server does not fill /tmp.
        """
        if self._last_output is not None:
            leftovers.release(self._last_output.parent)
            self._last_output = None
        self._fail_if_device_lost()
        with self._noting_a_lost_device():
            self._last_output = self.render_mp4(request)
        return self._last_output

    @contextmanager
    def _noting_a_lost_device(self) -> Iterator[None]:
        """Sets device_lost when what runs inside fails and the GPU is lost for good
        (errors.device_lost_reason); the error goes on as it was."""
        try:
            yield
        except Exception as error:
            reason = device_lost_reason(error)
            if reason is not None:
                self.device_lost = reason
                log.error(_device_lost_text(reason))
            raise

    def _fail_if_device_lost(self) -> None:
        if self.device_lost is not None:
            raise DeviceLost(_device_lost_text(self.device_lost))

    def render_mp4(self, request: Request) -> Path:
        """render_frames(), then the mp4 on a path no other prediction uses."""
        video = self.render_frames(request)
        # The file name is unique too: an upload (--upload-url) keeps only the name, and the
        # same seed comes again and again (42, 0). 64 random bits: with 32, two of 77,000
        # predictions of one seed shared a name as often as not, one upload replacing the other.
        # Named before the claim: until predict() holds the path, nothing else would remove
        # the folder, so a cancel (Cog raises it at any bytecode) while naming, in the metrics
        # or in the log line must find the folder released.
        name = f"{self.variant.id}-{video.seed}-{secrets.token_hex(8)}.mp4"
        output_dir = leftovers.claim(Path(tempfile.gettempdir()), OUTPUT_PREFIX)
        try:
            output = output_dir / name
            encode_mp4(video.output, output, fps=video.output.fps)
            finished = time.monotonic()
            _record_timings(video, finished, self.record_metric)
            log.info(
                f"wrote {output.name}: {video.output.count} frames at {video.output.fps} fps in "
                f"{finished - video.received:.1f} s"
            )
        except BaseException:  # including a cancel
            leftovers.release(output_dir)
            raise
        return output

    def render_frames(self, request: Request) -> RenderedVideo:
        """Check the request, denoise and decode: the frames as floats in [0, 1], and the
        output to encode, upscaled and interpolated as asked while it is read."""
        plan, progress = self._prepare_model(request)
        frames = self.denoise_and_decode(plan, progress)
        decoded = time.monotonic()
        if len(frames) != plan.num_frames:
            raise RuntimeError(f"pipeline returned {len(frames)} frames, not {plan.num_frames}")
        if not np.isfinite(frames).all():  # they would encode as black: say so instead
            if plan.lora_url:
                # peft scales the LoRA's own product: at 0, an infinite one still gives NaN.
                advice = (
                    "whatever the lora_scale (even at 0). Check the LoRA: its up and down "
                    "matrices are too large for this model's precision."
                    if plan.lora_scale == 0
                    else f"at lora_scale {plan.lora_scale:g}. Try a smaller lora_scale, or check "
                    "the LoRA."
                )
                raise LoraError(f"the video came out as NaN: the LoRA's weights overflow {advice}")
            raise RuntimeError("the pipeline returned NaN frames")
        output = self.postprocessor.apply(
            frames, plan.fps, plan.postprocess, self.record_metric, self.on_postprocess_progress
        )
        return RenderedVideo(frames, output, plan.seed, progress, plan.received, decoded)

    def denoise_only(self, request: Request) -> None:
        """render_frames() without the VAE decode, for a rank that does not write the video:
        it takes its part in every step, and rank 0 alone decodes the (identical) latents."""
        with self._noting_a_lost_device():
            plan, progress = self._prepare_model(request)
            self.denoise_and_decode(plan, progress, output_type="latent")

    def _prepare_model(self, request: Request) -> tuple[Plan, _StepProgress]:
        """The checked plan, its LoRA on the model, and a progress callback for its steps.

        The LoRA goes on before the prompt is rewritten: the rewrite is a language model's
        call (on the user's key, where given), which a LoRA that cannot be used (for another
        model, a URL that fails) would have spent for nothing."""
        plan = self._conditioned(request)
        if self.on_inputs_read is not None:
            self.on_inputs_read()
        # The LoRA, fetched (or found in the cache) and checked before it touches the model.
        lora = self.lora_cache.get(plan.lora_url) if plan.lora_url else None
        if lora is not None and self.engine is not None:
            layers = adapted_layers(lora)
            self.engine.check_lora(layers, plan.guidance_scale > 1, plan.speed_mode)
        self.lora.use(lora, plan.lora_scale)
        self._rewrite(plan, request)
        return plan, _StepProgress(plan.denoise_steps, self.on_step)

    def check(self, request: Request) -> None:
        """The checks that need neither the image or clip nor a language model: InputError,
        before a predictor spends up to COGVIDEOX_INPUT_TIMEOUT fetching either; DeviceLost
        once the GPU failed for good."""
        self._fail_if_device_lost()
        self._checked(request, time.monotonic())

    def prepare(self, request: Request) -> Plan:
        """Every input checked, the image or clip read and fitted, the prompt rewritten where
        asked: a Plan, or an InputError. No LoRA is put on: render_frames() does that."""
        plan = self._conditioned(request)
        self._rewrite(plan, request)
        return plan

    def _conditioned(self, request: Request) -> Plan:
        """prepare() but the prompt's rewrite."""
        plan = self._checked(request, time.monotonic())
        if self.mode == "i2v":
            self._condition_on_image(plan, request.image, request.convert_colour)
        elif self.mode == "v2v":
            self._condition_on_clip(plan, request.video, request.convert_colour)
        else:
            plan.conditioning["num_frames"] = plan.num_frames
        return plan

    def _rewrite(self, plan: Plan, request: Request) -> None:
        """The prompt rewritten where the request asks, and what the text encoder will not
        read of it logged."""
        if request.enhance_prompt:
            key = request.enhance_prompt_api_key
            api_key = key.get_secret_value() if key is not None else None
            plan.prompt = self._enhanced_prompt(plan.prompt, plan.seed, api_key)
        self._log_ignored_text(plan)

    def _checked(self, request: Request, received: float) -> Plan:
        """The Plan of everything but the image or clip and the rewrite. Cog passes JSON
        numbers through as they came (2.0 for an int input), so the types are settled here."""
        variant = self.variant
        if request.enhance_prompt and self.enhancer is None:
            raise InputError(
                f"enhance_prompt is not available on this deployment: it has no language "
                f"model to rewrite prompts ({ENHANCE_ENV} is off). Send enhance_prompt=false, "
                f"or write the long, detailed prompt yourself."
            )
        key = request.enhance_prompt_api_key
        if request.enhance_prompt and key is not None:
            # What the rewrite would refuse, refused here: before the image or clip is fetched.
            try:
                check_api_key(key.get_secret_value(), "enhance_prompt_api_key")
            except EnhanceError as error:
                raise InputError(str(error)) from None
        lora_url = (request.lora_url or "").strip()
        if lora_url and self.lora_cache is None:
            raise InputError(
                "lora_url is not available here: this generator serves the base model."
            )
        dynamic_cfg = request.use_dynamic_cfg
        plan = Plan(
            prompt=inputs.check_prompt(request.prompt, required=variant.task == "t2v"),
            negative_prompt=inputs.check_text_length(
                "negative_prompt", request.negative_prompt or ""
            ),
            num_frames=inputs.check_num_frames(variant, request.num_frames),
            fps=inputs.check_fps(variant, request.fps),
            seed=inputs.resolve_seed(request.seed),
            steps=int(request.num_inference_steps),
            guidance_scale=float(request.guidance_scale),
            dynamic_cfg=variant.dynamic_cfg if dynamic_cfg is None else dynamic_cfg,
            speed_mode=inputs.check_choice("speed_mode", request.speed_mode, SPEED_MODES),
            lora_url=check_lora_url(lora_url) if lora_url else None,
            lora_scale=float(request.lora_scale),
            postprocess=self.postprocessor.check(request.interpolate, request.upscale),
            height=self.render_size[0],
            width=self.render_size[1],
            received=received,
        )
        plan.denoise_steps = plan.steps
        if request.enhance_prompt and inputs.is_blank(plan.prompt):  # i2v allows it
            raise InputError(
                "enhance_prompt needs a prompt to rewrite: the prompt is empty. Describe the "
                "motion, or send enhance_prompt=false."
            )
        if self.mode == "v2v":
            strength = inputs.check_strength(request.strength, DEFAULT_STRENGTH, plan.steps)
            plan.conditioning["strength"] = strength
            # diffusers skips the first (1 - strength) of the schedule: it noises the clip's
            # latents to the level of the step it starts at and denoises from there.
            plan.denoise_steps = min(int(plan.steps * strength), plan.steps)
        return plan

    def _enhanced_prompt(self, prompt: str, seed: int, api_key: str | None) -> str:
        """The language model's rewrite, checked as a user's prompt is (after every other
        input, so a bad one costs no rewrite)."""
        assert self.enhancer is not None
        rewrite = self.enhancer.enhance(
            prompt,
            task=self.mode,
            seed=seed,
            max_tokens=self.max_prompt_tokens,
            api_key=api_key,
            record_metric=self.record_metric,
        )
        return inputs.check_prompt(rewrite, required=True)

    def _condition_on_image(self, plan: Plan, path: Path | None, convert_colour: bool) -> None:
        if path is None:
            raise InputError("image is required: the first frame of the video.")
        image = open_image(path, convert_colour)
        if self.variant.resolution == "image_aspect":
            plan.height, plan.width = inputs.image_aspect_size(
                image.size, self.render_size, self.size_multiple
            )
        plan.conditioning["image"] = fit_image(image, plan.height, plan.width)
        plan.conditioning["num_frames"] = plan.num_frames
        log.info(
            f"image: {image.width}x{image.height} scaled to cover {plan.width}x{plan.height}, "
            "cropped"
        )

    def _condition_on_clip(self, plan: Plan, path: Path | None, convert_colour: bool) -> None:
        if path is None:
            raise InputError("video is required: the clip to transform.")
        variant = self.variant
        clip = load_video(
            path,
            plan.num_frames,
            variant.fps,
            plan.height,
            plan.width,
            variant.allowed_frames,
            convert_colour,
        )
        log.info(clip.summary)
        # What runs is whole steps: the clip is re-noised to the level of the first one.
        log.info(
            f"strength {plan.conditioning['strength']:g}: denoised in the last "
            f"{plan.denoise_steps} of {plan.steps} steps, the clip re-noised "
            f"{plan.denoise_steps / plan.steps:.0%} of the way"
        )
        plan.conditioning["video"], plan.padding_latents = self._pad_for_latent_patches(clip.frames)

    def _log_ignored_text(self, plan: Plan) -> None:
        """Say which words the text encoder will not see (it reads max_prompt_tokens). The
        negative prompt is not encoded at all without guidance, so no part of it is named."""
        names = ("prompt", "negative_prompt") if plan.guidance_scale > 1 else ("prompt",)
        for name in names:
            text = getattr(plan, name)
            tail = inputs.truncated_prompt_tail(self.pipe.tokenizer, text, self.max_prompt_tokens)
            if tail:
                if len(tail) > LOGGED_TEXT_CHARS:
                    tail = f"{tail[:LOGGED_TEXT_CHARS]}... ({len(tail):,} characters)"
                log.warning(
                    f"{name} is longer than the text encoder's {self.max_prompt_tokens} tokens; "
                    f"this part is ignored: {tail!r}"
                )

    def denoise_and_decode(
        self, plan: Plan, progress: _StepProgress, output_type: str = "np"
    ) -> np.ndarray:
        """The diffusers pipeline, called as upstream's cli_demo.py calls it (see docs)."""
        log.info(f"seed: {plan.seed}")
        self.record_metric("seed", plan.seed)
        schedule = _guidance_schedule(plan.dynamic_cfg, plan.guidance_scale)
        log.info(
            f"generating {plan.num_frames} frames at {plan.width}x{plan.height}, {plan.steps} "
            f"steps, guidance {plan.guidance_scale:g}, {schedule}"
        )
        steps = plan.postprocess
        level = above_level_5_1(
            plan.width * steps.upscale, plan.height * steps.upscale, plan.fps * steps.interpolate
        )
        if level:
            log.warning(
                f"output: {level}. Firefox on Windows and some phones do not play such an mp4; "
                f"a smaller upscale, interpolate or fps keeps it within level 5.1"
            )
        if plan.speed_mode != "default":
            log.info(
                f"speed_mode {plan.speed_mode}: step caching, faster and slightly less faithful"
            )
        # A padded clip's padding is dropped from the latents, so the VAE decodes the clip's own
        # (an odd count: see _pad_for_latent_patches).
        padded = plan.padding_latents > 0 and output_type != "latent"
        try:
            embeddings = self._text_embeddings(plan)
            progress.phase = "denoising"
            # The cache hooks first: the engine reads them to choose a layout (FasterCache
            # skips the guidance batch's negative half, so it cannot be split by CFG).
            with (
                step_cache(
                    self.pipe,
                    plan.speed_mode,
                    plan.guidance_scale > 1,
                    starting_timestep(self.pipe.scheduler, plan.steps, plan.denoise_steps),
                ),
                self._split_over_ranks(plan.guidance_scale > 1),
            ):
                output = self.pipe(
                    **embeddings,
                    height=plan.height,
                    width=plan.width,
                    num_inference_steps=plan.steps,
                    guidance_scale=plan.guidance_scale,
                    use_dynamic_cfg=plan.dynamic_cfg,
                    generator=torch.Generator("cpu").manual_seed(plan.seed),
                    max_sequence_length=self.max_prompt_tokens,
                    output_type="latent" if padded else output_type,
                    callback_on_step_end=progress,
                    **plan.conditioning,
                ).frames
            if padded:
                output = self._decode(output[:, : -plan.padding_latents], output_type)
            return output[0]
        except torch.OutOfMemoryError as error:
            phase = progress.phase
            if phase == "denoising" and gpu_memory.raised_in(error, self.pipe.vae, "encode"):
                # The pipeline encodes the image or clip itself, before its first step.
                phase = "encoding the image" if self.mode == "i2v" else "encoding the video"
            raise self._out_of_memory(error, plan, phase) from error
        finally:
            # What diffusers does at the end of a call that completes: with model offload, every
            # model back on the CPU. A cancel or failure mid-call skips it (and the padded
            # clip's decode comes after it), and the model left on the GPU stayed there through
            # the next prediction's text encoding: no hook offloads a model before the first.
            self.pipe.maybe_free_model_hooks()
            self.release_memory()

    def _out_of_memory(
        self, error: torch.OutOfMemoryError, plan: Plan, phase: str
    ) -> GpuMemoryError:
        """What ran out and at what size, and what needs less: setup chose the memory policy
        for the default size."""
        what = gpu_memory.what_ran_out(phase, plan.num_frames, plan.width, plan.height)
        tiled = getattr(self.pipe.vae, "use_tiling", True)
        if self._warming_up:
            what += f" in setup's compile warm-up ({COMPILE_ENV}=1)"
            return out_of_memory(error, what, gpu_memory.setup_advice(phase, tiled, self.offload))
        advice = gpu_memory.request_advice(
            self.variant, phase, plan.num_frames, tiled, self.offload
        )
        return out_of_memory(error, what, advice)

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor, output_type: str):
        """The pipeline's own last steps on `latents`: the VAE decode, then the frames."""
        video = self.pipe.decode_latents(latents)
        return self.pipe.video_processor.postprocess_video(video=video, output_type=output_type)

    @torch.no_grad()
    def _text_embeddings(self, plan: Plan) -> dict[str, torch.Tensor]:
        """The prompts encoded as the pipeline would encode them, the negative one kept.

        Most requests share a negative prompt (the empty one), so its embedding is computed
        once and reused while it stays the same; diffusers encodes each prompt on its own,
        so the tensors are the ones it would compute.
        """
        encode = functools.partial(
            self.pipe.encode_prompt,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_prompt_tokens,
        )
        embeddings = {"prompt_embeds": encode(plan.prompt)[0]}
        if plan.guidance_scale > 1:
            if self._negative is None or self._negative[0] != plan.negative_prompt:
                self._negative = (plan.negative_prompt, encode(plan.negative_prompt)[0])
            embeddings["negative_prompt_embeds"] = self._negative[1]
        return embeddings

    @contextmanager
    def _split_over_ranks(self, classifier_free_guidance: bool) -> Iterator[None]:
        """The engine's split for one pipeline call, on a rank of a multi-GPU group."""
        if self.engine is None:
            yield
            return
        with self.engine.run(classifier_free_guidance) as layout:
            log.info(f"layout: {layout}")
            yield

    def _pad_for_latent_patches(self, frames: list) -> tuple[list, int]:
        """The clip with its last frame repeated until the latent frame count suits the
        transformer, and how many latent frames that added.

        For 1.5 models (patch_size_t 2) CogVideoXVideoToVideoPipeline refuses an odd latent
        count, which every 16N+1 clip has; here the clip gets 4 more frames (one latent frame).
        As diffusers' text- and image-to-video pipelines do with theirs, that latent frame is
        dropped before decoding: the VAE turns an even count into 4 frames each, the first
        (one frame of the clip) included, so the video would run 3 frames late.
        """
        patch_t = self.pipe.transformer.config.patch_size_t
        temporal = self.pipe.vae_scale_factor_temporal
        frames, added = list(frames), 0
        while patch_t and ((len(frames) - 1) // temporal + 1) % patch_t:
            frames += [frames[-1]] * temporal
            added += 1
        return frames, added

    def release_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _device_lost_text(reason: str) -> str:
    return (
        f"the GPU failed for good in a prediction ({reason}); every later prediction fails "
        f"until the worker restarts"
    )


def _record_cog_metric(name: str, value: float) -> None:
    cog.current_scope().record_metric(name, value)


def _record_timings(
    video: RenderedVideo, finished: float, record: Callable[[str, float], None]
) -> None:
    """The prediction's phase times, as metrics."""
    started, last_step = video.progress.started, video.progress.last_step
    for name, value in (
        ("prepare_seconds", started - video.received),  # inputs decoded, LoRA fetched
        ("denoise_seconds", last_step - started),
        ("decode_seconds", video.decoded - last_step),
        # Upscale and interpolate run inside the encode's loop: their seconds are their own.
        ("encode_seconds", finished - video.decoded - video.output.seconds),
        ("total_seconds", finished - video.received),
    ):
        record(name, round(value, 3))


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
    """callback_on_step_end: one log line per denoising step, then `on_step(step, seconds)`
    (a rank's cancel check, which may raise to stop the pipeline)."""

    def __init__(self, total: int, on_step: Callable[[int, float], None] | None = None):
        self.total, self.on_step = total, on_step
        self.started = self.last_step = time.monotonic()
        # Where the call is, for an out-of-memory error: the VAE decodes after the last step.
        self.phase = "encoding the prompt"

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        previous, self.last_step = self.last_step, time.monotonic()
        elapsed = self.last_step - self.started
        log.info(f"step {step + 1}/{self.total}, {elapsed:.1f} s elapsed")
        if step + 1 == self.total:
            self.phase = "decoding"
        if self.on_step is not None:
            self.on_step(step, self.last_step - previous)
        return {}
