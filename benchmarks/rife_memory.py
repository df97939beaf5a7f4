"""interpolate's device memory at full size: RIFE's tensors for one frame pair, measured on
the CPU in fp16 and extrapolated by pixel count. Not a GPU measurement.

interpolate works pair by pair: the k - 1 new frames between two frames are one batch through
IFNet, at the frame size padded to multiples of 64. Its memory therefore depends on the frame
size and the factor, not on the frame count. This script runs `rife.interpolate` on one pair
at a few sizes a CPU runs in seconds, in fp16 as on a GPU (release-size IFNet, random
weights: the tensors' sizes do not depend on the values), and takes the peak from
torch.profiler's allocation events. It fits bytes = fixed + per_pixel * padded pixels for
each factor, and extrapolates to the predictors' sizes, upscaled or not.

Counted: every tensor the code makes, from the pair's frames on the device to the new frames.
Reported apart: buffers an op frees before it returns, which belong to the CPU's kernels
(fp16 convolutions there use im2col); on a GPU, cuDNN's workspace takes their place and is
not measured here. Also measured: that a longer video's pairs, one after another, peak no
higher than one pair; and what `upscale` keeps on the device, besides the frame it gave,
while interpolate works on that frame.

    python3 benchmarks/rife_memory.py --out benchmarks/results/cpu/postprocess
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import command_line, environment, markdown_table
from benchmarks.common import write_json as write_record
from cogvideox_cog.postprocess import rife, rrdbnet

CPU = torch.device("cpu")
DTYPE = torch.float16  # as Postprocessor runs both models on a GPU
FACTORS = (2, 4)
UPSCALES = (1, 2, 4)
DEFAULT_SIZES = ((128, 192), (240, 360), (320, 576))
# The predictors' default sizes (docs/variants.md): frames do not change the figures.
VIDEOS = (("1.0, 49 x 480x720", 480, 720), ("1.5, 81 x 768x1360", 768, 1360))
FRAME_COUNTS = (2, 5)  # one pair, then four, at the smallest size
GIB = 1024**3


def allocation_peaks(prof: profile) -> tuple[int, int]:
    """(tensors, everything): the most bytes allocated at once during the profile, relative
    to its start, without and with the buffers an op frees before it returns."""
    allocations = _allocations(prof)
    live, op_buffers = {}, set()
    for index, (when, size, pointer, _) in enumerate(allocations):
        if size > 0:
            live[pointer] = index
        elif pointer in live:
            made = live.pop(pointer)
            op_end = allocations[made][3]
            if op_end is not None and when <= op_end:
                op_buffers.update((made, index))
    tensors = everything = tensors_peak = everything_peak = 0
    for index, (_, size, _, _) in enumerate(allocations):
        everything += size
        everything_peak = max(everything_peak, everything)
        if index not in op_buffers:
            tensors += size
            tensors_peak = max(tensors_peak, tensors)
    return tensors_peak, everything_peak


def _allocations(prof: profile) -> list[tuple[int, int, int, int | None]]:
    """(time, bytes, address, end of the top-level op it happened in) of each CPU allocation
    (bytes > 0) and release (< 0), in time order. A release outside any op has no end."""
    found = []
    for root in prof.profiler.kineto_results.experimental_event_tree():
        op_end = root.end_time_ns if root.typed[0] != _EventType.Allocation else None
        stack = [root]
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
                fields = node.typed[1]
                found.append((node.start_time_ns, fields.alloc_size, fields.ptr, op_end))
    return sorted(found, key=lambda allocation: allocation[0])


def padded_pixels(height: int, width: int) -> int:
    multiple = rife.PAD_MULTIPLE
    return (-(-height // multiple) * multiple) * (-(-width // multiple) * multiple)


def pair_peak(model: rife.IFNet, height: int, width: int, factor: int, count: int = 2) -> dict:
    """`count` frames (one pair by default) through `rife.interpolate`, 8-bit frames as
    `upscale` gives them, each new frame dropped once read, as the encoder does."""
    shape = (count, height, width, 3)
    frames = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in rife.interpolate(model, frames, len(frames), factor, CPU, DTYPE):
            pass
    seconds = time.perf_counter() - started
    tensors, everything = allocation_peaks(prof)
    return {
        "height": height,
        "width": width,
        "factor": factor,
        "frames": count,
        "padded_pixels": padded_pixels(height, width),
        "tensor_bytes": tensors,
        "with_op_buffers_bytes": everything,
        "seconds": round(seconds, 2),
    }


def upscale_held(height: int, width: int, factor: int) -> dict:
    """Bytes `rrdbnet.upscale` keeps, besides the frame it gave, while that frame is
    interpolated: tensors at the output size whatever the network's depth, so one block
    shows them. The frame itself is not counted: on a GPU `.cpu()` copies it to the host,
    while on a CPU the frame's array is the tensor's own memory."""
    frames = np.random.default_rng(0).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    upscaler = rrdbnet.RRDBNet(blocks=1).eval().to(DTYPE)
    made = rrdbnet.upscale(upscaler, frames, factor, CPU, DTYPE)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        frame = next(made)
    held = sum(size for _, size, _, _ in _allocations(prof)) - frame.nbytes
    made.close()
    return {
        "height": height,
        "width": width,
        "factor": factor,
        "output_pixels": frame.shape[0] * frame.shape[1],
        "frame_bytes": frame.nbytes,
        "held_bytes": held,
    }


def fit(pairs: list[dict], factor: int) -> dict:
    """bytes = fixed + per_pixel * padded pixels, least squares over the sizes measured."""
    measured = [pair for pair in pairs if pair["factor"] == factor]
    pixels = np.array([pair["padded_pixels"] for pair in measured], dtype=float)
    tensors = np.array([pair["tensor_bytes"] for pair in measured], dtype=float)
    per_pixel, fixed = np.polyfit(pixels, tensors, 1)
    misfit = np.abs(fixed + per_pixel * pixels - tensors) / tensors
    return {
        "factor": factor,
        "per_padded_pixel_bytes": float(per_pixel),
        "fixed_bytes": float(fixed),
        "largest_misfit": float(misfit.max()),
    }


def projections(fits: dict[int, dict], held: dict[int, dict]) -> list[dict]:
    """The fits and the upscale's held bytes at the predictors' sizes."""
    rows = []
    for video, height, width in VIDEOS:
        for upscale in UPSCALES:
            out_h, out_w = height * upscale, width * upscale
            kept = 0.0
            if upscale > 1:
                per_pixel = held[upscale]["held_bytes"] / held[upscale]["output_pixels"]
                kept = per_pixel * out_h * out_w
            pixels = padded_pixels(out_h, out_w)
            row = {"video": video, "upscale": upscale, "height": out_h, "width": out_w}
            row |= {"padded_pixels": pixels, "upscale_held_bytes": kept}
            for factor, line in fits.items():
                pair = line["fixed_bytes"] + line["per_padded_pixel_bytes"] * pixels
                row[f"interpolate_{factor}x_bytes"] = pair + kept
            rows.append(row)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=DEFAULT_SIZES,
        help="HEIGHTxWIDTH,... measured (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(side) for side in size.split("x")) for size in text.split(","))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = rife.IFNet().eval().to(DTYPE)
    pairs = []
    for height, width in args.sizes:
        for factor in FACTORS:
            pairs.append(pair_peak(model, height, width, factor))
            print(pairs[-1], flush=True)
    smallest = min(args.sizes, key=lambda size: size[0] * size[1])
    videos = []
    for factor in FACTORS:
        for count in FRAME_COUNTS:
            videos.append(pair_peak(model, *smallest, factor, count))
            print(videos[-1], flush=True)
    held = {factor: upscale_held(*(side // 4 for side in smallest), factor) for factor in (2, 4)}
    fits = {factor: fit(pairs, factor) for factor in FACTORS}
    record = {
        "command": command_line(),
        "environment": environment(CPU),
        "dtype": str(DTYPE),
        "pairs": pairs,
        "frame_counts": videos,
        "fits": list(fits.values()),
        "upscale_held": list(held.values()),
        "projections": projections(fits, held),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_record(args.out / "rife-memory.json", record)
    (args.out / "rife-memory.md").write_text(report(record))
    print(report(record))
    return 0


def report(record: dict) -> str:
    measured = [
        [
            f"{pair['width']}x{pair['height']}",
            str(pair["padded_pixels"]),
            f"{pair['factor']}x",
            f"{pair['tensor_bytes'] / 2**20:.1f}",
            f"{pair['tensor_bytes'] / pair['padded_pixels']:.0f}",
            f"{pair['with_op_buffers_bytes'] / 2**20:.1f}",
            f"{pair['seconds']:.1f}",
        ]
        for pair in record["pairs"]
    ]
    fits = [
        f"- interpolate {line['factor']}x: {line['per_padded_pixel_bytes']:.1f} bytes a padded "
        f"pixel, {line['fixed_bytes'] / 2**20:+.2f} MiB fixed (largest misfit "
        f"{100 * line['largest_misfit']:.2f}%)"
        for line in record["fits"]
    ]
    held = [
        f"- upscale {kept['factor']}x: {kept['held_bytes'] / kept['output_pixels']:.1f} bytes "
        "an output pixel"
        for kept in record["upscale_held"]
    ]
    counts = [
        [
            f"{video['width']}x{video['height']}",
            f"{video['factor']}x",
            str(video["frames"]),
            str(rife.interpolated_count(video["frames"], video["factor"])),
            f"{video['tensor_bytes'] / 2**20:.2f}",
        ]
        for video in record["frame_counts"]
    ]
    projected = [
        [
            row["video"],
            "none" if row["upscale"] == 1 else f"{row['upscale']}x",
            f"{row['width']}x{row['height']}",
            f"{row['upscale_held_bytes'] / GIB:.2f}",
            *(f"{row[f'interpolate_{factor}x_bytes'] / GIB:.2f}" for factor in FACTORS),
        ]
        for row in record["projections"]
    ]
    header = ["frames", "padded pixels", "interpolate", "tensors, MiB", "bytes a padded pixel"]
    header += ["with the CPU kernels' own buffers, MiB", "seconds"]
    lines = [
        "# interpolate's device memory, measured on the CPU in fp16",
        "",
        "One frame pair through `rife.interpolate` (release-size IFNet, random weights, fp16 "
        "as on a GPU): the most bytes of tensors alive at once, from torch.profiler's "
        "allocation events, relative to the start (the model's weights not included). "
        "Buffers an op frees before it returns (im2col of the CPU's fp16 convolutions) are "
        "in the next column only; a GPU has cuDNN's workspace instead, not measured here.",
        "",
        markdown_table(header, measured),
        "",
        "Fitted, bytes = fixed + per pixel x padded pixels:",
        "",
        *fits,
        "",
        "More frames, one pair after another, each new frame dropped once read as the "
        "encoder does: the peak is one pair's, whatever the frame count (only the pair being "
        "interpolated is on the device):",
        "",
        markdown_table(
            ["frames", "interpolate", "frames in", "frames out", "tensors, MiB"], counts
        ),
        "",
        "What `upscale` keeps on the device, besides the frame it gave, while interpolate "
        "works on that frame (the frame is on the host once given: a GPU's `.cpu()` copies it):",
        "",
        *held,
        "",
        "Extrapolated to the predictors' sizes (GiB; a CPU measurement scaled by pixel count, "
        "not a GPU measurement). Each column is what the step holds at its peak, what the "
        "upscale keeps included; the frame count does not change it:",
        "",
        markdown_table(
            ["video", "upscale", "interpolated at", "the upscale keeps", "2x", "4x"],
            projected,
        ),
        "",
        f"Command: `{record['command']}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
