"""Same frames as the model's authors: every variant against diffusers called as upstream does.

The reference is upstream's inference/cli_demo.py: `from_pretrained`, the scheduler swapped
for CogVideoXDPMScheduler (DDIM for 2B, as its comments recommend) with trailing timesteps,
VAE slicing and tiling, then the pipeline with `use_dynamic_cfg=True` (False with DDIM) and a
CPU generator seeded with the seed. Each test renders the same request through the project's
generator and through that call, on the same tiny weights in float32, and asserts the frames
are identical. A deliberate departure therefore fails here until someone changes the test.

The documented departures in what the model is given, the fit of the image and of the clip's
frames (cover and centre-crop where diffusers stretches) and the clip's frames picked in time,
are applied to the reference's input first: the reference gets the image or frames the
predictor makes, and the last tests show that each fit is a real difference. An image of the
video's own shape needs no fit: there the reference reads the file as cli_demo.py does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXImageToVideoPipeline,
    CogVideoXPipeline,
    CogVideoXVideoToVideoPipeline,
)
from diffusers.utils import load_image
from PIL import Image

from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.lora.store import LoraCache
from cogvideox_cog.media.clip import load_video
from cogvideox_cog.media.image import fit_image, open_image
from cogvideox_cog.media.mp4 import encode_mp4
from cogvideox_cog.pipeline import build_pipeline
from cogvideox_cog.variants import VARIANTS
from tests.file_server import FileServer
from tests.lora_files import lora_tensors, save_diffusers_lora

CPU = torch.device("cpu")
PROMPT = "a panda plays guitar in a bamboo forest"
SEED, STEPS, GUIDANCE = 42, 3, 6.0
TINY_SIZE = "48x80"  # the tiny 1.5 weights bound their rotary grid below 1.5's 768x1360


def _ours(
    variant_id: str,
    weights,
    mode: str,
    resolution=None,
    device=CPU,
    lora_cache: LoraCache | None = None,
    **request,
) -> np.ndarray:
    """The project's frames; device: the one the generator is told it runs on (the tiny
    pipeline runs on the CPU); lora_cache: where a request's lora_url is fetched to."""
    variant = VARIANTS[variant_id]
    pipe = build_pipeline(variant, weights, CPU, "none", mode=mode)
    generator = VideoGenerator(
        variant, pipe, device, mode, resolution=resolution, lora_cache=lora_cache
    )
    fields = dict(
        prompt=PROMPT,
        negative_prompt="",
        num_frames=None,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        use_dynamic_cfg=None,
        fps=None,
        seed=SEED,
    )
    return generator.render_frames(Request(**{**fields, **request})).frames


def _reference_pipe(pipeline_class, weights, ddim: bool = False):
    """The pipeline as inference/cli_demo.py sets it up (float32: this runs on a CPU)."""
    pipe = pipeline_class.from_pretrained(weights, dtype=torch.float32)
    scheduler = CogVideoXDDIMScheduler if ddim else CogVideoXDPMScheduler
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.vae.enable_slicing()
    pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(pipeline_class, weights, ddim: bool = False, **call) -> np.ndarray:
    """diffusers as inference/cli_demo.py drives it; the first video of the batch."""
    return _call_reference(_reference_pipe(pipeline_class, weights, ddim), ddim, **call)


def _call_reference(pipe, ddim: bool = False, **call) -> np.ndarray:
    """`call` may override the output type and the dynamic CFG that goes with the scheduler."""
    return pipe(
        prompt=PROMPT,
        num_videos_per_prompt=1,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(SEED),
        **{"output_type": "np", "use_dynamic_cfg": not ddim, **call},
    ).frames[0]


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A landscape picture of another shape than the model's, with detail everywhere."""
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("picture") / "picture.png"
    Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 256, (40, 48, 80, 3), dtype=np.uint8)
    return encode_mp4(frames, tmp_path_factory.mktemp("clip") / "clip.mp4", fps=16)


@pytest.fixture(scope="module")
def square_clip(tmp_path_factory):
    """A clip of another shape than the model's, with detail everywhere."""
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, (24, 64, 64, 3), dtype=np.uint8)
    return encode_mp4(frames, tmp_path_factory.mktemp("square") / "square.mp4", fps=16)


def test_2b_equals_diffusers_with_ddim_and_constant_guidance(tiny_weights):
    ours = _ours("cogvideox-2b", tiny_weights["1.0-t2v-2b"], "t2v", num_frames=9)
    reference = _reference(CogVideoXPipeline, tiny_weights["1.0-t2v-2b"], ddim=True, num_frames=9)
    assert np.array_equal(ours, reference)


def test_2b_video_to_video_equals_diffusers_with_ddim_and_constant_guidance(tiny_weights, clip):
    """The clip's latents scaled by 2B's VAE factor (1.15, not 5B's 0.7) and noised by DDIM on
    its SNR-shifted schedule, where the 5B test below runs DPM."""
    weights = tiny_weights["1.0-t2v-2b"]
    ours = _ours("cogvideox-2b", weights, "v2v", num_frames=9, video=clip, strength=0.8)
    frames = load_video(clip, 9, fps=8, height=48, width=80).frames
    reference = _reference(
        CogVideoXVideoToVideoPipeline, weights, ddim=True, video=frames, strength=0.8
    )
    assert np.array_equal(ours, reference)


def test_2b_with_dynamic_cfg_asked_for_equals_diffusers_ddim_with_dynamic_cfg(tiny_weights):
    """use_dynamic_cfg=true keeps 2B's DDIM and runs diffusers' dynamic schedule on it: what
    cli_demo.py renders with the DDIM swap it advises for 2B and its use_dynamic_cfg=True."""
    weights = tiny_weights["1.0-t2v-2b"]
    ours = _ours("cogvideox-2b", weights, "t2v", num_frames=9, use_dynamic_cfg=True)
    reference = _reference(
        CogVideoXPipeline, weights, ddim=True, num_frames=9, use_dynamic_cfg=True
    )
    assert np.array_equal(ours, reference)


def test_2b_at_a_deployments_resolution_equals_diffusers_at_that_size(tiny_weights):
    """2B's sine-cosine positions are computed for the video's own grid (no rotary bound): at
    a portrait COGVIDEOX_RESOLUTION, as diffusers computes them for that height and width."""
    weights = tiny_weights["1.0-t2v-2b"]
    ours = _ours("cogvideox-2b", weights, "t2v", resolution="96x64", num_frames=9)
    reference = _reference(CogVideoXPipeline, weights, ddim=True, num_frames=9, height=96, width=64)
    assert ours.shape == (9, 96, 64, 3)
    assert np.array_equal(ours, reference)


@pytest.fixture(scope="module")
def lora_2b(tiny_weights, tmp_path_factory):
    """A rank-4 LoRA of the 2B-shaped transformer as diffusers saves one: its folder and URL."""
    folder = tmp_path_factory.mktemp("lora-2b")
    tensors = lora_tensors(tiny_weights["1.0-t2v-2b"] / "transformer", 4, seed=1)
    path = save_diffusers_lora(tensors, folder)
    server = FileServer(folder)
    yield folder, server.url(path.name)
    server.stop()


def test_2b_with_a_lora_equals_diffusers_load_lora_weights_at_the_same_scale(
    tiny_weights, lora_2b, tmp_path
):
    """lora_url and lora_scale give diffusers' load_lora_weights and set_adapters at that
    scale: the LoRA beside the base weights, unfused (cli_demo.py fuses it, which rounds the
    sums otherwise, within 1e-5 in float32)."""
    folder, url = lora_2b
    weights = tiny_weights["1.0-t2v-2b"]
    cache = LoraCache(tmp_path / "loras", 1 << 30, 1 << 30, 60)
    ours = _ours(
        "cogvideox-2b", weights, "t2v", lora_cache=cache, num_frames=9, lora_url=url, lora_scale=0.5
    )
    pipe = _reference_pipe(CogVideoXPipeline, weights, ddim=True)
    pipe.load_lora_weights(folder, weight_name=url.rsplit("/", 1)[1], adapter_name="lora")
    pipe.set_adapters(["lora"], [0.5])
    assert np.array_equal(ours, _call_reference(pipe, ddim=True, num_frames=9))


def test_5b_equals_diffusers_with_dpm_and_dynamic_cfg(tiny_weights):
    ours = _ours("cogvideox-5b", tiny_weights["1.0-t2v"], "t2v", num_frames=9)
    reference = _reference(CogVideoXPipeline, tiny_weights["1.0-t2v"], num_frames=9)
    assert np.array_equal(ours, reference)


def test_5b_image_to_video_equals_diffusers_on_the_fitted_image(tiny_weights, picture):
    ours = _ours("cogvideox-5b-i2v", tiny_weights["1.0-i2v"], "i2v", num_frames=9, image=picture)
    height, width = ours.shape[1:3]
    image = fit_image(open_image(picture), height, width)
    reference = _reference(
        CogVideoXImageToVideoPipeline, tiny_weights["1.0-i2v"], image=image, num_frames=9
    )
    assert np.array_equal(ours, reference)


def test_an_image_of_the_videos_shape_gives_diffusers_frames_from_the_file_itself(
    tiny_weights, tmp_path
):
    """Nothing to crop: the picture is scaled as diffusers scales it (Lanczos), so the frames
    are those of cli_demo.py given the file, read by diffusers' load_image."""
    rng = np.random.default_rng(6)
    path = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)).save(path)  # 5:3
    weights = tiny_weights["1.0-i2v"]
    ours = _ours("cogvideox-5b-i2v", weights, "i2v", num_frames=9, image=path)
    reference = _reference(
        CogVideoXImageToVideoPipeline, weights, image=load_image(str(path)), num_frames=9
    )
    assert np.array_equal(ours, reference)


def test_1_5_equals_diffusers_with_dpm_and_dynamic_cfg(tiny_weights):
    ours = _ours(
        "cogvideox1.5-5b", tiny_weights["1.5-t2v"], "t2v", resolution=TINY_SIZE, num_frames=17
    )
    reference = _reference(
        CogVideoXPipeline, tiny_weights["1.5-t2v"], num_frames=17, height=48, width=80
    )
    assert np.array_equal(ours, reference)


def test_1_5_image_to_video_equals_diffusers_at_the_images_aspect(tiny_weights, picture):
    ours = _ours(
        "cogvideox1.5-5b-i2v",
        tiny_weights["1.5-i2v"],
        "i2v",
        resolution=TINY_SIZE,
        num_frames=17,
        image=picture,
    )
    height, width = ours.shape[1:3]
    image = fit_image(open_image(picture), height, width)
    reference = _reference(
        CogVideoXImageToVideoPipeline,
        tiny_weights["1.5-i2v"],
        image=image,
        num_frames=17,
        height=height,
        width=width,
    )
    assert np.array_equal(ours, reference)


def test_video_to_video_equals_diffusers_on_the_picked_frames(tiny_weights, clip):
    ours = _ours(
        "cogvideox-5b", tiny_weights["1.0-t2v"], "v2v", num_frames=9, video=clip, strength=0.8
    )
    frames = load_video(clip, 9, fps=8, height=48, width=80).frames
    reference = _reference(
        CogVideoXVideoToVideoPipeline, tiny_weights["1.0-t2v"], video=frames, strength=0.8
    )
    assert np.array_equal(ours, reference)


def test_1_5_video_to_video_decodes_the_clip_without_its_padding(tiny_weights, clip):
    """diffusers' video-to-video pipeline refuses a 16N+1 clip on 1.5 (an odd latent count).
    The clip gets one latent frame of padding, which is dropped before decoding, as the 1.5
    text-to-video pipeline drops its own: decoded with it, 17 frames came out as 24, 3 late."""
    weights = tiny_weights["1.5-t2v"]
    ours = _ours(
        "cogvideox1.5-5b",
        weights,
        "v2v",
        resolution=TINY_SIZE,
        num_frames=17,
        video=clip,
        strength=0.8,
    )
    frames = load_video(clip, 17, fps=16, height=48, width=80).frames
    padded = frames + [frames[-1]] * 4
    pipe = _reference_pipe(CogVideoXVideoToVideoPipeline, weights)
    latents = _call_reference(
        pipe, video=padded, strength=0.8, height=48, width=80, output_type="latent"
    )
    with torch.no_grad():
        video = pipe.decode_latents(latents[None, :-1])
    reference = pipe.video_processor.postprocess_video(video=video, output_type="np")[0]
    assert reference.shape == ours.shape == (17, 48, 80, 3)
    assert np.array_equal(ours, reference)


def test_the_image_fit_is_a_real_departure_from_diffusers_stretch(tiny_weights, picture):
    """The predictor crops the image to the video's shape; diffusers would stretch it."""
    ours = _ours("cogvideox-5b-i2v", tiny_weights["1.0-i2v"], "i2v", num_frames=9, image=picture)
    stretched = _reference(
        CogVideoXImageToVideoPipeline,
        tiny_weights["1.0-i2v"],
        image=open_image(picture),
        num_frames=9,
    )
    assert not np.array_equal(ours, stretched)


def test_the_clip_fit_is_a_real_departure_from_diffusers_stretch(tiny_weights, square_clip):
    """The predictor crops each frame of the clip to the video's shape; diffusers would
    stretch the frames it is given, here the same frames picked in time at their own size."""
    weights = tiny_weights["1.0-t2v"]
    ours = _ours("cogvideox-5b", weights, "v2v", num_frames=9, video=square_clip, strength=0.8)
    frames = load_video(square_clip, 9, fps=8, height=64, width=64).frames
    stretched = _reference(CogVideoXVideoToVideoPipeline, weights, video=frames, strength=0.8)
    assert ours.shape == stretched.shape == (9, 48, 80, 3)
    assert not np.array_equal(ours, stretched)


def test_the_seeds_noise_comes_from_a_cpu_generator_whatever_device_runs_the_model(
    tiny_weights,
):
    """cli_demo.py seeds `torch.Generator()`, a CPU one, so a seed draws the same noise on any
    GPU; a generator on the GPU draws other noise, which a CPU cannot tell apart in the tests
    above. Here the generator is told it runs on a GPU while the tiny model stays on the CPU,
    where a CUDA generator cannot draw: only the CPU one renders the reference frames."""
    weights = tiny_weights["1.0-t2v"]
    ours = _ours("cogvideox-5b", weights, "t2v", device=torch.device("cuda"), num_frames=9)
    assert np.array_equal(ours, _reference(CogVideoXPipeline, weights, num_frames=9))
