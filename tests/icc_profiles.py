"""ICC colour profiles for test pictures, written by hand: Pillow makes only sRGB."""

from __future__ import annotations

import struct

import numpy as np
from PIL import Image, ImageCms

XYZ = tuple[float, float, float]
_D50 = (0.9642, 1.0, 0.82491)  # the profile connection space's white


def _s15(*values: float) -> bytes:
    return b"".join(struct.pack(">i", round(v * 65536)) for v in values)


def _profile(name: str, kind: bytes, space: bytes, pcs: bytes, tags: list) -> bytes:
    """An ICC v2 profile of a device kind (mntr, prtr) and colour space, with a description
    and a white point besides the given tags."""
    text = name.encode() + b"\0"
    tags = [
        (b"desc", b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(79)),
        (b"wtpt", b"XYZ " + bytes(4) + _s15(*_D50)),
        *tags,
    ]
    table, data = struct.pack(">I", len(tags)), b""
    offset = 128 + 4 + 12 * len(tags)
    for signature, body in tags:
        body += bytes(-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (
        struct.pack(">I", 128 + len(table) + len(data))
        + bytes(4)
        + struct.pack(">I", 0x02100000)
        + kind
        + space
        + pcs
        + bytes(12)
        + b"acsp"
        + bytes(28)
        + _s15(*_D50)
        + bytes(48)
    )
    return header + table + data


def _gamma(gamma: float) -> bytes:
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)


def _matrix_profile(name: str, red: XYZ, green: XYZ, blue: XYZ, curve: bytes) -> bytes:
    """An RGB matrix profile."""
    tags = [
        (b"rXYZ", b"XYZ " + bytes(4) + _s15(*red)),
        (b"gXYZ", b"XYZ " + bytes(4) + _s15(*green)),
        (b"bXYZ", b"XYZ " + bytes(4) + _s15(*blue)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    return _profile(name, b"mntr", b"RGB ", b"XYZ ", tags)


def adobe_rgb_profile() -> bytes:
    return _matrix_profile(
        "Adobe RGB (1998)",
        (0.60974, 0.31111, 0.01947),
        (0.20528, 0.62567, 0.06087),
        (0.14919, 0.06322, 0.74457),
        _gamma(563 / 256),  # 2.2
    )


def srgb_curve(exponent: float = 2.4) -> bytes:
    """sRGB's tone curve, or one like it of another exponent."""
    return (
        b"para"
        + bytes(4)
        + struct.pack(">HH", 3, 0)
        + _s15(exponent, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
    )


def display_p3_profile() -> bytes:
    """Display P3, an iPhone photo's profile: P3 primaries under sRGB's tone curve."""
    return _matrix_profile(
        "Display P3",
        (0.515102, 0.241182, -0.001050),
        (0.291965, 0.692236, 0.041882),
        (0.157153, 0.066574, 0.784378),
        srgb_curve(),
    )


# sRGB's primaries (BT.709's) adapted to the profile connection space's D50 white.
_SRGB_RED = (0.436066, 0.222488, 0.013916)
_SRGB_GREEN = (0.385147, 0.716873, 0.097076)
_SRGB_BLUE = (0.143066, 0.060608, 0.714096)


def srgb_profile(name: str, curve: bytes | None = None) -> bytes:
    """sRGB under any name: Facebook's and Instagram's JPEGs carry one named "c2". curve:
    another tone curve (an ICC curv or para tag) on sRGB's primaries."""
    return _matrix_profile(name, _SRGB_RED, _SRGB_GREEN, _SRGB_BLUE, curve or srgb_curve())


def linear_srgb_profile(name: str = "sRGB linear") -> bytes:
    """sRGB's primaries in linear light (gamma 1), as a renderer's or a scanner's raw output
    is tagged: "sRGB" in its name, but its numbers are not sRGB's."""
    return _matrix_profile(name, _SRGB_RED, _SRGB_GREEN, _SRGB_BLUE, _gamma(1.0))


def grey_profile(gamma: float, name: str | None = None) -> bytes:
    """A greyscale picture's profile: grey under a pure gamma curve, as Photoshop's "Gray
    Gamma 1.8" and "Gray Gamma 2.2"."""
    name = name or f"Gray Gamma {gamma:g}"
    return _profile(name, b"mntr", b"GRAY", b"XYZ ", [(b"kTRC", _gamma(gamma))])


def srgb_grey_profile(name: str) -> bytes:
    """Grey under sRGB's tone curve, as GIMP's "GIMP built-in D65 Grayscale with sRGB TRC"."""
    return _profile(name, b"mntr", b"GRAY", b"XYZ ", [(b"kTRC", srgb_curve())])


# The sRGB colour of each ink printed alone on white paper, roughly a press's.
INKS = {
    "cyan": (0, 174, 239),
    "magenta": (236, 0, 140),
    "yellow": (255, 242, 0),
    "black": (35, 31, 32),
}


def cmyk_profile() -> bytes:
    """A print profile: CMYK to Lab through a table of the 16 corners of CMYK, each ink a
    colour of INKS, inks printed over each other multiplying in linear light."""
    corners = []
    for c, m, y, k in np.ndindex(2, 2, 2, 2):
        light = np.ones(3)
        for on, ink in zip((c, m, y, k), INKS.values(), strict=True):
            light *= (np.array(ink) / 255) ** 2.2 if on else 1
        corners.append(np.round(255 * light ** (1 / 2.2)).astype(np.uint8))
    to_lab = ImageCms.buildTransform(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB", 5000), "RGB", "LAB"
    )
    lab = to_lab.apply(Image.fromarray(np.array([corners], np.uint8)))
    # Pillow's Lab has a and b as signed bytes; a lut8 table holds them plus 128.
    table = np.asarray(lab).reshape(-1, 3).astype(np.int16)
    table[:, 1:] = table[:, 1:].astype(np.int8).astype(np.int16) + 128
    identity = bytes(range(256))
    lut = (
        b"mft1"
        + bytes(4)
        + bytes((4, 3, 2, 0))  # in and out channels, grid points
        + _s15(1, 0, 0, 0, 1, 0, 0, 0, 1)
        + identity * 4
        + table.astype(np.uint8).tobytes()
        + identity * 3
    )
    return _profile("Press CMYK", b"prtr", b"CMYK", b"Lab ", [(b"A2B0", lut)])
