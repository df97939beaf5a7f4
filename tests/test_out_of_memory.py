"""A prediction that runs out of GPU memory, injected into the tiny pipeline's own modules as
CUDA raises it: the error says what ran out and what to change, and the worker serves on."""

from __future__ import annotations

import gc
import operator
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from cogvideox_cog.devtools.tiny_postprocess import tiny_ifnet, tiny_rrdbnet
from cogvideox_cog.errors import GpuMemoryError
from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.media.mp4 import encode_mp4
from cogvideox_cog.pipeline import build_pipeline
from cogvideox_cog.postprocess import Postprocessor, Steps
from cogvideox_cog.variants import VARIANTS

CPU = torch.device("cpu")
CUDA_SAYS = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB "
    "of which 1.20 GiB is free. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
)


@pytest.fixture(scope="module")
def generator(tiny_weights) -> VideoGenerator:
    variant = VARIANTS["cogvideox-5b"]
    return VideoGenerator(
        variant, build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none"), CPU
    )


def _request(**overrides) -> Request:
    fields = {
        "prompt": "a cat walks",
        "negative_prompt": "",
        "num_frames": 25,
        "num_inference_steps": 2,
        "guidance_scale": 6.0,
        "use_dynamic_cfg": None,
        "fps": None,
        "seed": 5,
    }
    return Request(**{**fields, **overrides})


@contextmanager
def _out_of_memory(module: torch.nn.Module, seen: list | None = None) -> Iterator[None]:
    """`module`'s first call raises CUDA's error, as an allocation inside it would; `seen`
    gets a weak reference to the tensor it was given."""

    def fail(module, args, kwargs):
        if seen is not None:
            seen.append(weakref.ref(args[0] if args else kwargs["hidden_states"]))
        raise torch.OutOfMemoryError(CUDA_SAYS)

    handle = module.register_forward_pre_hook(fail, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize(
    ("module", "phase"), [("transformer", "denoising"), ("vae", "decoding")], ids=str
)
def test_out_of_gpu_memory_names_the_phase_the_size_and_fewer_frames(generator, module, phase):
    target = generator.pipe.transformer if module == "transformer" else generator.pipe.vae.decoder
    with _out_of_memory(target), pytest.raises(GpuMemoryError) as raised:
        generator.render_frames(_request())
    said = str(raised.value)
    assert said.startswith(f"The GPU ran out of memory while {phase} 25 frames at 80x48.")
    assert "Ask for fewer frames: num_frames=17 or less." in said
    assert isinstance(raised.value.__cause__, torch.OutOfMemoryError)


def test_out_of_gpu_memory_above_the_default_frame_count_suggests_the_default(tiny_weights):
    """What setup's memory policy was chosen for: 1.5 takes 161 frames, twice its default."""
    variant = VARIANTS["cogvideox1.5-5b"]
    pipe = build_pipeline(variant, tiny_weights["1.5-t2v"], CPU, "none")
    generator = VideoGenerator(variant, pipe, CPU, resolution="48x80")
    with _out_of_memory(pipe.transformer), pytest.raises(GpuMemoryError) as raised:
        generator.render_frames(_request(num_frames=161))
    assert "161 frames at 80x48. Ask for fewer frames: num_frames=81 or less." in str(raised.value)


def test_out_of_gpu_memory_tells_the_operator_the_offload_policy_that_needs_less(generator):
    with _out_of_memory(generator.pipe.transformer), pytest.raises(GpuMemoryError) as raised:
        generator.render_frames(_request(num_frames=9))
    assert str(raised.value).endswith(
        "The deployment's operator can set COGVIDEOX_OFFLOAD=model (it runs with none), which "
        "keeps less of the model on the GPU."
    )


def test_a_render_out_of_gpu_memory_keeps_none_of_its_tensors_while_its_error_is_held(
    generator,
):
    """Cog holds the error while it reports it, and the error its traceback: the failed
    call's tensors stayed on the GPU with them, out of reach of empty_cache."""
    seen = []
    with _out_of_memory(generator.pipe.transformer, seen), pytest.raises(GpuMemoryError) as raised:
        generator.render_frames(_request())
    gc.collect()
    assert raised.value is not None and seen and seen[0]() is None


def test_the_render_after_one_out_of_gpu_memory_gives_a_fresh_generators_frames(
    generator, tiny_weights
):
    """The speed mode's cache hooks and the kept negative-prompt embedding survive a call cut
    short in the middle of a step."""
    request = _request(num_frames=9, num_inference_steps=6, speed_mode="faster")
    block = generator.pipe.transformer.transformer_blocks[1]
    with _out_of_memory(block), pytest.raises(GpuMemoryError):
        generator.render_frames(request)
    variant = VARIANTS["cogvideox-5b"]
    fresh = VideoGenerator(
        variant, build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none"), CPU
    )
    np.testing.assert_array_equal(
        generator.render_frames(request).frames, fresh.render_frames(request).frames
    )


def test_out_of_gpu_memory_encoding_the_input_video_names_that_step_and_vae_tiling(
    tiny_weights, tmp_path
):
    """The pipeline encodes the clip before its first step: that was reported as the
    denoise, without the VAE tiling that makes the encode smaller too."""
    variant = VARIANTS["cogvideox-5b"]
    pipe = build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none", mode="v2v")
    pipe.vae.disable_tiling()
    generator = VideoGenerator(variant, pipe, CPU, "v2v")
    clip = np.random.default_rng(1).integers(0, 256, (24, 48, 80, 3), dtype=np.uint8)
    video = encode_mp4(clip, tmp_path / "clip.mp4", fps=24)
    with _out_of_memory(pipe.vae.encoder), pytest.raises(GpuMemoryError) as raised:
        generator.render_frames(_request(num_frames=9, video=video, strength=0.5))
    assert str(raised.value) == (
        "The GPU ran out of memory while encoding the video's 9 frames at 80x48. The "
        "deployment's operator can set COGVIDEOX_VAE_TILING=on, which runs the VAE in tiles "
        "with less memory."
    )


def _warm_up_generator(tiny_weights, offload: str) -> VideoGenerator:
    variant = VARIANTS["cogvideox-5b"]
    generator = VideoGenerator(
        variant, build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none"), CPU
    )
    generator.offload = offload
    return generator


# Setup's warm-up renders sizes no user chose: its advice names settings, never fewer frames,
# and only the settings that would make that phase fit.
WARM_UP_ADVICE = {
    "denoise-offload-or-compile": (
        "model",
        "transformer",
        "The GPU ran out of memory while denoising 49 frames at 80x48 in setup's compile "
        "warm-up (COGVIDEOX_COMPILE=1). Set COGVIDEOX_OFFLOAD=sequential (it runs with model), "
        "which keeps less of the model on the GPU, or COGVIDEOX_COMPILE=0, which skips this "
        "warm-up and runs the transformer uncompiled.",
    ),
    # The VAE is not compiled: compiling off would not make its decode fit.
    "untiled-decode-vae-tiling-alone": (
        "model",
        "vae.decoder",
        "The GPU ran out of memory while decoding 49 frames at 80x48 in setup's compile "
        "warm-up (COGVIDEOX_COMPILE=1). Set COGVIDEOX_VAE_TILING=on, which runs the VAE in "
        "tiles with less memory.",
    ),
    "least-offload-compile-alone": (
        "sequential",
        "transformer",
        "Set COGVIDEOX_COMPILE=0, which skips this warm-up and runs the transformer uncompiled.",
    ),
    # A tiled decode at the least offload: compiling off would not shrink the VAE either.
    "nothing-left-a-larger-gpu": (
        "sequential",
        "vae.decoder",
        "in setup's compile warm-up (COGVIDEOX_COMPILE=1). This model needs a GPU with more "
        "memory.",
    ),
    # The text encoder runs uncompiled: compiling off would not make it fit.
    "prompt-offload-not-compile": (
        "model",
        "text_encoder",
        "The GPU ran out of memory while encoding the prompt in setup's compile warm-up "
        "(COGVIDEOX_COMPILE=1). Set COGVIDEOX_OFFLOAD=sequential (it runs with model), which "
        "keeps less of the model on the GPU.",
    ),
}


@pytest.mark.parametrize(
    ("offload", "component", "advice"), WARM_UP_ADVICE.values(), ids=WARM_UP_ADVICE.keys()
)
def test_out_of_gpu_memory_in_setups_warm_up_advises_the_settings_that_would_fit(
    tiny_weights, offload, component, advice
):
    generator = _warm_up_generator(tiny_weights, offload)
    if component == "vae.decoder" and offload == "model":
        generator.pipe.vae.disable_tiling()
    module = operator.attrgetter(component)(generator.pipe)
    with _out_of_memory(module), pytest.raises(GpuMemoryError) as raised:
        generator.warm_up()
    assert str(raised.value).endswith(advice)


def test_a_request_after_a_warm_up_out_of_gpu_memory_gets_a_requests_advice(tiny_weights):
    generator = _warm_up_generator(tiny_weights, "model")
    with _out_of_memory(generator.pipe.transformer), pytest.raises(GpuMemoryError):
        generator.warm_up()
    with _out_of_memory(generator.pipe.transformer), pytest.raises(GpuMemoryError) as raised:
        generator.render_frames(_request())
    said = str(raised.value)
    assert "Ask for fewer frames" in said and "warm-up" not in said


def _postprocessed(steps: Steps) -> np.ndarray:
    frames = np.random.default_rng(0).random((3, 24, 40, 3), dtype=np.float32)
    postprocessor = Postprocessor(tiny_ifnet(), tiny_rrdbnet(), CPU)
    with _out_of_memory(postprocessor.upscaler), _out_of_memory(postprocessor.interpolator):
        return postprocessor.apply(frames, 8, steps, lambda name, value: None).array()


def test_out_of_gpu_memory_in_the_upscale_names_the_sizes_and_what_needs_less():
    with pytest.raises(GpuMemoryError) as raised:
        _postprocessed(Steps(upscale=4))
    assert str(raised.value) == (
        "The GPU ran out of memory while upscaling 3 frames 4x, 40x24 to 160x96. Ask for "
        "upscale='none': '2x' runs the same 4x model on the same tiles."
    )


def test_out_of_gpu_memory_in_a_4x_upscale_does_not_suggest_2x_which_runs_the_same_tiles():
    """2x with the 4x model feeds it the tiles 4x feeds it, then shrinks the output: it needs
    as much GPU memory as 4x, and a little more. The error suggested upscale='2x'."""
    frames = np.random.default_rng(0).random((1, 24, 40, 3), dtype=np.float32)
    postprocessor = Postprocessor(upscaler=tiny_rrdbnet(), device=CPU)
    tiles: dict[int, list[tuple[int, ...]]] = {2: [], 4: []}
    for factor, shapes in tiles.items():
        hook = postprocessor.upscaler.register_forward_pre_hook(
            lambda module, args, shapes=shapes: shapes.append(tuple(args[0].shape))
        )
        postprocessor.apply(frames, 8, Steps(upscale=factor), lambda name, value: None).array()
        hook.remove()
    assert tiles[2] == tiles[4]
    with pytest.raises(GpuMemoryError) as raised:
        _postprocessed(Steps(upscale=4))
    assert "'2x' or" not in str(raised.value)


def test_out_of_gpu_memory_in_the_interpolation_names_its_size_and_smaller_choices():
    with pytest.raises(GpuMemoryError) as raised:
        _postprocessed(Steps(interpolate=4))
    assert str(raised.value) == (
        "The GPU ran out of memory while interpolating 3 frames 4x at 40x24. Ask for "
        "interpolate='2x' or 'none'."
    )


def test_out_of_gpu_memory_in_a_2x_upscale_asks_for_none_alone():
    """2x is the smallest upscale: nothing smaller runs the model on less."""
    with pytest.raises(GpuMemoryError) as raised:
        _postprocessed(Steps(upscale=2))
    assert str(raised.value).endswith("40x24 to 80x48. Ask for upscale='none'.")


def test_out_of_gpu_memory_interpolating_upscaled_frames_names_their_size_and_less_upscale():
    """The interpolation runs on the upscaled frames: their size is what ran out, and a
    smaller upscale needs less; 2x is the smallest interpolation."""
    frames = np.random.default_rng(0).random((3, 24, 40, 3), dtype=np.float32)
    postprocessor = Postprocessor(tiny_ifnet(), tiny_rrdbnet(), CPU)
    steps = Steps(interpolate=2, upscale=2)
    with _out_of_memory(postprocessor.interpolator), pytest.raises(GpuMemoryError) as raised:
        postprocessor.apply(frames, 8, steps, lambda name, value: None).array()
    assert str(raised.value) == (
        "The GPU ran out of memory while interpolating 3 frames 2x at 80x48. Ask for "
        "interpolate='none', or a smaller upscale."
    )


def test_an_upscale_out_of_gpu_memory_before_interpolating_keeps_no_frame_while_held():
    """The error passes through the interpolation's frames on its way to the encoder: their
    last upscaled frame stayed on the GPU with it while Cog reported it."""
    frames = np.random.default_rng(0).random((3, 24, 40, 3), dtype=np.float32)
    postprocessor = Postprocessor(tiny_ifnet(), tiny_rrdbnet(), CPU)
    calls = []

    def fail_the_second_frame(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError(CUDA_SAYS)

    postprocessor.upscaler.register_forward_pre_hook(fail_the_second_frame)
    steps = Steps(upscale=2, interpolate=2)
    with pytest.raises(GpuMemoryError, match="while upscaling") as raised:
        postprocessor.apply(frames, 8, steps, lambda name, value: None).array()
    gc.collect()
    upscaled = [
        o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.shape == (1, 3, 48, 80)
    ]
    assert raised.value is not None and upscaled == []


def test_out_of_gpu_memory_encoding_the_prompt_names_no_size_and_no_frame_count(generator):
    """The text encoder reads the prompt alone: neither the size nor fewer frames changes it."""
    with _out_of_memory(generator.pipe.text_encoder), pytest.raises(GpuMemoryError) as raised:
        generator.render_frames(_request())
    assert str(raised.value) == (
        "The GPU ran out of memory while encoding the prompt. The deployment's operator can "
        "set COGVIDEOX_OFFLOAD=model (it runs with none), which keeps less of the model on the "
        "GPU."
    )


def test_out_of_gpu_memory_with_nothing_left_to_change_says_a_larger_gpu_is_needed(tiny_weights):
    generator = _warm_up_generator(tiny_weights, "sequential")
    with _out_of_memory(generator.pipe.text_encoder), pytest.raises(GpuMemoryError) as raised:
        generator.render_frames(_request())
    assert str(raised.value) == (
        "The GPU ran out of memory while encoding the prompt. Its operator needs a GPU with "
        "more memory."
    )


@pytest.mark.parametrize(
    ("tiled", "advice"),
    [
        (
            True,
            "COGVIDEOX_OFFLOAD=model (it runs with none), which keeps less of the model on the "
            "GPU.",
        ),
        (False, "COGVIDEOX_VAE_TILING=on, which runs the VAE in tiles with less memory."),
    ],
    ids=["tiled", "untiled"],
)
def test_out_of_gpu_memory_encoding_the_image_names_that_step_and_no_frame_count(
    tiny_weights, tmp_path, tiled, advice
):
    """The image is one frame whatever num_frames asks: fewer frames would not help. VAE
    tiling makes its encode smaller, as it does the clip's."""
    variant = VARIANTS["cogvideox-5b-i2v"]
    pipe = build_pipeline(variant, tiny_weights["1.0-i2v"], CPU, "none")
    if not tiled:
        pipe.vae.disable_tiling()
    generator = VideoGenerator(variant, pipe, CPU)
    image = tmp_path / "image.png"
    Image.new("RGB", (80, 48), (90, 120, 150)).save(image)
    with _out_of_memory(pipe.vae.encoder), pytest.raises(GpuMemoryError) as raised:
        generator.render_frames(_request(image=image))
    assert str(raised.value) == (
        "The GPU ran out of memory while encoding the image at 80x48. The deployment's "
        "operator can set " + advice
    )
