"""enhance_prompt: the deployment's rewriting backend, and one bounded, logged rewrite.

The backend is chosen by COGVIDEOX_ENHANCE_PROMPT in setup: `off` (default), `local` (a
small instruct model from the weights cache, local.py) or `openai` (an OpenAI-compatible
endpoint, endpoint.py). A rewrite is capped at the text encoder's token count (it reads no
more), tidied into one paragraph, logged shortened and recorded whole as the prediction's
`enhanced_prompt` metric. A failed rewrite fails the prediction (EnhanceError) rather than
falling back to the user's prompt: the video a seed gives must not depend on whether an
endpoint was up.
"""

from __future__ import annotations

import logging
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import cog
import torch

from ..errors import ConfigError, EnhanceError
from ..inputs import MAX_PROMPT_CHARS, is_blank
from ..settings import seconds_from_env, setting
from ..weights import download
from ..weights.causal_lm import load_causal_lm, source_problem
from .endpoint import BASE_URL_ENV, MIN_REDACTED_KEY_CHARS, EndpointRewriter, check_api_key
from .instruction import messages
from .local import WEIGHTS_ENV, LocalRewriter
from .rewriter import Rewriter, refused

log = logging.getLogger(__name__)

ENHANCE_ENV = "COGVIDEOX_ENHANCE_PROMPT"
BACKENDS = ("off", "local", "openai")
# Apache-2.0, 3.1 GB in bf16, a chat template and no "thinking" preamble: docs/inputs.md.
DEFAULT_WEIGHTS = "hf://Qwen/Qwen2.5-1.5B-Instruct"
MODEL_ENV = "COGVIDEOX_ENHANCE_MODEL"
DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
API_KEY_ENV = "COGVIDEOX_ENHANCE_API_KEY"
TIMEOUT_ENV = "COGVIDEOX_ENHANCE_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 600.0
LOGGED_CHARS = 300  # of the rewrite in its log line; the metric holds all of it
# How a chat model declines, where the caption should begin (after any markdown emphasis).
# A caption starts with the scene, never like this, so the video is not made from the apology.
_REFUSAL = re.compile(
    r"[\s*_#>]*"
    r"(?:(I['\u2019]m|I am) ((really|very|so|truly|terribly) )?"
    r"(sorry|unable|not able|afraid|not comfortable|not going to)\b"
    r"|I apologi[sz]e\b|(My a|A)pologies\b"
    r"|(Sorry|Unfortunately)\b[^.!?]{0,40}\bI\b"
    r"|I (can['\u2019]t|cannot|can not|won['\u2019]t|will not|must (decline|refuse))\b"
    r"|I (don['\u2019]t|do not) feel comfortable\b"
    r"|I understand\b[^.!?]{0,80}\bbut I (can['\u2019]t|cannot|won['\u2019]t|will not|am unable)\b"
    r"|As an AI\b|As an? (AI )?language model\b"
    # In Chinese, as the language model may answer a Chinese prompt: sorry, I cannot.
    r"|\u62b1\u6b49|\u5bf9\u4e0d\u8d77|\u6211\u65e0\u6cd5|\u6211\u4e0d\u80fd)"
)
# A reasoning model's thoughts, which it writes before its answer (DeepSeek-R1, Qwen3, ...)
# where the endpoint has no reasoning parser to take them out, or the local template opened
# them: everything up to the closing tag is left out.
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


class PromptEnhancer:
    """Rewrites prompts with one backend, within `max_tokens` of the text encoder's."""

    def __init__(self, rewriter: Rewriter):
        self.rewriter = rewriter

    def enhance(
        self,
        prompt: str,
        *,
        task: str,
        seed: int,
        max_tokens: int,
        api_key: str | None = None,
        record_metric: Callable[[str, object], None] | None = None,
    ) -> str:
        """The rewrite of `prompt`, tidied; EnhanceError if the backend gives none.
        record_metric: where the rewrite and its seconds go (Cog's metrics unless given)."""
        started = time.monotonic()
        reply = self.rewriter.rewrite(
            messages(prompt, task), seed=seed, max_tokens=max_tokens, api_key=api_key
        )
        text = tidy(self._answer_of(reply.text, max_tokens))
        if reply.cut:
            text = whole_sentences(_without_unclosed_quote(text))
            log.warning(
                f"enhanced prompt: the rewrite reached the cap of {max_tokens} tokens (what "
                f"the text encoder reads); kept up to its last full sentence"
            )
        if is_blank(text):
            raise EnhanceError(f"{self.rewriter.name} gave an empty rewrite")
        if is_refusal(text) and not is_refusal(tidy(prompt)):  # not the user's own words
            raise EnhanceError(refused(self.rewriter.name, text))
        if len(text) > MAX_PROMPT_CHARS:
            raise EnhanceError(
                f"{self.rewriter.name} gave a rewrite of {len(text):,} characters, over the "
                f"{MAX_PROMPT_CHARS:,} a prompt may have (it ignored max_tokens={max_tokens})"
            )
        seconds = time.monotonic() - started
        shown = (
            text
            if len(text) <= LOGGED_CHARS
            else f"{text[:LOGGED_CHARS]}... ({len(text):,} characters)"
        )
        log.info(f"enhanced prompt by {self.rewriter.name} in {seconds:.1f} s: {shown!r}")
        record = record_metric or cog.current_scope().record_metric
        record("enhanced_prompt", text)
        record("enhance_seconds", round(seconds, 3))
        return text

    def _answer_of(self, reply: str, max_tokens: int) -> str:
        """The reply without a reasoning model's thoughts; EnhanceError when it is all thought
        (the token cap came first)."""
        if _THINK_CLOSE in reply:
            log.info(f"enhanced prompt: {self.rewriter.name}'s reasoning (<think>) left out")
            return reply.rpartition(_THINK_CLOSE)[2]
        if reply.lstrip().startswith(_THINK_OPEN):
            raise EnhanceError(
                f"{self.rewriter.name} is a reasoning model: it was still reasoning (<think>) "
                f"at the cap of {max_tokens} tokens, and wrote no caption. Send "
                f"enhance_prompt=false; the deployment's operator can use a model without a "
                f"thinking mode, or serve it with thinking off."
            )
        return reply


def is_refusal(text: str) -> bool:
    """Whether a tidied rewrite opens as a refusal ("I'm sorry, but I can't ...")."""
    return _REFUSAL.match(text) is not None


def tidy(text: str) -> str:
    """One paragraph: whitespace collapsed, quotes the model wrapped it in removed."""
    text = " ".join(text.split())
    for opening, closing in ('""', "''", "\u201c\u201d"):
        if _wrapped_in(text, opening, closing):
            text = text[1:-1].strip()
    return text


def _wrapped_in(text: str, opening: str, closing: str) -> bool:
    """Whether the first and last characters are one pair of quotes around all of `text`,
    not the ends of two quotations inside it (`"Open" glows above a door marked "Closed"`)."""
    if len(text) < 2 or text[0] != opening or text[-1] != closing:
        return False
    inside = text[1:-1]
    if opening == "'":
        inside = re.sub(r"(?<=\w)'(?=\w)", "", inside)  # apostrophes: "the cat's paw"
    return opening not in inside and closing not in inside


def _without_unclosed_quote(text: str) -> str:
    """A rewrite the cap cut lost the closing quote tidy() would have removed with the opening
    one: the opening one goes alone (not a quotation's, which closes within the text)."""
    for opening, closing in ('""', "\u201c\u201d"):
        if text[:1] == opening and closing not in text[1:]:
            return text[1:].lstrip()
    return text


def whole_sentences(text: str) -> str:
    """`text` up to its last full stop, question or exclamation mark (with the quotes or
    brackets that close after it: `reads "Open."`); all of it if none."""
    ends = [m.end() for m in re.finditer(r"[.!?][\"'\u201d\u2019)\]]*(?=\s|$)", text)]
    return text[: ends[-1]] if ends else text


@dataclass(frozen=True)
class EnhanceConfig:
    """The deployment's COGVIDEOX_ENHANCE_* settings, checked. Read at the start of setup, so
    a mistyped setting fails before the video weights are downloaded."""

    backend: str  # "local" or "openai"
    timeout: float
    weights: str = ""  # local: the checkpoint's source
    endpoint: EndpointRewriter | None = None  # openai: built, nothing contacted


def config_from_env() -> EnhanceConfig | None:
    """The checked settings; None when enhancement is off. ConfigError names a bad one."""
    backend = setting(ENHANCE_ENV, "off").lower()
    if backend not in BACKENDS:
        raise ConfigError(f"{ENHANCE_ENV}={backend!r}: use one of {', '.join(BACKENDS)}.")
    if backend == "off":
        return None
    timeout = _timeout()
    if backend == "local":
        weights = setting(WEIGHTS_ENV, DEFAULT_WEIGHTS)
        if problem := source_problem(weights):
            raise ConfigError(f"{WEIGHTS_ENV}={download.shown(weights)!r} {problem}.")
        return EnhanceConfig(backend, timeout, weights=weights)
    base_url = setting(BASE_URL_ENV, DEFAULT_BASE_URL)
    if not download.is_http(base_url):
        raise ConfigError(f"{BASE_URL_ENV}={download.shown(base_url)!r} is not an http(s) URL.")
    if download.has_userinfo(base_url):
        # urllib sends no password from a URL; kept, it would show in logs and errors.
        raise ConfigError(
            f"{BASE_URL_ENV}={download.shown(base_url)!r} holds a user name or password, which "
            f"is not sent: give the endpoint's key in {API_KEY_ENV}."
        )
    if problem := download.url_problem(base_url):
        raise ConfigError(f"{BASE_URL_ENV}={download.shown(base_url)!r} {problem}.")
    if urllib.parse.urlsplit(base_url).path.rstrip("/").endswith("/chat/completions"):
        # The route is appended: kept, each rewrite would POST to .../chat/completions twice.
        raise ConfigError(
            f"{BASE_URL_ENV}={download.shown(base_url)!r} ends in /chat/completions, which is "
            f"appended to it: give the part before, as {DEFAULT_BASE_URL}."
        )
    model = setting(MODEL_ENV, DEFAULT_MODEL)
    key = setting(API_KEY_ENV) or None
    if key is not None:
        try:
            check_api_key(key, API_KEY_ENV)
        except EnhanceError as error:
            raise ConfigError(str(error)) from None
        if len(key) < MIN_REDACTED_KEY_CHARS:
            log.warning(
                f"setup: {API_KEY_ENV} has {len(key)} characters, fewer than "
                f"{MIN_REDACTED_KEY_CHARS}: an error that quotes the endpoint's answer will "
                f"show it where the answer has it (a key this short is found inside ordinary "
                f"words, which taking it out would mangle)"
            )
    endpoint = EndpointRewriter(base_url, model, key, timeout)
    return EnhanceConfig(backend, timeout, endpoint=endpoint)


def load_enhancer(
    config: EnhanceConfig | None, device: torch.device, video_peak_gib: float | None
) -> PromptEnhancer | None:
    """The backend ready to rewrite (in setup, after the video model); None when off.

    video_peak_gib: the video model's GPU memory peak when it runs without offload (a local
    model may then stay on the GPU if there is room for both); None under offload.
    """
    if config is None:
        return None
    if config.endpoint is not None:
        log.info(f"setup: prompt enhancer {config.endpoint.name}")
        return PromptEnhancer(config.endpoint)
    rewriter = load_causal_lm(
        config.weights,
        WEIGHTS_ENV,
        lambda directory: LocalRewriter.load(
            directory, config.weights, device, video_peak_gib=video_peak_gib, timeout=config.timeout
        ),
    )
    return PromptEnhancer(rewriter)


def _timeout() -> float:
    return seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, most=MAX_TIMEOUT_S)
