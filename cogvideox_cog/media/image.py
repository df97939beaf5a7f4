"""The image-to-video image: opened upright and safely, then fitted to the video's size.

Every error names the image and says what to send instead: the message is all a Replicate user
sees.
"""

from __future__ import annotations

import io
import logging
import mmap
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError

from ..errors import InputError
from .colour import BT709_TRANSFERS, SRGB_TRANSFER, is_d65, still_primaries_to_srgb

log = logging.getLogger(__name__)

# PIL warns at 89 MP and refuses at twice that; a phone photo is 12-50 MP. Refuse early and
# with a message instead of decoding a decompression bomb.
MAX_IMAGE_PIXELS = 64_000_000
_LIMIT_MP = f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP"
# The video keeps a centre crop of the image at its own shape (3:2 landscape for 1.0; the image's
# orientation up to 16:9 for 1.5-I2V). At 4:1 that crop still holds over a third of a landscape
# picture (a sixth of a 1:4 portrait on 1.0); a 100:1 panorama would leave a sliver stretched
# over the whole frame, so longer shapes are refused: the user crops instead.
MAX_ASPECT_RATIO = 4.0
# What the model's frames are in, and what a browser shows an untagged picture as.
_SRGB = ImageCms.createProfile("sRGB")
# HEIC, an iPhone's default photo format, is read by pillow-heif's Pillow plugin (libheif comes
# in its wheel): Pillow reads AVIF but not HEIC. It is registered after all of Pillow's own
# plugins, loaded in the order Image.open loads them: every other format is read as before, and
# an AVIF branded mif1, which pillow-heif also claims but cannot decode, still goes to Pillow.
Image.preinit()
Image.init()
pillow_heif.register_heif_opener()
_FORMATS = "JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF or HEIC"
# Pillow's names of those formats (MPO, a camera's JPEG, comes through JPEG's). The other ones
# Pillow reads are not offered: ICO decodes in full before its size is known, EPS needs a
# Ghostscript the image lacks.
_PILLOW_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")
# A progressive JPEG's decode time grows with its scans, and nothing else bounds them: 10,000
# scans of a 64 MP picture (a 1.4 MB file) took 80 s in one C call a cancel cannot stop.
# Encoders write about 10 (libjpeg's progression; mozjpeg's about 20), an EXIF thumbnail its own.
MAX_JPEG_SCANS = 100
_SOI, _SOS, _EOI = b"\xff\xd8", 0xDA, 0xD9  # a JPEG's start; the markers of a scan and its end
_STANDALONE = frozenset({0x00, 0x01, 0xD8, *range(0xD0, 0xD8)})  # markers without a length


_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*")  # little- and big-endian


def _starts_with(source, signatures: tuple[bytes, ...]) -> bool:
    """source: a path, or a file object open_image was given (put back where it was)."""
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as file:
            head = file.read(4)
    else:
        position = source.tell()
        source.seek(0)
        head = source.read(4)
        source.seek(position)
    return head.startswith(signatures)


def open_image(path: Path | str, convert_colour: bool = False) -> Image.Image:
    """Open any common image format upright and on white where it was transparent.

    convert_colour: convert it from the colour profile it embeds to sRGB; without, its numbers
    are read as sRGB whatever the profile, as upstream reads them (see _apply_profile). Size
    and shape are checked from the header, before any pixel is decoded.
    """
    try:
        image = Image.open(path, formats=_PILLOW_FORMATS)
    except (FileNotFoundError, IsADirectoryError) as error:
        # Cog passes an input that is neither a URL nor a data URI through as a bare path.
        raise InputError(
            f"image {str(path)[:100]!r} is not an http(s) URL or a data: URI of a picture."
        ) from error
    except UnidentifiedImageError as error:
        if _starts_with(path, _TIFF_SIGNATURES):
            raise InputError(
                "image is a TIFF of a layout that cannot be read (such as 16-bit grey with "
                "alpha, floating-point colour, or CMYK with alpha); save it as an 8- or 16-bit "
                "RGB TIFF, or send a PNG."
            ) from error
        raise InputError(f"image could not be read as a picture; send a {_FORMATS}.") from error
    except Image.DecompressionBombError as error:
        raise InputError(
            f"image is too large to decode safely ({error}); the limit is {_LIMIT_MP}."
        ) from error
    # A header Pillow cannot parse; RuntimeError is its AVIF reader's (libavif's) for one.
    except (OSError, ValueError, SyntaxError, RuntimeError) as error:
        raise InputError(f"image is damaged and could not be read: {error}") from error
    with image:  # closes the file also when the image is refused
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise InputError(
                f"image is {width}x{height} ({width * height / 1e6:.0f} MP); the limit is "
                f"{_LIMIT_MP}. Downscale it first."
            )
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise InputError(
                f"image is {width}x{height}, {max(width, height) / min(width, height):.1f}:1; "
                f"the longer side may be at most {MAX_ASPECT_RATIO:g} times the shorter. The "
                "video keeps only a centre crop at its own shape (3:2 or 16:9), so crop the "
                "part you want first."
            )
        if image.format in ("JPEG", "MPO"):
            _check_jpeg_scans(path)
        key = _16_bit_png_key(image)  # before decoding, which forgets the file's layout
        inverted = _16_bit_white_is_zero(image)
        icc = image.info.get("icc_profile")
        nclx = image.info.get("nclx_profile")  # a HEIC's colours without an ICC profile
        try:
            # A HEIC is decoded upright by libheif (its irot and imir), and pillow-heif sets its
            # EXIF orientation to 1, so that it is not turned a second time here.
            upright = _upright(image)
            upright = _to_8_bits(upright) if key is None else _key_as_alpha(upright, key)
            if inverted:
                upright = ImageOps.invert(upright)
            if upright.mode in _PREMULTIPLIED:  # a TIFF's associated alpha: grey in "La"
                upright = upright.convert(_PREMULTIPLIED[upright.mode])
            if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
                grey = upright.mode in ("L", "LA")
                rgba = upright.convert("RGBA")  # also applies a PNG's tRNS colour key
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                upright = Image.alpha_composite(background, rgba)
                if grey:  # still grey, which a grey colour profile describes
                    upright = upright.convert("L")
            if not icc and nclx:
                return _apply_nclx(upright.convert("RGB"), nclx, convert_colour)
            return _apply_profile(upright, icc, convert_colour)
        # EOFError: pillow-heif's for a HEIC whose picture data stops short.
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise InputError(
                f"image is damaged or truncated and could not be decoded: {error}"
            ) from error
        except RuntimeError as error:  # pillow-heif's, for a HEIF in a codec its libheif lacks
            raise InputError(f"image could not be decoded ({error}); send a {_FORMATS}.") from error


# Pillow's modes of colours premultiplied by their alpha, and how to read them with it apart
# (convert("RGB") of "La" fails).
_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}

# How to undo each EXIF orientation, as ImageOps.exif_transpose does.
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says. Not ImageOps.exif_transpose: it also
    writes the EXIF back without the orientation, which fails (TypeError, struct.error) on a
    tag stored with another type than Pillow expects, as some cameras and editors write."""
    image.load()  # as exif_transpose does: some formats store their EXIF after the pixels
    method = _ORIENTATIONS.get(image.getexif().get(ExifTags.Base.Orientation, 1))
    return image.transpose(method) if method is not None else image


def _apply_profile(image: Image.Image, icc: bytes | None, convert: bool) -> Image.Image:
    """The image in RGB, converted to sRGB from the colour profile its file embeds if asked to.

    Phones save photos in Display P3 and cameras offer Adobe RGB; read as sRGB, as Pillow's
    convert() and diffusers' load_image (upstream's reading, hence the default) do, their
    colours come out duller and shifted (a P3 green of (60, 170, 80) is (0, 173, 68) in sRGB).
    So are a greyscale picture's grey profile and a CMYK one's CMYK profile (a print file's:
    convert() reads its inks as pure cyan, magenta and yellow). Images without a profile, with
    an sRGB one, or with one for another kind of picture, are left as they are either way; so
    is one whose profile cannot be used (the log says so).
    """
    rgb = image.convert("RGB")
    if not icc:
        return rgb
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        name = ImageCms.getProfileDescription(profile).strip()
        source = _described_by(image, rgb, profile.profile.xcolor_space.strip())
        if source is None or _is_srgb(source, profile):
            return rgb
        if not convert:
            log.info(
                f"image: its colour profile {name[:60]!r} is not applied, the numbers are read "
                "as sRGB (as upstream reads them); convert_colour=true converts it to sRGB"
            )
            return rgb
        converted = ImageCms.profileToProfile(source, profile, _SRGB, outputMode="RGB")
    except (OSError, ImageCms.PyCMSError) as error:
        log.warning(f"image: its colour profile could not be used ({error}); read as sRGB")
        return rgb
    log.info(f"image: converted from its colour profile {name[:60]!r} to sRGB")
    return converted


# Colours whose conversion tells an sRGB profile, whatever its name: 16 levels a channel, and
# each grey level for a grey profile.
_PROBE = Image.fromarray(
    np.stack(np.meshgrid(*[np.arange(0, 256, 17, dtype=np.uint8)] * 3), axis=-1).reshape(64, 64, 3)
)
_GREY_PROBE = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")


def _is_srgb(source: Image.Image, profile: ImageCms.ImageCmsProfile) -> bool:
    """Whether a profile converts colours to sRGB within a level, which converting would
    only round, and the log would name as left out. Its colours decide, not its name: "c2"
    (in Facebook's and Instagram's JPEGs) is sRGB, and GIMP's grey "with sRGB TRC" is sRGB's
    greys, but "sRGB linear" is not sRGB's numbers at all."""
    if source.mode not in ("RGB", "L"):
        return False
    probe = _PROBE if source.mode == "RGB" else _GREY_PROBE
    converted = ImageCms.profileToProfile(probe, profile, _SRGB, outputMode="RGB")
    expected = np.asarray(probe.convert("RGB"), np.int16)
    difference = np.abs(np.asarray(converted, np.int16) - expected)
    return int(difference.max()) <= 1


# H.273 colour primaries that are not sRGB's, by name.
_PRIMARIES = {
    4: "BT.470 M",
    5: "BT.601 625",
    6: "BT.601 525",
    7: "SMPTE 240M",
    8: "film",
    9: "BT.2020",
    10: "CIE XYZ",
    11: "DCI-P3",
    12: "Display P3",
    22: "EBU 3213",
}
_HDR_TRANSFERS = {16: "PQ", 18: "HLG"}


def _apply_nclx(rgb: Image.Image, nclx: dict, convert: bool) -> Image.Image:
    """The image converted to sRGB from the H.273 primaries a HEIC declares instead of an ICC
    profile, if asked to: Display P3 from a phone, or BT.2020. libheif has already turned its
    YCbCr into RGB with the declared matrix; only the primaries are left to convert. HDR
    stills (PQ, HLG) are read as they are: they are not tone-mapped."""
    primaries, transfer = nclx.get("color_primaries"), nclx.get("transfer_characteristics")
    if primaries not in _PRIMARIES and transfer not in _HDR_TRANSFERS:
        return rgb  # BT.709's primaries (sRGB's), or unspecified: read as sRGB
    name = _PRIMARIES.get(primaries, "BT.709")
    if transfer in _HDR_TRANSFERS:
        log.warning(
            f"image: an HDR ({_HDR_TRANSFERS[transfer]}) picture on {name} primaries; read as "
            "it is, not tone-mapped, so it comes out dim"
        )
        return rgb
    red, green, blue, white = (
        (nclx[f"color_primary_{c}_x"], nclx[f"color_primary_{c}_y"])
        for c in ("red", "green", "blue", "white")
    )
    usable = transfer in BT709_TRANSFERS or transfer == SRGB_TRANSFER
    if not convert:
        if usable and is_d65(white):
            log.info(
                f"image: its colours are declared as {name} (not sRGB) and read as sRGB (as "
                "upstream reads them); convert_colour=true converts them to sRGB"
            )
        return rgb
    if not usable or not is_d65(white):
        log.warning(
            f"image: its {name} colours (transfer {transfer}) cannot be converted here; read "
            "as sRGB"
        )
        return rgb
    converted = still_primaries_to_srgb(np.asarray(rgb), (red, green, blue), transfer)
    log.info(f"image: converted from its declared {name} colours to sRGB")
    return Image.fromarray(converted, "RGB")


def _described_by(image: Image.Image, rgb: Image.Image, space: str) -> Image.Image | None:
    """The picture in the mode that a profile of this colour space describes, or None when
    the profile is for another kind of picture (a CMYK profile on an RGB JPEG)."""
    if space == "RGB":
        return rgb
    if space == "GRAY" and image.mode in ("1", "L"):
        return image.convert("L")
    if space == "CMYK" and image.mode == "CMYK":
        return image
    return None


def _to_8_bits(image: Image.Image) -> Image.Image:
    """Greyscale of more than 8 bits scaled to 8 bits.

    Pillow's convert() clips such pixels to 0..255 instead of scaling them, so a 16-bit grey PNG
    would become a white frame. Integer images are taken as 16-bit (what PNG and TIFF store),
    floating-point ones as 0..1 when they stay within it (else 0..255).
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        return image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    if image.mode == "F":
        scale = 255.0 if image.getextrema()[1] <= 1.0 else 1.0
        return image.point(lambda v: v * scale).convert("L")
    return image


def _check_jpeg_scans(source) -> None:
    """source: a path, or a file object open_image was given (read, then put back)."""
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as m:
            too_many = more_jpeg_scans_than_allowed(m)
    else:
        position = source.tell()
        source.seek(0)
        too_many = more_jpeg_scans_than_allowed(source.read())
        source.seek(position)
    if too_many:
        raise InputError(
            f"image is a progressive JPEG of over {MAX_JPEG_SCANS} scans, which would take "
            "minutes to decode. Save it again (any editor writes 10 or so), or send a PNG."
        )


def more_jpeg_scans_than_allowed(data) -> bool:
    """Whether JPEG `data` (bytes, or a file's mmap) holds over MAX_JPEG_SCANS scans.

    The markers are walked, as a decoder reads them, up to the end of the picture: what
    follows it (the video of a phone's motion photo) and what metadata segments hold are never
    decoded, and compressed data there holds the bytes of a scan's marker about every 64 KiB.
    Written here because Pillow stops reading markers at the first scan.
    """
    at, size, count = data.find(_SOI), len(data), 0
    if at == -1:
        return False
    at += 2
    while at + 4 <= size:
        if data[at] != 0xFF:  # stray bytes between segments, skipped as decoders do
            at = data.find(b"\xff", at)
            if at == -1:
                return False
            continue
        if data[at + 1] == 0xFF:  # fill before a marker
            at += 1
            continue
        marker = data[at + 1]
        if marker == _EOI:
            return False
        if marker in _STANDALONE:
            at += 2
            continue
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        if marker == _SOS:
            count += 1
            if count > MAX_JPEG_SCANS:
                return True
            at = _after_coded_data(data, at)
    return False


def _after_coded_data(data, at: int) -> int:
    """Where a scan's coded data ends: the first 0xFF followed by neither 0x00 (a 0xFF byte
    of data) nor a restart marker."""
    while (at := data.find(b"\xff", at)) != -1 and at + 1 < len(data):
        follower = data[at + 1]
        if follower != 0x00 and not 0xD0 <= follower <= 0xD7:
            return at
        at += 2
    return len(data)


def _16_bit_white_is_zero(image: Image.Image) -> bool:
    """A 16-bit greyscale TIFF whose 0 is white (photometric WhiteIsZero): Pillow inverts an
    8-bit one as it reads it, but reads a 16-bit one as it is stored, a negative."""
    if image.format != "TIFF" or not image.mode.startswith("I;16"):
        return False
    return image.tag_v2.get(262) == 0


def _16_bit_png_key(image: Image.Image) -> int | tuple[int, ...] | None:
    """A 16-bit PNG's transparency colour key (tRNS), or None.

    Pillow reads such a PNG's pixels as 8-bit RGB or 16-bit grey but keeps the key in 16 bits,
    so convert() matches no RGB pixel to it, and the grey key is lost with the scaling to 8 bits.
    """
    if image.format != "PNG" or not image.tile or image.tile[0].args not in ("RGB;16B", "I;16B"):
        return None
    return image.info.get("transparency")


def _key_as_alpha(image: Image.Image, key: int | tuple[int, ...]) -> Image.Image:
    """The image in 8 bits with alpha, transparent where its pixels equal the 16-bit key (RGB
    pixels, read as their high bytes, are matched on those)."""
    pixels = np.asarray(image)
    if image.mode == "RGB":
        transparent = (pixels == np.asarray(key) >> 8).all(axis=-1)
    else:
        transparent = pixels == key
    coloured = _to_8_bits(image)
    coloured = coloured.convert("RGBA" if coloured.mode == "RGB" else "LA")
    coloured.putalpha(Image.fromarray(np.where(transparent, 0, 255).astype(np.uint8)))
    return coloured


def fit_image(
    image: Image.Image, height: int, width: int, pixel_aspect: Fraction | int = 1
) -> Image.Image:
    """Scale to cover (height, width) and crop the centre: no stretching, no borders.
    pixel_aspect: how many times as wide as high a pixel is shown (a video's, 1 for images);
    the picture is fitted at that shape in one resize, so a stretched copy is never made."""
    if pixel_aspect == 1:
        return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
    scale = max(width / (image.width * pixel_aspect), height / image.height)
    crop_width, crop_height = float(width / scale / pixel_aspect), height / scale
    left, top = (image.width - crop_width) / 2, (image.height - crop_height) / 2
    box = (left, top, left + crop_width, top + crop_height)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box)
