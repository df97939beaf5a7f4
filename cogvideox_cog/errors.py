"""Every error the package lets out, each with a message that says what to change.

Who sees them: InputError (and LoraError) and EnhanceError fail one prediction, and the user
reads the message; DeviceLost fails every prediction and the health check until a restart;
the others fail setup, and the operator reads it in the setup log.
Signals that never leave the package (a download over its cap, a deadline) stay beside the
code that raises them.
"""

from __future__ import annotations


class InputError(ValueError):
    """A user input that cannot be served; the message says what to change."""


class LoraError(InputError):
    """The LoRA at lora_url cannot be used; the message says why and what to do."""


class EnhanceError(RuntimeError):
    """enhance_prompt's language model gave no usable rewrite (timeout, HTTP error, garbage,
    empty text). It fails the one prediction, before any denoising: the video is never made
    from a prompt other than the one the request and its seed determine."""


class ConfigError(ValueError):
    """A deployment setting (an environment variable) that cannot work; the message names it."""


class VariantError(ConfigError):
    """COGVIDEOX_MODEL names no variant, or one this predictor cannot serve."""


class WeightsError(RuntimeError):
    """Complete weights could not be provided; the message says what failed and what to do."""


class BadSource(WeightsError):
    """The source's bytes themselves are wrong (unsafe, corrupt, truncated, failing checks):
    what was downloaded is discarded rather than resumed."""


class RankGroupError(RuntimeError):
    """The rank processes of a multi-GPU predictor cannot serve (one failed in setup, died or
    is stuck); the message names the rank and says why."""


class GpuMemoryError(RuntimeError):
    """The GPU ran out of memory in one prediction, one larger than the memory policy was
    chosen for (more frames than the default, a large upscale); the message names the phase
    and the size, and what to change. It fails that prediction only: what it held is freed.
    In setup's compile warm-up it fails setup, and names the settings to change."""


class DeviceLost(RuntimeError):
    """The GPU failed in a way its process cannot recover from (an illegal memory access, a
    device-side assert, an uncorrectable ECC error): CUDA keeps the error, so every later
    prediction would fail the same way. The health check reports it, so the worker is
    restarted; until then each prediction fails at once, naming the first error."""


# Errors whose message already says what happened and what to do: a traceback would only
# bury it. Any other error a prediction raises is a fault of its own, whose traceback is
# what a maintainer needs, and Cog reports only its type and text.
EXPLAINED = (
    InputError,
    EnhanceError,
    ConfigError,
    WeightsError,
    RankGroupError,
    GpuMemoryError,
    DeviceLost,
)


# CUDA's sticky errors, as torch words them: after one, the context is lost for good.
_STICKY_CUDA_ERRORS = (
    "an illegal memory access was encountered",
    "unspecified launch failure",
    "device-side assert triggered",
    "an illegal instruction was encountered",
    "misaligned address",
    "hardware stack error",
    "invalid program counter",
    "uncorrectable ECC error encountered",
    "the launch timed out and was terminated",
)


# How Triton's launcher (the kernels of a compiled transformer) words a failed CUDA call, in a
# plain RuntimeError.
_TRITON_CUDA_ERROR = "Triton Error [CUDA]: "


def loses_the_device(error: BaseException) -> bool:
    """Whether `error` is one of CUDA's sticky errors (out of memory is not). Only the error
    torch raises for a failed CUDA call is read, or the one Triton's launcher raises: any
    other's text may quote what a user sent (a lora_url, an endpoint's reply), and one
    request must not take the server down."""
    import torch  # here: the package's errors are imported where torch is not needed

    text = str(error)
    if isinstance(error, torch.AcceleratorError):
        if "CUDA error" not in text:
            return False
    elif type(error) is not RuntimeError or not text.startswith(_TRITON_CUDA_ERROR):
        return False
    return any(sticky in text for sticky in _STICKY_CUDA_ERRORS)


def device_lost_reason(error: Exception) -> str | None:
    """Why the GPU is lost for good after `error` failed a prediction, or None.

    A kernel's fault often first surfaces under another name: the next cuBLAS or cuDNN call
    fails (`CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling ...`, `cuDNN error:
    CUDNN_STATUS_EXECUTION_FAILED`), a plain RuntimeError that a bad launch on a sound GPU
    raises too. So the GPU is asked: a synchronize of the current device (the generator's, or
    a rank's own) raises the error CUDA kept, if it kept one. Not after an error no lost GPU
    causes (an input, out of memory), nor where CUDA never ran. The first error is named by
    its type: its text may quote a request, and the reason is shown to every later one."""
    import torch  # here, as in loses_the_device

    if loses_the_device(error):
        return _first_line(error)
    if isinstance(error, InputError | GpuMemoryError | DeviceLost | torch.OutOfMemoryError):
        return None
    if not torch.cuda.is_initialized():
        return None
    try:
        torch.cuda.synchronize()
    except Exception as probe:
        if loses_the_device(probe):
            return f"{type(error).__name__} first, then on synchronizing: {_first_line(probe)}"
    return None


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0]
