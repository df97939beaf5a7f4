"""Frames to an mp4 that every browser plays, and a probe that checks a file is one.

Not diffusers.utils.export_to_video (0.42.1): its fps defaults to 10 where CogVideoX is made
for 8 or 16. With imageio and imageio-ffmpeg installed it pipes frames to an ffmpeg process
(libx264, yuv420p; its quality=5 becomes crf 25 in imageio-ffmpeg) and, with its
macro_block_size=16, scales frames up to the next multiple of 16. Without imageio it warns and
falls back to OpenCV's VideoWriter with the "mp4v" fourcc, MPEG-4 Part 2, which browsers do
not play (this project installs neither imageio nor OpenCV, so here it raises ImportError).
Neither path moves the moov atom first, both turn floats into bytes with
(frame * 255).astype(uint8), which truncates, and both write the final path in place.
diffusers' PyAV-based encode_video is closer, but sets no crf, no +faststart, no colour tags,
and writes in place too.
"""

from __future__ import annotations

import functools
import os
import secrets
import struct
from collections.abc import Iterator, Sequence
from fractions import Fraction
from itertools import chain
from numbers import Integral
from pathlib import Path
from typing import TypedDict

import av
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc
from PIL import Image

# crf 18 is x264's customary "visually lossless" point; 49 480x720 frames of textured, moving
# content came to 0.2-1.6 MB at it. "medium" is x264's default preset: on a 2-core CPU those
# frames took 1-2 s, within the noise of "fast", against minutes of generation, so a faster
# preset would win nothing worth its larger files or lower quality.
DEFAULT_CRF = 18
DEFAULT_PRESET = "medium"

# x264's AVX-512 code did not give the same file twice for the same frames: on an AVX-512
# machine, 10 encodes of one 9-frame 96x160 video gave 5 different files, decoding up to 36
# levels apart. Held to the instruction sets up to AVX2 (which every AVX-512 CPU has), all
# were identical, and 49 frames of 480x720 took the same 2.1-2.5 s. So where the CPU has
# AVX-512, x264 is given that list: the same seed and settings give the same mp4.
_X264_UP_TO_AVX2 = "MMX2,SSE2Fast,SSSE3,SSE4.2,AVX,FMA3,BMI2,AVX2"
_AVX2_AND_BELOW = {"mmx", "sse2", "ssse3", "sse4_2", "avx", "fma", "bmi2", "avx2"}

# H.264 level 5.1 (ITU-T H.264 Table A-1), the highest that Windows' own decoder (which Firefox
# uses there) and some phones' decode. x264 writes the lowest level a video needs, so a larger
# or faster one is written as 5.2 or 6.x, which those players refuse.
_LEVEL_5_1_MACROBLOCKS = 36_864  # a frame's 16x16 blocks
_LEVEL_5_1_MACROBLOCKS_PER_S = 983_040

Frames = np.ndarray | Sequence[np.ndarray] | Sequence[Image.Image]


class Mp4Info(TypedDict):
    """duration is the track's, in seconds; fps is the stream's average frame rate."""

    codec: str
    profile: str | None
    pix_fmt: str | None
    width: int
    height: int
    fps: float
    frames: int
    duration: float | None
    faststart: bool


def encode_mp4(
    frames: Frames,
    path: str | os.PathLike[str],
    fps: int,
    *,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
) -> Path:
    """Write an H.264/yuv420p mp4 with its index first, so a browser starts playing at once.

    frames: (F, H, W, 3) uint8 or float in [0, 1] (what output_type="np" gives), or a list of
    such frames or of PIL images (output_type="pil"). The file at `path` is replaced only once
    the new one is complete; a failed encode leaves it as it was.
    """
    if isinstance(fps, bool) or not isinstance(fps, Integral) or fps <= 0:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")
    fps = int(fps)
    path = Path(path)
    converted = _uint8_frames(frames)
    first = next(converted)  # input errors surface here, before any file is created
    height, width = first.shape[:2]

    # A hidden name in the same directory: os.replace is atomic only within one filesystem,
    # and a "*.mp4" glob never picks up the unfinished file. O_EXCL so two writers never share
    # it; opened with 0o666 so the umask, not mkstemp's 0o600, sets who may read the video.
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        _write(temp, chain([first], converted), width, height, fps, crf, preset)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def above_level_5_1(width: int, height: int, fps: int) -> str | None:
    """Why an mp4 of this size and frame rate needs an H.264 level above 5.1; None if not."""
    macroblocks = -(-width // 16) * -(-height // 16)
    if macroblocks > _LEVEL_5_1_MACROBLOCKS:
        return (
            f"{width}x{height} is {macroblocks:,} macroblocks a frame, above H.264 level 5.1's "
            f"{_LEVEL_5_1_MACROBLOCKS:,}"
        )
    if macroblocks * fps > _LEVEL_5_1_MACROBLOCKS_PER_S:
        return (
            f"{width}x{height} at {fps} fps is {macroblocks * fps:,} macroblocks a second, "
            f"above H.264 level 5.1's {_LEVEL_5_1_MACROBLOCKS_PER_S:,}"
        )
    return None


def _write(
    temp: Path,
    frames: Iterator[np.ndarray],
    width: int,
    height: int,
    fps: int,
    crf: int,
    preset: str,
) -> None:
    options = {
        # The muxer rewrites the file at close with moov before mdat, so a browser need not
        # fetch the end of the file (or all of it) before showing the first frame.
        "movflags": "+faststart",
        # The movie header and the edit list that hides x264's B-frame delay count in ms by
        # default: 17 frames at 16 fps came out as 1.062 s. A multiple of fps keeps F/fps exact.
        "movie_timescale": str(1000 * fps),
    }
    with av.open(str(temp), "w", format="mp4", container_options=options) as container:
        stream = container.add_stream(
            "libx264", rate=fps, options={"crf": str(crf), "preset": preset} | x264_cpu_options()
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # One tick per frame. mp4 raises the track timescale to >= 10000 by doubling
        # (8 fps -> 1/16384), which keeps every timestamp and the duration F/fps exact.
        stream.time_base = Fraction(1, fps)
        context = stream.codec_context
        context.time_base = Fraction(1, fps)
        # PyAV asks for slice threads (low latency); frame threads, as the ffmpeg CLI uses,
        # encoded faster here and x264 output is still deterministic for a given thread count.
        context.thread_type = "FRAME"
        # Convert with BT.709 and say so: untagged video leaves browsers to guess the matrix,
        # and they do not all guess the same, so colours would differ between them.
        context.colorspace = Colorspace.ITU709
        context.color_primaries = ColorPrimaries.BT709
        context.color_trc = ColorTrc.BT709
        context.color_range = ColorRange.MPEG

        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                format="yuv420p",
                dst_colorspace=Colorspace.ITU709,
                dst_color_range=ColorRange.MPEG,
            )
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def x264_cpu_options(cpu_flags: frozenset[str] | None = None) -> dict[str, str]:
    """x264's instruction sets capped at AVX2 where the CPU has AVX-512 (see above);
    cpu_flags: /proc/cpuinfo's, by default (none known elsewhere: x264 picks)."""
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    if "avx512f" in flags and flags >= _AVX2_AND_BELOW:
        return {"x264-params": f"asm={_X264_UP_TO_AVX2}"}
    return {}


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def _uint8_frames(frames: Frames) -> Iterator[np.ndarray]:
    """Convert one frame at a time, so a long float video is never copied whole."""
    if isinstance(frames, np.ndarray) and frames.ndim != 4:
        raise ValueError(f"frames array must be (F, H, W, 3), got shape {frames.shape}")
    size: tuple[int, int] | None = None
    for index, frame in enumerate(frames):
        rgb = _to_uint8(frame)
        height, width = rgb.shape[:2]
        if size is None:
            size = (height, width)
            if width % 2 or height % 2:
                # yuv420p stores colour at half resolution in both directions.
                raise ValueError(
                    f"frame size {width}x{height} (width x height) is odd; H.264 in yuv420p, "
                    "the pixel format every browser plays, needs an even width and height"
                )
        elif (height, width) != size:
            raise ValueError(
                f"frame {index} is {width}x{height} but frame 0 is {size[1]}x{size[0]} "
                "(width x height); all frames must be one size"
            )
        yield rgb
    if size is None:
        raise ValueError("no frames to encode")


def _to_uint8(frame: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(frame, Image.Image):
        rgb = np.asarray(frame.convert("RGB"))
    elif isinstance(frame, np.ndarray):
        if frame.dtype == np.uint8:
            rgb = frame
        elif np.issubdtype(frame.dtype, np.floating):
            # Round, not truncate: truncation darkens every pixel by half a level on average.
            rgb = np.rint(np.clip(frame, 0.0, 1.0) * 255.0).astype(np.uint8)
        else:
            raise TypeError(f"frames must be uint8 or float in [0, 1], got dtype {frame.dtype}")
    else:
        raise TypeError(f"a frame must be a numpy array or a PIL image, got {type(frame)}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"a frame must be (H, W, 3) RGB, got shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def probe_mp4(path: str | os.PathLike[str]) -> Mp4Info:
    """What a browser cares about, read back from the file rather than trusted from the encoder.

    frames is counted by decoding every frame, so a truncated stream cannot pass on its header.
    """
    path = Path(path)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = sum(1 for _ in container.decode(stream))
        context = stream.codec_context
        duration = (
            float(stream.duration * stream.time_base)
            if stream.duration is not None and stream.time_base is not None
            else None
        )
        return Mp4Info(
            codec=context.name,
            profile=context.profile,
            pix_fmt=context.format.name if context.format is not None else None,
            width=context.width,
            height=context.height,
            fps=float(stream.average_rate) if stream.average_rate else 0.0,
            frames=frames,
            duration=duration,
            faststart=_moov_before_mdat(path),
        )


def _moov_before_mdat(path: Path) -> bool:
    boxes = _top_level_boxes(path)
    return "moov" in boxes and "mdat" in boxes and boxes.index("moov") < boxes.index("mdat")


def _top_level_boxes(path: Path) -> list[str]:
    boxes: list[str] = []
    with path.open("rb") as file:
        end = os.fstat(file.fileno()).st_size
        offset = 0
        while offset + 8 <= end:
            file.seek(offset)
            header = file.read(16)
            size, kind = struct.unpack(">I4s", header[:8])
            if size == 1:  # 64-bit size follows the type
                size = struct.unpack(">Q", header[8:16])[0]
            elif size == 0:  # box runs to the end of the file
                size = end - offset
            if size < 8:
                raise ValueError(f"{path}: malformed mp4 box header at byte {offset}")
            boxes.append(kind.decode("latin-1"))
            offset += size
    return boxes
