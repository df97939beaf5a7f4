"""Rewrite with an OpenAI-compatible chat-completions endpoint, as upstream's demos do.

POST {base_url}/chat/completions with temperature 0 and the prediction's seed, so the same
request asks the same question the same way (endpoints that honour `seed` then answer the
same; none promises it). urllib, not an SDK: one JSON request needs no new dependency.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request

from ..errors import EnhanceError
from ..weights.download import DeadlineExceeded, shown, with_deadline
from .rewriter import Reply, refused

ERROR_BODY_CHARS = 300  # of an endpoint's error answer, in our message
# A key this long is never part of a word by chance; a shorter one is left in messages.
MIN_REDACTED_KEY_CHARS = 8
BASE_URL_ENV = "COGVIDEOX_ENHANCE_BASE_URL"  # where the endpoint is (read in enhance.py)
MAX_ANSWER_BYTES = 1 << 20  # a chat answer of a few hundred tokens is a few kB
# One UTF-16 half of a character: JSON can escape one alone ("\ud83d", half an emoji, as a
# gateway that cuts a JavaScript string sends), and Python decodes it to a str that no
# tokenizer and no UTF-8 log takes.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the key to another address, and urllib turns a POST into a GET
    without the prompt: the 3xx answer is reported instead."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class _ReportsConnection:
    """Sets `connected` once the connection (TLS included) is made: a deadline that passes
    before then is an endpoint that cannot be reached, not a slow one."""

    def __init__(self, connected: threading.Event):
        super().__init__()
        self.connected = connected

    def do_open(self, http_class, req, **kwargs):
        connected = self.connected

        class Connection(http_class):
            def connect(self) -> None:
                super().connect()
                connected.set()

        return super().do_open(Connection, req, **kwargs)


class _HTTP(_ReportsConnection, urllib.request.HTTPHandler):
    pass


class _HTTPS(_ReportsConnection, urllib.request.HTTPSHandler):
    pass


def _opener(connected: threading.Event) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_NoRedirects, _HTTP(connected), _HTTPS(connected))


def check_api_key(key: str, name: str) -> str:
    """`key` without spaces around it; EnhanceError (naming `name`, never the key) when an HTTP
    header cannot carry it (a line break inside, a letter outside ASCII)."""
    key = key.strip()
    if not all("!" <= c <= "~" for c in key):
        raise EnhanceError(
            f"{name} holds a character an HTTP header cannot carry (a space or line break "
            f"inside it, or a letter outside ASCII): send the key alone, as issued."
        )
    return key


class EndpointRewriter:
    """One model behind an OpenAI-compatible endpoint; `api_key` may be None (no auth)."""

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout: float):
        self.url = _chat_url(base_url)
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.name = f"{model} at {shown(base_url)}"  # in logs and errors: no query string

    def rewrite(
        self, chat: list[dict[str, str]], *, seed: int, max_tokens: int, api_key: str | None
    ) -> Reply:
        body = {
            "model": self.model,
            "messages": chat,
            "temperature": 0,
            "seed": seed,
            "max_tokens": max_tokens,
            "n": 1,
        }
        if api_key:
            api_key = check_api_key(api_key, "enhance_prompt_api_key")
        key = api_key or self.api_key
        try:
            answer = _choice(self._post(body, key), key)
            message = answer.get("message")
            message = message if isinstance(message, dict) else {}
            refusal = message.get("refusal")  # OpenAI's, in place of the content
            if isinstance(refusal, str) and refusal.strip():  # taken out before it is cut
                raise EnhanceError(refused(self.name, _redacted(refusal, key)))
            reason = answer.get("finish_reason")
            if reason == "content_filter":  # what text there is, the filter cut short
                raise EnhanceError(
                    f"{self.name}'s content filter stopped the rewrite (finish_reason "
                    f"'content_filter'): the caption was cut short or withheld. Rephrase the "
                    f"prompt, or send enhance_prompt=false to make the video from it as it is."
                )
            text = message.get("content")
            if not isinstance(text, str) or not text.strip():
                raise EnhanceError(f"{self.name} answered with no text (finish_reason {reason!r})")
        except EnhanceError as error:  # whatever part of the answer it quotes
            raise EnhanceError(_redacted(str(error), key)) from None
        text = _redacted(_LONE_SURROGATE.sub("", text), key)  # it is logged, and may be quoted
        return Reply(text, cut=reason == "length")

    def _post(self, body: dict, api_key: str | None) -> dict:
        """The endpoint's JSON answer, all of it within the timeout (connecting, headers and
        body; a per-read socket timeout alone lets a trickle last for ever)."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        connected = threading.Event()
        try:
            raw = with_deadline(
                lambda stop: self._exchange(request, stop, api_key, connected),
                self.timeout,
                "enhance",
            )
        except DeadlineExceeded:
            if not connected.is_set():
                raise EnhanceError(self._unreachable()) from None
            raise EnhanceError(f"{self.name} did not answer within {self.timeout:g} s") from None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            shown = _excerpt(raw, api_key)
            raise EnhanceError(
                f"{self.name} answered with something other than JSON: {shown!r}"
            ) from None

    def _unreachable(self) -> str:
        """A connection not made within the timeout (a firewall that drops it, a host that is
        down): a longer timeout would not help, unlike for a slow answer."""
        return f"{self.name} could not be reached within {self.timeout:g} s: no connection was made"

    def _exchange(
        self,
        request: urllib.request.Request,
        stop: threading.Event,
        api_key: str | None,
        connected: threading.Event,
    ) -> bytes:
        try:
            with _opener(connected).open(request, timeout=self.timeout) as response:
                return self._read(response, stop)
        except urllib.error.HTTPError as error:
            if 300 <= error.code < 400:
                raise EnhanceError(
                    f"{self.name} answered HTTP {error.code}, a redirect, which is not followed "
                    f"(it would take the key elsewhere): set {BASE_URL_ENV} to the address it "
                    f"redirects to"
                ) from None
            try:
                body = error.read(_excerpt_bytes(api_key))
            except (OSError, http.client.HTTPException):  # broken off: the code says enough
                body = b""
            detail = _excerpt(body, api_key)
            raise EnhanceError(f"{self.name} answered HTTP {error.code}: {detail}") from None
        except TimeoutError:
            raise EnhanceError(f"{self.name} did not answer within {self.timeout:g} s") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, TimeoutError):
                if not connected.is_set():
                    raise EnhanceError(self._unreachable()) from None
                raise EnhanceError(
                    f"{self.name} did not answer within {self.timeout:g} s"
                ) from None
            raise EnhanceError(f"{self.name} could not be reached: {reason}") from None
        except (ValueError, http.client.InvalidURL) as error:  # its refusal of a header or URL
            raise EnhanceError(f"{self.name} could not be asked: {error}") from None
        except http.client.HTTPException as error:  # no OSError: a status line, a cut body
            detail = _excerpt(f"{type(error).__name__}: {error}", api_key)
            raise EnhanceError(f"{self.name} gave a broken HTTP answer: {detail}") from None

    def _read(self, response, stop: threading.Event) -> bytes:
        """The body, at most MAX_ANSWER_BYTES; stops when the deadline has passed."""
        raw = b""
        while chunk := response.read1(64 << 10):
            raw += chunk
            if len(raw) > MAX_ANSWER_BYTES:
                raise EnhanceError(f"{self.name} answered with over {MAX_ANSWER_BYTES:,} bytes")
            if stop.is_set():
                return b""
        return raw


def _chat_url(base_url: str) -> str:
    """`base_url` with /chat/completions appended to its path: a query string (an Azure
    Function's `?code=`, say) stays at the end, where it is read, not in front of the route."""
    parts = urllib.parse.urlsplit(base_url)
    path = parts.path.rstrip("/") + "/chat/completions"
    return urllib.parse.urlunsplit(parts._replace(path=path, fragment=""))


def _redacted(text: str, api_key: str | None) -> str:
    """An endpoint may echo the request's Authorization header in its error: as sent, or
    inside a JSON string (`"` and `\\` escaped, `/` too by some servers), or in our repr of
    its parsed answer. A key shorter than MIN_REDACTED_KEY_CHARS stays: it is found inside
    ordinary words ("a", "sk", "local"), which taking it out would mangle, in the message and
    in the rewrite the video is made from."""
    if not api_key or len(api_key) < MIN_REDACTED_KEY_CHARS:
        return text
    for form in _quoted_forms(api_key):
        text = text.replace(form, "[the key]")
    return text


def _quoted_forms(api_key: str) -> list[str]:
    """The ways an answer can spell the key, longest first (one may hold another)."""
    in_json = json.dumps(api_key)[1:-1]
    forms = {api_key, in_json, in_json.replace("/", "\\/"), repr(api_key)[1:-1]}
    return sorted(forms, key=len, reverse=True)


def _excerpt_bytes(api_key: str | None) -> int:
    """Enough of an answer for an excerpt (UTF-8 takes up to 4 bytes a character), and a key
    that starts inside it read whole, escaped as it may be, so that it can be taken out."""
    longest = max(map(len, _quoted_forms(api_key))) if api_key else 0
    return 4 * ERROR_BODY_CHARS + longest


def _excerpt(answer: bytes | str, api_key: str | None) -> str:
    """The start of an answer, for an error message: the key taken out before it is cut,
    which could otherwise leave the key's first characters at the end."""
    if isinstance(answer, bytes):
        answer = answer[: _excerpt_bytes(api_key)].decode(errors="replace")
    return _redacted(answer.strip(), api_key)[:ERROR_BODY_CHARS]


def _choice(answer, api_key: str | None) -> dict:
    """The first choice of a chat-completions answer, or EnhanceError."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise EnhanceError(
            f"the endpoint's answer has no choices: {_excerpt(str(answer), api_key)}"
        )
    return choices[0]
