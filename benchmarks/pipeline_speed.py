"""Speed and memory of one CogVideoX prediction, phase by phase, through the predictor's code.

The models are built at full size from the published configs with random weights (speed and
memory do not depend on the values), so no download is needed: the transformer, the 3D VAE and
the T5 v1.1 XXL encoder. They then go through exactly what a prediction runs:
`cogvideox_cog.pipeline.PIPELINES["t2v"]`, `configure_pipeline` (scheduler swap, VAE tiling
and slicing, offload policy) and `VideoGenerator.render_mp4` (input checks, denoising, decoding,
mp4 encoding). Phases are timed by instrumentation only (wrapped methods and a forward hook on
the pipeline's own objects, with a device synchronisation at each mark), never by re-running
parts of the pipeline by hand. The one exception is labelled: after each prediction the final
latents are decoded again, once per `--tiling` mode, to compare VAE tiling on and off.

    python3 benchmarks/pipeline_speed.py --variant cogvideox-5b --offload none,model,sequential \
        --tiling on,off --steps 50 --steps-sequential 2 --out benchmarks/results/gpu/cogvideox-5b

`--size tiny` uses the tiny test models of `cogvideox_cog.devtools.tiny` instead, so the
harness itself runs on a CPU in seconds. Each run writes `<variant>-<size>-<offload>.json` into
--out, and `results.md` there is rewritten from every JSON in the folder.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXTransformer3DModel,
)
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from benchmarks.common import (
    HostPeak,
    environment,
    fmt,
    free_memory,
    markdown_table,
    request_fields,
    synchronize,
    write_json,
)
from cogvideox_cog import generator as predictor_generator
from cogvideox_cog.devtools.tiny import TINY, build_tiny_pipeline
from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.inputs import RESOLUTION_ENV
from cogvideox_cog.media.mp4 import probe_mp4
from cogvideox_cog.pipeline import PIPELINES, choose_compile, configure_pipeline, pipeline_dtype
from cogvideox_cog.variants import VARIANTS, Variant

log = logging.getLogger("pipeline_speed")

GIB = 2**30
OFFLOADS = ("none", "model", "sequential")
PROMPT = (
    "a panda in a red jacket sits on a wooden stool in a sunlit bamboo forest and plays an "
    "acoustic guitar; other pandas watch, the leaves move in a soft wind, cinematic, detailed"
)

# ---------------------------------------------------------------------------------------------
# Full-size configs. Each value is the published one; where a value equals the class default
# of diffusers 0.42.1 it is still written out, so a changed default cannot change the model.
#
# Transformer: the hub configs THUDM/CogVideoX-2b and THUDM/CogVideoX-5b transformer/config.json
# (2b: 30 layers, 30 heads, sincos positions; 5b: 42 layers, 48 heads, 3D rotary), which are
# what diffusers' scripts/convert_cogvideox_to_diffusers.py writes: "For CogVideoX-2B,
# num_layers is 30. For 5B, it is 42", "num_attention_heads is 30. For 5B, it is 48",
# "use_rotary_positional_embeddings is False. For 5B, it is True", everything else its
# CogVideoXTransformer3DModel defaults (head dim 64, 16 channels, time_embed_dim 512,
# text_embed_dim 4096, sample 49 x 60 x 90, patch 2, max_text_seq_length 226). CogVideoX1.5-5B:
# the same script's get_transformer_init_kwargs("1.5"): patch_size_t 2, patch_bias False,
# sample_height = sample_width = 300, sample_frames 81.
_TRANSFORMER_BASE = dict(
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    flip_sin_to_cos=True,
    freq_shift=0,
    time_embed_dim=512,
    ofs_embed_dim=None,
    text_embed_dim=4096,
    dropout=0.0,
    attention_bias=True,
    sample_width=90,
    sample_height=60,
    sample_frames=49,
    patch_size=2,
    patch_size_t=None,
    temporal_compression_ratio=4,
    max_text_seq_length=226,
    activation_fn="gelu-approximate",
    timestep_activation_fn="silu",
    norm_elementwise_affine=True,
    norm_eps=1e-5,
    spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0,
    use_learned_positional_embeddings=False,
    patch_bias=True,
)
TRANSFORMER = {
    "cogvideox-2b": {
        **_TRANSFORMER_BASE,
        "num_attention_heads": 30,
        "num_layers": 30,
        "use_rotary_positional_embeddings": False,
    },
    "cogvideox-5b": {
        **_TRANSFORMER_BASE,
        "num_attention_heads": 48,
        "num_layers": 42,
        "use_rotary_positional_embeddings": True,
    },
    "cogvideox1.5-5b": {
        **_TRANSFORMER_BASE,
        "num_attention_heads": 48,
        "num_layers": 42,
        "use_rotary_positional_embeddings": True,
        "patch_size_t": 2,
        "patch_bias": False,
        "sample_height": 300,
        "sample_width": 300,
        "sample_frames": 81,
    },
}

# VAE: hub vae/config.json (THUDM/CogVideoX-2b: block_out_channels 128, 256, 256, 512, 16 latent
# channels, temporal compression 4, scaling_factor 1.15258426; the 5b repos: the same with
# scaling_factor 0.7), i.e. AutoencoderKLCogVideoX's defaults, as the conversion script builds it
# ("For CogVideoX-2B, scaling_factor is 1.15258426. For 5B, it is 0.7"). 1.5 adds
# invert_scale_latents=True (the script's convert_vae for version 1.5).
_VAE_BASE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("CogVideoXDownBlock3D",) * 4,
    up_block_types=("CogVideoXUpBlock3D",) * 4,
    block_out_channels=(128, 256, 256, 512),
    latent_channels=16,
    layers_per_block=3,
    act_fn="silu",
    norm_eps=1e-6,
    norm_num_groups=32,
    temporal_compression_ratio=4,
    sample_height=480,
    sample_width=720,
    force_upcast=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    invert_scale_latents=False,
)
VAE = {
    "cogvideox-2b": {**_VAE_BASE, "scaling_factor": 1.15258426},
    "cogvideox-5b": {**_VAE_BASE, "scaling_factor": 0.7},
    "cogvideox1.5-5b": {**_VAE_BASE, "scaling_factor": 0.7, "invert_scale_latents": True},
}

# Text encoder: google/t5-v1_1-xxl config.json (the conversion script loads that repo; every
# CogVideoX repo ships its encoder as text_encoder/): T5 v1.1 XXL, gated-GELU, untied embeddings.
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_decoder_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.1,
    layer_norm_epsilon=1e-6,
    initializer_factor=1.0,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=True,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
# The real tokenizer: 32000 sentencepiece pieces plus 100 <extra_id_N> (len 32100; the
# embedding has 32128 rows), model_max_length 226 as the conversion script saves it.
TOKENIZER_PIECES, TOKENIZER_EXTRA_IDS, TOKENIZER_MAX_LENGTH = 32000, 100, 226

# The scheduler config the conversion script writes (snr_shift_scale 3.0 for 2B, 1.0 for 5B);
# configure_pipeline swaps in the variant's scheduler class from it, as for real weights.
SCHEDULER = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    set_alpha_to_one=True,
    timestep_spacing="trailing",
)
SNR_SHIFT_SCALE = {"cogvideox-2b": 3.0, "cogvideox-5b": 1.0, "cogvideox1.5-5b": 1.0}


def full_tokenizer() -> T5Tokenizer:
    """A T5 tokenizer of the real size, built locally: the tiny model's vocabulary padded with
    pieces no prompt uses. Prompts are padded to 226 tokens either way."""
    small = build_tiny_pipeline("1.0", "t2v").tokenizer
    pieces = [tuple(p) for p in json.loads(small.backend_tokenizer.to_str())["model"]["vocab"]]
    pieces += [(f"▁<unused{i}>", -100.0) for i in range(TOKENIZER_PIECES - len(pieces))]
    return T5Tokenizer(
        vocab=pieces, extra_ids=TOKENIZER_EXTRA_IDS, model_max_length=TOKENIZER_MAX_LENGTH
    )


@torch.no_grad()
def _randomise(model: torch.nn.Module, std: float = 0.02) -> None:
    """Small normal weights in every Linear and Embedding, so activations stay finite in bf16 and
    fp16 through dozens of layers; convolutions and norms keep their constructors' init."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
            module.weight.normal_(0.0, std)


def full_components(variant: Variant, device: torch.device, dtype: torch.dtype) -> dict:
    """Random full-size components on `device` in `dtype`, as from_pretrained(dtype=...) gives.

    As diffusers' and transformers' from_pretrained do, the models are constructed with `dtype`
    as torch's default dtype (so buffers computed at construction, such as the 2B's sincos
    position table, come out as they do there), and every floating-point parameter ends up in
    `dtype`, except the modules transformers keeps in float32 (T5's `wo`, for float16).
    """
    models = {}
    builders = {
        "transformer": lambda: CogVideoXTransformer3DModel(**TRANSFORMER[variant.id]),
        "vae": lambda: AutoencoderKLCogVideoX(**VAE[variant.id]),
        "text_encoder": lambda: T5EncoderModel(T5Config(**T5_XXL)),
    }
    for name, build in builders.items():
        started = time.perf_counter()
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = build().eval()
        finally:
            torch.set_default_dtype(default_dtype)
        _randomise(model)
        with torch.no_grad():
            for param in model.parameters():
                if param.is_floating_point() and param.dtype != dtype:
                    param.data = param.data.to(dtype)
        # transformers keeps T5's `wo` in float32 when loading in float16 (_keep_in_fp32_modules;
        # not for bfloat16): the 2B's text encoder holds 1 B parameters in float32 for it.
        keep = getattr(model, "_keep_in_fp32_modules", None) or ()
        if dtype == torch.float16 and keep:
            for sub_name, sub in model.named_modules():
                if sub_name.rsplit(".", 1)[-1] in keep:
                    sub.to(torch.float32)
        model.requires_grad_(False)
        models[name] = model
        params = sum(p.numel() for p in model.parameters())
        log.info(
            f"built {name}: {params / 1e9:.3f} B parameters in "
            f"{time.perf_counter() - started:.1f} s"
        )
    scheduler = CogVideoXDDIMScheduler(**SCHEDULER, snr_shift_scale=SNR_SHIFT_SCALE[variant.id])
    return {"tokenizer": full_tokenizer(), "scheduler": scheduler, **models}


def _family(variant: Variant) -> str:
    return "1.5" if variant.id.startswith("cogvideox1.5") else "1.0"


def tiny_resolution(variant: Variant) -> str | None:
    """The size a tiny model renders at, as COGVIDEOX_RESOLUTION writes it: the 1.5 variants
    generate at 768 x 1360 unless told otherwise, and the tiny 1.5 model's rotary grid
    bounds it to its own native size. None: the variant's own."""
    if _family(variant) == "1.0":
        return None
    spec = TINY[("1.5", "t2v")]
    return f"{spec.height}x{spec.width}"


def tiny_components(variant: Variant, device: torch.device, dtype: torch.dtype) -> dict:
    components = build_tiny_pipeline(_family(variant), "t2v").components
    for component in components.values():
        if isinstance(component, torch.nn.Module) and (device.type, dtype) != (
            "cpu",
            torch.float32,
        ):
            component.to(device=device, dtype=dtype)
    return components


# ---------------------------------------------------------------------------------------------
# Instrumentation


class PhaseProbe:
    """Times the phases of one prediction and the GPU memory peak within each.

    Marks: encode_prompt (text encoding), the transformer's forward pre-hook (the first one opens
    the denoising loop), scheduler.step (each return closes a step), decode_latents (VAE decode),
    video_processor.postprocess_video (tensor to numpy frames) and the encode_mp4 that
    VideoGenerator.render_mp4 calls. Each mark synchronises the device first. GPU peaks are taken
    per phase by resetting the peak statistics at each phase boundary and folding each phase's
    peak into the overall one.
    """

    def __init__(self, pipe, device: torch.device):
        self.pipe, self.device = pipe, device
        self.cuda = device.type == "cuda"
        self.times: dict[str, float] = {}
        self.peaks: dict[str, dict[str, float]] = {}
        self.step_ends: list[float] = []
        self.loop_start: float | None = None
        self.latents: torch.Tensor | None = None
        self.frames_finite: bool | None = None
        self.overall = [0, 0]
        self._undo: list = []

    # -- device helpers
    def sync(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def _fold(self) -> tuple[int, int]:
        """The peak since the last reset; folded into the overall peak, then reset."""
        if not self.cuda:
            return 0, 0
        peak = (
            torch.cuda.max_memory_allocated(self.device),
            torch.cuda.max_memory_reserved(self.device),
        )
        self.overall = [max(a, b) for a, b in zip(self.overall, peak, strict=True)]
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak

    def begin(self) -> float:
        now = self.sync()
        self._fold()
        return now

    def end(self, phase: str, started: float, finished: float | None = None) -> None:
        now = self.sync()
        self.times[phase] = self.times.get(phase, 0.0) + ((finished or now) - started)
        allocated, reserved = self._fold()
        if self.cuda:
            self.peaks[phase] = {
                "allocated_gib": allocated / GIB,
                "reserved_gib": reserved / GIB,
            }

    # -- wrapping
    def _wrap(self, owner, name: str, phase: str, before=None, after=None) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if before is not None:
                before(args, kwargs)
            started = self.begin()
            result = original(*args, **kwargs)
            self.end(phase, started)
            if after is not None:
                after(result)
            return result

        setattr(owner, name, timed)
        self._undo.append(lambda: delattr(owner, name))

    def install(self) -> PhaseProbe:
        pipe = self.pipe
        self._wrap(pipe, "encode_prompt", "text_encode")
        self._wrap(pipe, "decode_latents", "vae_decode", self._before_decode, self._after_decode)
        self._wrap(pipe.video_processor, "postprocess_video", "postprocess")

        step = pipe.scheduler.step

        @functools.wraps(step)
        def timed_step(*args, **kwargs):
            result = step(*args, **kwargs)
            self.step_ends.append(self.sync())
            return result

        pipe.scheduler.step = timed_step
        self._undo.append(lambda: delattr(pipe.scheduler, "step"))
        hook = pipe.transformer.register_forward_pre_hook(self._before_transformer)
        self._undo.append(hook.remove)

        # render_mp4() calls the module-level encode_mp4 of cogvideox_cog.generator.
        encode = predictor_generator.encode_mp4

        @functools.wraps(encode)
        def timed_encode(*args, **kwargs):
            started = self.begin()
            result = encode(*args, **kwargs)
            self.end("encode_mp4", started)
            return result

        predictor_generator.encode_mp4 = timed_encode
        self._undo.append(lambda: setattr(predictor_generator, "encode_mp4", encode))
        return self

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _before_transformer(self, module, args) -> None:
        if self.loop_start is None:
            self.loop_start = self.begin()

    def _before_decode(self, args, kwargs) -> None:
        latents = args[0] if args else kwargs["latents"]
        self.latents = latents
        if self.loop_start is not None and self.step_ends:
            self.end("denoise", self.loop_start, finished=self.step_ends[-1])

    def _after_decode(self, frames: torch.Tensor) -> None:
        # Outside the timed decode: random weights must still give finite pixels.
        self.frames_finite = bool(torch.isfinite(frames).all())

    @property
    def step_seconds(self) -> list[float]:
        if self.loop_start is None:
            return []
        marks = [self.loop_start, *self.step_ends]
        return [b - a for a, b in itertools.pairwise(marks)]


# ---------------------------------------------------------------------------------------------
# One run


def set_tiling(pipe, mode: str) -> None:
    if mode == "on":
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()


def standalone_decode(pipe, latents: torch.Tensor, mode: str, device: torch.device) -> dict:
    """Decode the run's final latents again with VAE tiling `mode`: time and GPU peak."""
    set_tiling(pipe, mode)
    free_memory(device)
    cuda = device.type == "cuda"
    result: dict = {"tiling": mode}
    try:
        if cuda:
            torch.cuda.synchronize(device)
            # Weights (and latents) already on the GPU: the peak minus this is the decode's own.
            # Reserved too: that is what must fit (the allocator's cached blocks with the
            # tensors), and what COGVIDEOX_VAE_TILING=auto counts.
            result["allocated_before_gib"] = torch.cuda.memory_allocated(device) / GIB
            result["reserved_before_gib"] = torch.cuda.memory_reserved(device) / GIB
        started = time.perf_counter()
        with torch.no_grad():
            frames = pipe.decode_latents(latents)
        synchronize(device)
        result["seconds"] = time.perf_counter() - started
        result["frames_finite"] = bool(torch.isfinite(frames).all())
        del frames
        if cuda:
            result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    except torch.cuda.OutOfMemoryError as error:
        result["error"] = f"out of GPU memory: {str(error).splitlines()[0]}"
    except Exception as error:  # a failed extra decode must not lose the run
        result["error"] = f"{type(error).__name__}: {error}"
    finally:
        pipe.maybe_free_model_hooks()
        free_memory(device)
    return result


def build_components(args, variant: Variant, offload: str, device: torch.device, dtype) -> dict:
    """The --size components, on the host for an offload policy."""
    build = full_components if args.size == "full" else tiny_components
    components = build(variant, device, dtype)
    if offload != "none":
        # Offload hooks move each component to the GPU when it runs, so the weights must start on
        # the host. Built on the GPU all the same: initialising 10 B parameters there takes
        # seconds, and the copy to the host a few more.
        for component in components.values():
            if isinstance(component, torch.nn.Module):
                component.to("cpu")
        free_memory(device)
    return components


def set_up(args, variant: Variant, offload: str, device: torch.device, record: dict):
    """What a predictor's setup does, timed: the pipeline built and configured, VAE tiling set
    to the run's mode, and with --compile on a GPU the compile warm-up. Adds the size, the
    setup and warm-up seconds and the GPU memory resident before the run to `record`."""
    free_memory(device)
    setup_started = time.perf_counter()
    components = build_components(args, variant, offload, device, pipeline_dtype(variant, device))
    pipe = PIPELINES["t2v"](**components)
    del components
    compiled = choose_compile("1" if args.compile else "0", device)  # the predictors' rule
    pipe = configure_pipeline(pipe, variant, device, offload, compiled=compiled)
    set_tiling(pipe, args.tiling[0])
    resolution = os.environ.get(RESOLUTION_ENV)
    if resolution is None and args.size != "full":
        resolution = tiny_resolution(variant)
    generator = VideoGenerator(variant, pipe, device, resolution=resolution)
    height, width = generator.render_size
    record.update(height=height, width=width)
    record["setup_seconds"] = time.perf_counter() - setup_started
    if compiled:
        # Which compile the steps were timed with: projections.py names it in its basis.
        record["compiled_as"] = "regional" if pipe.transformer._repeated_blocks else "whole-model"
        # As VideoGenerator.from_env: the compiling happens in setup, so the run is warm.
        warm_up_started = time.perf_counter()
        generator.warm_up()
        record["warm_up_seconds"] = time.perf_counter() - warm_up_started
        log.info(f"compile warm-up (both graphs): {record['warm_up_seconds']:.1f} s")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        record["resident_gib_before_run"] = torch.cuda.memory_allocated(device) / GIB
    free_memory(device)
    return pipe, generator


def measure_prediction(pipe, generator: VideoGenerator, device: torch.device, request: Request):
    """One `render_mp4` call with every phase marked and the host's peak memory taken: the probe
    (its marks, peaks and the final latents), the host peak, the mp4 and the total seconds."""
    probe = PhaseProbe(pipe, device).install()
    try:
        with HostPeak() as host:
            started = probe.begin()
            output = generator.render_mp4(request)
            finished = probe.sync()
            probe._fold()
    finally:
        probe.remove()
    return probe, host, output, finished - started


PROJECTION_RULE = (
    "total minus measured denoising plus the first step and {n} - 1 x the median of the others"
)


def projected_denoise(step_seconds: list[float], steps: int) -> float:
    """`steps` steps from the measured ones: the first once (its one-time costs: kernels
    loaded, with offload the transformer moved in), the median of the others for the rest."""
    if len(step_seconds) == 1:
        return steps * step_seconds[0]
    return step_seconds[0] + (steps - 1) * statistics.median(step_seconds[1:])


def phase_figures(probe: PhaseProbe, total: float, steps: int, project_steps: int) -> dict:
    """Seconds per phase (the rest as "other") and per denoising step; with a step count other
    than `project_steps`, the total projected to that many steps, labelled as such."""
    step_seconds = probe.step_seconds
    phases = {
        "text_encode_s": probe.times.get("text_encode"),
        "denoise_s": probe.times.get("denoise"),
        "vae_decode_s": probe.times.get("vae_decode"),
        "postprocess_s": probe.times.get("postprocess"),
        "encode_mp4_s": probe.times.get("encode_mp4"),
        "total_s": total,
    }
    phases["other_s"] = total - sum(v for k, v in phases.items() if k != "total_s" and v)
    figures: dict = {"phases": phases}
    figures["steps_s"] = {
        "each": step_seconds,
        "first": step_seconds[0] if step_seconds else None,
        "median": statistics.median(step_seconds) if step_seconds else None,
        "median_after_first": statistics.median(step_seconds[1:])
        if len(step_seconds) > 1
        else None,
        "total": sum(step_seconds),
    }
    if steps != project_steps and step_seconds:
        figures["projection"] = {
            "label": f"PROJECTION, not measured: {PROJECTION_RULE.format(n=project_steps)}",
            "steps": project_steps,
            "total_s": total - phases["denoise_s"] + projected_denoise(step_seconds, project_steps),
        }
    return figures


def output_figures(probe: PhaseProbe, host: HostPeak, output: Path, device: torch.device) -> dict:
    """Whether the frames were finite, the GPU and host peaks, and what the mp4 holds."""
    gpu_peak = {
        "allocated_gib": probe.overall[0] / GIB,
        "reserved_gib": probe.overall[1] / GIB,
        "by_phase": probe.peaks,
    }
    return {
        "frames_finite": probe.frames_finite,
        "gpu_peak": gpu_peak if device.type == "cuda" else None,
        "host_peak_rss_gib": host.peak / GIB,
        "host_peak_method": host.method,
        "mp4": {**probe_mp4(output), "bytes": output.stat().st_size},
    }


def run_one(
    args, variant: Variant, offload: str, device: torch.device, env: dict, decode_again: bool
) -> dict:
    steps = (
        args.steps_sequential if offload == "sequential" and args.steps_sequential else (args.steps)
    )
    frames = args.frames or variant.default_frames
    record: dict = {
        "variant": variant.id,
        "size": args.size,
        "offload": offload,
        "device": str(device),
        "dtype": str(pipeline_dtype(variant, device)).removeprefix("torch."),
        "steps": steps,
        "frames": frames,
        "tiling_in_run": args.tiling[0],
        "compile": args.compile,
        "environment": env,
    }
    pipe, generator = set_up(args, variant, offload, device, record)
    log.info(
        f"{variant.id} offload={offload}: {steps} steps, {frames} frames at "
        f"{record['width']}x{record['height']}, {record['dtype']}, VAE tiling {args.tiling[0]} "
        f"(setup {record['setup_seconds']:.1f} s)"
    )
    request = Request(**request_fields(PROMPT, frames, steps, 42))
    probe, host, output, total = measure_prediction(pipe, generator, device, request)
    record.update(phase_figures(probe, total, steps, args.project_steps))
    record.update(output_figures(probe, host, output, device))
    shutil.rmtree(output.parent, ignore_errors=True)

    # Labelled extra: the run's latents decoded again per tiling mode.
    latents = probe.latents
    del probe
    record["decode_again"] = [
        standalone_decode(pipe, latents, mode, device) for mode in args.tiling if decode_again
    ]
    del latents, generator
    try:
        pipe.remove_all_hooks()
    except Exception as error:  # teardown only; the measurements are in the record already
        log.warning(f"removing offload hooks failed: {error}")
    del pipe
    free_memory(device)
    return record


# ---------------------------------------------------------------------------------------------
# Output

OFFLOAD_ORDER = {name: i for i, name in enumerate(OFFLOADS)}


def _decode_cell(record: dict, mode: str) -> str:
    for item in record.get("decode_again") or []:
        if item["tiling"] == mode:
            if "error" in item:
                return "error"
            if item.get("peak_allocated_gib") is None:
                return fmt(item["seconds"])
            peaks = []
            for kind in ("allocated", "reserved"):
                peak, before = item[f"peak_{kind}_gib"], item.get(f"{kind}_before_gib")
                peaks.append(
                    f"{peak:.1f}" + (f" (+{peak - before:.1f})" if before is not None else "")
                )
            return f"{fmt(item['seconds'])} / " + " / ".join(peaks)
    return "-"


def table(records: list[dict]) -> str:
    header = [
        "variant",
        "size",
        "offload",
        "steps",
        "frames",
        "text enc s",
        "first step s",
        "median step s",
        "denoise s",
        "VAE decode s (tiling)",
        "mp4 s",
        "total s",
        "projected total s",
        "decode again, tiled s / GiB",
        "decode again, untiled s / GiB",
        "GPU peak alloc / reserved GiB",
        "host peak RSS GiB",
        "compile warm-up s",
    ]
    rows = []
    for r in sorted(records, key=lambda r: (r["variant"], r["size"], OFFLOAD_ORDER[r["offload"]])):
        if "error" in r:
            rows.append(
                [r["variant"], r["size"], r["offload"], fmt(r.get("steps"))]
                + ["-"] * (len(header) - 5)
                + [f"error: {r['error'][:80]}"]
            )
            continue
        p, s = r["phases"], r["steps_s"]
        projection = r.get("projection")
        gpu = r.get("gpu_peak")
        rows.append(
            [
                r["variant"],
                r["size"],
                r["offload"],
                str(r["steps"]),
                f"{r['frames']}x{r['height']}x{r['width']}",
                fmt(p["text_encode_s"]),
                fmt(s["first"]),
                fmt(s["median"]),
                fmt(p["denoise_s"]),
                f"{fmt(p['vae_decode_s'])} ({r['tiling_in_run']})",
                fmt(p["encode_mp4_s"]),
                fmt(p["total_s"]),
                (
                    f"{projection['total_s']:.1f} ({projection['steps']} steps, projected)"
                    if projection
                    else "-"
                ),
                _decode_cell(r, "on"),
                _decode_cell(r, "off"),
                f"{gpu['allocated_gib']:.1f} / {gpu['reserved_gib']:.1f}" if gpu else "-",
                fmt(r["host_peak_rss_gib"]),
                fmt(r.get("warm_up_seconds")),
            ]
        )
    return markdown_table(header, rows)


def write_results(out: Path) -> str:
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    records = [r for r in records if "variant" in r and "offload" in r]
    if not records:
        return ""
    env = records[-1]["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    smi = env.get("nvidia_smi") or {}
    lines = [
        "# CogVideoX pipeline speed and memory",
        "",
        f"- Device: {env.get('gpu') or env['device']}"
        + (f", driver {smi['driver_version']}" if smi.get("driver_version") else "")
        + (f", CUDA {env['cuda_runtime']}" if env.get("cuda_runtime") else ""),
        f"- Host: {env['cpu_count']} CPUs, {env['host_memory_gib']} GiB; {env['platform']}",
        f"- Versions: {versions}",
        f"- Command: `{env['command']}`",
        "- Random weights at the published shapes ('full') or the tiny test models ('tiny');",
        "  times in seconds, memory in GiB (2^30 bytes).",
        "- Phases are timed inside one `VideoGenerator.render_mp4` call; 'first step' includes",
        "  first-call effects (kernel loading; with offload, moving the transformer in).",
        "- 'decode again' decodes the run's final latents once more per VAE tiling mode:",
        "  seconds / GPU peak allocated / peak reserved during that decode (each + above its",
        "  level before: the decode's own memory; with offload the VAE's weights move in within",
        "  it). Reserved, the allocator's cached blocks with the tensors, is what must fit.",
        f"- 'projected' totals are NOT measured: {PROJECTION_RULE.format(n='N')}.",
        "- 'compile warm-up' (with --compile): setup's warm-up renders, which compile the",
        "  transformer's graphs (default frame count, then dynamic frames); the run after is warm.",
        "",
        table(records),
        "",
    ]
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    t2v = [v.id for v in VARIANTS.values() if v.task == "t2v"]
    parser.add_argument("--variant", choices=t2v, default="cogvideox-5b")
    parser.add_argument("--offload", default="none", help="comma list of none,model,sequential")
    parser.add_argument(
        "--tiling",
        default="on",
        help="comma list of on,off; the first is used "
        "in the run, each is timed by decoding the final latents again",
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--steps-sequential",
        type=int,
        default=None,
        help="steps for sequential offload (default: --steps)",
    )
    parser.add_argument(
        "--project-steps",
        type=int,
        default=50,
        help="runs with fewer steps also report a total projected to this many",
    )
    parser.add_argument(
        "--decode-again",
        choices=("first", "all", "none"),
        default="first",
        help="after which runs to decode the final latents again per --tiling mode: the first "
        "offload policy only (default; decode activations do not depend on the policy), all, none",
    )
    parser.add_argument("--frames", type=int, default=None, help="default: the variant's")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the transformer (COGVIDEOX_COMPILE=1) and warm it up as setup does",
    )
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.offload = [o.strip() for o in args.offload.split(",") if o.strip()]
    args.tiling = [t.strip() for t in args.tiling.split(",") if t.strip()]
    if not args.offload or any(o not in OFFLOADS for o in args.offload):
        parser.error(f"--offload takes a comma list of {', '.join(OFFLOADS)}")
    if not args.tiling or any(t not in ("on", "off") for t in args.tiling):
        parser.error("--tiling takes a comma list of on,off")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    variant = VARIANTS[args.variant]
    env = environment(device)
    log.info(f"environment: {env}")
    args.out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for index, offload in enumerate(args.offload):
        name = f"{variant.id}-{args.size}-{offload}"
        if offload != "none" and device.type != "cuda":
            log.warning(f"{name}: offload needs a CUDA GPU; skipped")
            continue
        decode_again = args.decode_again == "all" or (args.decode_again == "first" and index == 0)
        try:
            record = run_one(args, variant, offload, device, env, decode_again)
        except Exception as error:  # record it and go on to the next policy
            failures += 1
            log.error(f"{name} failed:\n{traceback.format_exc()}")
            record = {
                "variant": variant.id,
                "size": args.size,
                "offload": offload,
                "error": f"{type(error).__name__}: {error}",
                "environment": env,
            }
        # Outside the except block, so the traceback no longer holds the failed run's models.
        free_memory(device)
        write_json(args.out / f"{name}.json", record)
        write_results(args.out)
        if "error" not in record:
            p = record["phases"]
            log.info(
                f"{name}: total {p['total_s']:.1f} s, denoise {p['denoise_s']:.1f} s, "
                f"median step {record['steps_s']['median']:.3f} s"
            )
    text = write_results(args.out)
    print("\n" + text.split("\n\n", 1)[-1] if text else "no results", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
