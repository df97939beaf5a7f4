"""Input rules checked in run() before any heavy work, and preparation of the I2V image.

Every error names the input, the value and what would be accepted: the message is all a
Replicate user sees.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, InputError
from .variants import Variant

MAX_SEED = 2**32 - 1
# The text encoder reads 226 tokens: a few hundred words, about 1,000 characters of English.
# Ten times that is taken (the rest is cut by the encoder, and the log says which words);
# longer text is refused before it is tokenized, which for a 10 MB prompt took minutes.
# The predictors declare the same bound as max_length, so Cog's server refuses it first.
MAX_PROMPT_CHARS = 10_000
# PIL warns at 89 MP and refuses at twice that; a phone photo is 12-50 MP. Refuse early and
# with a message instead of decoding a decompression bomb.
MAX_IMAGE_PIXELS = 64_000_000
_LIMIT_MP = f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP"
# The video keeps a centre crop of the image at its own shape (3:2 for 1.0, up to 16:9 for 1.5).
# At 4:1 that crop still holds over a third of the picture; a 100:1 panorama would leave a
# sliver stretched over the whole frame, so longer shapes are refused: the user crops instead.
MAX_ASPECT_RATIO = 4.0


def check_num_frames(variant: Variant, num_frames: int | None) -> int:
    if num_frames is None:
        return variant.default_frames
    if num_frames != int(num_frames) or int(num_frames) not in variant.allowed_frames:
        allowed = list(variant.allowed_frames)
        raise InputError(
            f"num_frames={num_frames} is not supported by {variant.id}: it takes "
            f"{variant.frame_step}*N+1 frames, one of {', '.join(map(str, allowed))} "
            f"(default {variant.default_frames})."
        )
    return int(num_frames)


def check_fps(variant: Variant, fps: int | None) -> int:
    if fps is None:
        return variant.fps
    if fps < 1 or fps != int(fps):
        raise InputError(f"fps={fps} must be a whole number from 1 (the model's is {variant.fps}).")
    return int(fps)


def check_strength(strength: float | None, default: float, steps: int) -> float:
    """Video-to-video strength: (0, 1], and at least one denoising step at `steps`."""
    if strength is None:
        return default
    strength = float(strength)
    if not 0.0 < strength <= 1.0:
        raise InputError(f"strength={strength:g} must be above 0 and at most 1.")
    if int(steps * strength) < 1:
        raise InputError(
            f"strength={strength:g} with num_inference_steps={steps} leaves no denoising step "
            f"(it runs int(steps * strength) of them); raise one of the two, e.g. "
            f"num_inference_steps={math.ceil(1 / strength)}."
        )
    return strength


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Cog checks choices against the schema; this covers callers without one."""
    if value not in choices:
        raise InputError(f"{name}={value!r} is not one of: {', '.join(choices)}.")
    return value


def check_prompt(prompt: str, *, required: bool) -> str:
    """Text-to-video without a prompt would sample pure prior, so refuse a blank one.

    The prompt goes to the text encoder as it came, as upstream passes it.
    """
    prompt = check_text_length("prompt", prompt or "")
    if required and not prompt.strip():
        raise InputError("prompt is empty: describe the video to generate.")
    return prompt


def check_text_length(name: str, text: str) -> str:
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(
            f"{name} is {len(text):,} characters; at most {MAX_PROMPT_CHARS:,} are accepted. "
            "The text encoder reads only the first 226 tokens (about 1,000 characters)."
        )
    return text


def resolve_seed(seed: int | None) -> int:
    if seed is None:
        return secrets.randbits(32)
    if not 0 <= seed <= MAX_SEED or seed != int(seed):
        raise InputError(f"seed={seed} must be a whole number from 0 to {MAX_SEED}, or empty.")
    return int(seed)


def truncated_prompt_tail(tokenizer, prompt: str, max_tokens: int) -> str | None:
    """The part of the prompt the text encoder will not see, or None if it all fits."""
    ids = tokenizer(prompt, add_special_tokens=True, truncation=False, verbose=False).input_ids
    if len(ids) <= max_tokens:
        return None
    # The last kept position holds the end-of-sequence token, as in diffusers' own check.
    return tokenizer.decode(ids[max_tokens - 1 : -1], skip_special_tokens=True)


RESOLUTION_ENV = "COGVIDEOX_RESOLUTION"


def native_resolution(
    variant: Variant, config, vae_scale: int, override: str | None = None
) -> tuple[int, int]:
    """(height, width) to generate at: the variant's or config's, or a deployment's override.

    The size must suit the transformer: its learned position embeddings (1.0 I2V) allow only
    the config's size, and the 1.5 rotary grid only sizes within its bound. Checked here, in
    setup, so that weights which cannot make the size fail the deployment, not each request.
    """
    config_size = (config.sample_height * vae_scale, config.sample_width * vae_scale)
    if override:
        size, source = _parse_resolution(override, vae_scale * config.patch_size), override
    else:
        size, source = variant.native_size or config_size, None
    height, width = size
    what = f"{RESOLUTION_ENV}={source}" if source else f"{variant.id}'s {height}x{width}"
    fix = (
        f"use {variant.id}'s own weights, or set {RESOLUTION_ENV}=HEIGHTxWIDTH within "
        f"{config_size[0]}x{config_size[1]}"
    )
    if config.use_learned_positional_embeddings and size != config_size:
        raise ConfigError(
            f"{what}: these weights have learned position embeddings and only generate at "
            f"{config_size[0]}x{config_size[1]}" + ("" if source else f"; {fix}")
        )
    if config.patch_size_t is not None and (height > config_size[0] or width > config_size[1]):
        raise ConfigError(
            f"{what}: these weights generate at most {config_size[0]}x{config_size[1]} (their "
            f"transformer's sample_height x sample_width); {fix}"
        )
    return size


def _parse_resolution(override: str, multiple: int) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in override.lower().split("x"))
    except ValueError:
        raise ConfigError(
            f"{RESOLUTION_ENV}={override!r} is not HEIGHTxWIDTH, e.g. 768x1360"
        ) from None
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise ConfigError(
            f"{RESOLUTION_ENV}={override}: both sides must be multiples of {multiple}"
        )
    return height, width


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
    """Open any common image format upright, on white where it was transparent, as RGB.

    Size and shape are checked from the header, before any pixel is decoded.
    """
    try:
        image = Image.open(path)
    except (FileNotFoundError, IsADirectoryError) as error:
        # Cog passes an input that is neither a URL nor a data URI through as a bare path.
        raise InputError(
            f"image {str(path)[:100]!r} is not an http(s) URL or a data: URI of a picture."
        ) from error
    except UnidentifiedImageError as error:
        raise InputError(
            "image could not be read as a picture; send a JPEG, PNG, WebP, GIF, BMP or TIFF."
        ) from error
    except Image.DecompressionBombError as error:
        raise InputError(
            f"image is too large to decode safely ({error}); the limit is {_LIMIT_MP}."
        ) from error
    except (OSError, ValueError, SyntaxError) as error:  # a header Pillow cannot parse
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
        try:
            upright = _to_8_bits(ImageOps.exif_transpose(image))
            if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
                rgba = upright.convert("RGBA")  # also applies a PNG's tRNS colour key
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                upright = Image.alpha_composite(background, rgba)
            return upright.convert("RGB")
        except (OSError, SyntaxError, ValueError) as error:
            raise InputError(
                f"image is damaged or truncated and could not be decoded: {error}"
            ) from error


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


def fit_image(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale to cover (height, width) and crop the centre: no stretching, no borders."""
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
