"""The image-to-video image: opened upright and safely, fitted without stretching."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cogvideox_cog.errors import InputError
from cogvideox_cog.media.image import fit_image, open_image


def _encode(image: Image.Image, fmt: str, **kwargs) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    buffer.seek(0)
    return buffer


def test_exif_orientation_is_applied():
    landscape = Image.new("RGB", (60, 40), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    opened = open_image(_encode(landscape, "JPEG", exif=exif))
    assert opened.size == (40, 60)


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    opened = open_image(_encode(rgba, "PNG"))
    assert opened.mode == "RGB"
    assert opened.getpixel((3, 3)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_png_transparency_colour_key_becomes_white(mode):
    black = Image.new(mode, (8, 8), 0)
    opened = open_image(_encode(black, "PNG", transparency=0 if mode == "L" else (0, 0, 0)))
    assert opened.getpixel((3, 3)) == (255, 255, 255)


def _png_16_bits(colour_type: int, key: bytes, rows: list[bytes]) -> io.BytesIO:
    """A 16-bit PNG with a tRNS colour key, written by hand: Pillow cannot write 16-bit RGB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(
        ">IIBBBBB",
        len(rows[0]) // (6 if colour_type == 2 else 2),
        len(rows),
        16,
        colour_type,
        0,
        0,
        0,
    )
    pixels = zlib.compress(b"".join(b"\0" + row for row in rows))
    return io.BytesIO(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"tRNS", key)
        + chunk(b"IDAT", pixels)
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("colour_type", "key", "other", "shown"),
    [
        (0, struct.pack(">H", 0x1000), struct.pack(">H", 0x8000), (127, 127, 127)),  # grey
        (2, struct.pack(">HHH", 0xFFFF, 0x8000, 0), struct.pack(">HHH", 0, 0, 0xFFFF), (0, 0, 255)),
    ],
    ids=["grey", "rgb"],
)
def test_a_16_bit_png_transparency_colour_key_becomes_white(colour_type, key, other, shown):
    opened = open_image(_png_16_bits(colour_type, key, [key * 4 + other * 4] * 8))
    assert opened.getpixel((1, 3)) == (255, 255, 255)  # the key's colour: transparent
    assert opened.getpixel((6, 3)) == shown


@pytest.mark.parametrize(
    ("pixels", "fmt", "grey"),
    [
        (np.full((8, 8), 0x8000, np.uint16), "PNG", 127),  # 16-bit grey PNG, mid-grey
        (np.full((8, 8), 0x1000, np.uint16), "PNG", 15),  # a dark one: not clipped to white
        (np.full((8, 8), 40000, np.int32), "TIFF", 155),  # 32-bit integer TIFF, 16-bit values
        (np.full((8, 8), 0.5, np.float32), "TIFF", 127),  # floating point in 0..1
    ],
)
def test_deep_greyscale_images_are_scaled_to_8_bits_not_clipped(pixels, fmt, grey):
    opened = open_image(_encode(Image.fromarray(pixels), fmt))
    assert opened.mode == "RGB"
    assert opened.getpixel((3, 3)) == (grey, grey, grey)


def test_greyscale_and_palette_images_become_rgb():
    assert open_image(_encode(Image.new("L", (8, 8), 90), "PNG")).mode == "RGB"
    assert open_image(_encode(Image.new("P", (8, 8), 3), "GIF")).mode == "RGB"


def test_a_non_image_file_is_refused_with_the_accepted_formats():
    with pytest.raises(InputError, match="JPEG, PNG"):
        open_image(io.BytesIO(b"%PDF-1.4 not a picture"))


def test_a_truncated_image_is_refused():
    data = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG").getvalue()
    with pytest.raises(InputError, match="damaged or truncated"):
        open_image(io.BytesIO(data[: len(data) // 2]))


def test_an_image_with_a_damaged_header_is_refused_as_damaged():
    bmp = bytearray(_encode(Image.new("RGB", (4, 4)), "BMP").getvalue())
    bmp[28] = 7  # bits per pixel: no such BMP
    with pytest.raises(InputError, match="image is damaged"):
        open_image(io.BytesIO(bytes(bmp)))


@pytest.mark.parametrize("side", [9000, 20000])
def test_a_huge_declared_size_is_refused_before_decoding(side):
    # A small file whose header claims side x side pixels (a decompression bomb).
    bomb = _encode(Image.new("1", (side, side)), "PNG")
    with pytest.raises(InputError, match=r"image is .*the limit is 64 MP"):
        open_image(bomb)


def test_fit_image_covers_and_centre_crops_without_stretching():
    image = Image.new("RGB", (200, 100), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 50, 100))  # red left quarter is cropped away
    fitted = fit_image(image, height=100, width=100)
    assert fitted.size == (100, 100)
    assert fitted.getpixel((5, 50))[2] > 200  # left edge is blue, not red


def _adobe_rgb_profile() -> bytes:
    """Adobe RGB (1998) as an ICC v2 matrix profile, written by hand: Pillow makes only sRGB."""

    def s15(*values: float) -> bytes:
        return b"".join(struct.pack(">i", round(v * 65536)) for v in values)

    white = s15(0.9642, 1.0, 0.82491)  # D50, the profile connection space's white
    gamma = b"curv" + bytes(4) + struct.pack(">IH", 1, 563) + bytes(2)  # 563/256 = 2.2
    name = b"Adobe RGB (1998)\0"
    tags = [
        (b"desc", b"desc" + bytes(4) + struct.pack(">I", len(name)) + name + bytes(79)),
        (b"wtpt", b"XYZ " + bytes(4) + white),
        (b"rXYZ", b"XYZ " + bytes(4) + s15(0.60974, 0.31111, 0.01947)),
        (b"gXYZ", b"XYZ " + bytes(4) + s15(0.20528, 0.62567, 0.06087)),
        (b"bXYZ", b"XYZ " + bytes(4) + s15(0.14919, 0.06322, 0.74457)),
        (b"rTRC", gamma),
        (b"gTRC", gamma),
        (b"bTRC", gamma),
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


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_an_embedded_colour_profile_is_converted_to_srgb(fmt):
    # Adobe RGB (200, 100, 50) is (227, 100, 42) in sRGB: a camera's orange, read as sRGB,
    # would lose a tenth of its red.
    stored = Image.new("RGB", (8, 8), (200, 100, 50))
    kwargs = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
    opened = open_image(_encode(stored, fmt, icc_profile=_adobe_rgb_profile(), **kwargs))
    assert np.abs(np.subtract(opened.getpixel((4, 4)), (227, 100, 42))).max() <= 1


def test_a_transparent_image_with_a_colour_profile_is_still_flattened_onto_white():
    rgba = Image.new("RGBA", (8, 8), (200, 100, 50, 0))
    rgba.putpixel((0, 0), (200, 100, 50, 255))
    opened = open_image(_encode(rgba, "PNG", icc_profile=_adobe_rgb_profile()))
    assert opened.getpixel((4, 4)) == (255, 255, 255)
    assert np.abs(np.subtract(opened.getpixel((0, 0)), (227, 100, 42))).max() <= 1


def test_an_unusable_colour_profile_leaves_the_colours_as_stored(caplog):
    stored = Image.new("RGB", (8, 8), (200, 100, 50))
    opened = open_image(_encode(stored, "PNG", icc_profile=b"not a profile" * 20))
    assert opened.getpixel((4, 4)) == (200, 100, 50)
    assert "colour profile could not be used" in caplog.text
