"""What reading a video-to-video clip of an intra-only codec costs: only the picked frames
decoded, against every frame decoded.

Clips made to cost as much as the limits allow, one picture repeated so that a small file
holds many large frames: 16 MP 16-bit PNG at 74 fps (the slowest codec found, at the highest
rate the pixel limit lets through), 4K ProRes 422 HQ at 60 fps, 16 MP MJPEG at 100 fps. Each
is read by `load_video` as it reads such a clip (`_pick_intra_frames`: only the frames picked
are decoded) and as it reads a clip of an inter-frame codec (every frame decoded in order up to
the span used), each run in a process of its own: CPU seconds of all its threads, wall time,
peak RSS. Where decoding every frame takes too long or passes the pixel limit
(`--skip-every`), only the first is run.

    python3 benchmarks/clip_decode.py --out benchmarks/results/cpu/clip-decode
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import av
import numpy as np
import torch

from benchmarks.common import environment, markdown_table, write_json
from cogvideox_cog.media import clip


@dataclass(frozen=True)
class Case:
    codec: str
    pix_fmt: str
    width: int
    height: int
    rate: int
    num_frames: int
    fps: int
    size: tuple[int, int]  # the model's height and width
    grain: bool = False
    options: tuple[tuple[str, str], ...] = ()


CASES = {
    "png16-9": Case("png", "rgb48be", 4000, 4000, 74, 9, 8, (480, 720)),
    "png16-161": Case("png", "rgb48be", 4000, 4000, 74, 161, 16, (768, 1360)),
    "prores-161": Case(
        "prores_ks", "yuv422p10le", 3840, 2160, 60, 161, 16, (768, 1360), True, (("profile", "3"),)
    ),
    "mjpeg-49": Case("mjpeg", "yuvj420p", 4000, 4000, 100, 49, 8, (480, 720)),
    "mjpeg-161": Case("mjpeg", "yuvj420p", 4000, 4000, 100, 161, 16, (768, 1360)),
    # Small enough to run in seconds, not published: the harness checked end to end.
    "mjpeg-tiny": Case("mjpeg", "yuvj420p", 64, 48, 100, 9, 8, (32, 48)),
}
LABELS = {
    "png16-9": "16 MP 16-bit PNG in a mov at 74 fps, 9 frames at 720x480",
    "png16-161": "16 MP 16-bit PNG in a mov at 74 fps, 161 frames at 1360x768",
    "prores-161": "4K ProRes 422 HQ at 60 fps, 161 frames at 1360x768",
    "mjpeg-49": "16 MP MJPEG at 100 fps, 49 frames at 720x480",
    "mjpeg-161": "16 MP MJPEG at 100 fps, 161 frames at 1360x768",
    "mjpeg-tiny": "64x48 MJPEG at 100 fps, 9 frames at 48x32",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/clip-decode"))
    parser.add_argument("--cases", default=",".join(name for name in CASES if "tiny" not in name))
    parser.add_argument(
        "--skip-every",
        default="png16-161,mjpeg-161",
        help="cases read only as an intra-only clip (every frame decoded: too long, or refused)",
    )
    parser.add_argument("--run", nargs=3, metavar=("CASE", "MODE", "CLIP"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def picture(height: int, width: int, grain: bool) -> np.ndarray:
    """16-bit RGB: smooth ramps across, each row alike (a 16 MP PNG of 100 KB, a JPEG of 300
    KB, as in the docs' earlier measurements); with grain, detail like a camera's, which 4K
    ProRes 422 HQ codes in 3.9 MB a frame (1.9 Gb/s at 60 fps, about the rate Apple gives)."""
    x = np.linspace(0, 1, width)[None, :, None]
    rows = np.concatenate([x, 1 - x, x * x], axis=-1) * 0.8 + 0.1
    rgb = np.broadcast_to(rows, (height, width, 3)).copy()
    if grain:
        rgb += np.random.default_rng(0).normal(0, 0.01, rgb.shape)
    return np.round(np.clip(rgb, 0, 1) * 65535).astype(np.uint16)


def write_clip(path: Path, case: Case) -> int:
    """The case's clip, its span plus half a second: one picture's packet, muxed again and
    again. Returns its frame count."""
    frames = math.ceil(((case.num_frames - 1) / case.fps + 0.5) * case.rate)
    rgb = picture(case.height, case.width, case.grain)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(case.codec, rate=case.rate, options=dict(case.options))
        stream.width, stream.height, stream.pix_fmt = case.width, case.height, case.pix_fmt
        stream.codec_context.time_base = Fraction(1, case.rate)
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb48le").reformat(format=case.pix_fmt)
        frame.pts, frame.time_base = 0, Fraction(1, case.rate)
        coded = bytes([*stream.encode(frame), *stream.encode()][0])
        for index in range(frames):
            packet = av.Packet(coded)
            packet.stream, packet.pts, packet.dts = stream, index, index
            packet.time_base, packet.duration = Fraction(1, case.rate), 1
            packet.is_keyframe = True
            container.mux(packet)
    return frames


def peak_rss_mib() -> int:
    """This process's peak RSS since it started. Not ru_maxrss, which a child started by
    fork keeps from its parent (here holding the clip's picture) across exec."""
    status = Path("/proc/self/status").read_text()
    return round(int(status.split("VmHWM:")[1].split()[0]) / 1024)


def run_one(name: str, mode: str, path: str) -> dict:
    """One read of the clip, in this process."""
    if mode == "every":  # as a clip of an inter-frame codec is read
        clip._intra_coded = lambda codec: False
    case = CASES[name]
    height, width = case.size
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    video = clip.load_video(path, case.num_frames, case.fps, height, width)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_SELF)  # CPU: this process's own
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {
        "case": name,
        "mode": mode,
        "cpu_seconds": round(cpu, 2),
        "wall_seconds": round(wall, 2),
        "peak_rss_mib": peak_rss_mib(),
        "summary": video.summary,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run:
        print(json.dumps(run_one(*args.run)))
        return 0
    record = {"environment": environment(torch.device("cpu")), "runs": []}
    skip_every = set(args.skip_every.split(",")) if args.skip_every else set()
    with tempfile.TemporaryDirectory() as folder:
        for name in args.cases.split(","):
            path = Path(folder) / f"{name}.{'avi' if CASES[name].codec == 'mjpeg' else 'mov'}"
            frames = write_clip(path, CASES[name])
            for mode in ["picked", "every"]:
                if mode == "every" and name in skip_every:
                    continue
                command = [sys.executable, __file__, "--run", name, mode, str(path)]
                child = subprocess.run(command, capture_output=True, text=True, check=True)
                run = json.loads(child.stdout.splitlines()[-1])
                run.update(frames_in_clip=frames, file_mb=round(path.stat().st_size / 1e6, 1))
                record["runs"].append(run)
                print(run, flush=True)
    record["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.out / "clip_decode.json", record)
    (args.out / "results.md").write_text(report(record))
    print(report(record))
    return 0


def report(record: dict) -> str:
    env = record["environment"]
    modes = {"picked": "only the frames picked", "every": "every frame"}
    rows = [
        [
            LABELS[run["case"]],
            modes[run["mode"]],
            run["summary"].split(", ")[1].split(" ->")[0],
            f"{run['cpu_seconds']:.1f}",
            f"{run['wall_seconds']:.1f}",
            f"{run['peak_rss_mib']}",
        ]
        for run in record["runs"]
    ]
    table = markdown_table(
        ["clip", "decoded", "frames", "CPU s", "wall s", "peak RSS MiB"],
        rows,
    )
    return (
        "# Intra-only clips: only the picked frames decoded, against every frame\n\n"
        f"- Command: `{env['command']}`\n"
        f"- {env['cpu_count']} CPU cores shared with other work; load average "
        f"{env['load_average'][0]} at the start, {env['load_average_end'][0]} at the end\n"
        f"- Versions: av {env['versions']['av']}, numpy {env['versions']['numpy']}, "
        f"python {env['versions']['python']}\n"
        "- `load_video` in a process of its own per run: CPU seconds of all its threads, wall "
        "time, peak RSS of the process. Scaling each picked frame to the model's size is in "
        "both.\n\n"
        f"{table}\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
