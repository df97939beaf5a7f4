"""The video-to-video input: decoding, resampling to the model's fps, fitting, and refusals."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from av.video.reformatter import ColorRange, Colorspace, ColorTrc
from PIL import Image

from cogvideox_cog.errors import InputError
from cogvideox_cog.media import clip as video_input
from cogvideox_cog.media.clip import load_video
from cogvideox_cog.media.mp4 import encode_mp4

H, W = 48, 80  # the tiny models' resolution
ALLOWED = range(9, 50, 8)


def _write_clip(
    path, frames: int, fps: int, width: int = 64, height: int = 48, first_pts: int = 0
) -> str:
    """A clip whose frame i is a flat grey of level 5 * i: the level says which frame it was.
    first_pts: the first frame's timestamp, in frames."""
    codec, fmt = {
        ".mp4": ("libx264", "yuv420p"),
        ".webm": ("libvpx-vp9", "yuv420p"),
        ".mov": ("libx264", "yuv420p"),
        ".gif": ("gif", "rgb8"),
    }[path.suffix]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, fmt
        stream.codec_context.time_base = Fraction(1, fps)
        for index in range(frames):
            level = min(5 * index, 255)
            rgb = np.full((height, width, 3), level, np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = first_pts + index
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


def _levels(clip) -> list[int]:
    return [round(np.asarray(frame).mean() / 5) for frame in clip.frames]


def test_frames_decoded_before_an_edit_lists_start_count_against_the_limit(tmp_path, monkeypatch):
    """They are decoded (the frames after need them) and dropped inside FFmpeg: 6,000 4K
    frames of 35 bytes each, before the start of a 2.5 s clip, took 77 s."""
    monkeypatch.setattr(video_input, "MAX_DECODED_FRAMES", 50)
    path = _write_clip(tmp_path / "clip.mp4", frames=80, fps=8, first_pts=-60)
    with av.open(path) as container:
        assert sum(p.is_discard for p in container.demux(video=0)) == 60
    with pytest.raises(InputError, match="more than 50 decoded frames"):
        load_video(path, num_frames=9, fps=8, height=H, width=W)


@pytest.mark.parametrize("suffix", [".h264", ".hevc"])
def test_a_raw_stream_is_read_at_its_own_frame_rate_not_its_demuxers_25(tmp_path, suffix):
    codec = {".h264": "libx264", ".hevc": "libx265"}[suffix]
    path = tmp_path / f"clip{suffix}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(12):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 5 * index, np.uint8), "rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    clip = load_video(str(path), num_frames=9, fps=8, height=H, width=W)
    assert _levels(clip) == list(range(9))


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mov", ".gif"])
def test_each_format_is_resampled_to_the_model_fps_from_the_start(tmp_path, suffix):
    path = _write_clip(tmp_path / f"clip{suffix}", frames=40, fps=24)
    clip = load_video(path, num_frames=9, fps=8, height=H, width=W)
    assert len(clip.frames) == 9
    assert all(frame.size == (W, H) and frame.mode == "RGB" for frame in clip.frames)
    # 24 fps -> 8 fps: every third source frame, from the first.
    assert _levels(clip) == pytest.approx([0, 3, 6, 9, 12, 15, 18, 21, 24], abs=1)


def test_the_summary_says_what_was_done(tmp_path):
    path = _write_clip(tmp_path / "clip.mp4", frames=36, fps=30, width=96, height=64)
    summary = load_video(path, num_frames=9, fps=8, height=H, width=W).summary
    assert summary.startswith("video: 1.2 s at 30 fps")
    assert "-> 9 frames at 8 fps" in summary
    assert "96x64 -> 80x48" in summary


def test_the_summary_quoted_in_the_inputs_page_is_what_its_clip_gives(tmp_path):
    """docs/inputs.md quotes the log line for a 3.2 s 1280x720 clip at 30 fps made into 9
    frames: decoding goes one frame past the last one shown at 1.0 s."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "inputs.md").read_text()
    quoted = " ".join(re.search(r"`(video: 3\.2 s at 30 fps, .*?) \.\.\.`", page, re.S)[1].split())
    path = _write_clip(tmp_path / "clip.mp4", frames=96, fps=30, width=1280, height=720)
    summary = load_video(path, num_frames=9, fps=8, height=480, width=720).summary
    assert summary.startswith(quoted)


def test_the_limits_the_inputs_page_states_are_those_enforced():
    """The tests of each limit lower it to keep their clips small, so they hold whatever its
    value; the page tells users the values."""
    page = " ".join(
        (Path(__file__).resolve().parent.parent / "docs" / "inputs.md").read_text().split()
    )
    size = re.search(
        r"At most (\d+) megapixels a frame, 4:1 either way \(as an image\), and (\d+) s", page
    )
    decoded = re.search(r"At most ([\d,]+) frames and (\d+) gigapixels decoded", page)
    assert (int(size[1]) * 10**6, float(size[2])) == (
        video_input.MAX_VIDEO_PIXELS,
        video_input.MAX_VIDEO_SECONDS,
    )
    assert (int(decoded[1].replace(",", "")), int(decoded[2]) * 10**9) == (
        video_input.MAX_DECODED_FRAMES,
        video_input.MAX_DECODED_PIXELS,
    )


def test_a_clip_whose_timestamps_start_late_is_timed_from_its_first_frame(tmp_path):
    """Streams cut from a broadcast or a longer file may start at any time, not 0."""
    path = _write_clip(tmp_path / "late.webm", frames=12, fps=8, first_pts=8)  # from 1 s
    clip = load_video(path, num_frames=9, fps=8, height=H, width=W)
    assert _levels(clip) == pytest.approx([0, 1, 2, 3, 4, 5, 6, 7, 8], abs=1)


def test_a_clip_whose_timestamps_start_late_is_summarised_with_its_own_length(tmp_path):
    """A WebM's header gives the time its last frame ends, its start included: 3 s of frames
    from 5 s on are a 3 s clip, not an 8 s one."""
    path = _write_clip(tmp_path / "late.webm", frames=24, fps=8, first_pts=40)
    summary = load_video(path, num_frames=9, fps=8, height=H, width=W).summary
    assert summary.startswith("video: 3.0 s at 8 fps")


def test_a_short_clip_whose_timestamps_start_late_is_not_refused_as_too_long(tmp_path):
    """Cut from a recording at 700 s, 3 s of it is within the 600 s limit."""
    path = _write_clip(tmp_path / "late.webm", frames=24, fps=8, first_pts=8 * 700)
    assert len(load_video(path, num_frames=9, fps=8, height=H, width=W).frames) == 9


def test_a_slower_clip_repeats_frames_to_keep_real_time(tmp_path):
    path = _write_clip(tmp_path / "clip.mp4", frames=6, fps=4)
    clip = load_video(path, num_frames=9, fps=8, height=H, width=W)
    assert _levels(clip) == pytest.approx([0, 0, 1, 1, 2, 2, 3, 3, 4], abs=1)


def test_a_clip_that_lasts_exactly_long_enough_is_taken(tmp_path):
    # 9 frames at 8 fps span 1 s; a 1 s clip at 24 fps shows its last frame until 1 s.
    path = _write_clip(tmp_path / "clip.mp4", frames=24, fps=24)
    assert len(load_video(path, num_frames=9, fps=8, height=H, width=W).frames) == 9


def test_a_last_frame_held_for_seconds_counts_for_as_long_as_it_is_shown(tmp_path):
    """Screen recordings and GIFs hold a frame until the picture changes: here 10 frames at
    10 fps, then the eleventh for 3 s, 4 s in all, as the track's header says."""
    path = tmp_path / "screen.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.max_b_frames = 0  # the held frame's packet is muxed last
        for index in range(11):
            rgb = np.full((48, 64, 3), 5 * index, np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            for packet in [*stream.encode(frame), *(stream.encode() if index == 10 else [])]:
                packet.duration = 30 if packet.pts == 10 else 1
                container.mux(packet)
    clip = load_video(path, num_frames=17, fps=8, height=H, width=W, allowed_frames=ALLOWED)
    assert _levels(clip) == [0, 1, 2, 3, 5, 6, 7, 8] + [10] * 9


def test_a_too_short_clip_is_refused_with_the_frames_it_can_give(tmp_path):
    path = _write_clip(tmp_path / "clip.mp4", frames=20, fps=8)  # 2.5 s
    with pytest.raises(InputError, match=r"too short.*need at least 6.00 s.*num_frames=17"):
        load_video(path, num_frames=49, fps=8, height=H, width=W, allowed_frames=ALLOWED)


def test_a_too_short_clip_suggests_the_frame_count_it_lasts_exactly_long_enough_for(tmp_path):
    path = _write_clip(tmp_path / "clip.mp4", frames=16, fps=8)  # 2 s: 17 frames at 8 fps
    with pytest.raises(InputError, match=r"ask for num_frames=17 or fewer"):
        load_video(path, num_frames=25, fps=8, height=H, width=W, allowed_frames=ALLOWED)


def test_a_too_short_clip_is_measured_while_its_file_is_open(tmp_path):
    """A stream's duration and rate live in memory that closing the file frees: read after,
    they may be anything ("damaged ... of the 6148914691236516864.00 s its header gives").
    glibc overwrites memory as it is freed with MALLOC_PERTURB_ (and its per-thread cache
    off, which skips that), so such a read shows."""
    path = _write_clip(tmp_path / "clip.mp4", frames=12, fps=8)  # 1.5 s
    code = (
        "import sys; from cogvideox_cog.media.clip import load_video; "
        "load_video(sys.argv[1], num_frames=17, fps=8, height=48, width=80)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, path],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        env={
            **os.environ,
            "MALLOC_PERTURB_": "85",
            "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0",
        },
    )
    assert "InputError: video is too short: 1.50 s (12 frames)" in run.stderr, run.stderr[-300:]


def test_a_cut_off_upload_is_refused_as_truncated_not_as_too_short(tmp_path):
    noise = np.random.default_rng(1).integers(0, 256, (60, H, W, 3), dtype=np.uint8)
    whole = encode_mp4(noise, tmp_path / "whole.mp4", fps=24)  # 2.5 s, its index first
    data = whole.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"damaged or truncated.*of the 2.50 s its header gives"):
        load_video(tmp_path / "cut.mp4", num_frames=17, fps=8, height=H, width=W)


def test_a_cut_off_upload_with_its_index_last_is_refused_as_truncated(tmp_path):
    """Phones and cameras write the mp4's index (moov) last: a cut-off one has none."""
    data = Path(_write_clip(tmp_path / "whole.mp4", frames=40, fps=8)).read_bytes()
    assert data.rindex(b"moov") > data.index(b"mdat")
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"damaged or truncated: .* Send the whole file again"):
        load_video(tmp_path / "cut.mp4", num_frames=9, fps=8, height=H, width=W)


def test_a_single_frame_video_is_refused_pointing_to_image_to_video(tmp_path):
    path = _write_clip(tmp_path / "still.mp4", frames=1, fps=8)
    with pytest.raises(InputError, match="image-to-video"):
        load_video(path, num_frames=9, fps=8, height=H, width=W, allowed_frames=ALLOWED)


@pytest.mark.parametrize(
    ("content", "name"), [(b"", "empty.mp4"), (b"just some text\n" * 20, "notes.mp4")]
)
def test_an_empty_or_text_file_is_refused_with_the_formats(tmp_path, content, name):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match="mp4, webm, mov or gif"):
        load_video(tmp_path / name, num_frames=9, fps=8, height=H, width=W)


def test_an_mp4_with_a_box_of_an_impossible_size_is_not_called_cut_off(tmp_path):
    """A box under 8 bytes (its own header) ends the walk over the boxes: what follows is not
    read as boxes running past the end of the file."""
    ftyp = b"\x00\x00\x00\x14ftypisom\x00\x00\x02\x00isom"
    (tmp_path / "odd.mp4").write_bytes(ftyp + b"\x00\x00\x00\x04" + b"\x7f\xff\xff\xffjunk" * 4)
    with pytest.raises(InputError, match="could not be read as a video"):
        load_video(tmp_path / "odd.mp4", num_frames=9, fps=8, height=H, width=W)


def test_a_missing_file_says_it_is_not_a_url(tmp_path):
    with pytest.raises(InputError, match="not an http"):
        load_video(tmp_path / "nope.mp4", num_frames=9, fps=8, height=H, width=W)


def test_a_huge_frame_is_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(video_input, "MAX_VIDEO_PIXELS", 64 * 48 - 1)
    path = _write_clip(tmp_path / "clip.mp4", frames=10, fps=8)
    with pytest.raises(InputError, match=r"video is 64x48 \(.* MP a frame\); the limit is"):
        load_video(path, num_frames=9, fps=8, height=H, width=W)


def _write_growing_clip(path, width: int, height: int) -> str:
    """An MJPEG clip whose header and first 2 frames are 64x48, and whose other 18 frames are
    width x height: each JPEG gives its own size."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        larger = av.CodecContext.create("mjpeg", "w")
        larger.width, larger.height, larger.pix_fmt = width, height, "yuvj420p"
        larger.time_base = Fraction(1, 8)
        for index in range(20):
            encoder = stream if index < 2 else larger
            rgb = np.full((encoder.height, encoder.width, 3), 100, np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p")
            frame.pts, frame.time_base = index, Fraction(1, 8)
            for packet in encoder.encode(frame):
                packet.stream, packet.pts, packet.dts = stream, index, index
                container.mux(packet)
    return str(path)


def test_a_frame_over_the_limit_after_a_small_first_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(video_input, "MAX_VIDEO_PIXELS", 64 * 48)
    path = _write_growing_clip(tmp_path / "grows.mkv", width=72, height=48)
    with pytest.raises(InputError, match=r"frame 3 is 72x48 .*, larger than its first"):
        load_video(path, num_frames=9, fps=8, height=H, width=W)


def test_a_frame_far_over_the_limit_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    """A JPEG may declare up to 65535x65535 (13 GB of RGB) in a few megabytes."""
    monkeypatch.setattr(video_input, "MAX_VIDEO_PIXELS", 64 * 48)
    path = _write_growing_clip(tmp_path / "bomb.mkv", width=640, height=480)
    with pytest.raises(InputError, match=r"frame 3 is far larger than its first"):
        load_video(path, num_frames=9, fps=8, height=H, width=W)


def test_a_first_frame_far_over_the_limit_is_refused_before_the_probe_decodes_it(
    tmp_path, monkeypatch
):
    """Opening a file decodes its first frame where the container does not give the size (a
    PNG track, a raw H.264 stream): a 4.6 MB mov declaring 64x48 with a 16000x16000 16-bit
    PNG in it took 7 s of CPU and 1.5 GB there, before the size could be checked."""
    monkeypatch.setattr(video_input, "MAX_VIDEO_PIXELS", 64 * 48)
    picture = av.CodecContext.create("png", "w")
    picture.width, picture.height, picture.pix_fmt = 640, 480, "rgb24"
    picture.time_base = Fraction(1, 8)
    frame = av.VideoFrame.from_ndarray(np.zeros((480, 640, 3), np.uint8), format="rgb24")
    data = b"".join(bytes(packet) for packet in [*picture.encode(frame), *picture.encode()])
    path = tmp_path / "bomb.mov"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "rgb24"
        for index in range(10):
            packet = av.Packet(data)
            packet.stream, packet.pts, packet.dts = stream, index, index
            packet.time_base, packet.is_keyframe = Fraction(1, 8), True
            container.mux(packet)
    with pytest.raises(InputError, match=r"frame 1 is far larger than its header says"):
        load_video(path, num_frames=9, fps=8, height=H, width=W)


def test_a_clip_longer_than_4_to_1_is_refused_as_images_are(tmp_path):
    """Its centre crop at the model's shape would be a sliver stretched over the frame."""
    path = _write_clip(tmp_path / "strip.mp4", frames=12, fps=8, width=256, height=16)
    with pytest.raises(InputError, match=r"256x16, 16\.0:1; the longer side may be at most 4"):
        load_video(path, num_frames=9, fps=8, height=H, width=W)


def test_a_clip_of_exactly_4_to_1_is_taken_as_images_are(tmp_path):
    path = _write_clip(tmp_path / "strip.mp4", frames=12, fps=8, width=192, height=48)
    assert len(load_video(path, num_frames=9, fps=8, height=H, width=W).frames) == 9


def test_a_long_clip_is_refused_from_its_header(tmp_path, monkeypatch):
    monkeypatch.setattr(video_input, "MAX_VIDEO_SECONDS", 1.0)
    path = _write_clip(tmp_path / "clip.mp4", frames=24, fps=8)
    with pytest.raises(InputError, match="the limit is 1 s"):
        load_video(path, num_frames=9, fps=8, height=H, width=W)


def test_a_too_long_clip_is_told_the_seconds_that_are_used(tmp_path, monkeypatch):
    """9 frames at 8 fps take the clip's first 1.0 s (the ninth is the one shown at 1.0 s),
    not num_frames / fps = 1.1 s."""
    monkeypatch.setattr(video_input, "MAX_VIDEO_SECONDS", 1.0)
    path = _write_clip(tmp_path / "clip.mp4", frames=24, fps=8)
    with pytest.raises(InputError, match=r"Only the first 1\.0 s are used"):
        load_video(path, num_frames=9, fps=8, height=H, width=W)


def test_decoding_stops_once_the_needed_span_is_covered(tmp_path, monkeypatch):
    monkeypatch.setattr(video_input, "MAX_DECODED_FRAMES", 30)
    path = _write_clip(tmp_path / "clip.mp4", frames=200, fps=24)
    # 9 frames at 8 fps need 25 frames of 24 fps: within the limit, though the clip has 200.
    assert len(load_video(path, num_frames=9, fps=8, height=H, width=W).frames) == 9
    with pytest.raises(InputError, match="more than 30 decoded frames"):
        load_video(path, num_frames=17, fps=8, height=H, width=W)


def test_decoding_stops_at_a_budget_of_pixels(tmp_path, monkeypatch):
    """5,000 frames of 16 MP are within the frame and size limits: as 16-bit PNG, a 500 MB
    clip whose frames took 0.45 s of CPU each to decode, 38 minutes in all. Counted as they
    are decoded: an mkv's header may give any rate (this one says 2 fps for frames 1/24 s
    apart; one of variable rate often says 1000)."""
    monkeypatch.setattr(video_input, "MAX_DECODED_PIXELS", 30 * 64 * 48)
    path = tmp_path / "clip.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=2)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 24)
        for index in range(200):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), index, np.uint8), "rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 24)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    # 9 frames at 8 fps need 1 s: 26 frames, with the one after it that shows it is covered.
    assert len(load_video(path, num_frames=9, fps=8, height=H, width=W).frames) == 9
    with pytest.raises(InputError, match=r"to cover 2\.0 s \(31 frames of 64x48 so far\)"):
        load_video(path, num_frames=17, fps=8, height=H, width=W)


def _write_phone_clip(path, rotation: int) -> str:
    """A landscape-stored clip with a display matrix, as phones record portrait video: white
    in the left quarter of the stored frame, black elsewhere."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 96, 48, "yuv420p"
        stream.set_display_rotation(rotation)
        rgb = np.zeros((48, 96, 3), np.uint8)
        rgb[:, :24] = 255
        for _ in range(10):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def test_phone_clip_is_turned_upright_as_players_show_it(tmp_path):
    """Rotation 90 (counterclockwise, as FFmpeg players apply it): the stored frame's left
    edge ends up at the bottom of a portrait picture."""
    path = _write_phone_clip(tmp_path / "phone.mp4", rotation=90)
    clip = load_video(path, num_frames=9, fps=8, height=96, width=48)
    frame = np.asarray(clip.frames[0]).mean(axis=(1, 2))  # brightness per row
    assert frame[-10:].min() > 200 and frame[:60].max() < 50
    assert "48x96, turned 90 degrees as its display matrix says -> 48x96" in clip.summary


def test_phone_clip_turned_the_other_way_is_turned_upright_the_other_way(tmp_path):
    """Rotation 270: the stored frame's left edge ends up at the top of a portrait picture."""
    path = _write_phone_clip(tmp_path / "phone.mp4", rotation=270)
    clip = load_video(path, num_frames=9, fps=8, height=96, width=48)
    frame = np.asarray(clip.frames[0]).mean(axis=(1, 2))  # brightness per row
    assert frame[:10].min() > 200 and frame[-60:].max() < 50
    assert "48x96, turned 270 degrees as its display matrix says -> 48x96" in clip.summary


def test_a_clip_recorded_upside_down_is_turned_180_degrees_as_players_show_it(tmp_path):
    """A phone held upside down writes a half turn: the stored frame's left edge ends up on
    the right of the picture."""
    path = _write_phone_clip(tmp_path / "phone.mp4", rotation=180)
    clip = load_video(path, num_frames=9, fps=8, height=48, width=96)
    columns = np.asarray(clip.frames[0]).mean(axis=(0, 2))  # brightness per column
    assert columns[-20:].min() > 200 and columns[:66].max() < 50
    assert "96x48, turned 180 degrees as its display matrix says -> 96x48" in clip.summary


def _with_display_matrix(path: str, matrix: tuple[int, ...]) -> str:
    """The mp4 with its track header's display matrix replaced (a, b, u, c, d, v, x, y, w),
    as QuickTime Player's Flip Horizontal and Flip Vertical write it."""
    data = bytearray(Path(path).read_bytes())
    at = data.index(b"tkhd") + 4
    # version and flags, times and track id (wider in version 1), reserved, layer, group,
    # volume, reserved, then the matrix.
    at += 4 + (32 if data[at] == 1 else 20) + 8 + 2 + 2 + 2 + 2
    data[at : at + 36] = struct.pack(">9i", *matrix)
    Path(path).write_bytes(bytes(data))
    return path


ONE = 1 << 16


@pytest.mark.parametrize(
    ("matrix", "said", "white_at"),
    [
        ((-ONE, 0, 0, 0, ONE, 0, 96 * ONE, 0, 1 << 30), "mirrored", "right"),
        ((ONE, 0, 0, 0, -ONE, 0, 0, 48 * ONE, 1 << 30), "flipped upside down", "bottom"),
    ],
    ids=["flip horizontal", "flip vertical"],
)
def test_a_mirrored_display_matrix_mirrors_the_clip_as_players_do(tmp_path, matrix, said, white_at):
    """Its rotation alone reads as 180 degrees (a horizontal flip) or none (a vertical one)."""
    path = _write_phone_clip(tmp_path / "flipped.mp4", rotation=0)
    stored = np.zeros((48, 96), np.uint8)
    stored[:, :24] = 255  # white on the left, as _write_phone_clip stores it
    clip = load_video(_with_display_matrix(path, matrix), 9, 8, height=48, width=96)
    frame = np.asarray(clip.frames[0]).mean(axis=2)
    expected = np.fliplr(stored) if white_at == "right" else np.flipud(stored)
    assert np.abs(frame - expected).max() < 60
    assert f"96x48, {said} as its display matrix says" in clip.summary


def test_clip_without_rotation_is_left_as_stored(tmp_path):
    path = _write_phone_clip(tmp_path / "flat.mp4", rotation=0)
    clip = load_video(path, num_frames=9, fps=8, height=48, width=96)
    columns = np.asarray(clip.frames[0]).mean(axis=(0, 2))
    assert columns[:20].min() > 200 and columns[30:].max() < 50
    assert "turned" not in clip.summary


def _write_anamorphic_clip(
    path, pixel_aspect: Fraction, width: int = 40, height: int = 48, rotation: int = 0
) -> str:
    """A clip whose pixels are shown pixel_aspect times as wide as high, as a DVD's or an HDV
    camera's are (720x480 shown at 16:9, 1440x1080 shown at 1920x1080): white in the top
    quarter of the frame, black below. rotation: a display matrix's, as a phone writes it."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.sample_aspect_ratio = pixel_aspect
        if rotation:
            stream.set_display_rotation(rotation)
        rgb = np.zeros((height, width, 3), np.uint8)
        rgb[: height // 4] = 255
        for _ in range(10):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def test_a_clip_of_non_square_pixels_is_taken_at_the_shape_players_show(tmp_path):
    """40x48 of pixels twice as wide as high is shown 80x48, the model's own shape: nothing is
    cropped. Read as 40x48, scaling it to cover 80x48 would crop the white top quarter away."""
    path = _write_anamorphic_clip(tmp_path / "dvd.mp4", Fraction(2))
    clip = load_video(path, num_frames=9, fps=8, height=H, width=W)
    rows = np.asarray(clip.frames[0]).mean(axis=(1, 2))  # brightness per row
    assert rows[:10].min() > 200 and rows[-30:].max() < 50
    assert "40x48, its pixels shown 2:1 -> 80x48" in clip.summary


def test_a_turned_clip_of_non_square_pixels_is_stretched_across_its_stored_width(tmp_path):
    """Its pixels are wide along the stored frame's rows, which the quarter turn stands up:
    40x48 at 2:1 is shown 80x48, turned 48x80, the model's shape here, so nothing is cropped
    and the white top quarter turns into the left quarter. Stretched across the turned
    width instead, the centre crop would leave only a black strip."""
    path = _write_anamorphic_clip(tmp_path / "turned.mp4", Fraction(2), rotation=90)
    clip = load_video(path, num_frames=9, fps=8, height=80, width=48)
    columns = np.asarray(clip.frames[0]).mean(axis=(0, 2))  # brightness per column
    assert columns[:10].min() > 200 and columns[-30:].max() < 50
    assert "48x40, turned 90 degrees as its display matrix says, its pixels shown 2:1" in (
        clip.summary
    )


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP", "BMP"])
def test_a_still_image_is_refused_pointing_to_the_image_to_video_predictor(tmp_path, image_format):
    path = tmp_path / "photo"
    Image.new("RGB", (W, H), "red").save(path, image_format)
    with pytest.raises(InputError, match=f"video is a {image_format} image, not a video") as raised:
        load_video(path, num_frames=9, fps=8, height=H, width=W)
    assert "use the image-to-video predictor" in str(raised.value)


def test_an_animated_webp_is_refused_as_an_image_not_a_picture(tmp_path):
    path = tmp_path / "animation.webp"
    frames = [Image.new("RGB", (W, H), colour) for colour in ("red", "blue", "green")]
    frames[0].save(path, "WEBP", save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(InputError, match="video is an animated WEBP image") as raised:
        load_video(path, num_frames=9, fps=8, height=H, width=W)
    assert "image-to-video" not in str(raised.value)


def test_a_playlist_naming_other_files_is_not_read_as_a_video(tmp_path):
    """FFmpeg's concat demuxer would decode the clip the upload names, from the server's disk."""
    _write_clip(tmp_path / "on-the-server.mp4", frames=12, fps=8)
    playlist = tmp_path / "upload.mp4"
    playlist.write_text("ffconcat version 1.0\nfile on-the-server.mp4\n")
    with pytest.raises(InputError, match="could not be read as a video"):
        load_video(playlist, num_frames=9, fps=8, height=H, width=W)


def _mux_silence(container, audio, sample_format: str) -> None:
    """2 s of mono silence at 8 kHz into `audio`, in the sample format its codec takes."""
    dtype = np.float32 if sample_format == "fltp" else np.int16
    for index in range(16):
        samples = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), dtype), format=sample_format, layout="mono"
        )
        samples.sample_rate, samples.pts = 8000, index * 1024
        container.mux(audio.encode(samples))
    container.mux(audio.encode())


def test_a_song_with_cover_art_is_refused_as_having_no_video_track(tmp_path):
    """An m4a's artwork is a one-frame video stream (attached picture), not a clip."""
    path = tmp_path / "song.m4a"
    with av.open(str(path), "w", format="mp4") as container:
        audio = container.add_stream("aac", rate=8000)
        cover = container.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 64, 48, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        _mux_silence(container, audio, "fltp")
        picture = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 99, np.uint8), format="rgb24")
        container.mux(cover.encode(picture))
        container.mux(cover.encode())
    with pytest.raises(InputError, match=r"video has no video track \(only a cover picture\)"):
        load_video(path, num_frames=9, fps=8, height=H, width=W)


@pytest.mark.parametrize("suffix, codec", [(".mp3", "libmp3lame"), (".wav", "pcm_s16le")])
def test_an_audio_file_is_refused_as_having_no_video_track(tmp_path, suffix, codec):
    """Not as a file that could not be read: a song sent by mistake is told what it lacks."""
    path = tmp_path / f"song{suffix}"
    with av.open(str(path), "w") as container:
        audio = container.add_stream(codec, rate=8000)
        _mux_silence(container, audio, "s16")
    with pytest.raises(InputError, match=r"video has no video track; send an mp4"):
        load_video(path, num_frames=9, fps=8, height=H, width=W)


def test_a_clip_in_a_codec_without_a_decoder_is_refused_asking_for_h264(tmp_path):
    """FFmpeg has no decoder for some cameras' raw formats (Blackmagic RAW: 'braw')."""
    data = Path(_write_clip(tmp_path / "clip.mov", frames=10, fps=8)).read_bytes()
    assert data.count(b"avc1") == 1  # the sample entry's format
    (tmp_path / "raw.mov").write_bytes(data.replace(b"avc1", b"braw"))
    with pytest.raises(InputError, match=r"cannot be decoded here; re-encode it as H\.264"):
        load_video(tmp_path / "raw.mov", num_frames=9, fps=8, height=H, width=W)


def test_a_clip_whose_title_is_not_utf8_is_read(tmp_path):
    """Older cameras and tools write tags in Latin-1: 'café' as caf\\xe9."""
    path = tmp_path / "titled.mp4"
    with av.open(str(path), "w") as container:
        container.metadata["title"] = "cafe\u00e9"
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(10):
            rgb = np.full((48, 64, 3), 100, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    data = path.read_bytes()
    assert data.count("cafe\u00e9".encode()) == 1
    path.write_bytes(data.replace("cafe\u00e9".encode(), b"cafe\xe9 "))  # same length
    assert len(load_video(path, num_frames=9, fps=8, height=H, width=W).frames) == 9


# Saturated colours tell the matrices apart (by up to 25 of 255 levels); greys do not.
PATCHES = [(200, 30, 30), (30, 180, 40), (40, 60, 220), (250, 220, 20)]


@pytest.mark.parametrize(
    ("colorspace", "color_range"),
    [("ITU709", "MPEG"), ("ITU709", "JPEG"), ("ITU601", "MPEG"), ("BT2020", "MPEG")],
    ids=["bt709-limited", "bt709-full", "bt601-limited", "bt2020-limited"],
)
def test_a_clip_is_read_with_the_colour_matrix_and_range_it_is_tagged_with(
    tmp_path, colorspace, color_range
):
    """Phones write BT.709 (full range, some of them); a reader that took every clip as BT.601
    limited, or ignored the range, would shift saturated colours by 20 levels and more."""
    path = str(tmp_path / "tagged.mp4")
    rgb = np.zeros((48, 64, 3), np.uint8)
    for index, colour in enumerate(PATCHES):
        rgb[:, 16 * index : 16 * (index + 1)] = colour
    space, value_range = getattr(Colorspace, colorspace), getattr(ColorRange, color_range)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=8, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.colorspace, stream.codec_context.color_range = space, value_range
        for index in range(10):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                format="yuv420p", dst_colorspace=space, dst_color_range=value_range
            )
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    first = np.asarray(load_video(path, num_frames=9, fps=8, height=48, width=64).frames[0])
    centres = [first[24, 16 * index + 8].astype(int) for index in range(len(PATCHES))]
    assert np.abs(np.array(centres) - np.array(PATCHES)).max() <= 3, centres


@pytest.mark.parametrize("convert_colour", [False, True], ids=["default", "converted"])
def test_a_clip_tagged_with_a_matrix_ffmpeg_cannot_convert_is_refused_naming_it(
    tmp_path, convert_colour
):
    """YCgCo (H.273 matrix 8): FFmpeg's libswscale has no conversion of it to RGB, for the
    plain reading nor for the HDR one (the clip is tagged HLG)."""
    path = str(tmp_path / "ycgco.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.colorspace = 8
        stream.codec_context.color_trc = ColorTrc.ARIB_STD_B67
        for index in range(10):
            frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame.reformat(format="yuv420p")))
        container.mux(stream.encode())
    with pytest.raises(InputError, match=r"colour matrix \(YCgCo\).*re-encode it with a BT.709"):
        load_video(path, num_frames=9, fps=8, height=H, width=W, convert_colour=convert_colour)
