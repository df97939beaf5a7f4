"""What the benchmark scripts share: the machine they record, the request they render, how
they synchronise and free the device, and how they write results out."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "peft",
    "torchao",
    "tokenizers",
    "av",
    "cog",
    "coglet",
    "numpy",
    "imageio",
    "imageio-ffmpeg",
)


def command_line() -> str:
    """The command as typed from the repository root (no absolute path of the script)."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(ROOT)
    return shlex.join(["python3", str(script), *sys.argv[1:]])


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Python's version, then each package's installed version (None where it is missing)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def nvidia_smi() -> dict[str, str] | None:
    """The first GPU as nvidia-smi reports it; the short query if a field is unknown there."""
    for fields in (
        "name,driver_version,memory.total,power.limit,clocks.max.sm,pcie.link.gen.max",
        "name,driver_version,memory.total",
    ):
        try:
            out = subprocess.run(
                ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if out.strip():
            first = out.strip().splitlines()[0]
            return dict(zip(fields.split(","), (v.strip() for v in first.split(",")), strict=False))
    return None


def environment(device: torch.device) -> dict:
    env = {
        "command": command_line(),
        "versions": versions(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "host_memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        # Other work on the host when the measurement started (1, 5, 15 minute averages).
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda_runtime=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            nvidia_smi=nvidia_smi(),
        )
    return env


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a clock read after it times that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Collect garbage and, on a GPU, release cached blocks and restart the peak statistics, so
    one run's leftovers count neither in the next run's memory nor in its peaks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class HostPeak:
    """Peak resident memory of this process over a block.

    The kernel's high-water mark (VmHWM), reset by writing 5 to /proc/self/clear_refs; where that
    is refused, a psutil sampler every 20 ms.
    """

    def __enter__(self) -> HostPeak:
        self.method, self.peak = "VmHWM", 0
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "psutil sampled every 20 ms"
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.method == "VmHWM":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak = int(line.split()[1]) * 1024
        else:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, psutil.Process().memory_info().rss)


def request_fields(prompt: str, frames: int, steps: int, seed: int, **extra) -> dict:
    """The fields of the request the harnesses render, for `Request(**...)`: the predictor's
    defaults (guidance 6, no negative prompt, the variant's dynamic CFG and fps) at a fixed
    seed, so that every run and every side of a comparison computes the same video."""
    return dict(
        prompt=prompt,
        negative_prompt="",
        num_frames=frames,
        num_inference_steps=steps,
        guidance_scale=6.0,
        use_dynamic_cfg=None,
        fps=None,
        seed=seed,
        **extra,
    )


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.part")
    temp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    temp.replace(path)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


FP8_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with fp8 matmuls


def quantize_fp8(transformer: torch.nn.Module, device: torch.device) -> None:
    """Every Linear of the transformer to torchao's dynamic fp8: float8 weights, activations
    quantised on the fly, one scale per row. diffusers-torchao published this setting
    (`fp8dqrow`) for CogVideoX-5B on an H100 at 76.7 s compiled, against 87.5 s compiled bf16;
    its 75.3 s row (`fp8`) is another one, torchao's earlier `quantize_to_float8`.

    Benchmarks only: the predictors do not quantise until this is measured to pay.
    """
    require_fp8(device, transformer.dtype)
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


def require_fp8(device: torch.device, dtype: torch.dtype) -> None:
    """Exit with the reason before any work if --fp8 cannot run here on a model in `dtype`.

    Per-row scales take bfloat16 weights only: torchao's quantize_ fails on the float16 2B,
    which on a GPU came after minutes of other measurements."""
    if dtype != torch.bfloat16:
        raise SystemExit(f"--fp8 (per-row scales) needs a bfloat16 model, not {dtype}")
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < FP8_CAPABILITY:
        raise SystemExit("--fp8 needs a CUDA GPU of compute capability 8.9 or more (Ada, Hopper)")
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as error:
        raise SystemExit(f"--fp8 needs torchao (pip install torchao==0.18.0): {error}") from None
