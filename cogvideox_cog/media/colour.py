"""HDR and wide-gamut video frames to the SDR BT.709 colours the model was trained on.

An HDR frame (PQ or HLG on BT.2020 primaries: what phones record as HDR) read into 8-bit RGB
as it is comes out dim and washed out: reference white at 147 of 255 (PQ) or 190 (HLG), an
18% grey at 96 instead of 108, every colour duller. An SDR frame with BT.2020 primaries comes
out duller too. That is how upstream reads them, so it stays the default; a request with
convert_colour converts each to the picture an SDR BT.709 display should show:

1. Read as 16-bit R'G'B' with its tagged matrix and range, so that a 10-bit signal keeps its
   precision into the transfer functions.
2. To linear light (ITU-R BT.2100): PQ's EOTF gives cd/m2; HLG's inverse OETF gives scene
   light, and its OOTF the light of the 1,000 cd/m2 display BT.2100 takes as nominal
   (system gamma 1.2). SDR is made linear with BT.1886's gamma 2.4, which step 6 undoes.
3. HDR reference white, 203 cd/m2, becomes SDR white (ITU-R BT.2408): light / 203.
4. BT.2020 primaries to BT.709, in linear light.
5. Into SDR's range: a pixel brighter than white is scaled down whole until its brightest
   channel is white; channels still below 0 (colours outside BT.709) are clipped.
6. Encoded with the inverse of BT.1886 (gamma 1 / 2.4), as a BT.709 display shows it.

Steps 3 and 5 are the tone curve: BT.2408's direct mapping, reference white to SDR white and
brighter highlights clipped. FFmpeg's own colour management (libswscale, the default intent of
its scale filter) maps HLG the same way: 75% HLG to 99.8% SDR, brighter clipped (measured).
Curves that keep detail above reference white pay for it with everything below it: BT.2390's
EETF to a 203 cd/m2 target puts reference white at 230 of 255, and that filter's perceptual
intent (libplacebo's knee) at 173, a dim picture again, where SDR puts diffuse white at the
top of its range. Highlights are scaled whole, not clipped per channel, so that they keep
their hue and saturation: a bright blue sky stays blue, where per-channel clipping turns it
cyan (and desaturating it towards its luminance, white). Colours outside BT.709 are few in
camera footage; clipping them is what FFmpeg's colorspace filter does too.

Why numpy and not FFmpeg: the PyAV wheel's FFmpeg has neither zscale (it is built without
zimg) nor libplacebo. Its scale filter converts PQ and HLG through libswscale's colour
management, which first builds a 3D table for each filter graph: 3.5-5 s of a CPU core per
clip (9 s for the perceptual intent), then 35-40 ms a 720x1280 frame. The steps below need no
set-up and take about 30 ms a 720x1280 frame on one core (benchmarks/clip_colour.py).
"""

from __future__ import annotations

import functools

import av
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorTrc
from PIL import Image

# HDR reference white (diffuse white: a white page, a white shirt), in cd/m2: ITU-R BT.2408.
REFERENCE_WHITE = 203.0
# The HLG display BT.2100 takes as nominal, and its system gamma (1.2 at 1,000 cd/m2).
HLG_PEAK = 1000.0
HLG_GAMMA = 1.2
# BT.1886's display gamma: what SDR BT.709 video is shown with.
SDR_GAMMA = 2.4

_PQ = ColorTrc.SMPTE2084
_HLG = ColorTrc.ARIB_STD_B67
_HDR = {_PQ: "PQ", _HLG: "HLG"}

# CIE 1931 xy of the red, green and blue primaries; both spaces have the D65 white.
_BT709_XY = ((0.640, 0.330), (0.300, 0.600), (0.150, 0.060))
_BT2020_XY = ((0.708, 0.292), (0.170, 0.797), (0.131, 0.046))
_D65_XY = (0.3127, 0.3290)

_TOP = 65535  # a 16-bit code's full scale


def conversion(frame: av.VideoFrame) -> str | None:
    """What to_sdr makes of this frame, for the log; None for a frame read as it is (SDR
    BT.709 or BT.601, or untagged)."""
    hdr = _HDR.get(frame.color_trc)
    if hdr:
        return f"HDR ({hdr}) tone-mapped to SDR BT.709"
    if frame.color_primaries == ColorPrimaries.BT2020:
        return "BT.2020 primaries converted to BT.709"
    return None


def to_sdr(frame: av.VideoFrame) -> Image.Image:
    """The frame as 8-bit SDR BT.709 RGB, for a frame that conversion() names."""
    width, height = frame.width, frame.height
    transfer = frame.color_trc if frame.color_trc in _HDR else None
    # Planar, so that each step below runs over whole planes: numpy is several times slower
    # over rows of three values (max over them, a matrix, a gain per pixel).
    planes = frame.reformat(format="gbrp16le").planes
    table = _to_light(transfer)
    light = np.empty((3, height, width), np.float32)
    for channel, plane in zip((1, 2, 0), planes, strict=True):  # gbrp: green, blue, red
        codes = np.frombuffer(plane, "<u2").reshape(height, -1)[:, :width]
        np.take(table, codes, out=light[channel], mode="clip")  # "clip" is not buffered
    light = light.reshape(3, -1)
    # PQ and HLG are defined on BT.2020 primaries: only an HDR clip tagged BT.709 is taken so.
    wide = frame.color_primaries == ColorPrimaries.BT2020 or (
        transfer is not None and frame.color_primaries != ColorPrimaries.BT709
    )
    to_bt709 = _bt2020_to_bt709() if wide else np.eye(3, dtype=np.float32)
    if transfer == _HLG:
        # The OOTF: display light is scene light times (scene luminance) ** (gamma - 1), a
        # gain per pixel, so it may follow the primaries; one product gives both.
        luma = _BT2020_LUMA if wide else _BT709_LUMA
        light = np.concatenate([to_bt709, luma[None]]) @ light
        scene_luma = np.clip(light[3], 0, 1)
        light = light[:3]
        light *= _hlg_gain()[_root_index(scene_luma)]
    elif wide:
        light = to_bt709 @ light
    _fit_in_range(light)
    sdr = _encode()[_root_index(light)].reshape(3, height, width)
    return Image.merge("RGB", [Image.fromarray(channel) for channel in sdr])


def _fit_in_range(light: np.ndarray) -> None:
    """Step 5 on light (3 x N, linear BT.709, 1 = white), in place."""
    brightest = np.maximum(np.maximum(light[0], light[1]), light[2])
    light /= np.maximum(brightest, 1)
    np.clip(light, 0, 1, out=light)


def _root_index(light: np.ndarray) -> np.ndarray:
    """floor(sqrt(light) * 65535) for light in 0..1: an index into the tables below, finest
    near black, where gamma curves are steepest."""
    root = np.sqrt(light)
    root *= np.float32(_TOP)
    return root.astype(np.uint16)


def _root_midpoints() -> np.ndarray:
    """The light in the middle of each _root_index step."""
    return np.minimum((np.arange(_TOP + 1) + 0.5) / _TOP, 1) ** 2


@functools.cache
def _encode() -> np.ndarray:
    """The 8-bit BT.1886 code (gamma 1 / 2.4) of each _root_index."""
    return np.round(255 * _root_midpoints() ** (1 / SDR_GAMMA)).astype(np.uint8)


@functools.cache
def _hlg_gain() -> np.ndarray:
    """HLG's OOTF gain for each _root_index of scene luminance, display light in units of
    reference white: luminance ** (gamma - 1) * 1000 / 203."""
    gain = _root_midpoints() ** (HLG_GAMMA - 1) * (HLG_PEAK / REFERENCE_WHITE)
    return gain.astype(np.float32)


@functools.cache
def _to_light(transfer: int | None) -> np.ndarray:
    """Linear light of each 16-bit code: cd/m2 / 203 (PQ), scene light 0..1 (HLG), or SDR
    display light 0..1 (gamma 2.4)."""
    signal = np.arange(_TOP + 1) / _TOP
    if transfer == _PQ:
        m1, m2 = 2610 / 16384, 2523 / 4096 * 128
        c1, c2, c3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
        power = signal ** (1 / m2)
        light = 10000 * (np.maximum(power - c1, 0) / (c2 - c3 * power)) ** (1 / m1)
        light /= REFERENCE_WHITE
    elif transfer == _HLG:
        a = 0.17883277
        b, c = 1 - 4 * a, 0.5 - a * np.log(4 * a)
        upper = (np.exp((np.maximum(signal, 0.5) - c) / a) + b) / 12
        light = np.minimum(np.where(signal <= 0.5, signal**2 / 3, upper), 1)
    else:
        light = signal**SDR_GAMMA
    return light.astype(np.float32)


def _xyz_matrix(primaries, white) -> np.ndarray:
    """Linear RGB to CIE XYZ, for primaries and white given as xy."""
    xyz = np.array([[x / y, 1.0, (1 - x - y) / y] for x, y in primaries]).T
    white_xyz = np.array([white[0] / white[1], 1.0, (1 - white[0] - white[1]) / white[1]])
    return xyz * np.linalg.solve(xyz, white_xyz)


@functools.cache
def _bt2020_to_bt709() -> np.ndarray:
    to_bt709 = np.linalg.inv(_xyz_matrix(_BT709_XY, _D65_XY))
    return (to_bt709 @ _xyz_matrix(_BT2020_XY, _D65_XY)).astype(np.float32)


# Luminance of linear RGB: Y, the middle row of each matrix.
_BT709_LUMA = _xyz_matrix(_BT709_XY, _D65_XY)[1].astype(np.float32)
_BT2020_LUMA = _xyz_matrix(_BT2020_XY, _D65_XY)[1].astype(np.float32)


# Still pictures (HEIC) whose colours are declared by ITU-T H.273 code points (an nclx box)
# instead of an ICC profile: the transfer curves an SDR still may name.
SRGB_TRANSFER = 13
BT709_TRANSFERS = frozenset({1, 6, 14, 15})  # BT.709's curve, as BT.601 and BT.2020 give it too


def still_primaries_to_srgb(rgb: np.ndarray, primaries_xy, transfer: int) -> np.ndarray:
    """An 8-bit RGB picture on other primaries (D65 white) as sRGB: made linear with its own
    curve (sRGB's, or BT.1886's gamma 2.4 for BT.709's), converted to sRGB's primaries (those
    of BT.709), clipped, and encoded with the same curve. So only the primaries change."""
    codes = np.arange(256) / 255
    if transfer == SRGB_TRANSFER:
        to_light = np.where(codes <= 0.04045, codes / 12.92, ((codes + 0.055) / 1.055) ** 2.4)
    else:
        to_light = codes**SDR_GAMMA
    matrix = np.linalg.inv(_xyz_matrix(_BT709_XY, _D65_XY)) @ _xyz_matrix(primaries_xy, _D65_XY)
    light = np.clip(to_light[rgb] @ matrix.T, 0, 1)
    if transfer == SRGB_TRANSFER:
        signal = np.where(light <= 0.0031308, light * 12.92, 1.055 * light ** (1 / 2.4) - 0.055)
    else:
        signal = light ** (1 / SDR_GAMMA)
    return np.round(signal * 255).astype(np.uint8)


def is_d65(white_xy) -> bool:
    return abs(white_xy[0] - _D65_XY[0]) < 5e-4 and abs(white_xy[1] - _D65_XY[1]) < 5e-4
