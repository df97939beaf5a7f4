"""ICC colour profiles for test pictures, written by hand: Pillow makes only sRGB."""

from __future__ import annotations

import struct

XYZ = tuple[float, float, float]


def _s15(*values: float) -> bytes:
    return b"".join(struct.pack(">i", round(v * 65536)) for v in values)


def _matrix_profile(name: str, red: XYZ, green: XYZ, blue: XYZ, curve: bytes) -> bytes:
    """An RGB ICC v2 matrix profile, written by hand: Pillow makes only sRGB."""
    white = _s15(0.9642, 1.0, 0.82491)  # D50, the profile connection space's white
    text = name.encode() + b"\0"
    tags = [
        (b"desc", b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(79)),
        (b"wtpt", b"XYZ " + bytes(4) + white),
        (b"rXYZ", b"XYZ " + bytes(4) + _s15(*red)),
        (b"gXYZ", b"XYZ " + bytes(4) + _s15(*green)),
        (b"bXYZ", b"XYZ " + bytes(4) + _s15(*blue)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
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
        + b"mntrRGB XYZ "
        + bytes(12)
        + b"acsp"
        + bytes(28)
        + white
        + bytes(48)
    )
    return header + table + data


def adobe_rgb_profile() -> bytes:
    gamma = b"curv" + bytes(4) + struct.pack(">IH", 1, 563) + bytes(2)  # 563/256 = 2.2
    return _matrix_profile(
        "Adobe RGB (1998)",
        (0.60974, 0.31111, 0.01947),
        (0.20528, 0.62567, 0.06087),
        (0.14919, 0.06322, 0.74457),
        gamma,
    )


def display_p3_profile() -> bytes:
    """Display P3, an iPhone photo's profile: P3 primaries under sRGB's tone curve."""
    srgb_curve = b"para" + bytes(4) + struct.pack(">HH", 3, 0)
    srgb_curve += _s15(2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
    return _matrix_profile(
        "Display P3",
        (0.515102, 0.241182, -0.001050),
        (0.291965, 0.692236, 0.041882),
        (0.157153, 0.066574, 0.784378),
        srgb_curve,
    )
