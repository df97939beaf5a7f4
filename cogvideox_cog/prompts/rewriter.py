"""What a prompt-rewriting backend is: a chat in, the model's text out, within a token cap."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

REFUSAL_CHARS = 300  # of a refusal, in the error that quotes it


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


def refused(name: str, refusal: str) -> str:
    """The error for a model that declined to rewrite: its words, and what the user can do."""
    refusal = " ".join(refusal.split())
    if len(refusal) > REFUSAL_CHARS:
        refusal = refusal[:REFUSAL_CHARS] + "..."
    return (
        f"{name} refused to rewrite the prompt: {refusal!r}. Rephrase the prompt, or send "
        f"enhance_prompt=false to make the video from it as it is."
    )
