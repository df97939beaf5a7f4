"""The rules every COGVIDEOX_* variable follows, in one place.

Spaces around a value are dropped and an empty value means the default, for every setting:
orchestrators write `value: ""` to leave one unset, and a stray space (`-e X=" 1"`, a
trailing blank in a yaml file) must not fail setup, nor name another folder.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "COGVIDEOX_"
# Every setting (docs/configuration.md's table; tests/test_settings.py keeps the three agreeing).
NAMES = frozenset(
    PREFIX + name
    for name in (
        "ATTENTION_BACKEND COMPILE ENHANCE_API_KEY ENHANCE_BASE_URL ENHANCE_MODEL ENHANCE_PROMPT "
        "ENHANCE_TIMEOUT ENHANCE_WEIGHTS_URL GPUS INPUT_MAX_SIZE INPUT_TIMEOUT INTERPOLATE "
        "INTERPOLATE_SHA256 INTERPOLATE_URL LORA_CACHE_SIZE LORA_DIR LORA_MAX_SIZE LORA_TIMEOUT "
        "MODEL OFFLOAD RESOLUTION UPSCALE UPSCALE_SHA256 UPSCALE_URL VAE_TILING WEIGHTS_CHECK "
        "WEIGHTS_CONNECTIONS WEIGHTS_DIR WEIGHTS_FSYNC WEIGHTS_MANIFEST WEIGHTS_TIMEOUT "
        "WEIGHTS_URL"
    ).split()
)

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", re.IGNORECASE | re.ASCII)
# Plain decimals only: int() and float() also take "1_6", "+2", "1e3" and other scripts' digits.
# What a setting's prefix may be mistyped as: upstream's COGVIDEO_, lower case, a hyphen.
_PREFIX_OR_NEAR = re.compile(r"cog_?video_?x?[-_]", re.IGNORECASE | re.ASCII)
_COUNT = re.compile(r"\d+", re.ASCII)
_SECONDS = re.compile(r"\d+(?:\.\d*)?|\.\d+", re.ASCII)
# The longest timeout (32 years: "no limit"). Sockets, threads' waits and torch's collectives
# count in 64-bit nanoseconds and overflow at 292 years, past setup: every connection fails.
LONGEST_WAIT_S = 10**9


def setting(env: str, default: str = "") -> str:
    """`env`'s value without surrounding spaces; `default` when it is unset or blank."""
    return (os.environ.get(env) or "").strip() or default


def folder_from_env(env: str, default: os.PathLike | str) -> Path:
    """A folder from `env`: a trailing space would name another, empty, cache and download
    everything again. A file there is refused at setup: otherwise each download into it fails
    with NotADirectoryError, long after the deployment looked healthy. So is a link to
    nothing (a volume not mounted), which no mkdir can make: FileExistsError."""
    folder = Path(setting(env) or default)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{env}={str(folder)!r} is a file: name a folder (made if missing)")
    if folder.is_symlink() and not folder.exists():
        raise ConfigError(
            f"{env}={str(folder)!r} links to {os.readlink(folder)!r}, which does not exist: "
            "mount or make that folder, or name another"
        )
    return folder


def seconds_from_env(env: str, default: float, most: float = math.inf) -> float:
    """A positive number of seconds (at most `most`) from `env`, else a ConfigError naming it."""
    most = min(most, LONGEST_WAIT_S)
    raw = setting(env, f"{default:g}")
    seconds = float(raw) if _SECONDS.fullmatch(raw) else math.nan
    if not 0 < seconds <= most:
        raise ConfigError(f"{env}={raw!r}: give a number of seconds above 0 and at most {most:.0f}")
    return seconds


def count_from_env(env: str, default: int, most: int | None = None) -> int:
    """A whole number, 1 or more (and at most `most`), from `env`."""
    raw = setting(env, str(default))
    count = int(raw) if _COUNT.fullmatch(raw) else 0
    if count < 1 or (most is not None and count > most):
        limit = f"from 1 to {most}" if most is not None else "1 or more"
        raise ConfigError(f"{env}={raw!r}: give a whole number {limit}")
    return count


def size_from_env(env: str, default: str, positive: bool = False) -> int:
    """A size in bytes from `env` (see parse_size); positive: above 0."""
    raw = setting(env, default)
    size = parse_size(raw, env)
    if positive and size < 1:
        raise ConfigError(f"{env}={raw!r}: give a size above 0, e.g. 2G, 500M or a byte count")
    return size


def parse_size(text: str, env: str) -> int:
    """'2G', '500M', '1.5GiB' or a plain byte count -> bytes (binary multiples)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ConfigError(f"{env}={text!r} is not a size: use e.g. 2G, 500M or a byte count")
    size = float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " ")
    if not math.isfinite(size):  # int() of it raises a bare OverflowError
        raise ConfigError(f"{env}={text!r} is too large a size: use e.g. 2G, 500M or 100T")
    return int(size)


def warn_unknown_settings() -> list[str]:
    """Log each COGVIDEOX_* variable that is not a setting, with the one it may mean.

    A misspelt setting is otherwise ignored without a word: `COGVIDEOX_OFLOAD=none` leaves
    offload on `auto`. A warning, not a failure: a deployment may still carry a variable that
    a later version dropped. Returns the unknown names, sorted.
    """
    unknown = sorted(
        name for name in os.environ if _PREFIX_OR_NEAR.match(name) and name not in NAMES
    )
    for name in unknown:
        respelled = PREFIX + _PREFIX_OR_NEAR.sub("", name, count=1).upper().replace("-", "_")
        close = difflib.get_close_matches(respelled, NAMES, n=1, cutoff=0.8)
        meant = f" Did you mean {close[0]}?" if close else ""
        log.warning(
            f"{name} is not a setting of these predictors and is ignored.{meant} The settings "
            f"are in docs/configuration.md."
        )
    return unknown
