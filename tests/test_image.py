"""The image-to-video image: opened upright and safely, fitted without stretching."""

import io
import logging
import struct
import subprocess
import sys
import zlib

import numpy as np
import pillow_heif
import pytest
from diffusers.utils import load_image
from PIL import Image, ImageCms

from cogvideox_cog.errors import InputError
from cogvideox_cog.media.image import MAX_JPEG_SCANS, fit_image, open_image
from tests.icc_profiles import (
    INKS,
    adobe_rgb_profile,
    cmyk_profile,
    display_p3_profile,
    grey_profile,
    linear_srgb_profile,
    srgb_curve,
    srgb_grey_profile,
    srgb_profile,
)


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


def test_exif_orientation_is_applied_when_another_tag_has_an_unexpected_type():
    """Pillow cannot write back a WhitePoint (a rational) stored as text, as some cameras and
    editors store such tags; only the orientation is read here, so the photo still opens."""
    entries = [
        struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0),  # Orientation, a short: 6
        struct.pack("<HHI", 0x013E, 2, 4) + b"Cam\x00",  # WhitePoint, as ASCII
    ]
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, len(entries))
    exif += b"".join(entries) + struct.pack("<I", 0)
    landscape = Image.new("RGB", (60, 40))
    landscape.paste((255, 255, 255), (0, 0, 15, 40))  # white on the left
    opened = open_image(_encode(landscape, "JPEG", exif=exif, quality=95))
    rows = np.asarray(opened).mean(axis=(1, 2))
    assert opened.size == (40, 60) and rows[:10].min() > 200 and rows[20:].max() < 50


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
        # the key's red, not its green and blue: only a pixel equal in all three is transparent
        (
            2,
            struct.pack(">HHH", 0xFFFF, 0x8000, 0),
            struct.pack(">HHH", 0xFFFF, 0, 0xFFFF),
            (255, 0, 255),
        ),
    ],
    ids=["grey", "rgb", "rgb-sharing-a-channel"],
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
        (np.full((8, 8), 1.0, np.float32), "TIFF", 255),  # its white, 1.0, is still 0..1
        (np.full((8, 8), 200.0, np.float32), "TIFF", 200),  # floating point in 0..255
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
    with pytest.raises(InputError, match="JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF or HEIC"):
        open_image(io.BytesIO(b"%PDF-1.4 not a picture"))


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA"])
def test_a_format_pillow_reads_but_the_docs_do_not_offer_is_refused_naming_those(fmt):
    """ICO decodes in full before its size is known; the offered ones are those tested."""
    image = Image.new("RGB", (16, 16), (200, 100, 50))
    with pytest.raises(InputError, match="JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF or HEIC"):
        open_image(_encode(image, fmt))


def _with_scans(jpeg: bytes, extra: int) -> bytes:
    """A progressive JPEG with its last scan repeated `extra` more times before the end."""
    last = jpeg.rindex(b"\xff\xda")
    return jpeg[:-2] + jpeg[last:-2] * extra + b"\xff\xd9"


def test_a_progressive_jpeg_of_too_many_scans_is_refused_before_decoding():
    """Each scan decodes the whole picture again: 10,000 of them in a 1.4 MB file of 64 MP
    took 80 s of one C call, which a cancel cannot stop."""
    jpeg = _encode(Image.new("RGB", (64, 64), (200, 100, 50)), "JPEG", progressive=True)
    with pytest.raises(InputError, match="progressive JPEG of over 100 scans"):
        open_image(io.BytesIO(_with_scans(jpeg.getvalue(), 100)))


def test_a_progressive_jpeg_of_exactly_the_most_scans_allowed_is_read():
    jpeg = _encode(Image.new("RGB", (64, 64), (200, 100, 50)), "JPEG", progressive=True)
    scans = jpeg.getvalue().count(b"\xff\xda")
    most = _with_scans(jpeg.getvalue(), MAX_JPEG_SCANS - scans)
    assert most.count(b"\xff\xda") == MAX_JPEG_SCANS
    _assert_close(open_image(io.BytesIO(most)).getpixel((8, 8)), (200, 100, 50))


def test_fill_bytes_before_a_scans_marker_do_not_hide_the_scan_from_the_count():
    """A marker may follow any number of 0xFF fill bytes; read as a marker of its own, a fill
    byte took the scan's marker and length for a length that jumped past the scans."""
    jpeg = _encode(Image.new("RGB", (64, 64), (200, 100, 50)), "JPEG", progressive=True)
    filled = _with_scans(jpeg.getvalue(), 100).replace(b"\xff\xda", b"\xff\xff\xda")
    with pytest.raises(InputError, match="progressive JPEG of over 100 scans"):
        open_image(io.BytesIO(filled))


def test_a_multi_picture_jpeg_of_too_many_scans_is_refused_as_a_jpeg_is():
    """Cameras and phones write a JPEG with a second picture (a preview, a stereo view) in the
    MPO layout, which Pillow names MPO, not JPEG; its first picture is the one decoded."""
    pictures = [Image.new("RGB", (64, 64), colour) for colour in ((200, 100, 50), (50, 100, 200))]
    mpo = _encode(
        pictures[0], "MPO", save_all=True, append_images=pictures[1:], progressive=True
    ).getvalue()
    first_ends = mpo.index(b"\xff\xd9\xff\xd8") + 2
    bomb = _with_scans(mpo[:first_ends], 100) + mpo[first_ends:]
    assert Image.open(io.BytesIO(bomb)).format == "MPO"
    with pytest.raises(InputError, match="progressive JPEG of over 100 scans"):
        open_image(io.BytesIO(bomb))


def test_a_multi_picture_jpeg_whose_second_picture_has_too_many_scans_is_read():
    """Only the first picture is decoded: the scans after its end are never counted."""
    pictures = [Image.new("RGB", (64, 64), colour) for colour in ((200, 100, 50), (50, 100, 200))]
    mpo = _encode(
        pictures[0], "MPO", save_all=True, append_images=pictures[1:], progressive=True
    ).getvalue()
    first_ends = mpo.index(b"\xff\xd9\xff\xd8") + 2
    second = _with_scans(mpo[first_ends:], 10_000)
    assert len(second) > 2**16  # longer than any segment a misread length could skip
    opened = open_image(io.BytesIO(mpo[:first_ends] + second))
    _assert_close(opened.getpixel((8, 8)), (200, 100, 50))


def test_a_motion_photo_whose_video_holds_scan_markers_is_read():
    """Phones append the video to the picture (Samsung's and Google's motion photos); its
    compressed bytes hold a scan's marker about every 64 KiB, and counting every one refused
    a one-scan photo with a video of over 6 MB as a scan bomb."""
    jpeg = _encode(Image.new("RGB", (64, 64), (200, 100, 50)), "JPEG").getvalue()
    video = b"".join(b"\xff\xda" + bytes(range(i % 7, 200, 3)) for i in range(150))
    photo = jpeg + b"MotionPhoto_Data" + video
    _assert_close(open_image(io.BytesIO(photo)).getpixel((8, 8)), (200, 100, 50))


def test_a_progressive_jpeg_as_encoders_write_it_is_read():
    jpeg = _encode(Image.new("RGB", (64, 64), (200, 100, 50)), "JPEG", progressive=True)
    assert 5 < jpeg.getvalue().count(b"\xff\xda") < 100
    _assert_close(open_image(jpeg).getpixel((8, 8)), (200, 100, 50))


def test_a_grey_tiff_with_premultiplied_alpha_is_put_on_white():
    """Pillow opens a grey TIFF whose alpha is associated (premultiplied) in mode "La", which
    it cannot convert to RGB: the picture was refused as damaged."""
    grey = Image.new("LA", (8, 8), (100, 0))
    grey.putpixel((0, 0), (50, 255))
    data = _encode(grey, "TIFF").getvalue()
    unassociated = b"\x52\x01\x03\x00\x01\x00\x00\x00\x02\x00"  # ExtraSamples = 2
    data = data.replace(unassociated, unassociated[:8] + b"\x01\x00")
    assert Image.open(io.BytesIO(data)).mode == "La"
    image = open_image(io.BytesIO(data))
    assert image.getpixel((0, 0)) == (50, 50, 50)
    assert image.getpixel((4, 4)) == (255, 255, 255)


def _16_bit_grey_alpha_tiff(width: int = 8, height: int = 8) -> bytes:
    """A little-endian, uncompressed TIFF of 16-bit grey and alpha, which Pillow cannot read
    (and does not write): header, one IFD of 10 entries, then the pixels."""
    pixels_at = 8 + 2 + 10 * 12 + 4
    entries = [  # (tag, type: 3 SHORT or 4 LONG, count, value or two SHORTs)
        (256, 3, 1, width),
        (257, 3, 1, height),
        (258, 3, 2, 16 | 16 << 16),  # BitsPerSample 16, 16
        (259, 3, 1, 1),  # no compression
        (262, 3, 1, 1),  # BlackIsZero
        (273, 4, 1, pixels_at),
        (277, 3, 1, 2),  # SamplesPerPixel
        (278, 3, 1, height),
        (279, 4, 1, width * height * 4),
        (338, 3, 1, 2),  # ExtraSamples: unassociated alpha
    ]
    ifd = struct.pack("<H", len(entries))
    ifd += b"".join(struct.pack("<HHII", *entry) for entry in entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + bytes(width * height * 4)


def test_a_tiff_of_a_layout_the_reader_lacks_is_refused_saying_so():
    """It was told to send one of the formats, TIFF among them."""
    with pytest.raises(InputError, match=r"a TIFF of a layout that cannot be read.*RGB TIFF"):
        open_image(io.BytesIO(_16_bit_grey_alpha_tiff()))


def test_a_16_bit_tiff_whose_zero_is_white_is_read_as_a_positive():
    """Pillow inverts an 8-bit WhiteIsZero TIFF as it reads it, not a 16-bit one."""
    grey = Image.fromarray(np.full((8, 8), 16384, np.uint16))  # a quarter of the way to black
    tiff = _encode(grey, "TIFF", tiffinfo={262: 0})
    assert open_image(tiff).getpixel((4, 4)) == (192, 192, 192)


@pytest.mark.parametrize("fmt", ["PNG", "HEIF"])
def test_a_truncated_image_is_refused(fmt):
    data = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), fmt).getvalue()
    with pytest.raises(InputError, match="damaged or truncated"):
        open_image(io.BytesIO(data[: len(data) // 2]))


def test_an_image_with_a_damaged_header_is_refused_as_damaged():
    bmp = bytearray(_encode(Image.new("RGB", (4, 4)), "BMP").getvalue())
    bmp[28] = 7  # bits per pixel: no such BMP
    with pytest.raises(InputError, match="image is damaged"):
        open_image(io.BytesIO(bytes(bmp)))


def test_an_avif_with_a_damaged_header_is_refused_as_damaged():
    avif = _encode(Image.new("RGB", (16, 16)), "AVIF").getvalue()
    assert avif.count(b"iinf") == 1
    damaged = avif.replace(b"iinf", b"iin\x06")  # the box listing the items: unreadable
    with pytest.raises(InputError, match="image is damaged"):
        open_image(io.BytesIO(damaged))


def test_a_heic_whose_picture_data_stops_short_is_refused_as_damaged():
    heic = bytearray(_encode(Image.effect_noise((64, 64), 50).convert("RGB"), "HEIF").getvalue())
    # iloc: version and flags, field sizes (4-byte offsets, lengths and base offsets), item
    # count, then the picture's ID, data reference, base offset, extent count, offset, length.
    iloc = heic.index(b"iloc") + 4
    assert heic[iloc + 4 : iloc + 6] == b"\x44\x40"
    length = iloc + 22
    extent = struct.unpack(">I", heic[length : length + 4])[0]
    heic[length : length + 4] = struct.pack(">I", extent // 2)
    with pytest.raises(InputError, match="damaged or truncated"):
        open_image(io.BytesIO(bytes(heic)))


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


def test_fit_image_gives_width_by_height_for_a_landscape_video():
    fitted = fit_image(Image.new("RGB", (300, 200)), height=48, width=64)
    assert fitted.size == (64, 48)


def test_fit_image_averages_fine_detail_instead_of_picking_pixels():
    """A one-pixel checkerboard halved is grey: picking every other pixel (nearest) would
    give a flat black or white frame, and moire on real pictures."""
    checkerboard = (np.indices((200, 200)).sum(axis=0) % 2 * 255).astype(np.uint8)
    fitted = np.asarray(fit_image(Image.fromarray(checkerboard).convert("RGB"), 100, 100))
    assert np.abs(fitted[10:-10, 10:-10].astype(int) - 127).max() <= 16


def _lossless(fmt: str) -> dict:
    return {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_an_embedded_colour_profile_is_converted_to_srgb_when_asked(fmt):
    # Adobe RGB (200, 100, 50) is (227, 100, 42) in sRGB: a camera's orange, read as sRGB,
    # would lose a tenth of its red.
    stored = Image.new("RGB", (8, 8), (200, 100, 50))
    adobe = _encode(stored, fmt, icc_profile=adobe_rgb_profile(), **_lossless(fmt))
    opened = open_image(adobe, convert_colour=True)
    assert np.abs(np.subtract(opened.getpixel((4, 4)), (227, 100, 42))).max() <= 1


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_by_default_the_numbers_are_read_as_srgb_as_diffusers_load_image_reads_them(fmt, caplog):
    stored = Image.new("RGB", (8, 8), (200, 100, 50))
    adobe = _encode(stored, fmt, icc_profile=adobe_rgb_profile(), **_lossless(fmt))
    with caplog.at_level(logging.INFO, logger="cogvideox_cog"):
        opened = open_image(adobe)
    adobe.seek(0)
    assert np.array_equal(np.asarray(opened), np.asarray(load_image(Image.open(adobe))))
    assert np.abs(np.subtract(opened.getpixel((4, 4)), (200, 100, 50))).max() <= 1
    assert "'Adobe RGB (1998)' is not applied" in caplog.text
    assert "convert_colour=true" in caplog.text


def test_a_transparent_image_with_a_colour_profile_is_still_flattened_onto_white():
    rgba = Image.new("RGBA", (8, 8), (200, 100, 50, 0))
    rgba.putpixel((0, 0), (200, 100, 50, 255))
    opened = open_image(_encode(rgba, "PNG", icc_profile=adobe_rgb_profile()), True)
    assert opened.getpixel((4, 4)) == (255, 255, 255)
    assert np.abs(np.subtract(opened.getpixel((0, 0)), (227, 100, 42))).max() <= 1


def _srgb_of_gamma(level: int, gamma: float) -> float:
    """The sRGB level showing the light of an 8-bit level under a pure gamma curve."""
    light = (level / 255) ** gamma
    return 255 * (1.055 * light ** (1 / 2.4) - 0.055 if light > 0.0031308 else 12.92 * light)


@pytest.mark.parametrize(("mode", "fmt"), [("L", "PNG"), ("L", "JPEG"), ("LA", "PNG")])
def test_a_grey_colour_profile_is_converted_to_srgb_when_asked(mode, fmt):
    # Photoshop's Gray Gamma 1.8: a grey of 100 shows as sRGB's 119; read as sRGB, 19 darker.
    grey = Image.new(mode, (8, 8), (100, 255) if mode == "LA" else 100)
    profiled = _encode(grey, fmt, icc_profile=grey_profile(1.8), **_lossless(fmt))
    opened = open_image(profiled, convert_colour=True)
    assert np.abs(np.subtract(opened.getpixel((4, 4)), _srgb_of_gamma(100, 1.8))).max() <= 1


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_a_cmyk_colour_profile_is_converted_to_srgb_when_asked(fmt):
    # A print file's full cyan is its press's cyan ink; Pillow's convert() makes it (0, 255, 255).
    cyan = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    profiled = _encode(cyan, fmt, icc_profile=cmyk_profile(), **_lossless(fmt))
    opened = open_image(profiled, convert_colour=True)
    assert np.abs(np.subtract(opened.getpixel((4, 4)), INKS["cyan"])).max() <= 2


@pytest.mark.parametrize(
    ("picture", "profile", "name"),
    [
        (Image.new("L", (8, 8), 100), grey_profile(1.8), "Gray Gamma 1.8"),
        (Image.new("CMYK", (8, 8), (255, 0, 0, 0)), cmyk_profile(), "Press CMYK"),
    ],
    ids=["grey", "cmyk"],
)
def test_by_default_grey_and_cmyk_profiles_are_left_out_as_load_image_leaves_them(
    picture, profile, name, caplog
):
    profiled = _encode(picture, "JPEG", icc_profile=profile, quality=100)
    with caplog.at_level(logging.INFO, logger="cogvideox_cog"):
        opened = open_image(profiled)
    profiled.seek(0)
    assert np.array_equal(np.asarray(opened), np.asarray(load_image(Image.open(profiled))))
    assert f"{name!r} is not applied" in caplog.text


def _every_level() -> Image.Image:
    """Each 8-bit level in each channel, beside each other level in the others."""
    levels = np.arange(256, dtype=np.uint8)
    red, green = np.meshgrid(levels, levels)
    return Image.fromarray(np.stack([red, green, 255 - red], axis=-1), "RGB")


@pytest.mark.parametrize(
    "profile",
    [
        ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes(),  # "sRGB built-in"
        srgb_profile("sRGB IEC61966-2.1"),
        srgb_profile("c2"),
    ],
    ids=["pillow", "iec", "c2"],
)
@pytest.mark.parametrize("convert", [False, True])
def test_an_srgb_profile_leaves_the_pixels_and_the_log_as_they_are(profile, convert, caplog):
    """The log names a profile only where convert_colour changes the picture: "c2", sRGB by
    another name, was named as left out, and its conversion moved levels by 1."""
    stored = _every_level()
    with caplog.at_level(logging.INFO, logger="cogvideox_cog"):
        opened = open_image(_encode(stored, "PNG", icc_profile=profile), convert_colour=convert)
    assert np.array_equal(np.asarray(opened), np.asarray(stored))
    assert "image:" not in caplog.text


@pytest.mark.parametrize(
    ("convert", "logged"),
    [
        (False, "its colour profile 'Display P3' is not applied"),
        (True, "converted from its colour profile 'Display P3' to sRGB"),
    ],
)
def test_a_profile_that_is_not_srgb_is_named_in_the_log_either_way(convert, logged, caplog):
    stored = _every_level()
    profiled = _encode(stored, "PNG", icc_profile=display_p3_profile())
    with caplog.at_level(logging.INFO, logger="cogvideox_cog"):
        open_image(profiled, convert_colour=convert)
    assert logged in caplog.text


@pytest.mark.parametrize(
    ("convert", "logged"),
    [
        (False, "its colour profile 'sRGB linear' is not applied"),
        (True, "converted from its colour profile 'sRGB linear' to sRGB"),
    ],
)
def test_a_profile_named_srgb_whose_colours_are_not_is_named_in_the_log_either_way(
    convert, logged, caplog
):
    profiled = _encode(_every_level(), "PNG", icc_profile=linear_srgb_profile())
    with caplog.at_level(logging.INFO, logger="cogvideox_cog"):
        open_image(profiled, convert_colour=convert)
    assert logged in caplog.text


def test_a_linear_light_profile_named_srgb_is_converted_to_srgb_when_asked():
    # Linear light of 100 / 255 shows as sRGB's 170: its name does not make it sRGB.
    grey = Image.new("RGB", (8, 8), (100, 100, 100))
    profiled = _encode(grey, "PNG", icc_profile=linear_srgb_profile())
    opened = open_image(profiled, convert_colour=True)
    assert np.abs(np.subtract(opened.getpixel((4, 4)), _srgb_of_gamma(100, 1.0))).max() <= 1


@pytest.mark.parametrize("name", ["GIMP built-in D65 Grayscale with sRGB TRC", "sGrey"])
@pytest.mark.parametrize("convert", [False, True])
def test_a_grey_profile_with_srgb_greys_leaves_the_pixels_and_the_log_as_they_are(
    name, convert, caplog
):
    """Its greys are sRGB's by its curve, whether its name says so (GIMP's) or not."""
    stored = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    profiled = _encode(stored, "PNG", icc_profile=srgb_grey_profile(name))
    with caplog.at_level(logging.INFO, logger="cogvideox_cog"):
        opened = open_image(profiled, convert_colour=convert)
    assert np.array_equal(np.asarray(opened), np.asarray(stored.convert("RGB")))
    assert "image:" not in caplog.text


def test_a_profile_two_levels_off_srgb_is_converted_not_taken_as_srgb(caplog):
    """sRGB within a level is sRGB rounded; a curve of exponent 2.45 instead of 2.4 moves
    darker colours by 2 levels, a change of its own."""
    profile = srgb_profile("sRGB 2.45", srgb_curve(2.45))
    with caplog.at_level(logging.INFO, logger="cogvideox_cog"):
        open_image(_encode(_every_level(), "PNG", icc_profile=profile), convert_colour=True)
    assert "converted from its colour profile 'sRGB 2.45' to sRGB" in caplog.text


@pytest.mark.parametrize(
    "profile", [grey_profile(1.8), cmyk_profile()], ids=["grey-profile", "cmyk-profile"]
)
def test_a_profile_for_another_kind_of_picture_leaves_it_and_the_log_as_they_are(profile, caplog):
    """A grey or CMYK profile on an RGB picture does not describe its colours."""
    stored = _every_level()
    with caplog.at_level(logging.INFO, logger="cogvideox_cog"):
        opened = open_image(_encode(stored, "PNG", icc_profile=profile), convert_colour=True)
    assert np.array_equal(np.asarray(opened), np.asarray(stored))
    assert "image:" not in caplog.text


def test_an_unusable_colour_profile_leaves_the_colours_as_stored(caplog):
    stored = Image.new("RGB", (8, 8), (200, 100, 50))
    opened = open_image(_encode(stored, "PNG", icc_profile=b"not a profile" * 20), True)
    assert opened.getpixel((4, 4)) == (200, 100, 50)
    assert "colour profile could not be used" in caplog.text


# HEIC (an iPhone's photos) and AVIF: files written by pillow-heif and Pillow.
RED, GREEN, BLUE = (200, 30, 30), (30, 160, 60), (30, 30, 200)
# Both are lossy. Flat colours come back within 1 of what was written (the round trip through
# YCbCr); a reader that took the pixels as limited range (16-235) or swapped channels would be
# 12 or more off. 4 leaves room for another encoder version.
LOSSY_TOLERANCE = 4


def _upright() -> Image.Image:
    """64x32: red top left, blue top right, green below. Any turn or mirror moves a colour."""
    image = Image.new("RGB", (64, 32), GREEN)
    image.paste(RED, (0, 0, 32, 16))
    image.paste(BLUE, (32, 0, 64, 16))
    return image


def _assert_close(pixel: tuple[int, ...], colour: tuple[int, int, int]) -> None:
    assert np.abs(np.subtract(pixel, colour)).max() <= LOSSY_TOLERANCE, (pixel, colour)


def _assert_upright(opened: Image.Image) -> None:
    assert opened.size == (64, 32)
    for point, colour in [((8, 8), RED), ((56, 8), BLUE), ((32, 24), GREEN)]:
        _assert_close(opened.getpixel(point), colour)


def test_a_heic_reads_upright_with_its_colours():
    _assert_upright(open_image(_encode(_upright(), "HEIF", quality=90)))


# The transpose that an EXIF orientation undoes, so that the stored picture shows upright.
STORED_AS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
def test_a_heic_rotation_or_mirror_is_applied_once(orientation):
    # As an iPhone writes it: the turn is both a HEIF transform (irot, imir), which libheif
    # applies, and the EXIF orientation, which must then not be applied again.
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = _upright().transpose(STORED_AS[orientation])
    heic = _encode(stored, "HEIF", quality=90, exif=exif.tobytes())
    assert b"irot" in heic.getvalue() or b"imir" in heic.getvalue()
    _assert_upright(open_image(heic))


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
def test_every_exif_orientation_of_a_photo_is_undone(orientation):
    """A camera stores the sensor's pixels and says in EXIF how to turn or mirror them; each
    of the seven ways must show the picture upright, not only the common rotate-90."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = _upright().transpose(STORED_AS[orientation])
    _assert_upright(open_image(_encode(stored, "JPEG", quality=95, exif=exif.tobytes())))


@pytest.mark.parametrize(("convert", "expected"), [(True, (215, 93, 31)), (False, (200, 100, 50))])
def test_a_display_p3_heic_is_converted_to_srgb_only_when_asked(convert, expected):
    # Display P3 (200, 100, 50) is (215, 93, 31) in sRGB: 15 off in red when read as sRGB.
    # Within 2: the round trip's 1 and the conversion's rounding.
    stored = Image.new("RGB", (16, 16), (200, 100, 50))
    heic = _encode(stored, "HEIF", quality=90, icc_profile=display_p3_profile())
    opened = open_image(heic, convert_colour=convert)
    assert np.abs(np.subtract(opened.getpixel((8, 8)), expected)).max() <= 2


def _nclx_heic(primaries: int, transfer: int, colour=(200, 100, 50)) -> io.BytesIO:
    """A HEIC whose colours are declared by H.273 code points (nclx), not an ICC profile."""
    nclx = {
        "color_primaries": primaries,
        "transfer_characteristics": transfer,
        "matrix_coefficients": 6,
        "full_range_flag": 1,
    }
    stored = Image.new("RGB", (16, 16), colour)
    heic = _encode(stored, "HEIF", quality=90, nclx_profile=nclx)
    assert Image.open(heic).info["nclx_profile"]["color_primaries"] == primaries
    heic.seek(0)
    return heic


def _boxes(data: bytes, at: int, end: int):
    """(type, the whole box) of each box from `at` to `end`."""
    while at < end:
        size, kind = struct.unpack(">I4s", data[at : at + 8])
        yield kind, data[at : at + size]
        at += size


def _box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _with_nclx_beside_icc(heic: bytes, primaries: int, transfer: int) -> bytes:
    """A HEIC written with an ICC profile, given an nclx colour box beside it, as a camera
    may write both (pillow-heif writes one): the box added to the item's properties, the
    picture's offset moved past the bytes added."""
    nclx = _box(b"colr", b"nclx" + struct.pack(">HHHB", primaries, transfer, 6, 0x80))
    top = dict(_boxes(heic, 0, len(heic)))
    assert list(top) == [b"ftyp", b"meta", b"mdat"], list(top)
    meta = top[b"meta"]
    children = []
    for kind, box in _boxes(meta, 12, len(meta)):
        if kind == b"iprp":
            parts = dict(_boxes(box, 8, len(box)))
            ipco, ipma = parts[b"ipco"], parts[b"ipma"]
            properties = len(list(_boxes(ipco, 8, len(ipco)))) + 1
            assert ipma[8:16] == bytes(4) + struct.pack(">I", 1)  # version 0, one item
            count = ipma[18]
            ipma = _box(b"ipma", ipma[8:18] + bytes([count + 1]) + ipma[19:] + bytes([properties]))
            box = _box(b"iprp", _box(b"ipco", ipco[8:] + nclx) + ipma)
        children.append(box)
    grown = sum(map(len, children)) - (len(meta) - 12)
    fixed = []
    for box in children:
        if box[4:8] == b"iloc":
            assert box[8:14] == bytes(4) + b"\x44\x40"  # version 0; offsets and base of 4 bytes
            (items,) = struct.unpack(">H", box[14:16])
            assert items == 1
            (base,) = struct.unpack(">I", box[20:24])
            box = box[:20] + struct.pack(">I", base + grown) + box[24:]
        fixed.append(box)
    return top[b"ftyp"] + _box(b"meta", meta[8:12] + b"".join(fixed)) + top[b"mdat"]


@pytest.mark.parametrize(
    ("icc", "primaries", "expected"),
    [
        (display_p3_profile(), 1, (215, 93, 31)),
        (srgb_profile("sRGB IEC61966-2.1"), 12, (200, 100, 50)),
    ],
    ids=["p3-profile-bt709-box", "srgb-profile-p3-box"],
)
def test_a_heic_with_both_a_profile_and_an_nclx_box_is_read_by_its_profile(
    icc, primaries, expected, caplog
):
    """libheif reports only the ICC profile of a picture that has both: the profile's
    colours are converted, the box's primaries never."""
    stored = _encode(
        Image.new("RGB", (16, 16), (200, 100, 50)), "HEIF", quality=90, icc_profile=icc
    )
    both = _with_nclx_beside_icc(stored.getvalue(), primaries, 13)
    hidden = both.replace(b"colrprof", b"freeprof")  # the profile's box, skipped as padding
    assert Image.open(io.BytesIO(hidden)).info["nclx_profile"]["color_primaries"] == primaries
    with caplog.at_level(logging.INFO, logger="cogvideox_cog"):
        opened = open_image(io.BytesIO(both), convert_colour=True)
    assert np.abs(np.subtract(opened.getpixel((8, 8)), expected)).max() <= 2
    assert "declared" not in caplog.text


# Linear Display P3 to linear sRGB, as published (e.g. in the CSS Color 4 sample code).
P3_TO_SRGB = np.array([[1.2249, -0.2247, 0.0], [-0.0420, 1.0419, 0.0], [-0.0197, -0.0786, 1.0979]])


def _p3_on_bt709_curve_as_srgb(colour) -> tuple[int, ...]:
    """A BT.709-curve P3 colour in sRGB primaries on the same curve (BT.1886's gamma 2.4)."""
    light = np.clip(P3_TO_SRGB @ (np.array(colour) / 255) ** 2.4, 0, 1)
    return tuple(np.round(255 * light ** (1 / 2.4)).astype(int))


@pytest.mark.parametrize("transfer", [13, 1], ids=["sRGB-curve", "BT.709-curve"])
def test_a_heic_declaring_display_p3_without_a_profile_is_converted_when_asked(transfer, caplog):
    # With the sRGB curve, what LittleCMS makes of Display P3 (200, 100, 50) given as an ICC
    # profile (above).
    expected = (215, 93, 31) if transfer == 13 else _p3_on_bt709_curve_as_srgb((200, 100, 50))
    with caplog.at_level(logging.INFO, logger="cogvideox_cog"):
        opened = open_image(_nclx_heic(12, transfer), convert_colour=True)
    assert np.abs(np.subtract(opened.getpixel((8, 8)), expected)).max() <= 2
    assert "converted from its declared Display P3 colours to sRGB" in caplog.text


@pytest.mark.parametrize("transfer", [6, 14, 15], ids=["BT.601", "BT.2020-10", "BT.2020-12"])
def test_a_heic_on_another_code_for_bt709s_curve_is_converted_as_bt709s(transfer):
    """BT.601 and BT.2020 give BT.709's curve codes of their own (H.273): the same curve."""
    opened = open_image(_nclx_heic(12, transfer), convert_colour=True)
    expected = _p3_on_bt709_curve_as_srgb((200, 100, 50))
    assert np.abs(np.subtract(opened.getpixel((8, 8)), expected)).max() <= 2


def test_a_display_p3_colour_outside_srgb_is_clipped_to_its_nearest_srgb_channels():
    """Display P3's red is redder than sRGB's: sRGB red 1.22 and slightly negative green and
    blue, clipped to pure red, never wrapped around past 255."""
    opened = open_image(_nclx_heic(12, 13, colour=(255, 0, 0)), convert_colour=True)
    _assert_close(opened.getpixel((8, 8)), (255, 0, 0))


def test_by_default_a_heic_declaring_display_p3_is_read_as_srgb_and_the_log_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="cogvideox_cog"):
        opened = open_image(_nclx_heic(12, 13))
    _assert_close(opened.getpixel((8, 8)), (200, 100, 50))
    assert "declared as Display P3 (not sRGB) and read as sRGB" in caplog.text


def test_a_heic_declaring_srgb_primaries_is_read_as_it_is_either_way(caplog):
    with caplog.at_level(logging.INFO, logger="cogvideox_cog"):
        opened = open_image(_nclx_heic(1, 13), convert_colour=True)
    _assert_close(opened.getpixel((8, 8)), (200, 100, 50))
    assert "image:" not in caplog.text


def test_an_hdr_heic_is_read_as_it_is_with_a_warning_that_it_is_not_tone_mapped(caplog):
    opened = open_image(_nclx_heic(9, 16), convert_colour=True)
    _assert_close(opened.getpixel((8, 8)), (200, 100, 50))
    assert "an HDR (PQ) picture on BT.2020 primaries; read as it is, not tone-mapped" in (
        caplog.text
    )


def test_a_heic_over_the_pixel_limit_is_refused_from_its_header():
    # A 64x64 picture whose header (the ispe property) says 9000x9000: decoded, it would pass.
    heic = bytearray(_encode(Image.new("RGB", (64, 64)), "HEIF").getvalue())
    size = heic.index(b"ispe") + 8  # after the property's type, version and flags
    heic[size : size + 8] = struct.pack(">II", 9000, 9000)
    with pytest.raises(InputError, match=r"image is 9000x9000 \(81 MP\); the limit is 64 MP"):
        open_image(io.BytesIO(bytes(heic)))


def test_a_10_bit_heic_is_scaled_to_8_bits():
    pixels = np.empty((16, 16, 3), np.uint16)
    pixels[:] = (200 << 8, 100 << 8, 50 << 8)  # clipped instead of scaled: near white
    heic = io.BytesIO()
    pillow_heif.from_bytes("RGB;16", (16, 16), pixels.tobytes()).save(heic, quality=90)
    assert pillow_heif.open_heif(heic, convert_hdr_to_8bit=False).info["bit_depth"] == 10
    heic.seek(0)
    _assert_close(open_image(heic).getpixel((8, 8)), (200, 100, 50))


def test_a_heic_burst_reads_its_primary_image():
    red, green, blue = (Image.new("RGB", (16, 16), colour) for colour in (RED, GREEN, BLUE))
    burst = _encode(red, "HEIF", save_all=True, append_images=[green, blue], primary_index=1)
    _assert_close(open_image(burst).getpixel((8, 8)), GREEN)


def test_a_heif_in_a_codec_that_cannot_be_decoded_is_refused():
    # An AV1 picture in a file branded HEIC: pillow-heif takes it, and its libheif has no AV1
    # decoder.
    avif = _encode(Image.new("RGB", (16, 16)), "AVIF").getvalue()
    with pytest.raises(InputError, match=r"image could not be decoded \(.*\); send a JPEG"):
        open_image(io.BytesIO(avif[:8] + b"heic" + avif[12:]))


def test_a_heic_whose_metadata_item_type_is_not_ascii_does_not_crash_the_process(tmp_path):
    """libheif 1.20 (pillow-heif 1.1.1) crashed the whole process on it (a segmentation
    fault): the worker, not one prediction. So the test reads it in a process of its own."""
    exif = Image.Exif()
    exif[0x0112] = 1
    heic = _encode(Image.new("RGB", (16, 16)), "HEIF", exif=exif.tobytes()).getvalue()
    # The Exif item's entry: version 2 and flags, item ID, protection index, type "Exif".
    entry = heic.index(b"\x00\x00Exif\x00", heic.index(b"iinf"))
    assert heic[entry - 10 : entry - 5] == b"infe\x02"
    path = tmp_path / "damaged.heic"
    path.write_bytes(heic[: entry + 3] + b"\x88" + heic[entry + 4 :])  # "Exif" -> "E\x88if"
    code = "import sys; from cogvideox_cog.media.image import open_image; open_image(sys.argv[1])"
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-300:]


@pytest.mark.parametrize("brand", [b"avif", b"mif1"])
def test_an_avif_reads_whichever_brand_it_leads_with(brand):
    # Pillow reads AVIF. pillow-heif takes files branded mif1 too but cannot decode AV1, so it
    # must not be asked first.
    avif = _encode(_upright(), "AVIF", quality=90).getvalue()
    assert avif[8:12] == b"avif"
    _assert_upright(open_image(io.BytesIO(avif[:8] + brand + avif[12:])))


def test_every_other_format_is_tried_in_pillows_own_order_and_heif_last():
    # Image.open gives a file to the first plugin in Image.ID that accepts it, so reading HEIC
    # must leave the others' order as Pillow alone has it once it has read a WebP.
    pillow_alone = (
        "import io; from PIL import Image; webp = io.BytesIO(); "
        "Image.new('RGB', (4, 4)).save(webp, 'WEBP'); Image.open(webp); print(*Image.ID)"
    )
    run = subprocess.run(
        [sys.executable, "-c", pillow_alone], capture_output=True, text=True, check=True
    )
    assert [*run.stdout.split(), "HEIF"] == Image.ID


def test_a_heic_on_dci_p3_primaries_is_read_as_it_is_as_its_white_is_not_d65(caplog):
    """DCI-P3's white is greener than D65: converting its primaries as if white were D65, as
    the conversion here assumes, would tint every colour; it is read as sRGB with a warning."""
    opened = open_image(_nclx_heic(11, 13), convert_colour=True)
    _assert_close(opened.getpixel((8, 8)), (200, 100, 50))
    assert "its DCI-P3 colours (transfer 13) cannot be converted here" in caplog.text


def test_by_default_a_heic_that_cannot_be_converted_does_not_offer_convert_colour(caplog):
    with caplog.at_level(logging.INFO, logger="cogvideox_cog"):
        open_image(_nclx_heic(11, 13))
    assert "convert_colour" not in caplog.text


def test_an_hdr_heic_on_bt709_primaries_is_also_warned_about(caplog):
    open_image(_nclx_heic(1, 18), convert_colour=True)
    assert "an HDR (HLG) picture on BT.709 primaries" in caplog.text
