"""A GPU that fails for good in a prediction (CUDA's sticky errors, injected into the tiny
pipeline as torch raises them): the health check says so, so the worker is restarted, and
each prediction until then fails at once instead of running into the same error.

Where the first error is not one of them, the GPU is synchronized and its answer decides;
CUDA never runs here, so its answer is given at that boundary (torch.cuda's own functions)."""

from __future__ import annotations

import dataclasses
import logging
import threading

import cog
import pytest
import torch

from cogvideox_cog.errors import DeviceLost, EnhanceError, InputError, loses_the_device
from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.lora.store import LoraCache
from cogvideox_cog.parallel.protocol import Failed, Render
from cogvideox_cog.parallel.ranks import _render
from cogvideox_cog.pipeline import build_pipeline
from cogvideox_cog.variants import VARIANTS
from tests.lora_files import served_lora

CPU = torch.device("cpu")
ILLEGAL_ACCESS = (
    "CUDA error: an illegal memory access was encountered\n"
    "CUDA kernel errors might be asynchronously reported at some other API call, so the "
    "stacktrace below might be incorrect."
)
# How torch words a cuBLAS call that failed (TORCH_CUDABLAS_CHECK): a plain RuntimeError,
# which a kernel's earlier fault and a bad launch alike can cause.
CUBLAS_FAILED = (
    "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, opa, opb, "
    "m, n, k, &falpha, a, CUDA_R_16BF, lda, b, CUDA_R_16BF, ldb, &fbeta, c, CUDA_R_16BF, ldc, "
    "compute_type, CUBLAS_GEMM_DEFAULT_TENSOR_OP)`"
)
REQUEST = Request("a cat walks", "", 9, 1, 6.0, None, None, 5)


@pytest.fixture
def generator(tiny_weights) -> VideoGenerator:
    variant = VARIANTS["cogvideox-5b"]
    return VideoGenerator(
        variant, build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none"), CPU
    )


def _fail_transformer(generator: VideoGenerator, error: Exception) -> list[int]:
    """Every transformer call raises `error`; returns the list its calls are counted in."""
    calls: list[int] = []

    def fail(module, args, kwargs):
        calls.append(1)
        raise error

    generator.pipe.transformer.register_forward_pre_hook(fail, with_kwargs=True)
    return calls


def _gpu_answering(monkeypatch, error: Exception | None) -> list[int]:
    """CUDA is in use, and synchronizing the GPU raises `error` (None: the GPU is sound);
    returns the list its synchronizes are counted in."""
    synchronizes: list[int] = []

    def synchronize(device=None):
        synchronizes.append(1)
        if error is not None:
            raise error

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    return synchronizes


def test_a_sticky_cuda_error_makes_the_health_check_fail_naming_it(generator):
    _fail_transformer(generator, torch.AcceleratorError(ILLEGAL_ACCESS))
    with pytest.raises(torch.AcceleratorError):
        generator.predict(REQUEST)
    with pytest.raises(DeviceLost, match="an illegal memory access was encountered"):
        generator.healthcheck()


def test_the_health_check_names_the_sticky_errors_first_line_alone(generator):
    """Every later prediction repeats the reason: CUDA's advice under it is noise there."""
    _fail_transformer(generator, torch.AcceleratorError(ILLEGAL_ACCESS))
    with pytest.raises(torch.AcceleratorError):
        generator.predict(REQUEST)
    with pytest.raises(DeviceLost) as raised:
        generator.healthcheck()
    assert "(CUDA error: an illegal memory access was encountered);" in str(raised.value)
    assert "asynchronously" not in str(raised.value)


def test_after_a_sticky_cuda_error_a_prediction_fails_before_touching_the_gpu(generator):
    calls = _fail_transformer(generator, torch.AcceleratorError(ILLEGAL_ACCESS))
    with pytest.raises(torch.AcceleratorError):
        generator.predict(REQUEST)
    with pytest.raises(DeviceLost, match="until the worker restarts"):
        generator.predict(REQUEST)
    assert len(calls) == 1


def test_after_a_sticky_cuda_error_a_prediction_says_so_without_asking_the_gpu_again(
    generator, monkeypatch
):
    """A failed prediction hands its memory back; on a lost GPU that CUDA call would fail
    too, and its error would replace the one that says to restart the worker."""
    _fail_transformer(generator, torch.AcceleratorError(ILLEGAL_ACCESS))
    with pytest.raises(torch.AcceleratorError):
        generator.predict(REQUEST)

    def release_on_a_lost_gpu():
        raise torch.AcceleratorError(ILLEGAL_ACCESS)

    monkeypatch.setattr(generator, "release_memory", release_on_a_lost_gpu)
    with pytest.raises(DeviceLost, match="until the worker restarts"):
        generator.predict(REQUEST)


def test_after_a_sticky_cuda_error_the_check_before_an_input_is_fetched_fails(generator):
    """The image and video predictors check a request before they fetch its input (up to
    COGVIDEOX_INPUT_TIMEOUT): a lost GPU fails it there, as a multi-GPU group's does."""
    _fail_transformer(generator, torch.AcceleratorError(ILLEGAL_ACCESS))
    with pytest.raises(torch.AcceleratorError):
        generator.predict(REQUEST)
    with pytest.raises(DeviceLost, match="until the worker restarts"):
        generator.check(REQUEST)


def test_after_a_sticky_cuda_error_each_prediction_logs_no_traceback_of_its_own(generator, caplog):
    """DeviceLost's message says what happened and what to do: a traceback per prediction,
    each the same few frames, would bury the first error's in the log."""
    _fail_transformer(generator, torch.AcceleratorError(ILLEGAL_ACCESS))
    with pytest.raises(torch.AcceleratorError):
        generator.predict(REQUEST)
    caplog.clear()
    with caplog.at_level(logging.ERROR, "cogvideox_cog"), pytest.raises(DeviceLost):
        generator.predict(REQUEST)
    assert [r.getMessage() for r in caplog.records if "Traceback" in r.getMessage()] == []


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
        torch.AcceleratorError("CUDA error: invalid argument"),
    ],
    ids=["out of memory", "a bug", "a cuda error that is not sticky"],
)
def test_other_errors_leave_the_worker_healthy(generator, error):
    _fail_transformer(generator, error)
    with pytest.raises(RuntimeError):  # each case's own, or GpuMemoryError for memory
        generator.predict(REQUEST)
    assert generator.healthcheck() is True


@pytest.mark.parametrize(
    "text",
    [
        "CUDA error: device-side assert triggered",
        "CUDA error: unspecified launch failure",
        "CUDA error: uncorrectable ECC error encountered",
        "CUDA error: an illegal instruction was encountered",
        "CUDA error: misaligned address",
        "CUDA error: hardware stack error",
        "CUDA error: invalid program counter",
        "CUDA error: the launch timed out and was terminated",
    ],
)
def test_cudas_other_sticky_errors_lose_the_device(text):
    assert loses_the_device(torch.AcceleratorError(text))


def test_a_sticky_cuda_error_while_loading_a_lora_makes_the_health_check_fail(
    tiny_weights, tmp_path, monkeypatch
):
    """The LoRA's load is often a prediction's first GPU work: an error CUDA kept from before
    surfaces there, and taken for the LoRA's fault it failed each request for that LoRA."""
    variant = VARIANTS["cogvideox-5b"]
    pipe = build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none")
    cache = LoraCache(tmp_path / "cache", 1 << 30, 1 << 30, timeout_s=30)
    generator = VideoGenerator(variant, pipe, CPU, lora_cache=cache)

    def fail(*args, **kwargs):
        raise torch.AcceleratorError(ILLEGAL_ACCESS)

    monkeypatch.setattr(pipe, "load_lora_into_transformer", fail)
    transformer = tiny_weights["1.0-t2v"] / "transformer"
    with (
        served_lora(transformer, tmp_path / "lora", seed=1) as url,
        pytest.raises(torch.AcceleratorError),
    ):
        generator.predict(dataclasses.replace(REQUEST, lora_url=url))
    with pytest.raises(DeviceLost, match="an illegal memory access was encountered"):
        generator.healthcheck()


def test_a_sticky_cuda_error_a_compiled_kernels_launch_reports_loses_the_device():
    """With COGVIDEOX_COMPILE=1 the transformer runs Triton's kernels, and Triton's launcher
    reports the error CUDA kept as a plain RuntimeError of its own wording."""
    assert loses_the_device(
        RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")
    )


def test_an_error_of_the_package_quoting_tritons_words_leaves_the_worker_healthy():
    """An EnhanceError (a RuntimeError) quotes the endpoint's reply, which anyone can word."""
    text = "Triton Error [CUDA]: an illegal memory access was encountered"
    assert not loses_the_device(EnhanceError(text))
    assert not loses_the_device(RuntimeError(f"the endpoint said: {text}"))


def test_an_input_error_quoting_a_sticky_cuda_error_leaves_the_worker_healthy(
    tiny_weights, tmp_path
):
    """A LoraError quotes the lora_url it refuses: any user could send that text and take the
    server out of service until it restarted, a multi-GPU group too."""
    variant = VARIANTS["cogvideox-5b"]
    pipe = build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none")
    cache = LoraCache(tmp_path, 1 << 20, 1 << 30, timeout_s=30)
    generator = VideoGenerator(variant, pipe, CPU, lora_cache=cache)
    request = dataclasses.replace(REQUEST, lora_url=f"CUDA error: {ILLEGAL_ACCESS}")
    with pytest.raises(InputError, match="illegal memory access"):
        generator.predict(request)
    assert generator.healthcheck() is True
    assert not loses_the_device(RuntimeError(ILLEGAL_ACCESS))  # text alone is not torch's


def test_a_failure_after_which_the_gpu_reports_a_sticky_error_makes_the_health_check_fail(
    generator, monkeypatch
):
    """A kernel's fault first surfaces as the next cuBLAS call's failure: synchronizing then
    raises the error CUDA kept."""
    _fail_transformer(generator, RuntimeError(CUBLAS_FAILED))
    _gpu_answering(monkeypatch, torch.AcceleratorError(ILLEGAL_ACCESS))
    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_EXECUTION_FAILED"):
        generator.predict(REQUEST)
    said = "RuntimeError first, then on synchronizing: CUDA error: an illegal memory access"
    with pytest.raises(DeviceLost, match=said):
        generator.healthcheck()


def test_a_failure_after_which_the_gpu_synchronizes_leaves_the_worker_healthy(
    generator, monkeypatch
):
    """A cuBLAS failure from a bad launch leaves the GPU sound: its text alone does not decide."""
    _fail_transformer(generator, RuntimeError(CUBLAS_FAILED))
    synchronizes = _gpu_answering(monkeypatch, None)
    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_EXECUTION_FAILED"):
        generator.predict(REQUEST)
    assert generator.healthcheck() is True
    assert len(synchronizes) == 1


def test_a_failure_after_which_synchronizing_fails_without_a_sticky_error_leaves_it_healthy(
    generator, monkeypatch
):
    """Only CUDA's kept errors lose the GPU: another error on synchronizing says nothing of
    the device's state."""
    _fail_transformer(generator, RuntimeError(CUBLAS_FAILED))
    _gpu_answering(monkeypatch, torch.AcceleratorError("CUDA error: invalid argument"))
    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_EXECUTION_FAILED"):
        generator.predict(REQUEST)
    assert generator.healthcheck() is True


def test_a_failure_where_cuda_never_ran_does_not_synchronize(generator, monkeypatch):
    """On the CPU, CUDA is never initialized: a synchronize would start it."""
    _fail_transformer(generator, RuntimeError(CUBLAS_FAILED))
    synchronizes = _gpu_answering(monkeypatch, torch.AcceleratorError(ILLEGAL_ACCESS))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_EXECUTION_FAILED"):
        generator.predict(REQUEST)
    assert synchronizes == []


@pytest.mark.parametrize(
    ("error", "raised"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."), RuntimeError),
        (InputError("the video came out as NaN: the LoRA's weights overflow"), InputError),
        (cog.CancelationException(), cog.CancelationException),
    ],
    ids=["out of memory", "an input error", "a cancel"],
)
def test_errors_no_lost_gpu_causes_do_not_synchronize(generator, monkeypatch, error, raised):
    """Out of memory is not sticky, an input is the user's, and a cancel must stay fast."""
    _fail_transformer(generator, error)
    synchronizes = _gpu_answering(monkeypatch, torch.AcceleratorError(ILLEGAL_ACCESS))
    with pytest.raises(raised):
        generator.predict(REQUEST)
    assert synchronizes == []
    assert generator.healthcheck() is True


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_reports_its_gpu_lost_when_synchronizing_raises_a_sticky_error(
    generator, monkeypatch, rank
):
    """Only the rank's own process can ask its GPU: its Failed carries the answer to the
    group (rank 0 renders the video, the others only denoise)."""
    _fail_transformer(generator, RuntimeError(CUBLAS_FAILED))
    _gpu_answering(monkeypatch, torch.AcceleratorError(ILLEGAL_ACCESS))
    outcome = _render(generator, rank, Render(REQUEST), threading.Event())
    assert isinstance(outcome, Failed)
    assert outcome.device_lost == (
        "RuntimeError first, then on synchronizing: CUDA error: an illegal memory access was "
        "encountered"
    )
