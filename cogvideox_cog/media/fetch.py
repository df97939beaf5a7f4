"""The image and video inputs, fetched here with a size cap and a deadline, not by Cog.

Cog 0.23.1 downloads a `Path` input before run() is called, with no bound on size or time
(an endless URL fills the disk, a slow one holds the only slot as long as its sender likes),
and hands any string that is not a URL to run() as a path on the server's own disk. So the
predictors take these inputs as strings, and this module turns them into files: an http(s)
URL through the weights downloader (download.py) under COGVIDEOX_INPUT_MAX_SIZE and one
overall COGVIDEOX_INPUT_TIMEOUT, a data: URI decoded under the same cap; anything else is
refused. The file is deleted when the prediction is done with it; it lies in a folder of
its own, claimed as the output folders are (leftovers.py), so one that a killed worker left
behind is removed by the next setup.
"""

from __future__ import annotations

import base64
import binascii
import logging
import mimetypes
import re
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import leftovers
from ..errors import InputError, WeightsError
from ..settings import seconds_from_env, size_from_env
from ..weights import download

log = logging.getLogger(__name__)

MAX_SIZE_ENV = "COGVIDEOX_INPUT_MAX_SIZE"
TIMEOUT_ENV = "COGVIDEOX_INPUT_TIMEOUT"
INPUT_PREFIX = leftovers.TEMP_PREFIX + "input-"  # a folder in TMPDIR per fetched input
# A 64 MP PNG is at most ~200 MB; a 10-minute 4K clip (the video limits) fits in 1 GB.
DEFAULT_MAX_SIZE = "1G"
# 1 GB in 120 s is 8 MB/s; inputs on Replicate come from its own file store, far faster.
DEFAULT_TIMEOUT_S = 120.0
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,8}$")
_URL_SAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")


def max_bytes() -> int:
    return size_from_env(MAX_SIZE_ENV, DEFAULT_MAX_SIZE, positive=True)


def timeout_s() -> float:
    return seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def check_settings() -> None:
    """COGVIDEOX_INPUT_MAX_SIZE and COGVIDEOX_INPUT_TIMEOUT, in setup rather than in the
    first request that fetches an input (ConfigError)."""
    max_bytes()
    timeout_s()


@contextmanager
def fetched(name: str, value: str, kind: str) -> Iterator[Path]:
    """The input `name` (an http(s) URL or a data: URI of a `kind`, e.g. "picture") as a
    file of its own, removed on exit."""
    value = value.strip()
    scheme = download.scheme_of(value)
    if scheme not in ("http", "https", "data"):
        # download.shown: no password of a mistyped scheme (`htps://user:key@host`)
        raise InputError(
            f"{name} {download.shown(value)[:100]!r} is not an http(s) URL or a data: URI of "
            f"a {kind}."
        )
    problem = download.url_problem(value) if scheme != "data" else None
    if problem:
        raise InputError(f"the {name} URL {problem}.")
    # Named before the claim: the suffix of a large data: URI takes milliseconds, and a cancel
    # landing between the claim and the try would leave the folder until a restart.
    file_name = f"{name}{_suffix(value)}"
    folder = leftovers.claim(Path(tempfile.gettempdir()), INPUT_PREFIX)
    path = folder / file_name
    try:
        with path.open("wb") as out:
            if scheme == "data":
                out.write(_decode_data_uri(name, value))
            else:
                _download(name, value, out)
        yield path
    finally:
        leftovers.release(folder)


def _suffix(value: str) -> str:
    """The file's extension from the URL or the data: URI's media type: some formats are
    recognised by name only."""
    if value[:5].lower() == "data:":
        media_type = value[5:].split(",", 1)[0].split(";", 1)[0]
        return mimetypes.guess_extension(media_type.strip().lower()) or ""
    match = _SUFFIX.search(urllib.parse.urlsplit(value).path)
    return match[0].lower() if match else ""


def _decode_data_uri(name: str, value: str) -> bytes:
    header, comma, payload = value[5:].partition(",")
    if not comma:
        raise InputError(f"{name} is a data: URI without a comma before its data.")
    cap = max_bytes()
    if header.lower().endswith(";base64"):
        # Spaces and line breaks are dropped; the URL-safe alphabet (RFC 4648 section 5) and
        # missing padding, as base64url encoders write it, are taken too. Measured after: a
        # line break percent-encoded (%0D%0A, as RFC 2397 writes it) is six characters of no
        # data. (Cog's 100 MiB request body bounds what this holds in memory.)
        data = urllib.parse.unquote_to_bytes(payload).translate(_URL_SAFE_TO_STANDARD)
        data = _NOT_BASE64.sub(b"", data)
        if len(data) * 3 // 4 > cap:
            raise _too_big(name, len(data) * 3 // 4, cap)
        try:
            return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
        except (binascii.Error, ValueError) as error:
            raise InputError(f"{name} is a data: URI whose base64 data is damaged.") from error
    data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > cap:
        raise _too_big(name, len(data), cap)
    return data


def _download(name: str, url: str, out) -> None:
    cap, seconds = max_bytes(), timeout_s()
    started = time.monotonic()

    def fetch(cancelled: threading.Event) -> None:
        # One retry at most, in a row: a URL that fails twice fails the prediction within a
        # second or two, and a body cut short is still resumed where it stopped.
        hint = "Check the URL and try again."
        what = f"{name} {download.shown(url)}"
        download.fetch_capped(url, out, cap, cancelled, what, hint, retries=1)

    try:
        download.with_deadline(fetch, seconds, f"{name}-download")
    except download.TooLarge as error:
        raise _too_big(name, error.size, cap, error.at_least) from None
    except download.DeadlineExceeded:
        raise InputError(
            f"downloading {name} from {download.shown(url)} took longer than {seconds:g} s "
            f"({TIMEOUT_ENV}); host it closer to the server, or send a smaller file."
        ) from None
    except WeightsError as error:
        raise InputError(f"{name}: {error}") from None
    log.info(
        f"{name}: {download.human(out.tell())} downloaded in {time.monotonic() - started:.1f} s"
    )


def _too_big(name: str, size: int, cap: int, at_least: bool = False) -> InputError:
    more = "more than " if at_least else ""
    return InputError(
        f"{name} is {more}{download.human(size)}, over the {download.human(cap)} limit "
        f"({MAX_SIZE_ENV}); send a smaller file."
    )
