"""The pipeline as the predictors build and run it, in-process on the tiny 1.0 model."""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import tempfile
import threading
import weakref
from pathlib import Path

import cog
import numpy as np
import pytest
import torch
from accelerate.hooks import CpuOffload
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler
from PIL import Image

from cogvideox_cog.errors import ConfigError, GpuMemoryError, InputError, VariantError
from cogvideox_cog.generator import OUTPUT_PREFIX, WARM_UP_PREFIX, Request, VideoGenerator
from cogvideox_cog.media.mp4 import probe_mp4
from cogvideox_cog.parallel.protocol import Canceled, Failed, Render
from cogvideox_cog.parallel.ranks import StepCanceled, _render
from cogvideox_cog.pipeline import (
    blocks_run_eagerly,
    build_pipeline,
    choose_compile,
    choose_offload,
    choose_vae_tiling,
    compile_transformer,
    configure_pipeline,
    is_compiled,
    load_pipeline,
    no_offload_peak_gib,
    offload_for_free_memory,
    pipeline_dtype,
    tiling_for_free_memory,
)
from cogvideox_cog.variants import VARIANTS
from tests.markers import GUARDS_BACKEND

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parent.parent


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
        "num_frames": 9,
        "num_inference_steps": 2,
        "guidance_scale": 6.0,
        "use_dynamic_cfg": None,
        "fps": None,
        "seed": 5,
    }
    return Request(**{**fields, **overrides})


def test_dynamic_cfg_changes_the_video(generator):
    on = generator.render_mp4(_request(use_dynamic_cfg=True))
    off = generator.render_mp4(_request(use_dynamic_cfg=False))
    assert on.read_bytes() != off.read_bytes()


def test_5b_runs_the_dpm_scheduler_with_trailing_timesteps(generator):
    scheduler = generator.pipe.scheduler
    assert isinstance(scheduler, CogVideoXDPMScheduler)
    assert scheduler.config.timestep_spacing == "trailing"


def test_the_scheduler_runs_trailing_timesteps_whatever_the_weights_config_says(tiny_weights):
    """cli_demo sets `trailing` on the scheduler it swaps in, over the weights' own config."""
    variant = VARIANTS["cogvideox-5b"]
    pipe = load_pipeline(variant, tiny_weights["1.0-t2v"], CPU)
    config = pipe.scheduler.config
    pipe.scheduler = type(pipe.scheduler).from_config(config, timestep_spacing="leading")
    pipe = configure_pipeline(pipe, variant, CPU, "none")
    assert pipe.scheduler.config.timestep_spacing == "trailing"


def test_2b_runs_the_ddim_scheduler(tiny_weights):
    pipe = build_pipeline(VARIANTS["cogvideox-2b"], tiny_weights["1.0-t2v-2b"], CPU, "none")
    assert type(pipe.scheduler) is CogVideoXDDIMScheduler


def test_vae_tiling_and_slicing_are_on(generator):
    assert generator.pipe.vae.use_tiling and generator.pipe.vae.use_slicing


def test_vae_tiling_is_on_unless_asked_off_as_upstream_runs_it():
    variant = VARIANTS["cogvideox-5b"]
    assert choose_vae_tiling("on", variant, CPU) is True
    assert choose_vae_tiling("off", variant, CPU) is False
    assert choose_vae_tiling("auto", variant, CPU) is True  # no GPU memory to spare


def test_unknown_vae_tiling_policy_is_refused():
    with pytest.raises(ValueError, match="COGVIDEOX_VAE_TILING='yes' is not one of on, off"):
        choose_vae_tiling("yes", VARIANTS["cogvideox-5b"], CPU)


@pytest.mark.parametrize(
    ("variant_id", "free_gib", "tiled"),
    [
        ("cogvideox-5b", 79.0, False),  # H100 80 GB: 28.5 + 16.5 GiB fit
        ("cogvideox-5b", 45.0, False),  # docs/performance.md: untiled from 45 GiB
        ("cogvideox-5b", 44.5, True),
        ("cogvideox-2b", 39.0, False),
        ("cogvideox-2b", 38.5, True),
        ("cogvideox1.5-5b", 139.0, True),  # untiled 1.5 decode never measured: keep tiles
    ],
)
def test_auto_vae_tiling_untiles_only_where_the_measured_peak_fits(variant_id, free_gib, tiled):
    assert tiling_for_free_memory(VARIANTS[variant_id], free_gib) is tiled


@pytest.mark.parametrize("variant_id", ["cogvideox-2b", "cogvideox-5b"])
def test_auto_vae_tiling_keeps_tiles_where_only_the_allocated_untiled_peak_fits(variant_id):
    """The GPU runs' untiled decode: what fits is the memory the allocator reserved, its
    cached blocks with the tensors, not the tensors alone. Free memory that holds the
    allocated peak but not the reserved one must keep the tiles."""
    record = ROOT / f"benchmarks/results/gpu/{variant_id}/{variant_id}-full-none.json"
    untiled = next(
        d for d in json.loads(record.read_text())["decode_again"] if d["tiling"] == "off"
    )
    assert untiled["peak_allocated_gib"] < untiled["peak_reserved_gib"]
    variant = VARIANTS[variant_id]
    assert tiling_for_free_memory(variant, untiled["peak_reserved_gib"]) is True
    assert no_offload_peak_gib(variant, vae_tiling=False) > untiled["peak_reserved_gib"]


def test_auto_vae_tiling_keeps_tiles_at_a_deployments_own_resolution():
    """The untiled peak was measured at 480x720; a whole-frame decode's memory grows with
    the pixels (768x1360 has three times as many), so no free memory is known to hold it."""
    assert tiling_for_free_memory(VARIANTS["cogvideox-5b"], 79.0, resized=True) is True


def test_vae_tiling_off_places_a_vae_that_decodes_whole_frames(tiny_weights):
    """COGVIDEOX_VAE_TILING=off (or `auto` where the peak fits): the faster whole-frame decode,
    still one video at a time."""
    variant = VARIANTS["cogvideox-5b"]
    pipe = build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none", vae_tiling=False)
    assert (pipe.vae.use_tiling, pipe.vae.use_slicing) == (False, True)


def test_untiled_decode_departs_from_the_reference_tiled_frames(generator):
    """Why `on` stays the default: untiled frames are not the ones upstream renders."""
    vae = generator.pipe.vae
    latents = torch.randn(1, vae.config.latent_channels, 3, 16, 20, generator=torch.Generator())
    with torch.no_grad():
        tiled = vae.decode(latents).sample
        vae.disable_tiling()
        try:
            untiled = vae.decode(latents).sample
        finally:
            vae.enable_tiling()
    assert tiled.shape == untiled.shape == (1, 3, 9, 128, 160)
    assert (tiled - untiled).abs().max() > 1e-3


def test_cpu_runs_in_float32_whatever_the_variants_gpu_dtype(generator):
    assert generator.pipe.transformer.dtype == torch.float32


@pytest.mark.parametrize("variant_id", sorted(VARIANTS))
def test_a_gpu_runs_2b_in_fp16_and_the_others_in_bf16_as_upstream(variant_id):
    """docs/variants.md: fp16 gives the 5B and 1.5 models NaNs; float32 doubles the memory."""
    expected = torch.float16 if variant_id == "cogvideox-2b" else torch.bfloat16
    assert pipeline_dtype(VARIANTS[variant_id], torch.device("cuda")) == expected


def test_the_negative_prompt_is_encoded_once_while_it_stays_the_same(generator):
    calls = []
    hook = generator.pipe.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        counts = []
        for negative in ("dark", "dark", "blurry", "blurry"):
            calls.clear()
            generator.render_frames(_request(negative_prompt=negative, num_inference_steps=1))
            counts.append(len(calls))
    finally:
        hook.remove()
    assert counts == [2, 1, 2, 1]  # prompt and negative, then the prompt alone


def test_a_prediction_draws_no_progress_bar(generator, capfd):
    """Cog puts a prediction's stderr in its log: a bar per step would bury its lines."""
    capfd.readouterr()
    generator.render_frames(_request())
    assert "%|" not in capfd.readouterr().err


def test_two_predictions_never_share_an_output_path(generator):
    first = generator.render_mp4(_request())
    second = generator.render_mp4(_request())
    assert first != second
    assert first.exists() and second.exists()
    assert probe_mp4(first)["frames"] == probe_mp4(second)["frames"] == 9


def test_the_next_prediction_removes_the_previous_ones_output_folder(
    generator, monkeypatch, tmp_path
):
    """Cog has read and uploaded an output by the time the next prediction starts: kept, the
    folders of a long-running server would fill the disk."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first = generator.render_kept(_request(num_inference_steps=1))
    second = generator.render_kept(_request(num_inference_steps=1))
    assert not first.parent.exists() and second.exists()
    assert list(tmp_path.glob(f"{OUTPUT_PREFIX}*")) == [second.parent]


def test_a_cancel_after_the_encode_leaves_no_output_folder(generator, monkeypatch, tmp_path):
    """Cog raises a cancel at whatever bytecode the worker is at, here while the timings are
    recorded: the mp4 is written but not yet returned, so no later prediction removes it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def canceled_at_the_total(name, value):
        if name == "total_seconds":
            raise cog.CancelationException()

    monkeypatch.setattr(generator, "record_metric", canceled_at_the_total)
    with pytest.raises(cog.CancelationException):
        generator.render_mp4(_request(num_inference_steps=1))
    assert list(tmp_path.glob(f"{OUTPUT_PREFIX}*")) == []


def test_a_cancel_while_the_output_is_named_leaves_no_output_folder(
    generator, monkeypatch, tmp_path
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    real_token_hex = secrets.token_hex

    def canceled_at_the_output_name(nbytes):
        if nbytes == 8:  # the output name's random part
            raise cog.CancelationException()
        return real_token_hex(nbytes)

    monkeypatch.setattr(secrets, "token_hex", canceled_at_the_output_name)
    with pytest.raises(cog.CancelationException):
        generator.render_mp4(_request(num_inference_steps=1))
    assert list(tmp_path.glob(f"{OUTPUT_PREFIX}*")) == []


@pytest.mark.parametrize("module", ["transformer", "vae"])
@pytest.mark.parametrize(
    "error",
    [cog.CancelationException(), RuntimeError("CUDA error: unspecified launch failure")],
    ids=repr,
)
def test_a_prediction_stopped_in_a_forward_keeps_none_of_its_tensors_while_its_error_is_held(
    generator, monkeypatch, module, error
):
    """Cog holds a prediction's error while it reports it, and the error held its traceback,
    whose frames held the forward's locals: the activations of the layer it stopped in. And
    the pipeline's release of memory ran while they were held, so CUDA's cache kept them."""
    layer = stop_in_forward(generator, module, error)
    released_while_alive = record_releases(generator, monkeypatch, layer)
    try:
        with pytest.raises(type(error)) as raised:
            generator.predict(_request())
    finally:
        layer.handle.remove()
    assert layer.output() is None
    assert released_while_alive[-1] is False
    assert raised.value is error and str(raised.value) == str(error)  # what Cog reports


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize(
    ("error", "outcome"),
    [(StepCanceled(0), Canceled), (RuntimeError("NCCL error: remote process exited"), Failed)],
    ids=["canceled", "failed"],
)
def test_a_rank_stopped_in_a_forward_keeps_none_of_its_tensors_in_its_outcome(
    generator, monkeypatch, rank, error, outcome
):
    """A rank's Failed holds its error until it is sent, and the error its traceback; a
    canceled rank's memory was released while its cancel still held the activations. Rank 0
    renders the video, the others only denoise."""
    logged = io.StringIO()  # as a rank logs: each line formatted and sent, the record dropped
    package_logger = logging.getLogger("cogvideox_cog")
    monkeypatch.setattr(package_logger, "handlers", [logging.StreamHandler(logged)])
    monkeypatch.setattr(package_logger, "propagate", False)
    layer = stop_in_forward(generator, "transformer", error)
    released_while_alive = record_releases(generator, monkeypatch, layer)
    try:
        told = _render(generator, rank, Render(_request()), threading.Event())
    finally:
        layer.handle.remove()
    assert isinstance(told, outcome)
    assert layer.output() is None
    assert released_while_alive[-1] is False
    if outcome is Failed:  # its traceback is logged first, down to the layer
        assert "in stop\n" in logged.getvalue()


@pytest.mark.parametrize(
    ("error", "traced"),
    [
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), True),
        (InputError("num_frames=10 is not a frame count this model makes"), False),
        (GpuMemoryError("The GPU ran out of memory while denoising."), False),
        (cog.CancelationException(), False),
    ],
    ids=["fault", "input", "out-of-memory", "cancel"],
)
def test_a_failure_no_message_explains_logs_its_traceback_first(generator, caplog, error, traced):
    """Cog reports a failed prediction's type and text alone, and its traceback is let go of:
    a fault's traceback, down to where it was raised, is in the prediction's log. An error
    whose message says what to do, or a cancel, logs none."""
    layer = stop_in_forward(generator, "transformer", error)
    try:
        with caplog.at_level(logging.ERROR, "cogvideox_cog"), pytest.raises(type(error)):
            generator.predict(_request())
    finally:
        layer.handle.remove()
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prediction")]
    if traced:
        assert len(failed) == 1 and "Traceback (most recent call last)" in failed[0]
        assert "in stop\n" in failed[0] and str(error) in failed[0]
    else:
        assert failed == []


def test_a_completed_render_hands_its_memory_back_after_the_decode(generator, monkeypatch):
    """The pipeline's latents and activations are freed, and on CUDA its cache emptied, once
    the call ends: not only after a failure, or every later prediction starts on a full cache."""
    decoded: list[bool] = []
    hook = generator.pipe.vae.decoder.register_forward_hook(lambda *_: decoded.append(True))
    released_after_decode: list[bool] = []
    release = generator.release_memory

    def recording_release():
        release()
        released_after_decode.append(bool(decoded))

    monkeypatch.setattr(generator, "release_memory", recording_release)
    try:
        generator.render_frames(_request(num_inference_steps=1))
    finally:
        hook.remove()
    assert released_after_decode[-1:] == [True]


def stop_in_forward(generator: VideoGenerator, module: str, error: BaseException):
    """A hook that raises `error` inside a transformer block's or the VAE decoder's forward,
    with a weak reference to the output the forward made, held by its frames alone."""
    target = (
        generator.pipe.transformer.transformer_blocks[0]
        if module == "transformer"
        else generator.pipe.vae.decoder.conv_in
    )

    def stop(module, args, output):
        stop.output = weakref.ref(output[0] if isinstance(output, tuple) else output)
        stop.handle.remove()  # once: the next forward is another prediction's
        raise error

    stop.handle = target.register_forward_hook(stop)
    return stop


def record_releases(generator: VideoGenerator, monkeypatch, layer) -> list[bool]:
    """Whether the stopped layer's output was still alive at each release_memory()."""
    alive: list[bool] = []
    release = generator.release_memory

    def recording_release():
        release()
        alive.append(hasattr(layer, "output") and layer.output() is not None)

    monkeypatch.setattr(generator, "release_memory", recording_release)
    return alive


def test_whole_number_floats_from_json_are_accepted_as_ints(generator):
    video = generator.render_mp4(_request(num_frames=9.0, num_inference_steps=2.0, seed=5.0))
    assert probe_mp4(video)["frames"] == 9


def test_a_generator_without_a_lora_cache_refuses_a_lora_url_as_bad_input(generator):
    with pytest.raises(InputError, match="serves the base model"):
        generator.render_frames(_request(lora_url="https://example.com/a.safetensors"))


def test_a_generator_knows_the_offload_its_pipeline_was_placed_with(tiny_weights):
    """Out-of-memory advice names the next policy, so it must start from the one in use."""
    variant = VARIANTS["cogvideox-5b"]
    offloaded = VideoGenerator(
        variant, build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "model"), CPU
    )
    assert offloaded.offload == "model"


def test_bad_input_is_refused_before_the_pipeline_runs(generator, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the pipeline ran")

    monkeypatch.setattr(type(generator.pipe), "__call__", must_not_run)
    with pytest.raises(InputError, match="num_frames=10"):
        generator.render_mp4(_request(num_frames=10))


def test_prompt_over_the_token_limit_is_truncated_with_a_log_line(generator, caplog):
    long_prompt = " ".join(["a panda plays guitar"] * 80)
    generator.render_mp4(_request(prompt=long_prompt))
    assert "prompt is longer than the text encoder's 226 tokens" in caplog.text


def test_a_very_long_prompt_logs_only_the_start_of_what_is_ignored(generator, caplog):
    long_prompt = "a panda plays guitar " * 450  # close to the 10,000-character cap
    generator.render_mp4(_request(prompt=long_prompt, num_inference_steps=1))
    line = next(r.message for r in caplog.records if "this part is ignored" in r.message)
    assert len(line) < 600 and line.endswith("characters)'")


def test_a_long_negative_prompt_is_not_called_truncated_without_guidance(generator, caplog):
    """At guidance_scale 1 the negative prompt is not encoded: no part of it is "ignored"
    for its length, and a warning saying so would blame the wrong thing."""
    long_negative = " ".join(["blurry, low quality"] * 120)
    generator.render_mp4(
        _request(negative_prompt=long_negative, guidance_scale=1, num_inference_steps=1)
    )
    assert "negative_prompt is longer" not in caplog.text


@pytest.mark.parametrize(
    ("variant_id", "weights", "named"),
    [
        ("cogvideox-5b", "1.0-i2v", "1.0 5B image-to-video model (cogvideox-5b-i2v)"),
        ("cogvideox-5b-i2v", "1.0-t2v", "1.0 5B text-to-video model (cogvideox-5b)"),
        ("cogvideox-5b", "1.5-t2v", "1.5 5B text-to-video model (cogvideox1.5-5b)"),
        ("cogvideox1.5-5b-i2v", "1.0-i2v", "1.0 5B image-to-video model (cogvideox-5b-i2v)"),
        ("cogvideox-5b", "1.0-t2v-2b", "1.0 2B text-to-video model (cogvideox-2b)"),
        ("cogvideox-2b", "1.0-t2v", "1.0 5B text-to-video model (cogvideox-5b)"),
    ],
)
def test_another_variants_weights_are_refused_naming_theirs(
    tiny_weights, variant_id, weights, named
):
    with pytest.raises(VariantError, match=f"the weights are a CogVideoX {re.escape(named)}"):
        build_pipeline(VARIANTS[variant_id], tiny_weights[weights], CPU, "none")


def test_another_tasks_weights_are_refused_without_advising_a_variant_this_predictor_refuses(
    tiny_weights,
):
    """Image-to-video weights under a text-to-video variant: setting COGVIDEOX_MODEL to
    theirs would only get the predictor's refusal of an image-to-video variant."""
    with pytest.raises(VariantError) as raised:
        build_pipeline(VARIANTS["cogvideox-5b"], tiny_weights["1.0-i2v"], CPU, "none")
    message = str(raised.value)
    assert "Set COGVIDEOX_MODEL to the weights' variant" not in message
    assert "They are for predict_i2v.py (cog-i2v.yaml); here, set COGVIDEOX_WEIGHTS_URL" in message


def test_a_setup_given_another_variants_weights_fails_naming_them(tiny_weights, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_MODEL", "cogvideox-5b")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(tiny_weights["1.0-i2v"]))  # used in place
    with pytest.raises(VariantError, match="image-to-video model \\(cogvideox-5b-i2v\\)"):
        VideoGenerator.from_env("t2v")


@pytest.mark.parametrize(
    ("variant_id", "mode"), [("cogvideox-5b", "i2v"), ("cogvideox-5b-i2v", "v2v")]
)
def test_a_variant_is_refused_a_mode_of_another_task_before_its_weights_load(
    tiny_weights, variant_id, mode
):
    variant = VARIANTS[variant_id]
    with pytest.raises(ConfigError, match=f"{variant_id} is a {variant.task} variant and cannot"):
        load_pipeline(variant, tiny_weights["1.0-t2v"], CPU, mode)


def test_offload_is_none_on_cpu_whatever_is_asked():
    for policy in ("auto", "none", "model", "sequential"):
        assert choose_offload(policy, VARIANTS["cogvideox-5b"], CPU) == "none"


@pytest.mark.parametrize("policy", ["none", "model", "sequential"])
def test_an_offload_policy_set_on_a_gpu_is_used_whatever_memory_is_free(policy):
    """Only `auto` reads the GPU's free memory, so this runs on machines without one."""
    assert choose_offload(policy, VARIANTS["cogvideox-5b"], torch.device("cuda")) == policy


def test_model_offload_renders_the_placed_models_frames_prediction_after_prediction(
    generator, tiny_weights
):
    """diffusers takes accelerate's offload hooks off and puts them back after every call, and
    the speed modes' hooks come and go per prediction over them. Offload runs on a CPU when
    given the device, as configure_pipeline gives it (the policy itself is CUDA-only)."""
    variant = VARIANTS["cogvideox-5b"]
    offloaded = VideoGenerator(
        variant, build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "model"), CPU
    )
    assert hasattr(offloaded.pipe.transformer, "_hf_hook")
    for request in (
        _request(),
        _request(speed_mode="faster", num_inference_steps=6),
        _request(speed_mode="fast", num_inference_steps=4),
        _request(guidance_scale=1.0),
        _request(),
    ):
        expected = generator.render_frames(request).frames
        np.testing.assert_allclose(offloaded.render_frames(request).frames, expected, atol=1e-5)


@pytest.mark.parametrize(
    "error", [cog.CancelationException(), RuntimeError("CUDA out of memory")], ids=repr
)
def test_model_offload_puts_the_transformer_back_on_the_cpu_after_a_call_cut_short(
    tiny_weights, monkeypatch, error
):
    """diffusers offloads every model at the end of a call that completes. Cut short in the
    denoise, the transformer stayed on the GPU through the next prediction's text encoding,
    beside the text encoder: over model offload's peak (no hook offloads before the first
    model). The offload hooks' init_hook is what moves a model to the CPU."""
    variant = VARIANTS["cogvideox-5b"]
    offloaded = VideoGenerator(
        variant, build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "model"), CPU
    )
    offloaded_modules = []
    init_hook = CpuOffload.init_hook

    def recording_init_hook(self, module):
        offloaded_modules.append(module)
        return init_hook(self, module)

    def cut_short(step, seconds):
        offloaded_modules.clear()  # the transformer has run: it is on the execution device
        raise error

    monkeypatch.setattr(CpuOffload, "init_hook", recording_init_hook)
    offloaded.on_step = cut_short
    with pytest.raises(type(error)):
        offloaded.render_frames(_request())
    assert any(module is offloaded.pipe.transformer for module in offloaded_modules)


def test_sequential_offload_keeps_every_weight_off_the_device_until_its_layer_runs(tiny_weights):
    """`sequential` is the policy for cards model offload does not fit (16 GB for 5B): no
    whole model is ever placed, only each layer's weights while it runs."""
    variant = VARIANTS["cogvideox-5b"]
    pipe = build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "sequential")
    assert not isinstance(getattr(pipe.transformer, "_hf_hook", None), CpuOffload)
    assert {p.device.type for p in pipe.transformer.parameters()} == {"meta"}


def test_unknown_offload_policy_is_refused():
    with pytest.raises(ValueError, match="COGVIDEOX_OFFLOAD='fast' is not one of auto, none"):
        choose_offload("fast", VARIANTS["cogvideox-5b"], CPU)


@pytest.mark.parametrize("policy", ["model", "sequential"])
def test_an_offload_policy_asked_without_a_gpu_is_dropped_with_a_warning(caplog, policy):
    """The operator set it: say that it does nothing here rather than ignore it silently."""
    with caplog.at_level(logging.WARNING, logger="cogvideox_cog.pipeline"):
        assert choose_offload(policy, VARIANTS["cogvideox-5b"], CPU) == "none"
    assert f"COGVIDEOX_OFFLOAD={policy} needs a CUDA GPU; running without offload" in caplog.text


@pytest.mark.parametrize("policy", ["auto", "none"])
def test_an_offload_policy_that_asks_no_offload_logs_no_warning_without_a_gpu(caplog, policy):
    """`auto` (the default) and `none` get what they ask on a CPU: nothing to warn of."""
    with caplog.at_level(logging.WARNING, logger="cogvideox_cog.pipeline"):
        choose_offload(policy, VARIANTS["cogvideox-5b"], CPU)
    assert not caplog.records


def _gpu_with_free_gib(monkeypatch, free_gib: float, total_gib: float = 80.0) -> torch.device:
    """A CUDA device whose memory query answers `free_gib` free of `total_gib` (bytes, as
    torch.cuda.mem_get_info gives them): the policies' GPU branch, run without a GPU."""
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda device=None: (free_gib * 2**30, total_gib * 2**30)
    )
    return torch.device("cuda")


def test_auto_offload_on_a_gpu_goes_by_its_free_memory_not_its_total(monkeypatch):
    """A 16 GB card's worth free on an 80 GB GPU: what is taken is not there to use."""
    gpu = _gpu_with_free_gib(monkeypatch, free_gib=15.0, total_gib=80.0)
    assert choose_offload("auto", VARIANTS["cogvideox-5b"], gpu) == "sequential"


def test_auto_offload_on_a_gpu_counts_the_whole_frame_decode_vae_tiling_resolved(monkeypatch):
    """32 GiB free hold 5B's tiled peak (28.5 GiB), not its whole-frame one (45 GiB)."""
    gpu = _gpu_with_free_gib(monkeypatch, free_gib=32.0)
    variant = VARIANTS["cogvideox-5b"]
    assert choose_offload("auto", variant, gpu, vae_tiling=True) == "none"
    assert choose_offload("auto", variant, gpu, vae_tiling=False) == "model"


def test_auto_vae_tiling_on_a_gpu_keeps_tiles_at_a_deployments_own_resolution(monkeypatch):
    """79 GiB free untile 5B at its own size; at a resolution the deployment set, never."""
    gpu = _gpu_with_free_gib(monkeypatch, free_gib=79.0)
    variant = VARIANTS["cogvideox-5b"]
    assert choose_vae_tiling("auto", variant, gpu) is False
    assert choose_vae_tiling("auto", variant, gpu, resized=True) is True


def test_frames_match_the_requested_count_for_every_allowed_1_0_value(generator):
    for frames in (9, 17, 25):
        assert probe_mp4(generator.render_mp4(_request(num_frames=frames)))["frames"] == frames


@pytest.mark.parametrize(
    ("variant_id", "free_gib", "policy"),
    [
        ("cogvideox-5b", 79.0, "none"),  # H100 80 GB
        ("cogvideox-5b", 23.5, "model"),  # 24 GB card
        ("cogvideox-5b", 15.0, "sequential"),  # 16 GB card
        ("cogvideox-2b", 23.5, "none"),
        ("cogvideox1.5-5b", 31.0, "model"),  # 32 GB card: 1.5 needs model offload
        ("cogvideox1.5-5b", 23.5, "sequential"),
    ],
)
def test_auto_offload_picks_the_fastest_policy_that_fits_the_measured_peaks(
    variant_id, free_gib, policy
):
    assert offload_for_free_memory(VARIANTS[variant_id], free_gib) == policy


@pytest.mark.parametrize(
    ("variant_id", "none_from_gib", "model_from_gib"),
    [("cogvideox-2b", 22.5, 13.0), ("cogvideox-5b", 28.5, 17.0), ("cogvideox1.5-5b", 34.0, 24.5)],
)
def test_auto_offload_takes_each_policy_from_the_peak_docs_performance_gives(
    variant_id, none_from_gib, model_from_gib
):
    """docs/performance.md's table: each policy from its measured peak + 2 GiB up."""
    variant = VARIANTS[variant_id]
    assert offload_for_free_memory(variant, none_from_gib) == "none"
    assert offload_for_free_memory(variant, none_from_gib - 0.1) == "model"
    assert offload_for_free_memory(variant, model_from_gib) == "model"
    assert offload_for_free_memory(variant, model_from_gib - 0.1) == "sequential"


@pytest.mark.parametrize(
    ("i2v", "t2v"),
    [("cogvideox-5b-i2v", "cogvideox-5b"), ("cogvideox1.5-5b-i2v", "cogvideox1.5-5b")],
)
def test_image_to_video_variants_choose_offload_and_tiling_as_their_text_to_video_model(i2v, t2v):
    """The I2V models were not measured apart: docs/performance.md gives them the t2v figures."""
    for free_gib in (x / 2 for x in range(2 * 80)):
        for tiling in (True, False):
            assert offload_for_free_memory(VARIANTS[i2v], free_gib, tiling) == (
                offload_for_free_memory(VARIANTS[t2v], free_gib, tiling)
            )
        assert tiling_for_free_memory(VARIANTS[i2v], free_gib) == (
            tiling_for_free_memory(VARIANTS[t2v], free_gib)
        )


@pytest.mark.parametrize(
    ("variant_id", "free_gib", "policy"),
    [
        ("cogvideox-5b", 32.0, "model"),  # 28.5 GiB fit the denoise, not the whole-frame decode
        ("cogvideox-5b", 45.0, "none"),
        ("cogvideox-5b", 44.5, "model"),
        ("cogvideox-2b", 23.5, "model"),
    ],
)
def test_auto_offload_counts_the_whole_frame_decode_when_vae_tiling_is_off(
    variant_id, free_gib, policy
):
    assert offload_for_free_memory(VARIANTS[variant_id], free_gib, vae_tiling=False) == policy


@pytest.mark.parametrize(
    ("variant_id", "vae_tiling", "peak_gib"),
    [
        ("cogvideox-5b", True, 28.5),
        ("cogvideox-5b", False, 45.0),  # what auto untiles at, and a resident enhancer's room
        ("cogvideox1.5-5b", False, 34.0),  # the untiled 1.5 decode was never measured
    ],
)
def test_the_no_offload_peak_includes_the_whole_frame_decode(variant_id, vae_tiling, peak_gib):
    assert no_offload_peak_gib(VARIANTS[variant_id], vae_tiling) == peak_gib


def test_compile_is_skipped_on_cpu_with_a_warning(caplog):
    assert choose_compile("1", CPU) is False
    assert "COGVIDEOX_COMPILE=1 is for CUDA GPUs" in caplog.text


def test_compile_is_chosen_on_cuda_only_when_asked():
    cuda = torch.device("cuda")
    assert (choose_compile("1", cuda), choose_compile("0", cuda)) == (True, False)


def test_an_unknown_compile_value_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="COGVIDEOX_COMPILE='yes' is not 0 or 1"):
        choose_compile("yes", CPU)


def test_a_pipeline_configured_compiled_has_its_blocks_compiled(tiny_weights):
    """The branch a GPU takes, run here: compiling is lazy, so nothing is built until a call."""
    variant = VARIANTS["cogvideox-5b"]
    pipe = build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none", compiled=True)
    blocks = pipe.transformer.transformer_blocks
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert is_compiled(pipe.transformer)
    assert not is_compiled(
        build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none").transformer
    )


def test_setup_warm_up_runs_for_image_to_video(tiny_weights):
    """Text-to-video's warm-up runs in the `warmed_up` fixture below, on compiled blocks as
    setup runs it; 1.5 image-to-video's in the last test."""
    variant = VARIANTS["cogvideox-5b-i2v"]
    pipe = build_pipeline(variant, tiny_weights["1.0-i2v"], CPU, "none")
    VideoGenerator(variant, pipe, CPU).warm_up()


@pytest.fixture(scope="module")
def warmed_up(tiny_weights):
    """A compiled transformer after setup's warm-up, and the graphs dynamo then held.

    Compiled here on a CPU with aot_eager (predictors compile on CUDA only, with inductor);
    the graphs and their guards are dynamo's, the same for every backend.
    """
    from torch._dynamo.utils import counters

    variant = VARIANTS["cogvideox-5b"]
    pipe = build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none")
    compile_transformer(pipe.transformer, GUARDS_BACKEND)
    generator = VideoGenerator(variant, pipe, CPU)
    try:
        generator.warm_up()
        yield generator, counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_after_warm_up_no_frame_count_compiles_again(warmed_up):
    """COGVIDEOX_COMPILE's promise: setup compiles, requests do not, whatever num_frames."""
    generator, graphs = warmed_up
    for num_frames in (17, 33):  # the warm-up rendered 49 and 9
        generator.render_frames(_request(num_frames=num_frames, num_inference_steps=1))
    assert _graphs() == graphs


def test_after_warm_up_guidance_1_compiles_nothing(warmed_up):
    # A batch of one, where guidance makes two: torch specialises size 1, so the warm-up
    # renders one such request too.
    generator, graphs = warmed_up
    request = _request(num_frames=17, num_inference_steps=1, guidance_scale=1.0)
    generator.render_frames(request)
    assert _graphs() == graphs


def test_after_warm_up_no_speed_mode_compiles_in_a_request(warmed_up):
    """The speed modes run their blocks eagerly and call the compiled parts, which setup
    compiled: other frame counts, with and without guidance."""
    generator, graphs = warmed_up
    # 4 steps (timesteps 999, 749, 499, 249) pass both modes' computing and reusing branches.
    for mode in ("faster", "fast"):
        for num_frames, guidance in ((17, 6.0), (33, 1.0)):
            fields = dict(num_frames=num_frames, guidance_scale=guidance, num_inference_steps=4)
            generator.render_frames(_request(speed_mode=mode, **fields))
    generator.render_frames(_request(num_frames=25))
    assert _graphs() == graphs


def test_blocks_a_cancel_left_running_eagerly_are_compiled_again_by_the_next_prediction(
    warmed_up,
):
    """Where a cancel inside blocks_run_eagerly's loops would leave them: set aside."""
    generator, graphs = warmed_up
    blocks = generator.pipe.transformer.transformer_blocks
    for block in blocks[:1]:  # a cancel after blocks_run_eagerly set the first one aside
        block._compiled_call_impl = None
    generator.render_frames(_request(num_frames=17, num_inference_steps=1))
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert _graphs() == graphs


@pytest.mark.parametrize("mode", ["fast", "faster"])
def test_a_speed_mode_runs_the_compiled_blocks_eagerly_while_it_predicts(warmed_up, mode):
    """Its hooks would split a compiled block into graphs compiled inside requests; eager
    blocks call the parts setup compiled instead (pipeline.compile_transformer)."""
    generator, _ = warmed_up
    blocks = generator.pipe.transformer.transformer_blocks
    eager_at_steps = []
    generator.on_step = lambda step, seconds: eager_at_steps.append(
        all(block._compiled_call_impl is None for block in blocks)
    )
    try:
        generator.render_frames(_request(speed_mode=mode, num_frames=17, num_inference_steps=2))
    finally:
        generator.on_step = None
    assert eager_at_steps == [True, True]
    assert all(block._compiled_call_impl is not None for block in blocks)


def test_blocks_set_aside_for_a_speed_mode_are_compiled_again_when_it_fails(tiny_weights):
    """A speed mode's prediction that raises (out of memory, a cancel) leaves no block eager."""
    variant = VARIANTS["cogvideox-5b"]
    pipe = build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none", compiled=True)
    with pytest.raises(RuntimeError, match="out of memory"), blocks_run_eagerly(pipe.transformer):
        raise RuntimeError("CUDA out of memory")
    assert all(b._compiled_call_impl is not None for b in pipe.transformer.transformer_blocks)


@pytest.mark.parametrize("mode", ["fast", "faster"])
def test_on_a_compiled_transformer_speed_modes_give_their_eager_frames(
    warmed_up, tiny_weights, mode
):
    variant = VARIANTS["cogvideox-5b"]
    pipe = build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none")
    request = _request(speed_mode=mode, num_inference_steps=4)
    eager = VideoGenerator(variant, pipe, CPU).render_frames(request).frames
    compiled = warmed_up[0].render_frames(request).frames
    np.testing.assert_allclose(compiled, eager, atol=1e-5)


def _1_5_image_to_video(weights, bound_latents: tuple[int, int] | None = None) -> VideoGenerator:
    """The tiny 1.5-I2V; bound_latents: its config's sample_height x sample_width instead."""
    variant = VARIANTS["cogvideox1.5-5b-i2v"]
    pipe = load_pipeline(variant, weights, CPU, "i2v")
    if bound_latents:
        pipe.transformer.register_to_config(
            sample_height=bound_latents[0], sample_width=bound_latents[1]
        )
    pipe = configure_pipeline(pipe, variant, CPU, "none")
    return VideoGenerator(variant, pipe, CPU, "i2v", resolution="48x80")


def test_1_5_image_to_video_makes_portrait_videos_on_a_landscape_rotary_bound(
    tiny_weights, tmp_path
):
    """A config bounding the rotary grid at the training size (48x80 px here, 768x1360 on the
    real model) still renders a portrait image, and a landscape one as before."""
    landscape_bound = _1_5_image_to_video(tiny_weights["1.5-i2v"], bound_latents=(6, 10))
    square_bound = _1_5_image_to_video(tiny_weights["1.5-i2v"])
    portrait, landscape = tmp_path / "portrait.png", tmp_path / "landscape.png"
    Image.new("RGB", (60, 90), (90, 120, 30)).save(portrait)
    Image.new("RGB", (90, 60), (30, 60, 200)).save(landscape)
    quick = {"num_frames": 17, "num_inference_steps": 1}
    video = landscape_bound.render_frames(_request(**quick, image=portrait)).frames
    assert video.shape == (17, 64, 48, 3)  # portrait: the image's 2:3, on the 16 px grid
    np.testing.assert_array_equal(
        landscape_bound.render_frames(_request(**quick, image=landscape)).frames,
        square_bound.render_frames(_request(**quick, image=landscape)).frames,
    )


def test_after_warm_up_no_image_shape_compiles_again_on_1_5_image_to_video(
    tiny_weights, tmp_path, monkeypatch
):
    """CogVideoX1.5-I2V makes the video at the image's aspect ratio: height and width change
    per request, and setup's warm-up must leave them dynamic too."""
    from torch._dynamo.utils import counters

    variant = VARIANTS["cogvideox1.5-5b-i2v"]
    pipe = build_pipeline(variant, tiny_weights["1.5-i2v"], CPU, "none", mode="i2v")
    compile_transformer(pipe.transformer, GUARDS_BACKEND)
    generator = VideoGenerator(variant, pipe, CPU, "i2v", resolution="48x80")
    try:
        generator.warm_up()
        graphs = counters["stats"]["unique_graphs"]
        for (width, height), num_frames in (((90, 60), 17), ((60, 90), 33), ((70, 70), 17)):
            image = tmp_path / f"{width}x{height}.png"
            Image.new("RGB", (width, height), (90, 120, 30)).save(image)
            generator.render_frames(
                _request(num_frames=num_frames, num_inference_steps=1, image=image)
            )
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()


def test_without_guidance_the_negative_prompt_is_not_encoded(generator):
    """At guidance_scale 1 diffusers uses no negative embedding: encoding one costs a text
    encoder call for nothing."""
    calls = []
    hook = generator.pipe.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        generator.render_frames(
            _request(negative_prompt="never encoded", guidance_scale=1, num_inference_steps=1)
        )
    finally:
        hook.remove()
    assert len(calls) == 1  # the prompt alone


def test_the_output_is_named_after_the_variant_and_seed_with_16_random_hex_digits(generator):
    """docs/http-api.md: an upload keeps only the name, and the same seed comes again and
    again, so 64 random bits tell two outputs apart."""
    output = generator.render_mp4(_request(seed=42, num_inference_steps=1))
    assert re.fullmatch(r"cogvideox-5b-42-[0-9a-f]{16}\.mp4", output.name), output.name


def test_a_prompt_a_few_hundred_characters_too_long_logs_only_the_start_of_what_is_ignored(
    generator, caplog
):
    long_prompt = "a panda plays guitar " * 100  # some 900 characters past the 226 tokens
    generator.render_frames(_request(prompt=long_prompt, num_inference_steps=1))
    line = next(r.message for r in caplog.records if "this part is ignored" in r.message)
    assert len(line) < 600 and line.endswith("characters)'")


def test_a_warm_up_leaves_no_folder_behind(generator, monkeypatch, tmp_path):
    """Its folder is claimed like an output's: kept, it would stay in TMPDIR until the
    worker dies and the next setup removes it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    renders = generator.warm_up_renders()[:1]
    monkeypatch.setattr(generator, "warm_up_renders", lambda: renders)
    generator.warm_up()
    assert list(tmp_path.glob(f"{WARM_UP_PREFIX}*")) == []


def test_the_warm_up_key_gives_each_render_at_the_size_it_renders(generator):
    """Only an image's aspect (1.5 image-to-video) turns a render portrait: a key that turned
    a text-to-video one would name shapes its warm-up never compiled."""
    assert generator.warm_up_key() == [
        [49, 48, 80, 6.0, "default", 2],
        [9, 48, 80, 6.0, "default", 2],
        [9, 48, 80, 1.0, "default", 2],
        [49, 48, 80, 6.0, "faster", 4],
        [9, 48, 80, 6.0, "faster", 4],
    ]


def test_a_render_says_its_inputs_were_read_once_and_a_refused_one_never(generator, monkeypatch):
    """A rank tells the group once it has read its inputs (parallel/ranks.py): until then
    the group times its reading of the image or clip, which a refused input never finishes."""
    reads: list[int] = []
    monkeypatch.setattr(generator, "on_inputs_read", lambda: reads.append(1))
    with pytest.raises(InputError, match="num_frames=10"):
        generator.render_frames(_request(num_frames=10))
    assert reads == []
    generator.render_frames(_request(num_inference_steps=1))
    assert reads == [1]


def test_a_cancel_while_a_failed_render_hands_its_memory_back_keeps_none_of_its_tensors(
    generator, monkeypatch
):
    """The cancel's error holds the failure it interrupted (its __context__), and with it the
    failure's traceback and the activations of the layer it stopped in."""
    layer = stop_in_forward(generator, "transformer", RuntimeError("mat1 and mat2 shapes"))
    release = generator.release_memory

    def canceled_once():
        monkeypatch.setattr(generator, "release_memory", release)
        raise cog.CancelationException()

    monkeypatch.setattr(generator, "release_memory", canceled_once)
    try:
        with pytest.raises(cog.CancelationException) as raised:
            generator.predict(_request())
    finally:
        layer.handle.remove()
    assert isinstance(raised.value.__context__, RuntimeError)
    assert layer.output() is None
