"""What converting an HDR or BT.2020 video-to-video clip to SDR BT.709 costs per frame.

For 720x1280 and 1080x1920 frames of a 10-bit clip tagged HLG, PQ or SDR BT.2020, on one CPU
core: `cogvideox_cog.media.colour.to_sdr` (what load_video runs on each picked frame of such a
clip), against reading a frame as it is (what an SDR BT.709 clip costs: load_video's own read,
and PyAV's `VideoFrame.to_image`, which it replaced), and against FFmpeg's own conversion, the
scale filter with out_transfer=bt709 and out_primaries=bt709 through `av.filter.Graph`
(libswscale's colour management; the wheel has no zscale or libplacebo): its first frame,
which builds the filter's tables, and the frames after it. CPU time of this process, the
least of the repetitions: other work on a shared host only adds to it.

    python3 benchmarks/clip_colour.py --out benchmarks/results/cpu/clip-colour
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import av
import numpy as np
import torch
from av.filter import Graph
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

from benchmarks.common import environment, markdown_table, write_json
from cogvideox_cog.media.clip import _rgb  # load_video's read of one frame, timed as it runs
from cogvideox_cog.media.colour import to_sdr

SIZES = [(720, 1280), (1080, 1920)]
TRANSFERS = {
    "HLG": ColorTrc.ARIB_STD_B67,
    "PQ": ColorTrc.SMPTE2084,
    "SDR BT.2020": ColorTrc.BT2020_10,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/clip-colour"))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--filter-frames", type=int, default=6, help="frames through FFmpeg")
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=SIZES,
        help="HEIGHTxWIDTH,... of the frames (default: the published 720x1280,1080x1920)",
    )
    return parser.parse_args(argv)


def _sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(side) for side in size.split("x")) for size in text.split(",")]


def signal(height: int, width: int) -> np.ndarray:
    """R'G'B' in 0..1: coloured waves, grain, and a bright band (a sky) over the top fifth."""
    rng = np.random.default_rng(0)
    y = np.linspace(0, 1, height)[:, None]
    x = np.linspace(0, 1, width)[None, :]
    rgb = np.stack(
        [
            0.35 + 0.25 * np.sin(6 * x + 2 * y),
            0.40 + 0.20 * np.cos(5 * y + x),
            0.30 + 0.20 * np.sin(3 * x * y + 1),
        ],
        axis=-1,
    )
    rgb += rng.normal(0, 0.02, rgb.shape)
    rgb[: height // 5] += 0.35
    return np.clip(rgb, 0, 1)


def write_clip(path: Path, height: int, width: int, trc: int, frames: int) -> None:
    rgb = np.round(signal(height, width) * 65535).astype(np.uint16)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8, options={"crf": "12", "preset": "fast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p10le"
        context = stream.codec_context
        context.color_trc, context.color_primaries = trc, ColorPrimaries.BT2020
        context.colorspace, context.color_range = Colorspace.BT2020, ColorRange.MPEG
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb48le").reformat(
                format="yuv420p10le",
                dst_colorspace=Colorspace.BT2020,
                dst_color_range=ColorRange.MPEG,
            )
            frame.pts, frame.time_base = index, Fraction(1, 8)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_sdr_clip(path: Path, height: int, width: int) -> None:
    """An 8-bit SDR BT.709 clip, the common case: load_video reads its frames as they are."""
    rgb = np.round(signal(height, width) * 255).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8, options={"crf": "12", "preset": "fast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        context = stream.codec_context
        context.color_trc, context.color_primaries = ColorTrc.BT709, ColorPrimaries.BT709
        context.colorspace, context.color_range = Colorspace.ITU709, ColorRange.MPEG
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = 0, Fraction(1, 8)
        container.mux(stream.encode(frame))
        container.mux(stream.encode())


def cpu_ms(work, repeats: int) -> float:
    work()  # tables built, caches warm
    times = []
    for _ in range(repeats):
        start = time.process_time()
        work()
        times.append(time.process_time() - start)
    return 1000 * min(times)


def ffmpeg_ms(path: Path) -> tuple[float, float]:
    """FFmpeg's scale filter to SDR BT.709: (first frame, the least of the frames after it)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        graph = Graph()
        source = graph.add_buffer(template=stream)
        scale = graph.add("scale", "out_transfer=bt709:out_primaries=bt709:out_range=pc")
        pixels = graph.add("format", "rgb24")
        sink = graph.add("buffersink")
        source.link_to(scale)
        scale.link_to(pixels)
        pixels.link_to(sink)
        graph.configure()
        times = []
        for frame in container.decode(stream):
            start = time.process_time()
            graph.push(frame)
            graph.pull().to_ndarray()
            times.append(time.process_time() - start)
    return 1000 * times[0], 1000 * min(times[1:])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if len(os.sched_getaffinity(0)) > 1:
        # One core, set before numpy starts its BLAS threads: started afterwards, they would
        # share that core and time each other's waiting.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        os.execv(sys.executable, [sys.executable, *sys.argv])
    torch.set_num_threads(1)
    record = {"environment": environment(torch.device("cpu")), "runs": [], "sdr_runs": []}
    with tempfile.TemporaryDirectory() as folder:
        for height, width in args.sizes:
            path = Path(folder) / f"{height}-sdr.mp4"
            write_sdr_clip(path, height, width)
            with av.open(str(path)) as container:
                frame = next(container.decode(video=0))
            record["sdr_runs"].append(
                {
                    "size": f"{width}x{height}",
                    "clip": "SDR BT.709, 8-bit",
                    "as_it_is_ms": cpu_ms(lambda f=frame: _rgb(f, None, False), args.repeats),
                    "to_image_ms": cpu_ms(lambda f=frame: f.to_image(), args.repeats),
                }
            )
            for name, trc in TRANSFERS.items():
                path = Path(folder) / f"{height}-{trc}.mp4"
                write_clip(path, height, width, trc, args.filter_frames)
                with av.open(str(path)) as container:
                    frame = next(container.decode(video=0))
                first, then = ffmpeg_ms(path)
                record["runs"].append(
                    {
                        "size": f"{width}x{height}",
                        "clip": name,
                        "to_sdr_ms": cpu_ms(lambda f=frame: to_sdr(f), args.repeats),
                        "as_it_is_ms": cpu_ms(lambda f=frame: _rgb(f, None, False), args.repeats),
                        "to_image_ms": cpu_ms(lambda f=frame: f.to_image(), args.repeats),
                        "ffmpeg_first_frame_ms": first,
                        "ffmpeg_next_frames_ms": then,
                    }
                )
    record["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.out / "clip_colour.json", record)
    (args.out / "results.md").write_text(report(record))
    print(report(record))
    return 0


def report(record: dict) -> str:
    env = record["environment"]
    rows = [
        [
            run["size"],
            run["clip"],
            f"{run['to_sdr_ms']:.1f}",
            f"{run['as_it_is_ms']:.1f}",
            f"{run['to_image_ms']:.1f}",
            f"{run['ffmpeg_first_frame_ms'] / 1000:.2f} s",
            f"{run['ffmpeg_next_frames_ms']:.1f}",
        ]
        for run in record["runs"]
    ]
    table = markdown_table(
        [
            "frame",
            "clip (10-bit, BT.2020)",
            "to_sdr ms",
            "as it is (load_video) ms",
            "as it is (to_image) ms",
            "FFmpeg scale: first frame",
            "FFmpeg scale: next frames ms",
        ],
        rows,
    )
    sdr_table = markdown_table(
        ["frame", "clip", "load_video ms", "to_image ms"],
        [
            [run["size"], run["clip"], f"{run['as_it_is_ms']:.1f}", f"{run['to_image_ms']:.1f}"]
            for run in record.get("sdr_runs", [])
        ],
    )
    return (
        "# HDR and BT.2020 clips to SDR BT.709: cost per frame\n\n"
        f"- Command: `{env['command']}`\n"
        f"- One CPU core of {env['cpu_count']}; load average {env['load_average'][0]} at the "
        f"start, {env['load_average_end'][0]} at the end (other work on the host)\n"
        f"- Versions: av {env['versions']['av']}, numpy {env['versions']['numpy']}, "
        f"python {env['versions']['python']}\n"
        "- CPU milliseconds of this process, the least of the repetitions. `to_sdr` is what "
        "load_video runs per picked frame of such a clip, before scaling it; `as it is "
        "(load_video)` is what it runs on an SDR BT.709 frame instead, and `to_image` PyAV's "
        "read, which load_video used before. FFmpeg's first frame builds its tables.\n\n"
        f"{table}\n\n"
        "An 8-bit SDR BT.709 frame (yuv420p), read as it is: load_video's read against PyAV's "
        "`to_image`.\n\n"
        f"{sdr_table}\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
