"""What a prompt-rewriting backend is: a chat in, the model's text out, within a token cap."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Reply:
    text: str
    cut: bool  # the model was stopped by the token cap, mid-text


class Rewriter(Protocol):
    """A language model that answers a chat: local (local.py) or an endpoint (endpoint.py).

    Deterministic: the same chat, seed and cap give the same reply. Raises EnhanceError,
    saying what failed, when it gives no reply.
    """

    name: str  # for the log: which model, where

    def rewrite(
        self, chat: list[dict[str, str]], *, seed: int, max_tokens: int, api_key: str | None
    ) -> Reply: ...
