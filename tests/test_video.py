"""encode_mp4 writes what every browser plays, exactly as asked; probe_mp4 reads it back."""

import logging
import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc
from PIL import Image

from cogvideox_cog.devtools.tiny_postprocess import tiny_ifnet, tiny_rrdbnet
from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.media.mp4 import above_level_5_1, encode_mp4, probe_mp4, x264_cpu_options
from cogvideox_cog.pipeline import build_pipeline
from cogvideox_cog.postprocess import Postprocessor
from cogvideox_cog.variants import VARIANTS

CPU = torch.device("cpu")
WIDTH, HEIGHT = 64, 48  # small keeps the file fast; multiples of 8 as the models produce


def _clip(frames: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """Gradients with a white square moving left to right: real content, not zeros."""
    x = np.linspace(0, 255, width)[None, :]
    y = np.linspace(0, 255, height)[:, None]
    video = np.empty((frames, height, width, 3), np.uint8)
    side = min(width, height) // 4
    top = (height - side) // 2
    for i in range(frames):
        video[i, ..., 0] = x
        video[i, ..., 1] = y
        video[i, ..., 2] = (x + y + 8 * i) % 256
        left = (width - side) * i // max(frames - 1, 1)
        video[i, top : top + side, left : left + side] = 255
    return video


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def clip_mp4(tmp_path_factory) -> Path:
    return encode_mp4(_clip(9), tmp_path_factory.mktemp("clip") / "clip.mp4", fps=8)


def test_codec_is_h264(clip_mp4):
    assert probe_mp4(clip_mp4)["codec"] == "h264"


def test_pixel_format_is_yuv420p(clip_mp4):
    assert probe_mp4(clip_mp4)["pix_fmt"] == "yuv420p"


def test_colours_are_tagged_bt709_limited_range_so_browsers_need_not_guess(clip_mp4):
    """Each of the four tags: an untagged primaries or transfer is left to each browser's
    guess, and they do not all guess BT.709."""
    with av.open(str(clip_mp4)) as container:
        context = container.streams.video[0].codec_context
        tags = (context.colorspace, context.color_primaries, context.color_trc)
        assert tags == (Colorspace.ITU709, ColorPrimaries.BT709, ColorTrc.BT709)
        assert context.color_range == ColorRange.MPEG


def test_moov_atom_comes_before_mdat(clip_mp4):
    assert probe_mp4(clip_mp4)["faststart"] is True


def test_probe_reports_a_file_without_faststart(tmp_path):
    """The faststart check is not vacuous: a plain mp4 muxer puts moov at the end."""
    plain = tmp_path / "plain.mp4"
    with av.open(str(plain), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for rgb in _clip(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    assert probe_mp4(plain)["faststart"] is False


@pytest.mark.parametrize("frames", [1, 49, 81])
def test_frame_count_is_exact(tmp_path, frames):
    out = encode_mp4(_clip(frames), tmp_path / "clip.mp4", fps=16)
    assert probe_mp4(out)["frames"] == frames


@pytest.mark.parametrize("fps", [8, 16, 24])
def test_fps_is_honoured_and_duration_is_frames_over_fps(tmp_path, fps):
    """Two contents: x264's frame types decide whether the muxer writes an edit list, which
    at the default ms timescale made the second clip 17 frames at 16 fps last 1.062 s."""
    for name, video in {"rgb": _clip(17), "bgr": _clip(17)[..., ::-1]}.items():
        info = probe_mp4(encode_mp4(video, tmp_path / f"{name}.mp4", fps=fps))
        assert info["fps"] == fps
        assert info["duration"] == pytest.approx(17 / fps, abs=1e-9)


def test_size_is_honoured_and_portrait_not_swapped(tmp_path):
    info = probe_mp4(encode_mp4(_clip(5, width=48, height=80), tmp_path / "clip.mp4", fps=8))
    assert (info["width"], info["height"]) == (48, 80)


def test_the_same_frames_encode_to_the_same_file_every_time(tmp_path):
    """On an AVX-512 machine x264's own choice gave 5 different files in 10 tries of this clip;
    elsewhere this passes either way."""
    noise = np.random.default_rng(0).integers(-6, 7, (9, 96, 160, 3))
    frames = np.clip(_clip(9, width=160, height=96) + noise, 0, 255).astype(np.uint8)
    files = {encode_mp4(frames, tmp_path / f"{i}.mp4", fps=8).read_bytes() for i in range(20)}
    assert len(files) == 1


def test_x264_is_held_to_avx2_only_where_the_cpu_has_avx512():
    avx2 = frozenset({"mmx", "sse2", "ssse3", "sse4_2", "avx", "fma", "bmi2", "avx2"})
    held = x264_cpu_options(avx2 | {"avx512f", "avx512bw"})
    assert held == {"x264-params": "asm=MMX2,SSE2Fast,SSSE3,SSE4.2,AVX,FMA3,BMI2,AVX2"}
    assert x264_cpu_options(avx2) == {}  # x264 picks its own
    assert x264_cpu_options(frozenset()) == {}  # not Linux, or not x86


def test_uint8_float_and_pil_inputs_encode_alike(tmp_path):
    video = _clip(9)
    inputs = {
        "uint8": video,
        "float": video.astype(np.float32) / 255.0,
        "pil": [Image.fromarray(frame) for frame in video],
    }
    decoded = {
        name: _decode(encode_mp4(frames, tmp_path / f"{name}.mp4", fps=8))
        for name, frames in inputs.items()
    }
    assert decoded["uint8"].shape == (9, HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(decoded["float"], decoded["uint8"])
    np.testing.assert_array_equal(decoded["pil"], decoded["uint8"])


def test_decoded_pixels_match_the_input(clip_mp4):
    """Catches swapped channels, transposed frames and colour-matrix mix-ups, not just headers."""
    error = np.abs(_decode(clip_mp4).astype(int) - _clip(9).astype(int))
    assert error.mean() < 4


@pytest.mark.parametrize(("width", "height"), [(49, 80), (48, 81)])
def test_odd_size_is_refused_naming_the_size(tmp_path, width, height):
    with pytest.raises(ValueError, match=rf"{width}x{height} .*even width and height"):
        encode_mp4(_clip(3, width=width, height=height), tmp_path / "clip.mp4", fps=8)
    assert list(tmp_path.iterdir()) == []


def test_no_temporary_file_is_left_behind(tmp_path):
    encode_mp4(_clip(5), tmp_path / "clip.mp4", fps=8)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_existing_file_is_replaced_only_once_the_new_one_is_complete(tmp_path, monkeypatch):
    out = tmp_path / "clip.mp4"
    out.write_bytes(b"previous video")
    real_replace = os.replace
    seen = {}

    def replace(src, dst):
        seen["old file still whole"] = Path(dst).read_bytes() == b"previous video"
        seen["new file complete"] = probe_mp4(src)["frames"] == 9
        seen["same directory"] = Path(src).parent == Path(dst).parent
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    encode_mp4(_clip(9), out, fps=8)
    assert seen == dict.fromkeys(seen, True) and len(seen) == 3
    assert probe_mp4(out)["frames"] == 9


def test_failed_encode_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    out = tmp_path / "clip.mp4"
    out.write_bytes(b"previous video")
    frames = [Image.fromarray(frame) for frame in _clip(9)]
    frames[6] = frames[6].resize((WIDTH // 2, HEIGHT // 2))  # fails mid-encode, not up front
    with pytest.raises(ValueError, match="frame 6 is 32x24 but frame 0 is 64x48"):
        encode_mp4(frames, out, fps=8)
    assert out.read_bytes() == b"previous video"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_an_encode_interrupted_mid_way_leaves_no_temp(tmp_path):
    """A KeyboardInterrupt (or a cancel raised as another BaseException) removes the
    unfinished file too, not only an error."""

    def frames():
        yield from _clip(3)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode_mp4(frames(), tmp_path / "clip.mp4", fps=8)
    assert list(tmp_path.iterdir()) == []


def _top_level_box_at(data: bytes, kind: bytes) -> int:
    offset = 0
    while data[offset + 4 : offset + 8] != kind:
        offset += int.from_bytes(data[offset : offset + 4], "big")
    return offset


def test_probe_reads_a_last_box_of_size_zero_as_running_to_the_end(clip_mp4, tmp_path):
    """An mp4 box of size 0 runs to the end of the file, as a muxer writing to a pipe
    leaves mdat."""
    data = clip_mp4.read_bytes()
    mdat = _top_level_box_at(data, b"mdat")
    assert mdat + int.from_bytes(data[mdat : mdat + 4], "big") == len(data)
    unsized = tmp_path / "unsized.mp4"
    unsized.write_bytes(data[:mdat] + bytes(4) + data[mdat + 4 :])
    assert probe_mp4(unsized)["faststart"] is True


def test_probe_refuses_a_box_smaller_than_its_own_header(clip_mp4, tmp_path):
    malformed = tmp_path / "malformed.mp4"
    malformed.write_bytes(clip_mp4.read_bytes() + b"\x00\x00\x00\x04free")
    with pytest.raises(ValueError, match="malformed mp4 box header at byte"):
        probe_mp4(malformed)


@pytest.mark.parametrize("fps", [0, -8, 7.5, True])
def test_fps_must_be_a_positive_integer(tmp_path, fps):
    with pytest.raises(ValueError, match="fps must be a positive integer"):
        encode_mp4(_clip(3), tmp_path / "clip.mp4", fps=fps)


def test_no_frames_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        encode_mp4([], tmp_path / "clip.mp4", fps=8)
    assert list(tmp_path.iterdir()) == []


def test_x264_is_not_held_to_avx2_where_the_cpu_does_not_report_avx2():
    """A virtual machine may pass AVX-512 through but hide AVX2: told asm=...AVX2, x264 would
    run instructions the CPU does not claim; it is left to pick its own there."""
    assert x264_cpu_options(frozenset({"mmx", "sse2", "avx512f"})) == {}


def test_float_frames_are_rounded_to_the_nearest_level_not_truncated(tmp_path):
    """0.4 of a level below each uint8 value: rounded, the same video; truncated, one level
    darker everywhere."""
    video = _clip(9)
    below = (np.maximum(video.astype(np.float32) - 0.4, 0.0)) / 255.0
    decoded = {
        name: _decode(encode_mp4(frames, tmp_path / f"{name}.mp4", fps=8))
        for name, frames in {"uint8": video, "float": below}.items()
    }
    np.testing.assert_array_equal(decoded["float"], decoded["uint8"])


def test_a_frame_of_another_width_alone_is_refused_not_rescaled(tmp_path):
    frames = list(_clip(9))
    frames[6] = _clip(1, width=WIDTH // 2)[0]
    with pytest.raises(ValueError, match="frame 6 is 32x48 but frame 0 is 64x48"):
        encode_mp4(frames, tmp_path / "clip.mp4", fps=8)


def test_frames_with_an_alpha_channel_are_refused_naming_their_shape(tmp_path):
    rgba = np.zeros((3, HEIGHT, WIDTH, 4), np.uint8)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) RGB, got shape \(48, 64, 4\)"):
        encode_mp4(rgba, tmp_path / "clip.mp4", fps=8)


def test_the_first_frame_is_shown_at_time_zero(clip_mp4):
    """A video that starts later shows nothing (or a player's black) for its first moment."""
    with av.open(str(clip_mp4)) as container:
        times = [frame.time for frame in container.decode(video=0)]
    assert times[:3] == [0.0, 0.125, 0.25]


@pytest.mark.parametrize(
    ("width", "height", "fps"),
    [
        (720, 480, 8),
        (1360, 768, 64),
        (2880, 1920, 45),
        (4080, 2304, 16),
        (4096, 2304, 16),
        (4096, 2048, 30),  # 983,040 macroblocks a second: level 5.1's most, allowed
    ],
)
def test_sizes_and_rates_within_h264_level_5_1_are_not_flagged(width, height, fps):
    assert above_level_5_1(width, height, fps) is None


def test_the_15_models_4x_upscale_is_flagged_for_its_frame_size():
    """5440x3072: 65,280 macroblocks a frame, which x264 writes as level 6.0."""
    assert "65,280 macroblocks a frame" in above_level_5_1(5440, 3072, 16)


def test_a_frame_edge_part_way_through_a_macroblock_counts_it_whole():
    """4096x2312: 145 rows of macroblocks (144.5 filled), 37,120 a frame, above 5.1's most."""
    assert "37,120 macroblocks a frame" in above_level_5_1(4096, 2312, 16)


def test_a_size_within_level_5_1_at_too_high_a_rate_is_flagged_for_its_rate():
    """2720x1536 (the 1.5 models' 2x) at 64 fps (16 fps interpolated 4x) is level 5.2."""
    assert "macroblocks a second" in above_level_5_1(2720, 1536, 64)
    assert above_level_5_1(2880, 1920, 46) is not None


class _Planned(Exception):
    """Raised by the transformer's first call: the request was planned, nothing rendered."""


def test_a_request_warns_of_the_level_its_upscaled_and_interpolated_output_needs(
    tiny_weights, caplog
):
    """CogVideoX-5B's 720x480 upscaled 4x is 2880x1920, within level 5.1 at 24 fps but not
    at the 48 fps that 2x interpolation makes: the warning is about the mp4 written. (The
    tiny model is set to the real size; the request stops before the transformer runs.)"""
    variant = VARIANTS["cogvideox-5b"]
    pipe = build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none")
    postprocessor = Postprocessor(tiny_ifnet(), tiny_rrdbnet())
    generator = VideoGenerator(
        variant, pipe, CPU, resolution="480x720", postprocessor=postprocessor
    )
    request = Request(
        prompt="a cat walks",
        negative_prompt="",
        num_frames=9,
        num_inference_steps=1,
        guidance_scale=6.0,
        use_dynamic_cfg=None,
        fps=24,
        seed=5,
        interpolate="2x",
        upscale="4x",
    )

    def stop(module, args, kwargs):
        raise _Planned

    handle = pipe.transformer.register_forward_pre_hook(stop, with_kwargs=True)
    caplog.set_level(logging.INFO, logger="cogvideox_cog")
    try:
        with pytest.raises(_Planned):
            generator.render_frames(request)
    finally:
        handle.remove()
    assert "output: 2880x1920 at 48 fps is 1,036,800 macroblocks a second" in caplog.text


def test_float_frames_beyond_0_to_1_are_clipped_not_wrapped_around(tmp_path):
    """A decoder's or upscaler's overshoot past white must stay white: cast to bytes as it is,
    1.02 wraps to a dark 4 and -0.02 to a bright 251."""
    video = _clip(9)
    overshoot = video.astype(np.float32) / 255.0
    overshoot[video == 255] = 1.02
    overshoot[video == 0] = -0.02
    decoded = {
        name: _decode(encode_mp4(frames, tmp_path / f"{name}.mp4", fps=8))
        for name, frames in {"uint8": video, "float": overshoot}.items()
    }
    np.testing.assert_array_equal(decoded["float"], decoded["uint8"])


def test_the_video_file_is_readable_as_the_umask_allows_not_only_by_its_owner(tmp_path):
    """Who may read the video is the umask's choice, as for any file written with open():
    0o666 less the umask, not a temporary file's 0o600."""
    previous = os.umask(0o022)
    try:
        out = encode_mp4(_clip(3), tmp_path / "clip.mp4", fps=8)
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o644


def test_integer_frames_other_than_uint8_are_refused_not_cast(tmp_path):
    """int64 levels above 255 would wrap around in a cast; the caller converts knowingly."""
    with pytest.raises(TypeError, match=r"uint8 or float in \[0, 1\], got dtype int64"):
        encode_mp4(_clip(3).astype(np.int64), tmp_path / "clip.mp4", fps=8)


def test_a_single_frame_array_is_refused_naming_the_four_dimensions_expected(tmp_path):
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\), got shape \(48, 64, 3\)"):
        encode_mp4(_clip(1)[0], tmp_path / "clip.mp4", fps=8)
