"""What each CogVideoX release needs that its weights' config cannot tell us.

Everything the config does know (native resolution, text length, latent channels) is read from
the loaded model instead, so tiny test models and the real weights take the same path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import VariantError
from .settings import setting

Task = Literal["t2v", "i2v"]
SchedulerName = Literal["ddim", "dpm"]
Size = Literal["2b", "5b"]

MODEL_ENV = "COGVIDEOX_MODEL"
DEFAULT_VARIANT = {"t2v": "cogvideox-5b", "i2v": "cogvideox-5b-i2v"}
TASK_NAMES = {"t2v": "text-to-video", "i2v": "image-to-video"}


@dataclass(frozen=True)
class Variant:
    id: str
    task: Task
    hub_repo: str
    # Trained in bf16: fp16 on the 5B and 1.5 models overflows into NaNs (black videos).
    dtype: Literal["float16", "bfloat16"]
    # The scheduler and dynamic CFG as upstream's inference/cli_demo.py runs the model: DPM with
    # use_dynamic_cfg=True for every 5B model, 1.0 and 1.5 (the SAT configs agree: DynamicCFG,
    # scale 6, exp 5); DDIM without it for 2B (cli_demo.py recommends both for 2B).
    scheduler: SchedulerName
    dynamic_cfg: bool
    fps: int
    # Frame counts are frame_step * N + 1 (the causal VAE compresses time by 4; 1.5 models
    # also pad latents to patch_size_t), from frame_step + 1 up to max_frames.
    frame_step: int
    max_frames: int
    default_frames: int
    # "native": only the resolution in the transformer config (learned position embeddings
    # on the 1.0 I2V model, training resolution elsewhere). "image_aspect": any multiple of
    # the patch grid with the short side at the render size's short side and the long side at
    # most its long side (the native size unless COGVIDEOX_RESOLUTION sets one), chosen to match
    # the input image (CogVideoX1.5-5B-I2V).
    resolution: Literal["native", "image_aspect"]
    # (height, width) the model was trained at, where its config does not say: the 1.5
    # conversions store sample_height = sample_width = 300 latents, a bound for the rotary
    # grid, so diffusers' default would be 2400 x 2400. None: read it from the config.
    native_size: tuple[int, int] | None = None
    # Free GPU memory (GiB) from which `auto` keeps the whole pipeline on the GPU, or else uses
    # model offload; below both, sequential offload. Each is the peak memory the CUDA allocator
    # reserved at the default frame count and resolution, measured on an H100
    # (benchmarks/results/gpu/), plus about 2 GiB (to a half GiB) for the CUDA
    # context and fragmentation.
    vram_no_offload_gib: float = 28.5  # cogvideox-5b: 26.4 GiB reserved without offload
    vram_model_offload_gib: float = 17.0  # cogvideox-5b: 15.1 GiB reserved with model offload
    # What decoding the default video without VAE tiling adds to the reserved GPU peak (the
    # measure vram_no_offload_gib takes; benchmarks/results/gpu/, "decode again"), to a half
    # GiB, for COGVIDEOX_VAE_TILING=auto; None where it was not measured (auto keeps tiling
    # there). Allocated memory grows by 11.0 GiB only, but the allocator's cached blocks grow
    # by about 5 GiB more, and those are taken from the GPU all the same.
    vae_untiled_extra_gib: float | None = None

    @property
    def family(self) -> Literal["1.0", "1.5"]:
        """The release: 1.5 models patch time by 2 and take any resolution up to a bound."""
        return "1.5" if self.id.startswith("cogvideox1.5") else "1.0"

    @property
    def size(self) -> Size:
        """2B is the one without rotary position embeddings (sine-cosine ones instead)."""
        return "2b" if self.id == "cogvideox-2b" else "5b"

    @property
    def allowed_frames(self) -> range:
        return range(self.frame_step + 1, self.max_frames + 1, self.frame_step)


VARIANTS: dict[str, Variant] = {
    v.id: v
    for v in (
        Variant(
            id="cogvideox-2b",
            task="t2v",
            hub_repo="THUDM/CogVideoX-2b",
            dtype="float16",
            scheduler="ddim",
            dynamic_cfg=False,
            fps=8,
            frame_step=8,
            max_frames=49,
            default_frames=49,
            resolution="native",
            vram_no_offload_gib=22.5,  # measured: 20.6 GiB reserved
            vram_model_offload_gib=13.0,  # measured: 10.9 GiB reserved
            vae_untiled_extra_gib=16.5,  # measured: 36.9 GiB reserved untiled, 20.6 tiled
        ),
        Variant(
            id="cogvideox-5b",
            task="t2v",
            hub_repo="THUDM/CogVideoX-5b",
            dtype="bfloat16",
            scheduler="dpm",
            dynamic_cfg=True,
            fps=8,
            frame_step=8,
            max_frames=49,
            default_frames=49,
            resolution="native",
            vae_untiled_extra_gib=16.5,  # measured: 43.0 GiB reserved untiled, 26.4 tiled
        ),
        Variant(
            id="cogvideox-5b-i2v",
            task="i2v",
            hub_repo="THUDM/CogVideoX-5b-I2V",
            dtype="bfloat16",
            scheduler="dpm",
            dynamic_cfg=True,
            fps=8,
            frame_step=8,
            max_frames=49,
            default_frames=49,
            resolution="native",
            vae_untiled_extra_gib=16.5,  # the same VAE and video size as cogvideox-5b
        ),
        Variant(
            id="cogvideox1.5-5b",
            task="t2v",
            hub_repo="THUDM/CogVideoX1.5-5B",
            dtype="bfloat16",
            scheduler="dpm",
            dynamic_cfg=True,
            fps=16,
            frame_step=16,
            max_frames=161,
            default_frames=81,
            resolution="native",
            native_size=(768, 1360),
            vram_no_offload_gib=34.0,  # measured: 31.7 GiB reserved at 81 x 768 x 1360
            vram_model_offload_gib=24.5,  # measured: 22.4 GiB reserved
        ),
        Variant(
            id="cogvideox1.5-5b-i2v",
            task="i2v",
            hub_repo="THUDM/CogVideoX1.5-5B-I2V",
            dtype="bfloat16",
            scheduler="dpm",
            dynamic_cfg=True,
            fps=16,
            frame_step=16,
            max_frames=161,
            default_frames=81,
            resolution="image_aspect",
            native_size=(768, 1360),
            vram_no_offload_gib=34.0,  # as the 1.5 t2v model; the I2V one was not measured
            vram_model_offload_gib=24.5,
        ),
    )
}


PREDICTOR_FILES = {
    "t2v": "predict_t2v.py (cog.yaml)",
    "i2v": "predict_i2v.py (cog-i2v.yaml)",
    "v2v": "predict_v2v.py (cog-v2v.yaml)",
}


def get_variant(variant_id: str, task: Task, predictor: str | None = None) -> Variant:
    """Look a variant up and make sure the predictor asking (default: the task's) can serve it."""
    variant = VARIANTS.get(variant_id.strip().lower())
    if variant is None:
        raise VariantError(
            f"{MODEL_ENV}={variant_id!r} is not a known CogVideoX variant; "
            f"choose one of: {', '.join(VARIANTS)}"
        )
    if variant.task != task:
        matching = [v.id for v in VARIANTS.values() if v.task == task]
        predictor = predictor or PREDICTOR_FILES[task]
        raise VariantError(
            f"{MODEL_ENV}={variant.id!r} is for {TASK_NAMES[variant.task]}, but {predictor} "
            f"runs the {TASK_NAMES[task]} variants; choose one of: {', '.join(matching)}"
        )
    return variant


def variant_from_env(task: Task, predictor: str | None = None) -> Variant:
    return get_variant(setting(MODEL_ENV, DEFAULT_VARIANT[task]), task, predictor)
