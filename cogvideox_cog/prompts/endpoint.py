"""Rewrite with an OpenAI-compatible chat-completions endpoint, as upstream's demos do.

POST {base_url}/chat/completions with temperature 0 and the prediction's seed, so the same
request asks the same question the same way (endpoints that honour `seed` then answer the
same; none promises it). urllib, not an SDK: one JSON request needs no new dependency.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from ..errors import EnhanceError
from .rewriter import Reply

ERROR_BODY_CHARS = 300  # of an endpoint's error answer, in our message
MAX_ANSWER_BYTES = 1 << 20  # a chat answer of a few hundred tokens is a few kB


class EndpointRewriter:
    """One model behind an OpenAI-compatible endpoint; `api_key` may be None (no auth)."""

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout: float):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.name = f"{model} at {base_url}"

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
        answer = _choice(self._post(body, api_key or self.api_key))
        message = answer.get("message")
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise EnhanceError(
                f"{self.name} answered with no text (finish_reason {answer.get('finish_reason')!r})"
            )
        return Reply(text, cut=answer.get("finish_reason") == "length")

    def _post(self, body: dict, api_key: str | None) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = self._read(response)
        except urllib.error.HTTPError as error:
            detail = error.read(ERROR_BODY_CHARS).decode(errors="replace").strip()
            raise EnhanceError(f"{self.name} answered HTTP {error.code}: {detail}") from None
        except TimeoutError:
            raise EnhanceError(f"{self.name} did not answer within {self.timeout:g} s") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, TimeoutError):
                raise EnhanceError(
                    f"{self.name} did not answer within {self.timeout:g} s"
                ) from None
            raise EnhanceError(f"{self.name} could not be reached: {reason}") from None
        try:
            return json.loads(raw)
        except ValueError:
            shown = raw[:ERROR_BODY_CHARS].decode(errors="replace")
            raise EnhanceError(
                f"{self.name} answered with something other than JSON: {shown!r}"
            ) from None

    def _read(self, response) -> bytes:
        """The body, within the timeout in all (not per read) and MAX_ANSWER_BYTES."""
        deadline = time.monotonic() + self.timeout
        raw = b""
        while chunk := response.read1(64 << 10):
            raw += chunk
            if len(raw) > MAX_ANSWER_BYTES:
                raise EnhanceError(f"{self.name} answered with over {MAX_ANSWER_BYTES:,} bytes")
            if time.monotonic() > deadline:
                raise TimeoutError
        return raw


def _choice(answer) -> dict:
    """The first choice of a chat-completions answer, or EnhanceError."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise EnhanceError(
            f"the endpoint's answer has no choices: {str(answer)[:ERROR_BODY_CHARS]}"
        )
    return choices[0]
