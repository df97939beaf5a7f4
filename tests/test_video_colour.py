"""HDR and wide-gamut video-to-video clips are read as the SDR BT.709 picture they should show.

Expected values come from published figures and the standards' own formulas written out here,
never from the code under test: ITU-R BT.2408's signal levels, BT.2087's BT.709 to BT.2020
matrix, BT.2100's PQ and HLG, and BT.1886's gamma 2.4 for SDR.
"""

from __future__ import annotations

import av
import numpy as np
import pytest
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

from cogvideox_cog.media.clip import load_video
from cogvideox_cog.media.image import fit_image

H, W = 48, 64  # each patch is a 16-pixel column, whole chroma blocks of 4:2:0
# ITU-R BT.2087: linear BT.709 RGB to linear BT.2020 RGB.
BT709_TO_BT2020 = np.array(
    [[0.6274, 0.3293, 0.0433], [0.0691, 0.9195, 0.0114], [0.0164, 0.0880, 0.8956]]
)
BT2020_LUMA = np.array([0.2627, 0.6780, 0.0593])
REFERENCE_WHITE = 203.0  # cd/m2, ITU-R BT.2408
HDR = {"PQ": ColorTrc.SMPTE2084, "HLG": ColorTrc.ARIB_STD_B67}


def _pq(nits: np.ndarray) -> np.ndarray:
    """BT.2100 PQ's inverse EOTF: cd/m2 to signal."""
    m1, m2 = 2610 / 16384, 2523 / 32
    c1, c2, c3 = 3424 / 4096, 2413 / 128, 2392 / 128
    y = (np.asarray(nits, float) / 10000) ** m1
    return ((c1 + c2 * y) / (1 + c3 * y)) ** m2


def _hlg(nits: np.ndarray) -> np.ndarray:
    """BT.2100 HLG on its nominal 1,000 cd/m2 display: inverse OOTF (gamma 1.2), then OETF."""
    nits = np.asarray(nits, float)
    scene_luma = (nits @ BT2020_LUMA / 1000) ** (1 / 1.2)
    scene = nits / (1000 * scene_luma ** (1.2 - 1))
    a = 0.17883277
    b, c = 1 - 4 * a, 0.5 - a * np.log(4 * a)
    log = a * np.log(np.maximum(12 * scene - b, 1e-9)) + c
    return np.where(scene <= 1 / 12, np.sqrt(3 * scene), log)


def _sdr_levels(bt709_light) -> np.ndarray:
    """The 8-bit BT.709 signal of linear light (1 = white): BT.1886's gamma 2.4, inverted."""
    return 255 * np.asarray(bt709_light, float) ** (1 / 2.4)


def _signal(transfer: str, bt709_light) -> np.ndarray:
    """The BT.2020 signal of a linear BT.709 colour (1 = reference white) in a transfer."""
    bt2020 = np.asarray(bt709_light, float) @ BT709_TO_BT2020.T
    if transfer == "SDR":
        return bt2020 ** (1 / 2.4)
    nits = bt2020 * REFERENCE_WHITE
    return _pq(nits) if transfer == "PQ" else _hlg(nits)


def _write_clip(path, signals, trc, primaries=ColorPrimaries.BT2020, colorspace=None) -> str:
    """A lossless 10-bit clip whose frames are columns of the given R'G'B' signals (0..1),
    tagged with trc, primaries and a BT.2020 (or given) matrix, limited range."""
    colorspace = colorspace if colorspace is not None else Colorspace.BT2020
    rgb = np.zeros((H, W, 3), np.uint16)
    for index, signal in enumerate(signals):
        rgb[:, 16 * index : 16 * (index + 1)] = np.round(np.clip(signal, 0, 1) * 65535)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p10le"
        context = stream.codec_context
        context.color_trc, context.color_primaries = trc, primaries
        context.colorspace, context.color_range = colorspace, ColorRange.MPEG
        for index in range(10):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb48le").reformat(
                format="yuv420p10le", dst_colorspace=colorspace, dst_color_range=ColorRange.MPEG
            )
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with av.open(str(path)) as container:  # the tags reached the file, or the test is moot
        frame = next(container.decode(video=0))
        assert (frame.color_trc, frame.color_primaries) == (trc, primaries)
        assert (frame.colorspace, frame.format.name) == (colorspace, "yuv420p10le")
    return str(path)


def _patches(path) -> np.ndarray:
    """The centre pixel of each 16-pixel column of the clip's first frame, as read."""
    first = np.asarray(load_video(path, num_frames=9, fps=8, height=H, width=W).frames[0])
    return np.array([first[H // 2, 16 * index + 8] for index in range(W // 16)], int)


@pytest.mark.parametrize(
    ("transfer", "white_signal"), [("HLG", 0.75), ("PQ", 0.58)], ids=["HLG", "PQ"]
)
def test_hdr_reference_white_and_grey_read_as_their_sdr_levels(tmp_path, transfer, white_signal):
    """BT.2408's levels: reference white (75% HLG, 58% PQ) is SDR white, and an 18% grey card
    (38% in both, 26 cd/m2) is 26/203 of it. Read as they were, both came out dim: white at
    190 (HLG) or 147 (PQ) of 255, grey at 96 instead of 108."""
    signals = [(white_signal,) * 3, (0.38,) * 3]
    path = _write_clip(tmp_path / "hdr.mp4", signals, HDR[transfer])
    white, grey = _patches(path)[:2]
    assert white.min() >= 252, white
    assert np.abs(grey - _sdr_levels(26 / REFERENCE_WHITE)).max() <= 3, grey


# Linear BT.709 light, 1 = reference white: an orange, a green and a blue, all inside BT.709.
COLOURS = [(0.6, 0.25, 0.05), (0.1, 0.45, 0.12), (0.08, 0.12, 0.55)]


@pytest.mark.parametrize("transfer", ["HLG", "PQ", "SDR"])
def test_a_bt2020_colour_inside_bt709_reads_as_its_bt709_value(tmp_path, transfer):
    """Read as BT.709, BT.2020's primaries make every colour duller (the SDR orange's red
    23 levels short); converted, each is the BT.709 colour it was made from."""
    trc = HDR.get(transfer, ColorTrc.BT2020_10)
    path = _write_clip(tmp_path / "wide.mp4", [_signal(transfer, c) for c in COLOURS], trc)
    patches = _patches(path)[: len(COLOURS)]
    assert np.abs(patches - _sdr_levels(COLOURS)).max() <= 3, patches


def test_an_hdr_highlight_keeps_its_hue_at_sdr_white(tmp_path):
    """A bright sky at 1.8 times reference white is scaled whole to fit: it stays the same
    blue. Clipped channel by channel, it would turn cyan (green at 245, not 191)."""
    sky = np.array([0.5, 0.9, 1.8])
    path = _write_clip(tmp_path / "sky.mp4", [_signal("PQ", sky)], ColorTrc.SMPTE2084)
    patch = _patches(path)[0]
    assert np.abs(patch - _sdr_levels(sky / sky.max())).max() <= 3, patch


def test_a_bt2020_colour_outside_bt709_keeps_the_channels_bt709_can_show(tmp_path):
    """BT.2020's green primary lies outside BT.709: in BT.709 it has negative red and blue,
    which are clipped; its green stays."""
    green = np.array([0.0, 0.5, 0.0])  # linear BT.2020, half of reference white
    signal = _pq(green * REFERENCE_WHITE)
    path = _write_clip(tmp_path / "green.mp4", [signal], ColorTrc.SMPTE2084)
    in_bt709 = np.linalg.inv(BT709_TO_BT2020) @ green
    assert in_bt709[0] < 0 and in_bt709[2] < 0
    patch = _patches(path)[0]
    assert np.abs(patch - _sdr_levels(np.clip(in_bt709, 0, 1))).max() <= 3, patch


def test_an_sdr_bt709_clip_is_read_as_it_is(tmp_path):
    """Fully tagged BT.709: the frames are exactly those decoded to RGB and fitted, as before."""
    path = _write_clip(
        tmp_path / "sdr.mp4",
        [(0.8, 0.3, 0.1), (0.2, 0.7, 0.3), (0.1, 0.2, 0.9), (0.5, 0.5, 0.5)],
        ColorTrc.BT709,
        primaries=ColorPrimaries.BT709,
        colorspace=Colorspace.ITU709,
    )
    clip = load_video(path, num_frames=9, fps=8, height=40, width=60)
    with av.open(path) as container:
        first = next(container.decode(video=0))
        expected = fit_image(first.to_image().convert("RGB"), 40, 60)
    assert np.array_equal(np.asarray(clip.frames[0]), np.asarray(expected))
    assert "BT.709" not in clip.summary


@pytest.mark.parametrize(
    ("trc", "said"),
    [
        (ColorTrc.ARIB_STD_B67, "; HDR (HLG) tone-mapped to SDR BT.709"),
        (ColorTrc.SMPTE2084, "; HDR (PQ) tone-mapped to SDR BT.709"),
        (ColorTrc.BT2020_10, "; BT.2020 primaries converted to BT.709"),
    ],
    ids=["HLG", "PQ", "SDR-BT.2020"],
)
def test_the_summary_says_how_the_colours_were_converted(tmp_path, trc, said):
    path = _write_clip(tmp_path / "clip.mp4", [(0.5, 0.5, 0.5)], trc)
    assert load_video(path, num_frames=9, fps=8, height=H, width=W).summary.endswith(said)
