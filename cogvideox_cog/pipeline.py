"""The diffusers pipeline as upstream runs it: dtype, scheduler swap, VAE tiling, offload,
and the attention backend and regional compile this project adds.

Everything here happens in setup, but blocks_run_eagerly() and compiled_blocks_back(), which
speed.py calls per request; generator.py runs the pipeline per request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXImageToVideoPipeline,
    CogVideoXPipeline,
    CogVideoXVideoToVideoPipeline,
)

from .attention import ATTENTION_BACKEND_ENV, AttentionBackendName, use_dispatching_attention
from .errors import ConfigError, VariantError
from .logs import drop_diffusers_noise
from .settings import setting
from .variants import MODEL_ENV, PREDICTOR_FILES, TASK_NAMES, VARIANTS, Task, Variant
from .weights import WEIGHTS_URL_ENV

log = logging.getLogger(__name__)
drop_diffusers_noise()

OFFLOAD_ENV = "COGVIDEOX_OFFLOAD"
OFFLOAD_POLICIES = ("auto", "none", "model", "sequential")
COMPILE_ENV = "COGVIDEOX_COMPILE"
VAE_TILING_ENV = "COGVIDEOX_VAE_TILING"
VAE_TILING_POLICIES = ("on", "off", "auto")
SCHEDULERS = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}


# What a generator does; video-to-video runs the text-to-video variants' weights.
Mode = Literal["t2v", "i2v", "v2v"]
PIPELINES: dict[Mode, type] = {
    "t2v": CogVideoXPipeline,
    "i2v": CogVideoXImageToVideoPipeline,
    "v2v": CogVideoXVideoToVideoPipeline,
}
MODE_TASK: dict[Mode, Task] = {"t2v": "t2v", "i2v": "i2v", "v2v": "t2v"}


def choose_offload(
    requested: str, variant: Variant, device: torch.device, vae_tiling: bool = True
) -> str:
    """Resolve COGVIDEOX_OFFLOAD: `auto` keeps everything on the GPU when it fits, the VAE's
    decode as choose_vae_tiling() resolved it included."""
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
    free_gib = torch.cuda.mem_get_info(device)[0] / 2**30
    return offload_for_free_memory(variant, free_gib, vae_tiling)


def offload_for_free_memory(variant: Variant, free_gib: float, vae_tiling: bool = True) -> str:
    """The fastest policy whose measured peak fits: none, then model, then sequential."""
    if free_gib >= no_offload_peak_gib(variant, vae_tiling):
        return "none"
    if free_gib >= variant.vram_model_offload_gib:
        return "model"
    return "sequential"


def no_offload_peak_gib(variant: Variant, vae_tiling: bool) -> float:
    """The GPU memory the pipeline needs without offload: the measured peak, which decodes in
    tiles, plus what decoding whole frames adds where that was measured (the VAE decodes
    beside the whole model then, so the extra comes on top)."""
    untiled_extra = 0.0 if vae_tiling else variant.vae_untiled_extra_gib or 0.0
    return variant.vram_no_offload_gib + untiled_extra


def vae_tiling_setting() -> str:
    """COGVIDEOX_VAE_TILING; unset, `on`: upstream decodes in tiles, and whole frames differ
    from its frames where the tiles are blended."""
    return setting(VAE_TILING_ENV, "on")


def choose_vae_tiling(
    requested: str, variant: Variant, device: torch.device, resized: bool = False
) -> bool:
    """Resolve COGVIDEOX_VAE_TILING: whether the VAE decodes in tiles.

    `on` is upstream's choice (cli_demo.py tiles) and the default, so the frames are the
    reference ones. Decoding whole frames is faster (5B: 2.34 s against 3.46 s on an H100)
    but needs 16.5 GiB more reserved (11 GiB more allocated), and the frames differ slightly
    where the tiles were blended, so `auto` untiles only where that peak was measured and fits
    the free memory.
    resized: the deployment sets its own COGVIDEOX_RESOLUTION.
    """
    if requested not in VAE_TILING_POLICIES:
        raise ConfigError(
            f"{VAE_TILING_ENV}={requested!r} is not one of {', '.join(VAE_TILING_POLICIES)}"
        )
    if requested != "auto":
        return requested == "on"
    if device.type != "cuda":
        return True
    free_gib = torch.cuda.mem_get_info(device)[0] / 2**30
    return tiling_for_free_memory(variant, free_gib, resized)


def tiling_for_free_memory(variant: Variant, free_gib: float, resized: bool = False) -> bool:
    """`auto`: tiles unless the untiled peak was measured and fits beside the whole model.

    It was measured at the variant's own size: a whole-frame decode's memory grows with the
    pixels it decodes (768x1360 on 5B: three times 480x720's), so under a deployment's
    resolution it was not measured, and the frames stay tiled.
    """
    if variant.vae_untiled_extra_gib is None or resized:
        return True
    return free_gib < no_offload_peak_gib(variant, vae_tiling=False)


def compile_setting() -> str:
    """COGVIDEOX_COMPILE; unset, `0`: upstream runs the transformer eagerly, and compiled
    frames have not been compared with the reference at full size."""
    return setting(COMPILE_ENV, "0")


def choose_compile(requested: str, device: torch.device) -> bool:
    """Resolve COGVIDEOX_COMPILE: `1` compiles the transformer, on CUDA only (a CPU runs the
    tiny test models, where inductor's C++ builds would cost minutes for nothing)."""
    if requested not in ("0", "1"):
        raise ConfigError(f"{COMPILE_ENV}={requested!r} is not 0 or 1")
    if requested == "1" and device.type != "cuda":
        log.warning(f"{COMPILE_ENV}=1 is for CUDA GPUs; running uncompiled on {device}")
        return False
    return requested == "1"


def check_compiled_if_flex(attention: AttentionBackendName | None, compiled: bool) -> None:
    """Refuse flex attention uncompiled. Eager, torch runs it unfused, holding the whole
    matrix of scores (for 5B, 2 x 48 heads x 17,776^2 tokens: hundreds of GB), so setup's
    small check passes and every real request runs out of memory."""
    if attention is AttentionBackendName.FLEX and not compiled:
        raise ConfigError(
            f"{ATTENTION_BACKEND_ENV}='flex' runs only compiled: set {COMPILE_ENV}=1 "
            f"(CUDA only), or leave the backend unset (torch's SDPA)"
        )


def pipeline_dtype(variant: Variant, device: torch.device) -> torch.dtype:
    # bf16/fp16 matmuls on CPU are slow and CPU runs are tiny test models: keep float32 there.
    return getattr(torch, variant.dtype) if device.type == "cuda" else torch.float32


def build_pipeline(
    variant: Variant,
    weights: Path,
    device: torch.device,
    offload: str,
    compiled: bool = False,
    mode: Mode | None = None,
    attention: AttentionBackendName | None = None,
    vae_tiling: bool = True,
    before_placing: Callable[[Any], None] | None = None,
):
    """mode: the variant's task unless given ("v2v" runs a t2v variant's weights)."""
    pipe = load_pipeline(variant, weights, device, mode)
    check_weights_match(pipe, variant)
    return configure_pipeline(
        pipe,
        variant,
        device,
        offload,
        compiled,
        attention,
        vae_tiling=vae_tiling,
        before_placing=before_placing,
    )


def load_pipeline(variant: Variant, weights: Path, device: torch.device, mode: Mode | None = None):
    """The pipeline read from `weights`, not yet placed: the step that fails on bad files."""
    mode = mode or variant.task
    if MODE_TASK[mode] != variant.task:
        raise ConfigError(f"{variant.id} is a {variant.task} variant and cannot run {mode}")
    dtype = pipeline_dtype(variant, device)
    log.info(f"pipeline: {variant.id} ({mode}) from {weights}, {dtype} on {device}")
    return PIPELINES[mode].from_pretrained(weights, dtype=dtype)


def check_weights_match(pipe, variant: Variant) -> None:
    """Refuse another variant's weights. Every release has the same files, so they load, and
    then fail each request on a tensor's shape or render at another release's size.

    What the configs tell apart: image-to-video doubles the transformer's input channels
    (the image's latents ride along), 1.5 patches time, and 2B has no rotary embeddings.
    """
    config = pipe.transformer.config
    task = "i2v" if config.in_channels == 2 * pipe.vae.config.latent_channels else "t2v"
    family = "1.0" if config.patch_size_t is None else "1.5"
    size = "5b" if config.use_rotary_positional_embeddings else "2b"
    if (task, family, size) == (variant.task, variant.family, variant.size):
        return
    matching = [
        v.id for v in VARIANTS.values() if (v.task, v.family, v.size) == (task, family, size)
    ]
    # Another task's variant is refused by this predictor: only the weights can change here.
    use = (
        f"Set {MODEL_ENV} to the weights' variant, or"
        if task == variant.task
        else f"They are for {' or '.join(_predictors_of(task))}; here, set"
    )
    raise VariantError(
        f"the weights are a CogVideoX {family} {size.upper()} {TASK_NAMES[task]} model "
        f"({' or '.join(matching) or 'no variant served here'}), but {MODEL_ENV}={variant.id!r}. "
        f"{use} {WEIGHTS_URL_ENV} to {variant.id}'s weights (hf://{variant.hub_repo})."
    )


def _predictors_of(task: Task) -> list[str]:
    """The predictors that serve a task's weights (video-to-video runs text-to-video's)."""
    return [PREDICTOR_FILES[mode] for mode, served in MODE_TASK.items() if served == task]


def configure_pipeline(
    pipe,
    variant: Variant,
    device: torch.device,
    offload: str,
    compiled: bool = False,
    attention: AttentionBackendName | None = None,
    vae_tiling: bool = True,
    before_placing: Callable[[Any], None] | None = None,
):
    """Scheduler, VAE memory savers, attention and placement: everything after the weights
    are loaded. compiled: compile the transformer (choose_compile() decides where that pays).
    attention: the attention backend (attention.py; None: torch's SDPA).
    before_placing: called with the pipeline just before its weights are placed, for hooks
    that must stay under offload's (a rank's engine: see parallel.engine.ContextParallel)."""
    log.info(
        f"pipeline: offload={offload}, attention={attention.value if attention else 'native'}, "
        f"VAE tiling {'on' if vae_tiling else 'off'}"
    )
    use_dispatching_attention(pipe.transformer, attention)
    hold_every_image_shape(pipe.transformer, variant)
    pipe.scheduler = SCHEDULERS[variant.scheduler].from_config(
        pipe.scheduler.config, timestep_spacing="trailing"
    )
    if vae_tiling:
        pipe.vae.enable_tiling()
    pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    if before_placing is not None:
        before_placing(pipe)
    # Offload hooks move each component to the GPU when it runs; moving the whole pipeline
    # there first would defeat them, so exactly one of these places the weights.
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    if compiled:
        compile_transformer(pipe.transformer)
    return pipe


def hold_every_image_shape(transformer: torch.nn.Module, variant: Variant) -> None:
    """Square the rotary bound of a model that follows the image's shape (1.5-I2V).

    Its authors say it makes portrait videos too (zai-org/CogVideo issue 758), but a config
    holding the training size as its bound (96 x 170 latents, reported there) limits
    diffusers' sliced rotary grid to landscape: a portrait video failed inside the pipeline
    with a tensor-size error. The grid's positions count from 0 whatever the bound, so a
    square bound of the longer side gives the same tables for every size the old one held.
    """
    config = transformer.config
    if variant.resolution != "image_aspect" or config.sample_height == config.sample_width:
        return
    side = max(config.sample_height, config.sample_width)
    log.info(
        f"pipeline: rotary bound {config.sample_height}x{config.sample_width} latents squared "
        f"to {side}x{side}, for portrait images"
    )
    transformer.register_to_config(sample_height=side, sample_width=side)


def compile_transformer(transformer: torch.nn.Module, backend: str = "inductor") -> None:
    """Regional compilation: each CogVideoXBlock compiled in place, the rest left eager; and
    each block's parts (norms, attention, feed-forward) compiled a second time, for the
    speed modes.

    The blocks share one forward and, with their weights as graph inputs, one compiled graph:
    compiling costs one block's graph instead of the whole model's (140 s a graph for all of
    5B on an H100). In place, so offload hooks and the pipeline keep the same modules.

    The parts are what `speed_mode` runs: its cache hooks sit on each block's attention and
    keep Python state that would split a compiled block into pieces compiled inside requests.
    So under those hooks the block runs eagerly (speed.step_cache) and calls its compiled
    parts; the hooks wrap the parts' compiled forward, registered here first. A compiled
    block inlines its parts, so the default path keeps its one graph.

    Compiling happens on the first calls: warm_up(), with the compile cache (compile_cache.py).
    backend: torch.compile's; tests of recompiles pass a cheaper one (guards are dynamo's).
    """
    transformer._repeated_blocks = ["CogVideoXBlock"]  # diffusers does not set it for CogVideoX
    transformer.compile_repeated_blocks(backend=backend)
    for block in transformer.transformer_blocks:
        block._compiled_block = block._compiled_call_impl  # for compiled_blocks_back()
        for part in (block.norm1, block.attn1, block.norm2, block.ff):
            part.forward = torch.compile(part.forward, backend=backend)


@contextmanager
def blocks_run_eagerly(transformer: torch.nn.Module) -> Iterator[None]:
    """The compiled blocks set aside for a while: each block runs its Python forward, which
    calls its compiled parts (compile_transformer)."""
    try:
        for block in transformer.transformer_blocks:
            block._compiled_call_impl = None
        yield
    finally:
        compiled_blocks_back(transformer)


def compiled_blocks_back(transformer: torch.nn.Module) -> None:
    """Every block's compiled call put back: also those a cancel left set aside, landing in
    blocks_run_eagerly's loops (Cog raises it at the worker's next bytecode)."""
    for block in transformer.transformer_blocks:
        if hasattr(block, "_compiled_block"):
            block._compiled_call_impl = block._compiled_block


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether `module.compile()` was called on it or on one of its blocks (torch keeps the
    compiled call there)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())
