"""Input rules checked in run() before any heavy work.

Every error names the input, the value and what would be accepted: the message is all a
Replicate user sees.
"""

from __future__ import annotations

import math
import secrets
import unicodedata

from .errors import ConfigError, InputError
from .settings import setting
from .variants import Variant

MAX_SEED = 2**32 - 1
# The text encoder reads 226 tokens: a few hundred words, about 1,000 characters of English.
# Ten times that is taken (the rest is cut by the encoder, and the log says which words);
# longer text is refused before it is tokenized, which for a 10 MB prompt took minutes.
# The predictors declare the same bound as max_length, so Cog's server refuses it first.
MAX_PROMPT_CHARS = 10_000


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
    strength = float(default if strength is None else strength)
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
    if required and is_blank(prompt):
        raise InputError("prompt is empty: describe the video to generate.")
    return prompt


# Letters and symbols drawn as nothing: the Hangul fillers and the blank Braille pattern.
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def is_blank(text: str) -> bool:
    """Nothing a reader would see: spaces, invisible characters such as U+200B, marks with
    nothing to mark (a variation selector, U+034F), and the blank glyphs above."""
    return all(
        c.isspace() or c in _BLANK_GLYPHS or unicodedata.category(c) in ("Cc", "Cf", "Mn")
        for c in text
    )


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


def choose_render_size(
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


def resolution_setting() -> str | None:
    """COGVIDEOX_RESOLUTION, its form checked before the weights are fetched: a typo should
    not cost a 20 GB download. choose_render_size() checks the size against the weights."""
    override = setting(RESOLUTION_ENV) or None
    if override:
        _height_width(override)
    return override


def _height_width(override: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in override.lower().split("x"))
    except ValueError:
        raise ConfigError(
            f"{RESOLUTION_ENV}={override!r} is not HEIGHTxWIDTH, e.g. 768x1360"
        ) from None
    if height <= 0 or width <= 0:
        raise ConfigError(f"{RESOLUTION_ENV}={override}: both sides must be above 0")
    return height, width


def _parse_resolution(override: str, multiple: int) -> tuple[int, int]:
    height, width = _height_width(override)
    if height % multiple or width % multiple:
        raise ConfigError(
            f"{RESOLUTION_ENV}={override}: both sides must be multiples of {multiple}"
        )
    return height, width


def image_aspect_size(
    image_size: tuple[int, int], render_size: tuple[int, int], multiple: int
) -> tuple[int, int]:
    """(height, width) closest to the image's aspect ratio: short side at the render size's
    short side, long side a multiple of the patch grid and at most the render size's long side
    (the variant's native size, or COGVIDEOX_RESOLUTION's)."""
    image_w, image_h = image_size
    short, longest = min(render_size), max(render_size)
    if image_w >= image_h:
        long_side = round(short * image_w / image_h / multiple) * multiple
        return short, min(max(long_side, short), longest)
    long_side = round(short * image_h / image_w / multiple) * multiple
    return min(max(long_side, short), longest), short
