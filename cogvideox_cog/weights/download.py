"""Bytes of a weights tar, in order, from an HTTP(S) URL or a local file.

The built-in downloader (used when pget is absent) fetches fixed-size chunks with parallel
ranged GETs and hands them on in file order, so the tar is extracted as it arrives without
a copy of it on disk. A chunk cut short is re-requested from the byte where it stopped, with
backoff, on connection errors, timeouts and 5xx; a server without Range support gets one
streaming GET. Position is exposed so an interrupted extraction can start a new stream at
the first byte it has not written (untar.py), and the server's ETag or Last-Modified, so it
only does that on the same file.

Hand-written on urllib rather than huggingface_hub or requests: huggingface_hub downloads
whole files into a directory (no streaming into a tar reader), requests is not one of our
pinned dependencies and its streaming reads copy every block once more; urllib brings
redirects and the proxy variables, and the socket fills our buffers in place (_read_some).
Retries are ours for the same reason (urllib3's Retry comes with urllib3's connection pool,
another unpinned dependency) and because a retry must resume at the byte where it stopped.

Other URLs the package fetches use it too: fetch_capped and with_deadline bound a LoRA, an
input image or clip and a post-processing model by size and time, and shown() and
url_problem() keep every URL's password and signature out of logs and errors.
"""

from __future__ import annotations

import http.client
import logging
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

from ..errors import BadSource, WeightsError
from ..settings import count_from_env, seconds_from_env

log = logging.getLogger(__name__)

TIMEOUT_ENV = "COGVIDEOX_WEIGHTS_TIMEOUT"
CONNECTIONS_ENV = "COGVIDEOX_WEIGHTS_CONNECTIONS"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_CONNECTIONS = 8
MAX_CONNECTIONS = 64  # each holds a CHUNK_BYTES buffer: 64 are about 1 GiB of memory
CHUNK_BYTES = 16 << 20  # one ranged GET; chunks in flight (and buffers): connections + 2
READ_BYTES = 4 << 20  # at most this much per read
PUBLISH_BYTES = 1 << 20  # hand bytes on in batches this big while they flow fast
RETRIES = 5  # consecutive failures without progress before a range is given up
BACKOFF_S = 1.0  # first wait; doubles per failure, up to BACKOFF_MAX_S
BACKOFF_MAX_S = 30.0
PROGRESS_EVERY_S = 15.0
USER_AGENT = "cogvideox-cog weights downloader"
RESUME_HINT = "Run setup again to resume, or check the URL and the network."
# The bytes on disk are of the old file, and the next setup's probe sees the new validator.
RESTART_HINT = "Run setup again: it downloads the new file from the start."
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_AUTHORITY = re.compile(r"\A[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")
# `id:key@` at the start or after a `/`, where no `scheme://host` says where user info is.
# Possessive: linear in the text, however many `:` it holds.
_LOOSE_USERINFO = re.compile(r"(?:\A|(?<=/))[^/?#@:\s]*+:[^/?#@\s]*+@")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def timeout_s() -> float:
    return seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def connections() -> int:
    return count_from_env(CONNECTIONS_ENV, DEFAULT_CONNECTIONS, most=MAX_CONNECTIONS)


class _Retryable(Exception):
    """A response we cannot use, but the next attempt might."""


class _Fatal(Exception):
    """A response that says retrying is pointless (4xx, the file changed)."""


class _Changed(_Fatal):
    """The server now serves another version of the file than the one being downloaded."""

    def __init__(self, how: str):
        super().__init__(f"the file changed on the server during the download ({how})")


@dataclass
class RemoteFile:
    """What one probe learnt about a URL."""

    url: str
    size: int | None
    ranges: bool
    etag: str | None
    last_modified: str | None

    @property
    def shown(self) -> str:
        return shown(self.url)

    @property
    def validator(self) -> str | None:
        """Identifies this version of the file, so a resumed download does not mix two."""
        return self.etag or self.last_modified

    def changed(self, headers) -> str | None:
        """How a response's ETag or Last-Modified shows another version of the file, or None."""
        for name, ours in (("ETag", self.etag), ("Last-Modified", self.last_modified)):
            theirs = headers.get(name)
            if ours and theirs and theirs != ours:
                return f"{name} {ours}, now {theirs}"
        return None


def probe(
    url: str, retries: int | None = None
) -> tuple[RemoteFile, http.client.HTTPResponse | None]:
    """Learn the size and Range support of `url` with one GET of its first byte.

    A server that ignores Range answers with the whole body; that response is returned open,
    to be read as the download itself, rather than fetched twice.
    """

    def attempt():
        try:
            response = _open(url, "bytes=0-0")
        except urllib.error.HTTPError as error:
            if error.code == 416 and (error.headers or {}).get("Content-Range") == "bytes */0":
                error.close()
                return RemoteFile(url, 0, True, None, None), None  # an empty file has no byte 0
            raise
        headers = response.headers
        validators = {"etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified")}
        if response.status == 206:
            match = _CONTENT_RANGE.fullmatch(headers.get("Content-Range", ""))
            response.close()  # the byte itself is not needed
            if match and match[3] != "*":
                return RemoteFile(url, int(match[3]), True, **validators), None
            response = _open(url, None)  # a range of unknown total length: stream it
        length = response.headers.get("Content-Length")
        size = int(length) if length and length.isdigit() else None
        return RemoteFile(url, size, False, **validators), response

    return _retrying(f"could not download {shown(url)}", attempt, retries)


def scheme_of(url: str) -> str:
    """The URL's scheme, lower case ("" for none), where urlsplit would raise on the rest."""
    match = _SCHEME.match(url)
    return match[1].lower() if match else ""


def is_http(url: str) -> bool:
    """Whether `url` is http(s), in any case of the scheme (`HTTPS://` too)."""
    return scheme_of(url) in ("http", "https")


def shown(url: str) -> str:
    """`url` as logs and errors show it: an http(s) URL without its query string (where a
    presigned URL carries its signature) and without a user name or password. Any other URL
    keeps no user name or password either: a mistyped scheme (`htps://user:key@host`) must
    not put the key in an error that says the URL is not http(s)."""
    url = _without_userinfo(url)
    if not is_http(url):
        return url  # a local path, hf://
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        parts = urllib.parse.SplitResult(url[: url.find(":")], "", "", "", "")
    host = parts.netloc.rpartition("@")[2]
    hidden = "?<query hidden>" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", "")) + hidden


def has_userinfo(url: str) -> bool:
    """Whether `url` holds a user name or password, as shown() finds them."""
    return _without_userinfo(url) != url


def _without_userinfo(url: str) -> str:
    """`url` without what comes before the host's `@`. A password holding `/`, `?` or `#`
    ends the authority early (`https://id:ab/cd@host`: host `id`, port `ab`), so where what
    follows the authority's `:` is no port number and an `@` comes later, all up to the
    last `@` is taken for the user name and password. With no host after the scheme (a
    mistyped `https//id:key@host` or `https:/id:key@host`), an `id:key@` is."""
    match = _AUTHORITY.match(url)
    if match is None or not match[1]:
        return _LOOSE_USERINFO.sub("", url, count=1)
    authority, rest = match[1], url[match.end(1) :]
    if "@" in authority:
        return url[: match.start(1)] + authority.rpartition("@")[2] + rest
    _, colon, port = authority.rpartition(":")
    if colon and port and not port.isdigit() and not authority.endswith("]") and "@" in rest:
        return url[: match.start(1)] + rest.rpartition("@")[2]
    return url


_URL = re.compile(r"""https?://[^\s"'\\<>]+""", re.IGNORECASE)


def hide_urls(text: str) -> str:
    """`text` with every http(s) URL in it as shown() shows it: for another program's log,
    such as pget's, which prints the whole URL it fetches (and any it is redirected to)."""
    return _URL.sub(lambda match: shown(match[0]), text)


# Query parameters that sign a URL or bound its life rather than name the file: S3's and
# GCS's presigned URLs (X-Amz-*, X-Goog-* and the older AWSAccessKeyId, GoogleAccessId,
# Signature, Expires), CloudFront's (Key-Pair-Id, Policy); Azure's SAS token when it has `sig`.
_SIGNING = re.compile(
    r"x-amz-.*|x-goog-.*|awsaccesskeyid|googleaccessid|signature|expires|key-pair-id|policy",
    re.IGNORECASE,
)
_AZURE_SAS = frozenset(
    "sv ss srt sp se st spr sig sr si sip skoid sktid skt ske sks skv saoid suoid scid sdd ses "
    "rscc rscd rsce rscl rsct".split()
)


def identity(url: str) -> str:
    """What names the file behind `url`, for the cache: an http(s) URL without the query
    parameters that sign it. A presigned URL expires (S3's within 7 days) and is renewed with
    a new signature for the same file; keyed on the whole URL, each renewal downloaded the
    weights again beside the old copy. Other URLs are returned unchanged."""
    if not is_http(url):
        return url
    try:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return url
    azure = any(name == "sig" for name, _ in query)
    kept = [
        (name, value)
        for name, value in query
        if not (_SIGNING.fullmatch(name) or (azure and name in _AZURE_SAS))
    ]
    if len(kept) == len(query):
        return url
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(kept)))


_UNSENDABLE = re.compile(r"[\x00-\x20\x7f]")  # what http.client refuses in a request line


def url_problem(url: str) -> str | None:
    """Why urllib cannot fetch this http(s) URL as written, or None. Said before any request,
    so that the error names the URL's fault rather than a socket's (and echoes no password,
    nor the query string that http.client quotes when it refuses a request line)."""
    if has_userinfo(url):  # before urlsplit, whose port error quotes a password
        return (
            "holds a user name or password, which cannot be sent: use a signed URL instead "
            "(its token in the query string)"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError as error:
        return f"is not a valid URL ({error})"
    if _UNSENDABLE.search(url) or not (parts.path + parts.query).isascii():
        return (
            "holds a space, a control character or a letter outside ASCII, which a request "
            "cannot carry: percent-encode it (a space is %20), as a browser's address bar does"
        )
    if not parts.hostname:
        return "has no host"
    try:
        parts.hostname.encode("idna")  # as the socket will: a DNS label is 1 to 63 characters
    except UnicodeError:
        return "has a host name with an empty part (two dots in a row) or one over 63 characters"
    return None


def local_validator(stat: os.stat_result) -> str:
    """A local file's version, as RemoteFile.validator is a URL's: its mtime and size."""
    return f"{stat.st_mtime_ns}-{stat.st_size}"


def local_version(source: str) -> str | None:
    """The version of the local file `source` names; None for a URL, or a file that is gone
    (its cached copy then stands). Kept in a cache marker: a file replaced at the same path
    (new weights baked into an image, a cache on a volume that outlives it) is fetched again."""
    if is_http(source) or source.startswith("hf://"):
        return None
    try:
        stat = Path(source).expanduser().stat()
    except (OSError, ValueError):
        return None
    return local_validator(stat) if S_ISREG(stat.st_mode) else None


class _RedirectsWithinHttp(urllib.request.HTTPRedirectHandler):
    """urllib also follows a redirect to ftp://, which would hang until the deadline. What is
    refused is said without the target: urllib's own refusal (of s3://, say) quotes it whole,
    a presigned query string too, and http.client's of a user:password@ host quotes those."""

    def http_error_302(self, req, fp, code, msg, headers):
        _check_redirect(code, headers.get("location") or headers.get("uri") or "")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _check_redirect(code: int, location: str) -> None:
    try:
        parts = urllib.parse.urlsplit(location)
        with_userinfo = "@" in parts.netloc
    except ValueError:
        raise _Fatal(f"HTTP {code}: a redirect to an invalid URL") from None
    if parts.scheme and parts.scheme.lower() not in ("http", "https"):
        raise _Fatal(f"HTTP {code}: a redirect to {parts.scheme.lower()}:, not http(s)")
    if with_userinfo:
        raise _Fatal(f"HTTP {code}: a redirect to a URL with a user name or password in it")


_OPENER = urllib.request.build_opener(_RedirectsWithinHttp)


def _open(url: str, byte_range: str | None) -> http.client.HTTPResponse:
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if byte_range:
        headers["Range"] = byte_range
    request = urllib.request.Request(url, headers=headers)
    return _OPENER.open(request, timeout=timeout_s())


def _describe(error: BaseException) -> tuple[bool, str, float | None]:
    """(worth retrying, what happened, seconds the server asked us to wait)."""
    if isinstance(error, urllib.error.HTTPError):
        retry_after = error.headers.get("Retry-After") if error.headers else None
        wait = float(retry_after) if retry_after and retry_after.isdigit() else None
        retryable = error.code >= 500 or error.code in (408, 425, 429)
        return retryable, f"HTTP {error.code} {error.reason}", wait
    if isinstance(error, (_Fatal, http.client.InvalidURL)):  # InvalidURL: the URL's own fault
        return False, str(error), None
    if isinstance(error, (TimeoutError, socket.timeout)):
        return True, f"no data for {timeout_s():g} s ({TIMEOUT_ENV})", None
    if isinstance(error, urllib.error.URLError):
        if isinstance(error.reason, (TimeoutError, socket.timeout)):
            return True, f"no answer in {timeout_s():g} s ({TIMEOUT_ENV})", None
        return True, f"{error.reason}", None
    if isinstance(error, (_Retryable, http.client.HTTPException, OSError)):
        return True, str(error) or type(error).__name__, None
    return False, repr(error), None


def _backoff(failures: int, asked: float | None) -> float:
    delay = min(BACKOFF_S * 2 ** (failures - 1), BACKOFF_MAX_S)
    if asked is not None:
        return min(max(asked, delay), BACKOFF_MAX_S)
    return delay * random.uniform(0.75, 1.0)  # jitter: parallel ranges do not retry in step


class _Retries:
    """The one retry policy of every loop here: failures in a row, each retryable one waited
    out with backoff and logged; past the budget, or not retryable, a WeightsError.

    retries: the budget (RETRIES when not given, read when the loop starts).
    """

    def __init__(self, retries: int | None = None, wait: Callable[[float], object] = time.sleep):
        self.budget = RETRIES if retries is None else retries
        self.failures = 0
        self.wait = wait

    def succeeded(self) -> None:
        self.failures = 0  # progress: the budget is for failures in a row

    def failed(
        self,
        error: Exception,
        where: str,
        message: Callable[[str], str],
        note: str = "",
        allowed: bool = True,
    ) -> None:
        """Wait before the next attempt, or raise WeightsError(message(reason))."""
        retryable, text, asked = _describe(error)
        self.failures += 1
        if not allowed or not retryable or self.failures > self.budget:
            tries = f" ({self.failures} attempts)" if self.failures > 1 else ""
            raise WeightsError(message(f"{text}{tries}")) from error
        delay = _backoff(self.failures, asked)
        log.warning(
            f"download: {where}: {text}; retry {self.failures}/{self.budget} in {delay:.1f} s"
            + note
        )
        self.wait(delay)


def _retrying(what: str, attempt: Callable, retries: int | None = None):
    """Call attempt() until it returns, retrying what _describe() calls retryable."""
    policy = _Retries(retries)
    while True:
        try:
            return attempt()
        except Exception as error:
            policy.failed(error, what, lambda reason: f"{what}: {reason}")


def human(size: int) -> str:
    """A size for people; small ones (a LoRA of a test's limit) in kB, not as 0.0 MB."""
    if size >= 1e9:
        return f"{size / 1e9:.2f} GB"
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


class Progress:
    """Logs bytes, rate and ETA every PROGRESS_EVERY_S, never per chunk.

    Not tqdm: its bar redraws with carriage returns, noise in a server log (see logs.py).
    """

    def __init__(self, what: str, total: int | None, start: int = 0):
        self.what, self.total, self.start = what, total, start
        self.position = start
        self.started = self.last = time.monotonic()

    def update(self, position: int) -> None:
        self.position = position
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            log.info(f"download: {self.what}: {self.line()}")

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def line(self) -> str:
        done = self.position - self.start
        rate = done / max(self.seconds, 1e-9)
        text = human(self.position)
        if self.total:
            text += f" of {human(self.total)} ({100 * self.position / self.total:.0f}%)"
        text += f" at {rate / 1e6:.0f} MB/s"
        if self.total and rate > 0:
            text += f", ETA {(self.total - self.position) / rate:.0f} s"
        return text


class Stream:
    """Bytes of a source in order, from `position` on."""

    position: int
    total: int | None
    progress: Progress

    def views(self, n: int) -> Iterator[memoryview]:
        """The next `n` bytes as views, each valid only until the next one is asked for."""
        raise NotImplementedError

    def read(self, n: int) -> bytes:
        return b"".join(bytes(view) for view in self.views(n))

    def close(self) -> None:
        pass

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Chunk:
    begin: int
    end: int
    buffer: bytearray | None
    filled: int = 0
    error: WeightsError | None = None

    @property
    def size(self) -> int:
        return self.end - self.begin


class RangedStream(Stream):
    """Parallel ranged GETs of fixed-size chunks, handed on in file order.

    Workers fill chunk buffers ahead of the reader, at most `connections + 2` chunks ahead,
    and publish what they have received as they go, so the reader never waits for a whole
    chunk and a range that fails for good still delivers every byte before the failure.
    """

    def __init__(
        self,
        remote: RemoteFile,
        start: int,
        what: str,
        hint: str = RESUME_HINT,
        retries: int | None = None,
    ):
        assert remote.size is not None
        self.hint, self.retries = hint, retries
        self.remote, self.total, self.position = remote, remote.size, start
        self.progress = Progress(what, remote.size, start)
        self._first, self._count = start, -(-(remote.size - start) // CHUNK_BYTES)
        workers = min(connections(), self._count)
        self._window = workers + 2
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._chunks: dict[int, _Chunk] = {}
        self._spare: list[bytearray] = []
        self._claimed = self._head = self._offset = 0
        self._failed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"weights-range-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def views(self, n: int) -> Iterator[memoryview]:
        while n > 0:
            with self._cond:
                while True:
                    chunk = self._chunks.get(self._head)
                    if chunk is not None and (chunk.filled > self._offset or chunk.error):
                        break
                    if self._head >= self._count:
                        raise BadSource(
                            f"truncated tar {self.remote.shown}: it ends at byte "
                            f"{self.position:,}, but its headers promise more"
                        )
                    self._cond.wait()
                available = chunk.filled - self._offset
                if available <= 0:
                    raise chunk.error
            take = min(n, available)
            yield memoryview(chunk.buffer)[self._offset : self._offset + take]
            self._offset += take
            self.position += take
            n -= take
            self.progress.update(self.position)
            if self._offset == chunk.size:
                with self._cond:
                    del self._chunks[self._head]
                    self._spare.append(chunk.buffer)
                    self._head += 1
                    self._offset = 0
                    self._cond.notify_all()

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while (
                    not self._stop.is_set()
                    and not self._failed
                    and self._claimed < self._count
                    and self._claimed >= self._head + self._window
                ):
                    self._cond.wait()
                if self._stop.is_set() or self._failed or self._claimed >= self._count:
                    return
                begin = self._first + self._claimed * CHUNK_BYTES
                chunk = _Chunk(begin, min(begin + CHUNK_BYTES, self.total), None)
                chunk.buffer = self._spare.pop() if self._spare else None
                self._chunks[self._claimed] = chunk
                self._claimed += 1
            if chunk.buffer is None:
                chunk.buffer = bytearray(CHUNK_BYTES)
            try:
                self._fill(chunk)
            except BaseException as error:  # never leave the reader waiting on a dead worker
                if not isinstance(error, WeightsError):
                    error = WeightsError(f"download of {self.remote.shown} failed: {error!r}")
                with self._cond:
                    chunk.error = error
                    self._failed = True  # no new ranges; earlier ones still finish
                    self._cond.notify_all()
                return

    def _fill(self, chunk: _Chunk) -> None:
        view = memoryview(chunk.buffer)
        policy = _Retries(self.retries, wait=self._stop.wait)
        while chunk.filled < chunk.size and not self._stop.is_set():
            filled = chunk.filled
            try:
                body_end = self._request(chunk, view)
                if self._stop.is_set():
                    return
                if chunk.filled < body_end:  # the body ended before its Content-Range did
                    raise _Retryable(
                        f"connection closed after {chunk.filled - filled:,} of "
                        f"{body_end - filled:,} bytes of the range"
                    )
            except Exception as error:
                if chunk.filled > filled:
                    policy.succeeded()
                at = chunk.begin + chunk.filled
                policy.failed(
                    error,
                    f"{self.remote.shown} at byte {at:,}",
                    lambda reason, at=at, error=error: (
                        f"download of {self.remote.shown} failed after {at:,} of "
                        f"{self.total:,} bytes: {reason}. " + self._hint(error)
                    ),
                )

    def _hint(self, error: Exception) -> str:
        """The weights' resume hint is wrong once the file changed: what is on disk belongs to
        the old one. A caller's own hint (try the request again) stays right."""
        if isinstance(error, _Changed) and self.hint == RESUME_HINT:
            return RESTART_HINT
        return self.hint

    def _request(self, chunk: _Chunk, view: memoryview) -> int:
        """One GET of the rest of `chunk`; returns where its body ends in the chunk."""
        first, last = chunk.begin + chunk.filled, chunk.end - 1
        with _open(self.remote.url, f"bytes={first}-{last}") as response:
            if response.status != 206:
                raise _Fatal(
                    f"asked for bytes {first}-{last}, got HTTP {response.status} without a "
                    f"range: the server stopped honouring Range requests"
                )
            body_end = chunk.filled + self._check(response, first, last)
            published = filled = chunk.filled
            try:
                while filled < body_end and not self._stop.is_set():
                    want = min(body_end - filled, READ_BYTES)
                    got = _read_some(response, view[filled : filled + want])
                    if not got:
                        break
                    filled += got
                    # Batch while bytes flow; publish at once when the socket runs dry.
                    if filled - published >= PUBLISH_BYTES or got < want:
                        with self._cond:
                            chunk.filled = published = filled
                            self._cond.notify_all()
            finally:  # what arrived before an error counts: the retry starts after it
                with self._cond:
                    chunk.filled = filled
                    self._cond.notify_all()
            return body_end

    def _check(self, response: http.client.HTTPResponse, first: int, last: int) -> int:
        """A 206 must be for the bytes asked, of the same file, and say its length right;
        returns that length."""
        headers = response.headers
        match = _CONTENT_RANGE.fullmatch(headers.get("Content-Range", ""))
        if not match or int(match[1]) != first or int(match[2]) > last:
            raise _Retryable(
                f"asked for bytes {first}-{last}, got Content-Range "
                f"{headers.get('Content-Range')!r}"
            )
        total = match[3]
        changed = self.remote.changed(headers)
        if total != "*" and int(total) != self.total:
            changed = f"size {self.total:,}, now {int(total):,}"
        if changed:
            raise _Changed(changed)
        expected = int(match[2]) - first + 1
        length = headers.get("Content-Length")
        if length is None and response.chunked:
            return expected  # HTTP/1.1 allows it: the length is Content-Range's alone
        if length != str(expected):
            raise _Retryable(
                f"Content-Length {length} for bytes {first}-{match[2]} ({expected:,} bytes)"
            )
        return expected


class SequentialStream(Stream):
    """One reader from `position` to the end: a local file, or a server without Range.

    `opener(position)` returns a binary reader positioned at `position`. For HTTP without
    Range that means fetching and discarding the bytes before it, so a retry after a dropped
    connection costs the bytes already received (and the log says so).
    """

    def __init__(
        self,
        opener: Callable[[int], object],
        start: int,
        total: int | None,
        what: str,
        retry: bool,
        retries: int | None = None,
    ):
        self.opener, self.position, self.total, self.retry = opener, start, total, retry
        self.what, self.retries = what, retries
        self.progress = Progress(what, total, start)
        self._buffer = bytearray(READ_BYTES)
        self._reader = None

    def views(self, n: int) -> Iterator[memoryview]:
        view = memoryview(self._buffer)
        policy = _Retries(self.retries)
        while n > 0:
            try:
                want = min(n, READ_BYTES)
                if self.total is not None:  # never wait for bytes past the end
                    want = min(want, self.total - self.position)
                if want <= 0:
                    raise BadSource(
                        f"truncated tar: {self.what} ended at byte {self.position:,}, but its "
                        f"headers promise more"
                    )
                if self._reader is None:
                    self._reader = self.opener(self.position)
                got = _read_some(self._reader, view[:want])
                if not got:
                    raise _Retryable(
                        f"the data ended after {self.position:,} of "
                        f"{f'{self.total:,}' if self.total else 'unknown'} bytes"
                    )
            except BadSource:
                self._drop_reader()
                raise
            except Exception as error:
                self._drop_reader()
                total = f"{self.total:,}" if self.total else "unknown"
                policy.failed(
                    error,
                    f"{self.what} at byte {self.position:,}",
                    lambda reason, total=total: (
                        f"{self.what} failed after {self.position:,} of {total} bytes: {reason}"
                    ),
                    note=f" (the server has no Range support: the retry fetches the first "
                    f"{self.position:,} bytes again)",
                    allowed=self.retry,
                )
                continue
            policy.succeeded()
            yield view[:got]
            self.position += got
            n -= got
            self.progress.update(self.position)

    def close(self) -> None:
        self._drop_reader()

    def _drop_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def _read_some(reader, view: memoryview) -> int:
    """Read what has arrived (at least one byte, at most len(view)), 0 at the end.

    HTTPResponse.readinto waits until the whole view is full, so a timeout or a dropped
    connection would lose the bytes already in it; the BufferedReader under a plain (not
    chunked) response reads at most once, and a chunked response's readinto1 reads at most
    one chunk's worth (its read1). Our callers count the body's length themselves.
    """
    if isinstance(reader, http.client.HTTPResponse):
        if not reader.chunked and reader.fp:
            return reader.fp.readinto1(view)
        return reader.readinto1(view)
    return reader.readinto(view)


def open_url(
    remote: RemoteFile,
    response: http.client.HTTPResponse | None,
    start: int,
    what: str,
    hint: str = RESUME_HINT,
    retries: int | None = None,
) -> Stream:
    """A stream of a probed URL from byte `start`: parallel ranges where the server allows.

    `response`: the open whole-file response probe() returned for a server without Range.
    `retries`: failures in a row allowed (RETRIES when not given).
    """
    url = remote.url
    if remote.ranges:
        return RangedStream(remote, start, what, hint, retries)
    log.warning(
        f"download: {remote.shown} does not support Range requests: one connection, no resume"
    )

    def opener(position: int):
        nonlocal response
        reader, response = response or _open(url, None), None
        if reader.status != 200:
            raise _Fatal(f"HTTP {reader.status} for the whole file")
        changed = remote.changed(reader.headers)
        if changed:
            raise _Changed(changed)
        skip = bytearray(READ_BYTES)
        while position > 0:  # no Range: fetch and drop what we already have
            got = _read_some(reader, memoryview(skip)[: min(position, READ_BYTES)])
            if not got:
                raise _Retryable(f"the body ended before byte {position:,}")
            position -= got
        return reader

    return SequentialStream(
        opener, start, remote.size, f"download of {remote.shown}", retry=True, retries=retries
    )


def open_file(path: os.PathLike, start: int, what: str) -> Stream:
    size = os.path.getsize(path)

    def opener(position: int):
        reader = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by the stream)
        reader.seek(position)
        return reader

    return SequentialStream(opener, start, size, what, retry=False)


class TooLarge(Exception):
    """A body over the caller's size cap: its announced size, or (at_least) the bytes read."""

    def __init__(self, size: int, at_least: bool):
        super().__init__(f"{'more than ' if at_least else ''}{human(size)}")
        self.size, self.at_least = size, at_least


def fetch_capped(
    url: str,
    out,
    max_bytes: int,
    cancelled: threading.Event,
    what: str,
    hint: str = RESUME_HINT,
    retries: int | None = None,
) -> None:
    """Write the body of `url` to the binary file `out`, at most `max_bytes` of it.

    A size the server announces over the cap is refused before any byte; a body of unknown
    length is counted as it comes. Returns early once `cancelled` is set (see with_deadline).
    `retries`: failures in a row allowed, of the first request and of the body alike.
    Raises TooLarge, or WeightsError when the URL cannot be fetched.
    """
    remote, response = probe(url, retries)
    if remote.size is not None and remote.size > max_bytes:
        if response is not None:
            response.close()
        raise TooLarge(remote.size, at_least=False)
    if remote.size == 0:
        return
    if remote.size is None:  # chunked, no length: one streaming read, capped as it goes
        assert response is not None  # probe() hands back the open whole-file response
        written = 0
        with response as reader:
            # read1: what has arrived, so a trickle cannot keep this thread past a cancel.
            while block := _read_arrived(reader, written, what, hint):
                written += out.write(block)  # a full disk's OSError is the caller's to handle
                if written > max_bytes:
                    raise TooLarge(written, at_least=True)
                if cancelled.is_set():
                    return
        return
    with open_url(remote, response, 0, what, hint, retries) as stream:
        for view in stream.views(remote.size):
            out.write(view)
            if cancelled.is_set():
                return


def _read_arrived(reader, written: int, what: str, hint: str) -> bytes:
    """The next block of a body of unknown length; a broken connection is a WeightsError."""
    try:
        return reader.read1(READ_BYTES)
    except (OSError, http.client.HTTPException) as error:
        # Not resumed: without a length the server gave no sign that it takes ranges.
        _, happened, _ = _describe(error)
        raise WeightsError(
            f"{what}: the download broke after {written:,} bytes ({happened}); the server "
            f"gave no length, so it is not resumed. {hint}"
        ) from None


class DeadlineExceeded(Exception):
    """with_deadline() stopped waiting (not a socket timeout, which is a TimeoutError)."""


_waiting = threading.local()  # stop_waiting_when's check, per thread


@contextmanager
def stop_waiting_when(check: Callable[[], None]) -> Iterator[None]:
    """Within the block, with_deadline in this thread also calls check() while it waits, and
    what check raises stops the wait as a Cog cancel does: a rank process's cancel, which is
    a flag that no exception in this thread carries."""
    previous = getattr(_waiting, "check", None)
    _waiting.check = check
    try:
        yield
    finally:
        _waiting.check = previous


def waiting_check() -> Callable[[], None] | None:
    """The check stop_waiting_when set in this thread, if any: for work that waits otherwise
    than through with_deadline (a local model's generate loop)."""
    return getattr(_waiting, "check", None)


def with_deadline(work: Callable[[threading.Event], object], seconds: float, name: str):
    """work(cancelled) in a thread; DeadlineExceeded once it runs past `seconds`.

    A thread, because a stalled socket read cannot be interrupted otherwise; the calling
    thread keeps running bytecode, so a Cog cancel lands at once as well (and the check of
    stop_waiting_when runs). `cancelled` is set when the caller stops waiting, for any
    reason, so the work can stop at its next block.
    """
    check = waiting_check()
    cancelled = threading.Event()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = work(cancelled)
        except BaseException as error:
            outcome["error"] = error

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    deadline = time.monotonic() + seconds
    try:
        while worker.is_alive():
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"{name} took longer than {seconds:g} s")
            if check is not None:
                check()
            worker.join(0.1)
    finally:
        cancelled.set()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
