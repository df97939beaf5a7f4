"""Input rules checked in run() before any heavy work, and preparation of the I2V image.

Every error names the input, the value and what would be accepted: the message is all a
Replicate user sees.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .variants import Variant

MAX_SEED = 2**32 - 1
# PIL warns at 89 MP and refuses at twice that; a phone photo is 12-50 MP. Refuse early and
# with a message instead of decoding a decompression bomb.
MAX_IMAGE_PIXELS = 64_000_000
_LIMIT_MP = f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP"


class InputError(ValueError):
    """A user input that cannot be served; the message says what to change."""


def check_num_frames(variant: Variant, num_frames: int | None) -> int:
    if num_frames is None:
        return variant.default_frames
    if num_frames not in variant.allowed_frames:
        allowed = list(variant.allowed_frames)
        raise InputError(
            f"num_frames={num_frames} is not supported by {variant.id}: it takes "
            f"{variant.frame_step}*N+1 frames, one of {', '.join(map(str, allowed))} "
            f"(default {variant.default_frames})."
        )
    return num_frames


def check_fps(variant: Variant, fps: int | None) -> int:
    if fps is None:
        return variant.fps
    if fps < 1:
        raise InputError(f"fps={fps} must be at least 1 (the model was trained at {variant.fps}).")
    return fps


def check_prompt(prompt: str, *, required: bool) -> str:
    """Strip the prompt; text-to-video without one would sample pure prior, so refuse it."""
    prompt = (prompt or "").strip()
    if required and not prompt:
        raise InputError("prompt is empty: describe the video to generate.")
    return prompt


def resolve_seed(seed: int | None) -> int:
    if seed is None:
        return secrets.randbits(32)
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed={seed} must be between 0 and {MAX_SEED}, or left empty.")
    return seed


def truncated_prompt_tail(tokenizer, prompt: str, max_tokens: int) -> str | None:
    """The part of the prompt the text encoder will not see, or None if it all fits."""
    ids = tokenizer(prompt, add_special_tokens=True, truncation=False).input_ids
    if len(ids) <= max_tokens:
        return None
    # The last kept position holds the end-of-sequence token, as in diffusers' own check.
    return tokenizer.decode(ids[max_tokens - 1 : -1], skip_special_tokens=True)


def image_aspect_size(
    image_size: tuple[int, int], native_size: tuple[int, int], multiple: int
) -> tuple[int, int]:
    """(height, width) closest to the image's aspect ratio: short side at the native short side,
    long side a multiple of the patch grid and at most the native long side."""
    image_w, image_h = image_size
    short, longest = min(native_size), max(native_size)
    if image_w >= image_h:
        long_side = round(short * image_w / image_h / multiple) * multiple
        return short, min(max(long_side, short), longest)
    long_side = round(short * image_h / image_w / multiple) * multiple
    return min(max(long_side, short), longest), short


def open_image(path: Path | str) -> Image.Image:
    """Open any common image format upright, on white where it was transparent, as RGB."""
    try:
        image = Image.open(path)
    except UnidentifiedImageError as error:
        raise InputError(
            "image could not be read as a picture; send a JPEG, PNG, WebP, GIF, BMP or TIFF."
        ) from error
    except Image.DecompressionBombError as error:
        raise InputError(
            f"image is too large to decode safely ({error}); the limit is {_LIMIT_MP}."
        ) from error
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(
            f"image is {width}x{height} ({width * height / 1e6:.0f} MP); the limit is "
            f"{_LIMIT_MP}. Downscale it first."
        )
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        return image.convert("RGB")
    except (OSError, SyntaxError) as error:
        raise InputError(
            f"image is damaged or truncated and could not be decoded: {error}"
        ) from error


def fit_image(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale to cover (height, width) and crop the centre: no stretching, no borders."""
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
