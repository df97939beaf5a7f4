"""Clips whose frames are each coded on their own (MJPEG, ProRes, PNG...): only the frames
picked are decoded, and they are the frames that decoding every frame picks."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from cogvideox_cog.errors import InputError
from cogvideox_cog.media import clip as video_input
from cogvideox_cog.media.clip import load_video

H, W = 48, 80  # the tiny models' resolution
ALLOWED = range(9, 50, 8)
# Frame times in 1/240 s: 24 fps on average, with frames early, late, held and 4 ms apart,
# and one exactly at a target time (60: 0.25 s).
IRREGULAR = [0, 10, 19, 31, 40, 50, 52, 60, 61, 95, 100, 110, 118, 130, 140, 150]
IRREGULAR += [160 + 10 * index + (index % 3) * 3 for index in range(60)]


def _write_clip(path, codec, pix_fmt, times, key=None, held=10, time_base=240) -> str:
    """A clip whose frame i, shown at times[i] / time_base s for 10 / time_base s (its last
    for held / time_base s), is a flat grey of level 3 * i, coded by `codec`; key(i) False
    marks frame i's packet as not a key frame."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        stream.codec_context.time_base = Fraction(1, time_base)
        for index, time in enumerate(times):
            rgb = np.full((48, 64, 3), (3 * index) % 256, np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = time, Fraction(1, time_base)
            for packet in stream.encode(frame):
                packet.duration = held if index == len(times) - 1 else 10
                if key is not None:
                    packet.is_keyframe = key(index)
                container.mux(packet)
        container.mux(stream.encode())
    return str(path)


def _every_frame_decoded(monkeypatch, *args, **kwargs):
    """load_video as it reads a clip of an inter-frame codec: every frame decoded in order."""
    with monkeypatch.context() as patch:
        patch.setattr(video_input, "_intra_coded", lambda codec: False)
        return load_video(*args, **kwargs)


def _pictures(clip) -> list[bytes]:
    return [frame.tobytes() for frame in clip.frames]


def _decoded(clip) -> str:
    """The summary's count of frames decoded: "9 of 26" where only the picked ones were."""
    return re.search(r"(\d+(?: of \d+)?) frames decoded", clip.summary)[1]


CLIPS = {
    "mjpeg.mov": ("mjpeg", "yuvj420p"),
    "mjpeg.avi": ("mjpeg", "yuvj420p"),
    "mjpeg.mkv": ("mjpeg", "yuvj420p"),
    "prores.mov": ("prores_ks", "yuv422p10le"),
    "png.mov": ("png", "rgb24"),
    "png-16-bit.mov": ("png", "rgb48be"),
}


@pytest.mark.parametrize("name", CLIPS)
@pytest.mark.parametrize("num_frames", [9, 17])
def test_an_intra_coded_clip_gives_the_frames_that_decoding_every_frame_gives(
    tmp_path, monkeypatch, name, num_frames
):
    codec, pix_fmt = CLIPS[name]
    path = _write_clip(tmp_path / name.replace("-", "."), codec, pix_fmt, IRREGULAR)
    every = _every_frame_decoded(monkeypatch, path, num_frames, fps=8, height=H, width=W)
    clip = load_video(path, num_frames, fps=8, height=H, width=W)
    assert _pictures(clip) == _pictures(every)
    assert " of " in _decoded(clip)
    assert len(set(_pictures(clip))) > num_frames // 2  # not one picture over and over


@pytest.mark.parametrize("name", ["mjpeg.mov", "png.mov"])
def test_an_intra_coded_clip_whose_last_frame_is_held_gives_the_frames_of_every_frame_decoded(
    tmp_path, monkeypatch, name
):
    """The last frame, from 190 / 240 s, is held for 2 s: it is on screen for the targets
    from 0.875 s to 2 s, and no frame after it shows that."""
    codec, pix_fmt = CLIPS[name]
    path = _write_clip(tmp_path / name, codec, pix_fmt, IRREGULAR[:20], held=480)
    every = _every_frame_decoded(monkeypatch, path, num_frames=17, fps=8, height=H, width=W)
    clip = load_video(path, num_frames=17, fps=8, height=H, width=W)
    assert _pictures(clip) == _pictures(every)
    assert " of " in _decoded(clip)
    assert len(set(_pictures(clip)[7:])) == 1


def test_an_intra_coded_clip_decodes_only_the_frames_picked(tmp_path, monkeypatch):
    path = _write_clip(tmp_path / "clip.mov", "prores_ks", "yuv422p10le", IRREGULAR)
    every = _every_frame_decoded(monkeypatch, path, num_frames=17, fps=8, height=H, width=W)
    clip = load_video(path, num_frames=17, fps=8, height=H, width=W)
    # 2 s at 8 fps: frames to 480 of 1/240 s, and the one after, which shows it is covered.
    read = 1 + sum(time <= 480 for time in IRREGULAR)
    assert f"{read} frames decoded" in every.summary
    assert f"17 of {read} frames decoded" in clip.summary


def test_a_png_frame_added_to_the_one_before_is_decoded_with_it(tmp_path, monkeypatch):
    """FFmpeg's PNG decoder adds a frame whose packet is not marked as a key frame to the
    frame before it, so those before it back to a key frame are decoded too."""
    path = _write_clip(tmp_path / "clip.mov", "png", "rgb24", IRREGULAR, key=lambda i: i % 7 == 0)
    every = _every_frame_decoded(monkeypatch, path, num_frames=17, fps=8, height=H, width=W)
    clip = load_video(path, num_frames=17, fps=8, height=H, width=W)
    assert _pictures(clip) == _pictures(every)
    assert " of " in _decoded(clip)


def test_a_png_clip_cut_after_a_key_frame_by_its_edit_list_gives_the_frames_decoded_in_order(
    tmp_path, monkeypatch
):
    """A mov's edit list may start the clip after a key frame: the frames before its start are
    decoded, for the frames added to them, but not shown (their packets marked discard)."""
    times, key = [-30, -20, -10, *IRREGULAR], lambda i: i % 7 == 0
    path = _write_clip(tmp_path / "clip.mov", "png", "rgb24", times, key=key)
    with av.open(path) as container:
        assert [p.is_discard for p in container.demux(video=0)][:4] == [True] * 3 + [False]
    every = _every_frame_decoded(monkeypatch, path, num_frames=17, fps=8, height=H, width=W)
    clip = load_video(path, num_frames=17, fps=8, height=H, width=W)
    assert _pictures(clip) == _pictures(every)
    assert " of " in _decoded(clip)


def _without_quantisation_tables(jpeg: bytes) -> bytes:
    """The JPEG with its DQT segments left out, to be decoded with the tables last defined."""
    at, kept = 2, [jpeg[:2]]
    while jpeg[at + 1] != 0xDA:  # up to the picture data
        length = int.from_bytes(jpeg[at + 2 : at + 4], "big")
        if jpeg[at + 1] != 0xDB:
            kept.append(jpeg[at : at + 2 + length])
        at += 2 + length
    return b"".join([*kept, jpeg[at:]])


# Two APP1 segments of 40,000 bytes (a camera's EXIF and maker notes), before a JPEG's tables.
LARGE_METADATA = (b"\xff\xe1" + (40_002).to_bytes(2, "big") + bytes(40_000)) * 2


@pytest.mark.parametrize(
    ("name", "metadata"),
    [("mjpeg.mov", b""), ("mjpeg.avi", b""), ("mjpeg.mov", LARGE_METADATA)],
    ids=["mov", "avi", "mov-tables-behind-64-kib-of-metadata"],
)
def test_a_jpeg_without_tables_is_decoded_with_those_of_a_frame_not_picked(
    tmp_path, monkeypatch, name, metadata
):
    """An MJPEG frame may leave its tables out, as JPEG's abbreviated form allows: FFmpeg
    decodes it with those last defined. Here only frame 11 (from 110 / 240 s, not on screen
    at a target time) brings the coarse quantisation of the frames after it, also where its
    metadata puts them further in than the first 64 KiB looked at."""
    frames = []
    for quality in (2, 31):
        encoder = av.CodecContext.create("mjpeg", "w")
        encoder.width, encoder.height, encoder.pix_fmt = 64, 48, "yuvj420p"
        encoder.time_base, encoder.qmin, encoder.qmax = Fraction(1, 240), quality, quality
        coded = []
        for index in range(len(IRREGULAR)):
            rgb = np.full((48, 64, 3), (3 * index) % 256, np.uint8)
            rgb[::2, ::3] = 250  # detail, for the quantisation to show
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p")
            frame.pts = index
            coded += [bytes(packet) for packet in encoder.encode(frame)]
        frames.append(coded)
    path = tmp_path / name
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        stream.codec_context.time_base = Fraction(1, 240)
        for index, time in enumerate(IRREGULAR):
            jpeg = frames[index >= 11][index]
            if index == 11:
                jpeg = jpeg[:2] + metadata + jpeg[2:]
            packet = av.Packet(jpeg if index in (0, 11) else _without_quantisation_tables(jpeg))
            packet.stream, packet.pts, packet.dts = stream, time, time
            packet.time_base, packet.duration, packet.is_keyframe = Fraction(1, 240), 10, True
            container.mux(packet)
    every = _every_frame_decoded(monkeypatch, path, num_frames=9, fps=8, height=H, width=W)
    clip = load_video(path, num_frames=9, fps=8, height=H, width=W)
    assert _pictures(clip) == _pictures(every)
    assert " of " in _decoded(clip)


@pytest.mark.parametrize(
    "name, codec, pix_fmt",
    [("png.mov", "png", "rgba"), ("prores-4444.mov", "prores_ks", "yuva444p10le")],
)
def test_a_clips_transparent_parts_are_white_as_an_images_are(tmp_path, name, codec, pix_fmt):
    """Not the colour the transparent pixels hold: here a keyed-out green screen."""
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., 1] = 255  # green, and transparent but for the left half
    rgba[:, :32] = (200, 100, 50, 255)
    path = tmp_path / name
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        for index in range(12):
            frame = av.VideoFrame.from_ndarray(rgba, format="rgba")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    clip = load_video(path, num_frames=9, fps=8, height=48, width=64)
    pixels = np.asarray(clip.frames[4]).astype(int)
    assert np.abs(pixels[24, 8] - (200, 100, 50)).max() <= 3
    assert np.abs(pixels[24, 56] - (255, 255, 255)).max() <= 3


def test_an_mjpeg_frame_of_too_many_progressive_scans_is_refused_before_it_is_decoded(tmp_path):
    """Each scan decodes the whole picture again: 10,000 of them made a 4000x4000 frame of
    593 KB take 5 s."""
    encoder = av.CodecContext.create("mjpeg", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 64, 48, "yuvj420p"
    encoder.time_base = Fraction(1, 8)
    rgb = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 128, np.uint8), format="rgb24")
    jpeg = b"".join(bytes(p) for p in encoder.encode(rgb.reformat(format="yuvj420p")))
    last_scan = jpeg[jpeg.rindex(b"\xff\xda") : -2]
    bomb = jpeg[:-2] + last_scan * 100 + b"\xff\xd9"  # the scan again, 100 more times
    path = tmp_path / "clip.mov"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for index in range(12):
            packet = av.Packet(bomb if index == 3 else jpeg)
            packet.stream, packet.pts, packet.dts = stream, index, index
            packet.time_base, packet.duration, packet.is_keyframe = Fraction(1, 8), 1, True
            container.mux(packet)
    with pytest.raises(InputError, match="frame 4 is a progressive JPEG of over 100 scans"):
        load_video(path, num_frames=9, fps=8, height=H, width=W)


@pytest.mark.parametrize(
    "name, codec, pix_fmt, options",
    [
        ("h264.mp4", "libx264", "yuv420p", {}),
        ("h264-every-frame-a-key-frame.mp4", "libx264", "yuv420p", {"x264-params": "keyint=1"}),
        ("mpeg4-marked-key-frames.avi", "mpeg4", "yuv420p", {}),  # AVI marks every frame key
        ("hevc.mp4", "libx265", "yuv420p", {}),
        ("vp9.webm", "libvpx-vp9", "yuv420p", {}),
        ("gif.gif", "gif", "rgb8", {}),  # a GIF frame may draw only what changed
        ("ffv1.mkv", "ffv1", "yuv420p", {}),  # keeps its coder's state from frame to frame
        ("qtrle.mov", "qtrle", "rgb24", {}),  # codes only the lines that changed
    ],
)
def test_a_clip_of_a_codec_whose_frames_depend_on_others_has_every_frame_decoded(
    tmp_path, name, codec, pix_fmt, options
):
    path = tmp_path / name
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=24, options=options)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        for index in range(40):
            rgb = np.full((48, 64, 3), 5 * index, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        assert not video_input._intra_coded(container.streams.video[0].codec_context.codec)
    assert " of " not in _decoded(load_video(path, num_frames=9, fps=8, height=H, width=W))


def test_a_too_short_intra_coded_clip_is_measured_by_its_frames_not_those_decoded(tmp_path):
    path = _write_clip(tmp_path / "clip.mov", "mjpeg", "yuvj420p", IRREGULAR)
    with pytest.raises(InputError, match=r"too short: 3\.19 s \(76 frames\).*num_frames=25"):
        load_video(path, num_frames=33, fps=8, height=H, width=W, allowed_frames=ALLOWED)


def test_an_intra_coded_clip_needing_too_many_frames_is_refused_as_before(tmp_path, monkeypatch):
    monkeypatch.setattr(video_input, "MAX_DECODED_FRAMES", 30)
    path = _write_clip(tmp_path / "clip.mov", "mjpeg", "yuvj420p", IRREGULAR)
    assert len(load_video(path, num_frames=9, fps=8, height=H, width=W).frames) == 9
    with pytest.raises(InputError, match=r"more than 30 decoded frames to cover 2\.0 s"):
        load_video(path, num_frames=17, fps=8, height=H, width=W)


def _damaged(tmp_path, number: int, name: str = "png.mov", times=IRREGULAR) -> str:
    """A clip (PNG unless named) whose frame `number` (from 1) has its picture data
    overwritten."""
    codec, pix_fmt = CLIPS[name]
    path = _write_clip(tmp_path / "clip.mov", codec, pix_fmt, times)
    with av.open(path) as container:
        packets = [packet for packet in container.demux(video=0) if packet.size]
        data = bytes(packets[number - 1])
    data_at = data.index(b"IDAT") + 8 if codec == "png" else len(data) // 40
    broken = data[:data_at] + bytes(range(40)) + data[data_at + 40 :]
    content = Path(path).read_bytes()
    assert content.count(data) == 1
    Path(path).write_bytes(content.replace(data, broken))
    return path


def test_damage_in_a_picked_frame_is_refused_as_decoding_every_frame_refuses_it(
    tmp_path, monkeypatch
):
    path = _damaged(tmp_path, number=13)  # from 118 / 240 s: on screen at 0.5 s
    with pytest.raises(InputError) as every:
        _every_frame_decoded(monkeypatch, path, num_frames=9, fps=8, height=H, width=W)
    with pytest.raises(InputError) as error:
        load_video(path, num_frames=9, fps=8, height=H, width=W)
    assert "damaged or truncated: only 12 frames (0.49 s" in str(every.value)
    assert str(error.value) == str(every.value)


@pytest.mark.parametrize("name", ["png.mov", "prores.mov"])
def test_damage_in_the_last_frame_picked_is_refused_as_decoding_every_frame_refuses_it(
    tmp_path, monkeypatch, name
):
    """The frames still in a frame-threaded decoder after the last packet come out together:
    those before the broken one count, and its error is not lost (PNG's is a zlib error,
    ProRes's invalid data, which PyAV drops when frames came out before it)."""
    path = _damaged(tmp_path, number=24, name=name)  # from 236 / 240 s: on screen at 1 s
    with pytest.raises(InputError) as every:
        _every_frame_decoded(monkeypatch, path, num_frames=9, fps=8, height=H, width=W)
    with pytest.raises(InputError) as error:
        load_video(path, num_frames=9, fps=8, height=H, width=W)
    assert "damaged or truncated: only 23 frames (0.97 s" in str(every.value)
    # The same error, got from sending a packet or from taking a frame.
    call = r"'avcodec_\w+\(\)'"
    assert re.sub(call, "", str(error.value)) == re.sub(call, "", str(every.value))


def test_a_clip_broken_in_its_last_frame_picked_is_not_called_too_short(tmp_path):
    """It ends just after that frame: measured to its end, it would be long enough."""
    path = _damaged(tmp_path, number=24, name="prores.mov", times=IRREGULAR[:25])
    with pytest.raises(InputError, match=r"damaged or truncated: only 23 frames \(0\.97 s"):
        load_video(path, num_frames=9, fps=8, height=H, width=W)


def _write_mkv_broken_at(path, times, broken: int, durations: dict) -> Path:
    """A ProRes Matroska clip of frames at times (1/240 s), each shown 10 / 240 s unless
    durations gives another, with frame `broken` (from 0) damaged."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("prores_ks", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv422p10le"
        stream.codec_context.time_base = Fraction(1, 240)
        for index, time in enumerate(times):
            rgb = np.full((48, 64, 3), 5 * index, np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv422p10le")
            frame.pts, frame.time_base = time, Fraction(1, 240)
            for coded in stream.encode(frame):
                data = bytes(coded)
                if index == broken:
                    data = data[: len(data) // 40] + bytes(range(40)) + data[len(data) // 40 + 40 :]
                packet = av.Packet(data)
                packet.stream, packet.pts, packet.dts = stream, coded.pts, coded.dts
                packet.time_base, packet.is_keyframe = coded.time_base, True
                packet.duration = durations.get(index, 10)
                container.mux(packet)
    return path


def test_a_broken_frame_is_stood_in_for_by_the_one_before_while_that_is_still_shown(
    tmp_path, monkeypatch
):
    """A Matroska block may last past the next one's time. Decoding every frame, the frame
    before a broken one shows the targets up to its end: here frame 24 (from 230 / 240 s)
    lasts to 250 and frame 25 (from 236, on screen at 1 s) is broken."""
    times = [*range(0, 240, 10), 236, 250, 260, 270]
    path = _write_mkv_broken_at(tmp_path / "clip.mkv", times, broken=24, durations={23: 20})
    every = _every_frame_decoded(monkeypatch, path, num_frames=9, fps=8, height=H, width=W)
    clip = load_video(path, num_frames=9, fps=8, height=H, width=W)
    assert _pictures(clip) == _pictures(every)
    assert "9 of 24 frames decoded" in clip.summary


def test_a_picked_frame_standing_in_for_a_broken_one_is_not_decoded_again(tmp_path, monkeypatch):
    """Frame 21 (from 205 / 240 s, lasting to 245) is on screen at 0.875 s and, as frame 22
    (from 236) is broken, at 1 s too: the picture already made of it is taken again."""
    times = [*range(0, 200, 10), 205, 236, 250, 260, 270]
    path = _write_mkv_broken_at(tmp_path / "clip.mkv", times, broken=21, durations={20: 40})
    every = _every_frame_decoded(monkeypatch, path, num_frames=9, fps=8, height=H, width=W)
    clip = load_video(path, num_frames=9, fps=8, height=H, width=W)
    assert _pictures(clip) == _pictures(every)
    assert "8 of 21 frames decoded" in clip.summary


def test_damage_in_a_frame_not_picked_goes_unnoticed(tmp_path):
    path = _damaged(tmp_path, number=12)  # from 110 / 240 s: the next is on screen at 0.5 s
    assert len(load_video(path, num_frames=9, fps=8, height=H, width=W).frames) == 9


def test_a_new_palette_in_a_frame_not_picked_is_still_given_to_the_decoder(tmp_path, monkeypatch):
    """An AVI of 8-bit palette pictures carries a palette only where it changes (here every
    fourth frame); the decoder keeps it for the frames after."""
    path = tmp_path / "palette.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("rawvideo", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "pal8"
        for index in range(40):
            palette = np.zeros((256, 4), np.uint8)
            palette[0] = [20 * (index // 4), 20 * (index // 4), 20 * (index // 4), 255]
            frame = av.VideoFrame.from_ndarray((np.zeros((48, 64), np.uint8), palette), "pal8")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    every = _every_frame_decoded(monkeypatch, path, num_frames=9, fps=8, height=H, width=W)
    clip = load_video(path, num_frames=9, fps=8, height=H, width=W)
    assert _pictures(clip) == _pictures(every)
    assert " of " in _decoded(clip)
    assert len(set(_pictures(clip))) == 7  # 24 fps -> 8 fps: frames 0, 3, 6, ..., 24
