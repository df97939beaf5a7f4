"""HDR and wide-gamut video-to-video clips: read as they are by default, as upstream reads
them, and with convert_colour as the SDR BT.709 picture they should show.

Expected values come from published figures and the standards' own formulas written out here,
never from the code under test: ITU-R BT.2408's signal levels, BT.2087's BT.709 to BT.2020
matrix, BT.2100's PQ and HLG, and BT.1886's gamma 2.4 for SDR.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from av.video.reformatter import ColorPrimaries, Colorspace, ColorTrc

from cogvideox_cog.media.clip import load_video
from cogvideox_cog.media.image import fit_image
from tests.colour_clips import H, W, write_clip

# ITU-R BT.2087: linear BT.709 RGB to linear BT.2020 RGB.
BT709_TO_BT2020 = np.array(
    [[0.6274, 0.3293, 0.0433], [0.0691, 0.9195, 0.0114], [0.0164, 0.0880, 0.8956]]
)
BT2020_LUMA = np.array([0.2627, 0.6780, 0.0593])
REFERENCE_WHITE = 203.0  # cd/m2, ITU-R BT.2408
HDR = {"PQ": ColorTrc.SMPTE2084, "HLG": ColorTrc.ARIB_STD_B67}
NAMES = ["HLG", "PQ", "SDR-BT.2020"]


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


def _converted(path):
    return load_video(path, num_frames=9, fps=8, height=H, width=W, convert_colour=True)


def _patches(path) -> np.ndarray:
    """The centre pixel of each 16-pixel column of the clip's first frame, converted."""
    first = np.asarray(_converted(path).frames[0])
    return np.array([first[H // 2, 16 * index + 8] for index in range(W // 16)], int)


@pytest.mark.parametrize(
    ("transfer", "white_signal"), [("HLG", 0.75), ("PQ", 0.58)], ids=["HLG", "PQ"]
)
def test_hdr_reference_white_and_grey_read_as_their_sdr_levels(tmp_path, transfer, white_signal):
    """BT.2408's levels: reference white (75% HLG, 58% PQ) is SDR white, and an 18% grey card
    (38% in both, 26 cd/m2) is 26/203 of it. Read as they are (the default), both are dim:
    white at 190 (HLG) or 147 (PQ) of 255, grey at 96 instead of 108."""
    signals = [(white_signal,) * 3, (0.38,) * 3]
    path = write_clip(tmp_path / "hdr.mp4", signals, HDR[transfer])
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
    path = write_clip(tmp_path / "wide.mp4", [_signal(transfer, c) for c in COLOURS], trc)
    patches = _patches(path)[: len(COLOURS)]
    assert np.abs(patches - _sdr_levels(COLOURS)).max() <= 3, patches


@pytest.mark.parametrize(
    ("primaries", "made_on"),
    [(ColorPrimaries.BT709, "BT.709"), (ColorPrimaries.UNSPECIFIED, "BT.2020")],
    ids=["tagged-BT.709", "untagged"],
)
def test_an_hdr_clip_is_taken_on_bt2020_primaries_unless_tagged_bt709(tmp_path, primaries, made_on):
    """PQ and HLG are defined on BT.2020's primaries: a clip whose primaries are not tagged
    is read on them. One tagged BT.709 is read on BT.709's, without the conversion."""
    signals = [
        _pq(np.asarray(c) * REFERENCE_WHITE) if made_on == "BT.709" else _signal("PQ", c)
        for c in COLOURS
    ]
    path = write_clip(tmp_path / "hdr.mp4", signals, ColorTrc.SMPTE2084, primaries=primaries)
    patches = _patches(path)[: len(COLOURS)]
    assert np.abs(patches - _sdr_levels(COLOURS)).max() <= 3, patches


def test_hlgs_system_gamma_weighs_a_saturated_colour_by_its_bt2020_luminance(tmp_path):
    """BT.2100's OOTF raises the scene light to a power of its luminance, of the BT.2020
    signal: weighed as BT.709 luminance, a saturated red comes out 2 levels too dark."""
    red = (0.8, 0.0, 0.0)
    path = write_clip(tmp_path / "red.mp4", [_signal("HLG", red)], ColorTrc.ARIB_STD_B67)
    patch = _patches(path)[0]
    assert abs(patch[0] - _sdr_levels(red)[0]) <= 1, patch


@pytest.mark.parametrize("transfer", ["HLG", "PQ"])
def test_an_hdr_highlight_brighter_than_reference_white_is_full_sdr_white(tmp_path, transfer):
    """Highlights are clipped at SDR white: the brightest code, 255, not a level below it."""
    path = write_clip(tmp_path / "highlight.mp4", [(1.0, 1.0, 1.0)], HDR[transfer])
    assert _patches(path)[0].tolist() == [255, 255, 255]


def test_an_hdr_highlight_keeps_its_hue_at_sdr_white(tmp_path):
    """A bright sky at 1.8 times reference white is scaled whole to fit: it stays the same
    blue. Clipped channel by channel, it would turn cyan (green at 245, not 191)."""
    sky = np.array([0.5, 0.9, 1.8])
    path = write_clip(tmp_path / "sky.mp4", [_signal("PQ", sky)], ColorTrc.SMPTE2084)
    patch = _patches(path)[0]
    assert np.abs(patch - _sdr_levels(sky / sky.max())).max() <= 3, patch


def test_a_bt2020_colour_outside_bt709_keeps_the_channels_bt709_can_show(tmp_path):
    """BT.2020's green primary lies outside BT.709: in BT.709 it has negative red and blue,
    which are clipped; its green stays."""
    green = np.array([0.0, 0.5, 0.0])  # linear BT.2020, half of reference white
    signal = _pq(green * REFERENCE_WHITE)
    path = write_clip(tmp_path / "green.mp4", [signal], ColorTrc.SMPTE2084)
    in_bt709 = np.linalg.inv(BT709_TO_BT2020) @ green
    assert in_bt709[0] < 0 and in_bt709[2] < 0
    patch = _patches(path)[0]
    assert np.abs(patch - _sdr_levels(np.clip(in_bt709, 0, 1))).max() <= 3, patch


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_a_colour_outside_bt709_is_clipped_before_encoding_not_left_negative(tmp_path):
    """A negative channel left to the encoding table is the root of a negative number, NaN,
    whose conversion to an index numpy leaves undefined (it warns)."""
    green = np.array([0.0, 0.5, 0.0])
    path = write_clip(tmp_path / "green.mp4", [_pq(green * REFERENCE_WHITE)], ColorTrc.SMPTE2084)
    _patches(path)


def test_an_sdr_bt2020_clips_full_white_and_black_read_as_255_and_0(tmp_path):
    """The top 16-bit codes are SDR's brightest light, not clipped below it."""
    path = write_clip(tmp_path / "sdr.mp4", [(1.0, 1.0, 1.0), (0.0, 0.0, 0.0)], ColorTrc.BT2020_10)
    assert _patches(path)[:2].tolist() == [[255, 255, 255], [0, 0, 0]]


def _decoded_as_it_is(path, height: int, width: int) -> np.ndarray:
    """The first frame as FFmpeg decodes it to RGB with the clip's matrix and range, fitted."""
    with av.open(path) as container:
        first = next(container.decode(video=0))
        return np.asarray(fit_image(first.to_image().convert("RGB"), height, width))


def test_an_sdr_bt709_clip_is_read_as_it_is_even_when_converting(tmp_path):
    """Fully tagged BT.709: the frames are exactly those decoded to RGB and fitted."""
    path = write_clip(
        tmp_path / "sdr.mp4",
        [(0.8, 0.3, 0.1), (0.2, 0.7, 0.3), (0.1, 0.2, 0.9), (0.5, 0.5, 0.5)],
        ColorTrc.BT709,
        primaries=ColorPrimaries.BT709,
        colorspace=Colorspace.ITU709,
    )
    clip = load_video(path, num_frames=9, fps=8, height=40, width=60, convert_colour=True)
    assert np.array_equal(np.asarray(clip.frames[0]), _decoded_as_it_is(path, 40, 60))
    assert "BT.709" not in clip.summary


@pytest.mark.parametrize(
    "trc", [ColorTrc.ARIB_STD_B67, ColorTrc.SMPTE2084, ColorTrc.BT2020_10], ids=NAMES
)
def test_by_default_an_hdr_or_bt2020_clip_is_read_as_it_is_as_upstream_reads_it(tmp_path, trc):
    """Upstream's load_video has FFmpeg decode the frames to RGB with neither conversion."""
    path = write_clip(tmp_path / "clip.mp4", [(0.75,) * 3, (0.38,) * 3, (0.6, 0.3, 0.1)], trc)
    clip = load_video(path, num_frames=9, fps=8, height=40, width=60)
    assert np.array_equal(np.asarray(clip.frames[0]), _decoded_as_it_is(path, 40, 60))
    assert "; colours read as they are, as upstream reads them (convert_colour=true: " in (
        clip.summary
    )


@pytest.mark.parametrize(
    ("trc", "said"),
    [
        (ColorTrc.ARIB_STD_B67, "; HDR (HLG) tone-mapped to SDR BT.709"),
        (ColorTrc.SMPTE2084, "; HDR (PQ) tone-mapped to SDR BT.709"),
        (ColorTrc.BT2020_10, "; BT.2020 primaries converted to BT.709"),
    ],
    ids=NAMES,
)
def test_the_summary_says_how_the_colours_were_converted(tmp_path, trc, said):
    path = write_clip(tmp_path / "clip.mp4", [(0.5, 0.5, 0.5)], trc)
    assert _converted(path).summary.endswith(said)


@pytest.mark.parametrize(
    ("convert", "said"),
    [
        (True, "; HDR (HLG) tone-mapped to SDR BT.709"),
        (False, "(convert_colour=true: HDR (HLG) tone-mapped to SDR BT.709)"),
    ],
    ids=["converted", "default"],
)
def test_the_summary_names_a_conversion_that_starts_after_the_first_frame(tmp_path, convert, said):
    """A stream spliced from an SDR BT.709 part and an HLG one: its first frame is SDR, the
    next picked frame HDR."""
    sdr = write_clip(
        tmp_path / "sdr.h264",
        [(0.5, 0.5, 0.5)],
        ColorTrc.BT709,
        primaries=ColorPrimaries.BT709,
        colorspace=Colorspace.ITU709,
    )
    hlg = write_clip(tmp_path / "hlg.h264", [(0.5, 0.5, 0.5)], ColorTrc.ARIB_STD_B67)
    spliced = tmp_path / "spliced.h264"
    spliced.write_bytes(Path(sdr).read_bytes() + Path(hlg).read_bytes())
    # Read at the stream's own 8 fps: frame 0 (SDR) at 0 s, frame 16 (HLG) at 2 s.
    clip = load_video(spliced, num_frames=3, fps=1, height=H, width=W, convert_colour=convert)
    assert clip.summary.endswith(said)
