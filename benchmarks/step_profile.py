"""Where one denoising step's time goes: torch.profiler over transformer steps, each op's own
time summed into attention, matmul, norm/elementwise and other.

    python3 benchmarks/step_profile.py --variant cogvideox-5b --out DIR

Says which speed-up can pay: attention kernels, fp8 matmuls, or fusing the elementwise ops
(compile). Device time on a GPU, CPU time on a CPU. Writes
DIR/profile-<variant>-<size>.json and the profiler's top-30 table as
DIR/profile-<variant>-<size>.txt. The compiled step's profile comes from a compiled start:
compile_setup.py --profile-steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import environment, synchronize, write_json
from benchmarks.transformer_step import build_step
from cogvideox_cog.variants import VARIANTS

CLASSES = (  # first match wins: op or kernel name fragments, lower case
    ("attention", ("attention", "sdpa", "flash", "fmha", "mha", "softmax")),
    ("matmul", ("mm", "matmul", "linear", "gemm", "cutlass", "sm90", "sm80", "conv")),
    (
        "norm/elementwise",
        ("norm", "add", "mul", "div", "sub", "gelu", "silu", "tanh", "copy", "cat", "elementwise"),
    ),
)


def op_class(name: str) -> str:
    lowered = name.lower()
    for label, fragments in CLASSES:
        if any(fragment in lowered for fragment in fragments):
            return label
    return "other"


def profile_steps(transformer, inputs: dict, steps: int, device: torch.device) -> tuple:
    """One untimed step, then `steps` under the profiler: each op class's own seconds per
    step, and the profiler's top-30 table."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    with torch.no_grad():
        transformer(**inputs)
        synchronize(device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                transformer(**inputs)
            synchronize(device)
    events = prof.key_averages()
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return seconds_by_class(events, steps, cuda), events.table(sort_by=sort_by, row_limit=30)


def seconds_by_class(events, steps: int, cuda: bool) -> dict[str, float]:
    """Each op class's own seconds per step, from the profiler's averaged events.

    On a GPU the profiler lists every kernel twice: as a device row under its kernel name, and
    inside the self device time of the op that launched it (aten::addmm, a compiled graph's
    triton_* launch). The kernel names do not classify (cuBLAS's Hopper GEMMs are nvjet_*), so
    the time is summed over the launching ops, and kernels that no op launched count as other.
    """
    seconds: dict[str, float] = {label: 0.0 for label, _ in CLASSES} | {"other": 0.0}
    attribute = "self_device_time_total" if cuda else "self_cpu_time_total"
    kernels = launched = 0.0
    for event in events:
        own = getattr(event, attribute, 0) or 0
        if own <= 0 or event.key.startswith("ProfilerStep"):
            continue
        if cuda and event.device_type != DeviceType.CPU:
            kernels += own
            continue
        launched += own
        seconds[op_class(event.key)] += own / 1e6 / steps
    seconds["other"] += max(kernels - launched, 0.0) / 1e6 / steps
    return seconds


def write_profile(out: Path, name: str, record: dict, seconds: dict, table: str, device) -> None:
    """DIR/<name>.json (the record, time by class and fraction) and DIR/<name>.txt (table)."""
    total = sum(seconds.values())
    write_json(
        out / f"{name}.json",
        record
        | {
            "time": "device" if device.type == "cuda" else "cpu",
            "step_s_by_class": {k: round(v, 5) for k, v in seconds.items()},
            "fraction_by_class": {k: round(v / total, 4) for k, v in seconds.items()},
            "environment": environment(device),
        },
    )
    (out / f"{name}.txt").write_text(table)
    print({k: f"{v / total:.0%}" for k, v in seconds.items()}, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="cogvideox-5b")
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps, after one warm-up")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    transformer, inputs, shape = build_step(args, VARIANTS[args.variant], device)
    seconds, table = profile_steps(transformer, inputs, args.steps, device)
    record = {
        "variant": args.variant,
        "size": args.size,
        "compiled": False,
        "shape": "x".join(map(str, shape)) + ", CFG batch 2",
    }
    write_profile(args.out, f"profile-{args.variant}-{args.size}", record, seconds, table, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
