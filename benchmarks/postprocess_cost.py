"""upscale and interpolate, side by side with the prediction they follow: seconds and FLOPs.

One tiny CogVideoX prediction (the test model, 48x80) is rendered by the predictor's own code
(VideoGenerator.render_mp4): the base. Its decoded frames then go through each step with
RIFE and Real-ESRGAN at their released sizes (IFNet widths 192..32; RRDBNet 64 features, 23
blocks), random weights: time does not depend on the values. Reported per step: the seconds
of the step, the extra seconds of the mp4 encode (more or larger frames), and the FLOPs
counted by torch's FlopCounterMode on one model call, scaled to 49 frames at 480x720 (the work
is per pixel, so it scales with the pixel count; labelled a projection).

    python3 benchmarks/postprocess_cost.py --out benchmarks/results/cpu/postprocess

GPU seconds and GPU memory at full size are not measured by this run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import command_line, environment, markdown_table, request_fields
from benchmarks.common import write_json as write_record
from cogvideox_cog.devtools.tiny import build_tiny_pipeline
from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.media.mp4 import encode_mp4
from cogvideox_cog.pipeline import configure_pipeline
from cogvideox_cog.postprocess import Postprocessor, Steps
from cogvideox_cog.postprocess.rife import IFNet
from cogvideox_cog.postprocess.rrdbnet import RRDBNet
from cogvideox_cog.variants import VARIANTS

FULL_FRAMES, FULL_H, FULL_W = 49, 480, 720
STEPS = {
    "upscale 2x": Steps(upscale=2),
    "upscale 4x": Steps(upscale=4),
    "interpolate 2x": Steps(interpolate=2),
    "interpolate 4x": Steps(interpolate=4),
    "upscale 2x + interpolate 2x": Steps(interpolate=2, upscale=2),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def base_prediction(frames: int, steps: int, out: Path) -> tuple[float, np.ndarray, float]:
    """(seconds of render_mp4, the decoded frames, seconds of their mp4 encode)."""
    variant = VARIANTS["cogvideox-5b"]
    cpu = torch.device("cpu")
    pipe = configure_pipeline(build_tiny_pipeline("1.0", "t2v"), variant, cpu, "none", False)
    generator = VideoGenerator(variant, pipe, cpu)
    request = Request(**request_fields("a panda plays guitar", frames, steps, 42))
    started = time.perf_counter()
    generator.render_mp4(request)
    seconds = time.perf_counter() - started
    video = generator.render_frames(request)
    return seconds, video.frames, _encode_seconds(video.frames, out / "base.mp4")


def _encode_seconds(frames: np.ndarray, path: Path) -> float:
    started = time.perf_counter()
    encode_mp4(frames, path, fps=8)
    return time.perf_counter() - started


def flops_at_full_size(interpolator: IFNet, upscaler: RRDBNet, height: int, width: int) -> dict:
    """FLOPs of one call of each model at this size, scaled to 49 frames at 480x720."""
    image = torch.rand(1, 3, height, width)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        upscaler(image)
    per_frame = counter.get_total_flops() * (FULL_H * FULL_W) / (height * width)
    pad = (-(-height // 64) * 64, -(-width // 64) * 64)
    padded = torch.rand(1, 3, *pad)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        interpolator(padded, padded, torch.full((1, 1, *pad), 0.5))
    full_pad = (-(-FULL_H // 64) * 64) * (-(-FULL_W // 64) * 64)
    per_middle = counter.get_total_flops() * full_pad / (pad[0] * pad[1])
    pairs = FULL_FRAMES - 1
    return {
        "upscale_tflop_per_frame": per_frame / 1e12,
        "upscale_tflop_49_frames": FULL_FRAMES * per_frame / 1e12,
        "interpolate_tflop_per_new_frame": per_middle / 1e12,
        "interpolate_2x_tflop": pairs * per_middle / 1e12,
        "interpolate_4x_tflop": 3 * pairs * per_middle / 1e12,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    base_seconds, frames, base_encode = base_prediction(args.frames, args.steps, args.out)
    postprocessor = Postprocessor(IFNet(), RRDBNet(), cpu)
    rows = []
    for name, steps in STEPS.items():
        started = time.perf_counter()
        result = postprocessor.apply(frames, 8, steps).array()
        seconds = time.perf_counter() - started
        encode = _encode_seconds(result, args.out / "step.mp4") - base_encode
        rows.append(
            {
                "step": name,
                "seconds": seconds,
                "extra_encode_seconds": encode,
                "frames": len(result),
                "height": result.shape[1],
                "width": result.shape[2],
            }
        )
    (args.out / "base.mp4").unlink()
    (args.out / "step.mp4").unlink()
    record = {
        "command": command_line(),
        "environment": environment(cpu),
        "base": {
            "seconds": base_seconds,
            "frames": len(frames),
            "height": frames.shape[1],
            "width": frames.shape[2],
            "steps": args.steps,
        },
        "steps": rows,
        "projection_full_size": flops_at_full_size(
            postprocessor.interpolator, postprocessor.upscaler, *frames.shape[1:3]
        ),
    }
    write_record(args.out / "postprocess_cost.json", record)
    (args.out / "results.md").write_text(report(record))
    print(report(record))
    return 0


def report(record: dict) -> str:
    base = record["base"]
    header = ["step", "output", "step s", "extra encode s", "added, x base prediction"]
    rows = [
        [
            "base prediction",
            f"{base['frames']} x {base['width']}x{base['height']}",
            f"{base['seconds']:.2f}",
            "-",
            "1",
        ]
    ]
    for row in record["steps"]:
        added = row["seconds"] + row["extra_encode_seconds"]
        rows.append(
            [
                row["step"],
                f"{row['frames']} x {row['width']}x{row['height']}",
                f"{row['seconds']:.2f}",
                f"{row['extra_encode_seconds']:.2f}",
                f"{added / base['seconds']:.1f}",
            ]
        )
    projection = record["projection_full_size"]
    lines = [
        f"# upscale and interpolate on the CPU at {base['width']}x{base['height']}",
        "",
        f"Base: the tiny CogVideoX, {base['frames']} frames, {base['steps']} steps, on the CPU. "
        "RIFE and Real-ESRGAN at their released sizes, random weights.",
        "",
        markdown_table(header, rows),
        "",
        "Projection (FLOPs counted at this size, scaled by pixels to 49 frames at 480x720; "
        "not a measurement of time):",
        "",
        f"- upscale (x4 model, 2x and 4x alike): {projection['upscale_tflop_49_frames']:.0f} "
        f"TFLOP ({projection['upscale_tflop_per_frame']:.1f} a frame)",
        f"- interpolate 2x: {projection['interpolate_2x_tflop']:.1f} TFLOP, 4x: "
        f"{projection['interpolate_4x_tflop']:.1f} TFLOP (at 480x720; after a 4x upscale, "
        "16 times that)",
        "- CogVideoX-5B itself, 50 steps at 480x720x49: about 33,000 TFLOP (about 330 a "
        "transformer forward, two forwards a step with guidance).",
        "",
        f"Command: `{record['command']}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
