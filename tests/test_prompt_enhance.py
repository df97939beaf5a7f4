"""enhance_prompt's backends and rules, without a Cog server: the endpoint backend against a
real chat-completions server on 127.0.0.1 and its failures, the local backend on a tiny
random Qwen2 fetched through the weights cache, and the rewrite's bounds."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import threading
import time
from pathlib import Path

import cog
import pytest
import torch
from transformers import GenerationConfig

from cogvideox_cog.devtools.tiny import save_tiny_weights
from cogvideox_cog.devtools.tiny_llm import (
    CHAT_TEMPLATE,
    IM_END,
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    save_tiny_causal_lm,
)
from cogvideox_cog.errors import (
    BadSource,
    ConfigError,
    EnhanceError,
    GpuMemoryError,
    InputError,
    WeightsError,
)
from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.inputs import MAX_PROMPT_CHARS
from cogvideox_cog.parallel.ranks import OwnCancel, StepCanceled
from cogvideox_cog.pipeline import build_pipeline
from cogvideox_cog.prompts import enhance
from cogvideox_cog.prompts.endpoint import (
    BASE_URL_ENV,
    ERROR_BODY_CHARS,
    MIN_REDACTED_KEY_CHARS,
    EndpointRewriter,
    _excerpt,
    _redacted,
)
from cogvideox_cog.prompts.enhance import (
    PromptEnhancer,
    config_from_env,
    load_enhancer,
    tidy,
    whole_sentences,
)
from cogvideox_cog.prompts.instruction import instruction, messages
from cogvideox_cog.prompts.local import (
    REWRITE_MARGIN_BYTES,
    LocalRewriter,
    _fits_beside,
    visit_fits,
)
from cogvideox_cog.prompts.rewriter import Reply, refused
from cogvideox_cog.variants import VARIANTS
from cogvideox_cog.weights.cache import COMPLETE_MARKER
from cogvideox_cog.weights.causal_lm import ensure_causal_lm
from cogvideox_cog.weights.download import stop_waiting_when
from tests.chat_server import REFUSAL, ChatServer, rewrite_of
from tests.file_server import FileServer
from tests.http_peers import EndlessHandshake, NeverAccepts
from tests.hub_server import HubServer

PROMPT = "a cat playing piano"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def chat():
    with ChatServer(delay=3.0) as server:
        yield server


@pytest.fixture
def endpoint(chat):
    chat.fault = None
    chat.requests.clear()
    chat.hung_up.clear()
    return PromptEnhancer(EndpointRewriter(chat.base_url, "writer-1", "sk-test", timeout=0.5))


# The rewrite's form


def test_tidy_makes_one_paragraph_without_wrapping_quotes():
    assert tidy('  "A cat sits.\n\nIt  plays."  ') == "A cat sits. It plays."


@pytest.mark.parametrize(
    "rewrite",
    [
        '"Open" glows in red neon above a bar, under a sign that reads "Closed"',
        "\u201cOpen\u201d glows in red neon above a bar, under a sign reading \u201cClosed\u201d",
        "'Open' glows in red neon above a bar's door, under a sign that reads 'Closed'",
    ],
)
def test_tidy_keeps_quotations_that_open_and_close_the_rewrite(rewrite):
    assert tidy(rewrite) == rewrite


def test_tidy_removes_single_quotes_around_a_rewrite_with_apostrophes():
    assert (
        tidy("'A cat's paw rests on the piano's keys.'") == "A cat's paw rests on the piano's keys."
    )


def test_whole_sentences_drops_an_unfinished_last_sentence():
    assert whole_sentences("A cat sits. It plays the") == "A cat sits."


def test_whole_sentences_does_not_end_at_a_decimal_point():
    assert whole_sentences("A cat sits. It is 2.5 m tall and walks") == "A cat sits."


@pytest.mark.parametrize(
    ("cut", "kept"),
    [
        ('A sign reads "Open." A cat walks toward the', 'A sign reads "Open."'),
        (
            "A cat sits. A sign says \u201cOpen!\u201d It walks",
            "A cat sits. A sign says \u201cOpen!\u201d",
        ),
        ("A cat naps (a tabby.) It", "A cat naps (a tabby.)"),
    ],
)
def test_whole_sentences_keeps_a_sentence_that_ends_inside_quotes_or_brackets(cut, kept):
    """American style puts the full stop inside the closing quote: `reads "Open."`."""
    assert whole_sentences(cut) == kept


def test_whole_sentences_keeps_text_without_a_full_stop():
    assert whole_sentences("a cat sits on a") == "a cat sits on a"


def test_the_chat_ends_with_the_users_prompt_after_the_instruction():
    chat = messages(f"  {PROMPT} ", "t2v")
    assert chat[0]["role"] == "system" and "CogVideoX" in chat[0]["content"]
    assert chat[-1] == {"role": "user", "content": PROMPT}


def test_image_to_video_asks_for_motion_and_gives_no_example_of_looks():
    chat = messages(PROMPT, "i2v")
    assert "cannot see" in chat[0]["content"]
    assert [m["role"] for m in chat] == ["system", "user"]


def test_image_to_video_is_never_asked_how_things_look_which_the_image_decides():
    """Its own rule says "do not invent how they look": a rule above it that asks for the
    subject's appearance, clothing and light would contradict it."""
    system = instruction("i2v")
    for look in ("appearance", "clothing", "colour, material", "the time of day and the light"):
        assert look not in system


def test_video_to_video_is_never_asked_for_motion_or_camera_moves_which_the_clip_keeps():
    system = instruction("v2v")
    for move in ("how the camera frames and moves", "slow pan", "tracking shot", "how it moves"):
        assert move not in system


# The endpoint backend


def test_the_endpoint_is_asked_deterministically_with_the_seed_and_the_cap(endpoint, chat):
    rewrite = endpoint.enhance(PROMPT, task="t2v", seed=42, max_tokens=200)
    assert rewrite == rewrite_of(PROMPT)
    (body,) = chat.bodies()
    assert (body["model"], body["temperature"], body["seed"], body["max_tokens"]) == (
        "writer-1",
        0,
        42,
        200,
    )
    assert chat.requests[0]["headers"]["authorization"] == "Bearer sk-test"


def test_a_slow_endpoint_fails_at_the_timeout(endpoint, chat):
    chat.fault = "slow"
    started = time.monotonic()
    with pytest.raises(EnhanceError, match=r"did not answer within 0.5 s"):
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226)
    assert time.monotonic() - started < 2.5


def test_an_http_500_fails_with_the_endpoints_message(endpoint, chat):
    chat.fault = "500"
    with pytest.raises(EnhanceError, match=r"answered HTTP 500: .*the model crashed"):
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226)


def test_an_answer_that_is_not_json_fails_saying_so(endpoint, chat):
    chat.fault = "garbage"
    with pytest.raises(EnhanceError, match=r"something other than JSON: .*Bad Gateway"):
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226)


def test_an_empty_answer_fails(endpoint, chat):
    chat.fault = "empty"
    with pytest.raises(EnhanceError, match="answered with no text"):
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226)


def test_an_answer_cut_at_the_cap_keeps_its_full_sentences(endpoint, chat):
    chat.fault = "cut"
    assert endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226) == rewrite_of(PROMPT)


def test_a_quoted_rewrite_cut_at_the_cap_loses_its_unclosed_opening_quote(endpoint, chat):
    chat.fault = "quoted-cut"
    assert endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226) == rewrite_of(PROMPT)


@pytest.mark.parametrize("fault", ["think", "think-open", "think-twice"])
def test_a_reasoning_models_thoughts_are_left_out_of_the_rewrite(endpoint, chat, fault):
    """A reasoning model served without a reasoning parser (vLLM, Ollama) answers with its
    thoughts before the caption: in <think> tags, or after only a closing tag where its chat
    template opened them (DeepSeek-R1's), or in two blocks. The video is made from the
    caption alone, after the last closing tag."""
    chat.fault = fault
    assert endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226) == rewrite_of(PROMPT)


@pytest.mark.parametrize("fault", ["think-cut", "blank-think-cut"])
def test_a_reasoning_model_stopped_at_the_cap_while_thinking_fails_saying_so(endpoint, chat, fault):
    """Before, the video was made from its thoughts (blank lines before them included)."""
    chat.fault = fault
    with pytest.raises(EnhanceError, match=r"reasoning .*226 tokens.*no caption"):
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226)


def test_an_unreachable_endpoint_fails_saying_so(chat):
    gone = ChatServer()
    gone.close()
    rewriter = EndpointRewriter(gone.base_url, "writer-1", None, timeout=0.5)
    with pytest.raises(EnhanceError, match="could not be reached"):
        PromptEnhancer(rewriter).enhance(PROMPT, task="t2v", seed=1, max_tokens=226)


def test_an_endpoint_that_makes_no_connection_fails_as_unreachable_not_as_slow(chat):
    """A dropped connect (a firewall, a wrong host) said `did not answer within 0.5 s`, as a
    slow model does, which asks for a longer timeout: no timeout makes the connection."""
    with NeverAccepts() as port:
        rewriter = EndpointRewriter(f"http://127.0.0.1:{port.port}/v1", "writer-1", None, 0.5)
        started = time.monotonic()
        with pytest.raises(EnhanceError) as error:
            PromptEnhancer(rewriter).enhance(PROMPT, task="t2v", seed=1, max_tokens=226)
    assert time.monotonic() - started < 2.5
    assert str(error.value) == (
        f"writer-1 at http://127.0.0.1:{port.port}/v1 could not be reached within 0.5 s: no "
        f"connection was made"
    )


@pytest.mark.parametrize(
    ("fault", "problem"),
    [
        ("not-http", r"gave a broken HTTP answer: BadStatusLine: SSH-2.0"),
        ("cut-body", r"gave a broken HTTP answer: IncompleteRead"),
        ("cut-error", r"answered HTTP 500"),
    ],
)
def test_an_answer_that_breaks_http_is_the_endpoints_fault(endpoint, chat, fault, problem):
    """http.client's own errors are no OSError: they failed the prediction as a crash."""
    chat.fault = fault
    with pytest.raises(EnhanceError, match=rf"writer-1 at .*{problem}"):
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226)


@pytest.mark.parametrize(
    ("fault", "problem"),
    [
        ("no-choices", r"answer has no choices"),
        ("bare-choice", r"answer has no choices"),
        ("completion", r"answered with no text"),
    ],
)
def test_an_answer_without_a_chat_message_is_the_endpoints_fault(endpoint, chat, fault, problem):
    """An empty choice list, a choice that is no object (it crashed the prediction), or the
    older completions API's `text` in place of `message`."""
    chat.fault = fault
    with pytest.raises(EnhanceError, match=problem):
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226)


@pytest.mark.parametrize(
    ("fault", "problem", "timeout", "within"),
    [
        # Read to the timeout, an answer streamed at loopback speed filled the memory.
        ("endless", r"answered with over 1,048,576 bytes", 30, 10),
        # Only an excerpt of an error is quoted: all of it was read, for ever or to the timeout.
        ("endless-error", r"answered HTTP 500", 5, 4),
    ],
)
def test_an_endless_answer_fails_at_its_size_cap_before_the_timeout(
    endpoint, chat, fault, problem, timeout, within
):
    chat.fault = fault
    rewriter = EndpointRewriter(chat.base_url, "writer-1", None, timeout=timeout)
    started = time.monotonic()
    with pytest.raises(EnhanceError, match=problem):
        PromptEnhancer(rewriter).enhance(PROMPT, task="t2v", seed=1, max_tokens=226)
    assert time.monotonic() - started < within


def test_an_endpoint_without_a_key_is_asked_without_an_authorization_header(endpoint, chat):
    rewriter = EndpointRewriter(chat.base_url, "writer-1", None, timeout=0.5)
    rewriter.rewrite(messages(PROMPT, "t2v"), seed=1, max_tokens=226, api_key=None)
    assert "authorization" not in chat.requests[-1]["headers"]


def test_half_an_emoji_in_an_answer_is_left_out_of_the_rewrite(endpoint, chat):
    """JSON can escape one UTF-16 half of an emoji alone; kept, it made the text encoder's
    tokenizer raise a TypeError after the rewrite: a crash instead of a video."""
    chat.fault = "half-emoji"
    assert endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226) == rewrite_of(PROMPT)


@pytest.mark.parametrize(
    ("fault", "status"), [("redirect", 302), ("redirect-300", 300), ("redirect-308", 308)]
)
def test_a_redirect_is_not_followed_so_the_key_stays_with_the_endpoint(
    endpoint, chat, fault, status
):
    chat.fault = fault
    with pytest.raises(EnhanceError, match=rf"answered HTTP {status}, a redirect, which is not"):
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226)


def test_a_bad_request_is_not_taken_for_a_redirect(endpoint, chat):
    """HTTP 400, just past the redirects: the endpoint's own words say what it refused."""
    chat.fault = "400"
    with pytest.raises(EnhanceError) as failed:
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226)
    assert str(failed.value) == (
        f"writer-1 at {chat.base_url} answered HTTP 400: "
        '{"error": {"message": "max_tokens is too large"}}'
    )


def test_headers_trickled_in_fail_at_the_timeout_in_all(endpoint, chat):
    """Each byte within the socket timeout: only a deadline over the whole exchange ends it."""
    chat.fault = "trickle"
    started = time.monotonic()
    with pytest.raises(EnhanceError, match=r"did not answer within 0.5 s"):
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226)
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("fault", ["trickle-body", "stall-body"])
def test_a_body_not_done_by_the_timeout_is_read_no_further(endpoint, chat, fault):
    """Read on (a trickle within the socket timeout, or a read with no socket timeout),
    the connection and its thread outlived the failed prediction, one more each time."""
    chat.fault = fault
    with pytest.raises(EnhanceError, match=r"did not answer within 0.5 s"):
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226)
    assert chat.hung_up.wait(2.0)


def test_an_endpoint_whose_tls_handshake_never_ends_fails_as_unreachable(chat):
    """A connection is made once TLS is: a handshake that trickles on past the timeout is
    no slow model, and a longer timeout would not help."""
    with EndlessHandshake() as peer:
        url = f"https://127.0.0.1:{peer.port}/v1"
        rewriter = EndpointRewriter(url, "writer-1", None, timeout=0.5)
        with pytest.raises(EnhanceError) as error:
            PromptEnhancer(rewriter).enhance(PROMPT, task="t2v", seed=1, max_tokens=226)
    assert str(error.value) == (
        f"writer-1 at {url} could not be reached within 0.5 s: no connection was made"
    )


def test_an_answer_of_exactly_the_size_cap_is_taken(endpoint, chat):
    chat.fault = "padded"
    assert endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226) == rewrite_of(PROMPT)


def test_an_error_answer_a_connection_reset_breaks_off_is_the_endpoints_fault(endpoint, chat):
    """The status says enough; the reset's own error escaped as a crash of the prediction."""
    chat.fault = "reset-error"
    with pytest.raises(EnhanceError) as failed:
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226)
    assert str(failed.value) == f"writer-1 at {chat.base_url} answered HTTP 500: "


def test_an_error_in_four_byte_characters_is_quoted_to_300_characters(endpoint, chat):
    """UTF-8 takes up to four bytes a character: 300 bytes held 75 of them."""
    chat.fault = "wide-echo"
    rewriter = EndpointRewriter(chat.base_url, "writer-1", None, timeout=0.5)
    with pytest.raises(EnhanceError) as failed:
        PromptEnhancer(rewriter).enhance(PROMPT, task="t2v", seed=1, max_tokens=226)
    assert str(failed.value).endswith("answered HTTP 500: " + "\U0001f600" * ERROR_BODY_CHARS)


def test_a_key_quoted_across_the_end_of_the_bytes_an_excerpt_takes_does_not_show(endpoint, chat):
    """Cut there, the key's first characters were within the 300 the message quotes."""
    chat.fault = "wide-echo"
    with pytest.raises(EnhanceError) as failed:
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226, api_key="sk-user-0123456789")
    assert "sk-" not in str(failed.value)


@pytest.mark.parametrize(
    ("fault", "problem"),
    [
        ("deep", r"something other than JSON"),
        ("long", r"a rewrite of 12,\d{3} characters, over the 10,000 .*ignored max_tokens"),
        ("invisible", r"gave an empty rewrite"),
    ],
)
def test_an_unusable_answer_is_the_endpoints_fault_not_the_users(endpoint, chat, fault, problem):
    chat.fault = fault
    with pytest.raises(EnhanceError, match=problem):
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226)


@pytest.mark.parametrize("fault", ["refuse", "refusal"])
def test_a_refusal_fails_quoting_it_instead_of_becoming_the_prompt(endpoint, chat, fault):
    """In the text, as chat models decline, or in OpenAI's `refusal` field."""
    chat.fault = fault
    with pytest.raises(EnhanceError, match="refused to rewrite the prompt") as failed:
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226)
    assert REFUSAL in str(failed.value)


def test_an_empty_refusal_field_beside_the_rewrite_is_no_refusal(endpoint, chat):
    """Some OpenAI-compatible servers send `refusal: ""` with every answer."""
    chat.fault = "blank-refusal"
    assert endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226) == rewrite_of(PROMPT)


def test_a_rewrite_the_content_filter_cut_short_fails_instead_of_becoming_the_prompt(
    endpoint, chat
):
    """finish_reason "content_filter" (Azure OpenAI's filter, say): what text came back is a
    part of the caption, not a caption cut at the cap."""
    chat.fault = "filtered"
    with pytest.raises(EnhanceError, match=r"content filter stopped the rewrite") as failed:
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226)
    assert "enhance_prompt=false" in str(failed.value)


@pytest.mark.parametrize(
    "rewrite",
    [
        "Sorry-looking, a wet beagle sits on a porch as rain falls.",
        "I-beams rise from a building site at dawn while a crane turns slowly.",
        "A clown says I'm sorry with a sign, bowing as the crowd laughs.",
        "Unfortunately for the picnic, dark clouds roll in over the hills at noon.",
        "Apologetic, a small robot bows to a girl in a yellow raincoat on a wet street.",
    ],
)
def test_a_caption_with_an_apology_in_it_is_not_a_refusal(rewrite):
    assert not enhance.is_refusal(rewrite)


@pytest.mark.parametrize(
    "rewrite",
    [
        "Sorry, but I can't create that video.",
        "I apologize, but this request goes against my guidelines.",
        "Unfortunately, I am not able to help with this.",
        "I\u2019m unable to describe that scene.",
        "As an AI, I do not make such content.",
        "I'm really sorry, but I can't help with that.",
        "I'm afraid I can't create that video.",
        "Apologies, but I can't help with that.",
        "Sorry, that's not something I can help with.",
        "I must decline this request.",
        "I'm not comfortable writing that.",
        "I'm not going to write that scene.",
        "I apologise, but I can't write that.",
        "My apologies, but I can't help with that.",
        "I must refuse this request.",
        "I won't create that video.",
        "I will not describe that scene.",
        "I don't feel comfortable describing that scene.",
        "As a language model, I cannot do that.",
        "I understand the idea, but I can't create that content.",
        "**I'm sorry**, but I can't help with that.",
        "\u62b1\u6b49\uff0c\u6211\u65e0\u6cd5\u6ee1\u8db3\u8be5\u8bf7\u6c42\u3002",
        "\u5bf9\u4e0d\u8d77\uff0c\u8fd9\u4e2a\u8bf7\u6c42\u6211\u505a\u4e0d\u5230\u3002",
        "\u6211\u65e0\u6cd5\u751f\u6210\u8fd9\u4e2a\u89c6\u9891\u3002",
        "\u6211\u4e0d\u80fd\u63cf\u8ff0\u8fd9\u4e2a\u573a\u666f\u3002",
    ],
)
def test_the_usual_ways_of_declining_are_refusals(rewrite):
    assert enhance.is_refusal(rewrite)


def test_a_rewrite_that_opens_as_the_users_prompt_does_is_not_a_refusal(endpoint, chat):
    chat.fault = "verbatim"
    prompt = "I can't stop dancing: a girl in a red coat spins under a streetlight at night."
    assert endpoint.enhance(prompt, task="t2v", seed=1, max_tokens=226) == prompt


def test_a_rewrite_of_a_quoted_prompt_that_opens_as_a_refusal_is_not_a_refusal(endpoint, chat):
    """The user's prompt is compared as the rewrite is, tidied: its wrapping quotes out."""
    chat.fault = "verbatim"
    prompt = '"I can\'t stop dancing: a girl in a red coat spins under a streetlight at night."'
    assert endpoint.enhance(prompt, task="t2v", seed=1, max_tokens=226) == prompt[1:-1]


def test_a_rewrite_of_exactly_as_many_characters_as_a_prompt_may_have_is_taken(endpoint, chat):
    chat.fault = "verbatim"
    prompt = ("a cat plays piano " * 600)[: MAX_PROMPT_CHARS - 1] + "."
    assert len(tidy(prompt)) == MAX_PROMPT_CHARS
    assert endpoint.enhance(prompt, task="t2v", seed=1, max_tokens=226) == prompt


def test_a_reasoning_model_that_closed_its_thoughts_at_the_cap_gave_an_empty_rewrite(
    endpoint, chat
):
    chat.fault = "think-done-cut"
    with pytest.raises(EnhanceError, match="gave an empty rewrite"):
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226)


def test_an_error_that_quotes_the_key_does_not_show_it(endpoint, chat):
    chat.fault = "echo"
    with pytest.raises(EnhanceError, match=r"HTTP 401") as failed:
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226, api_key="sk-user-9")
    assert "sk-user-9" not in str(failed.value) and "[the key]" in str(failed.value)


@pytest.mark.parametrize(
    "fault", ["echo-page", "echo-json", "echo-late", "echo-refusal", "echo-apology", "echo-finish"]
)
def test_an_answer_that_quotes_the_key_anywhere_does_not_show_any_of_it(endpoint, chat, fault):
    """A proxy's error page or an error in place of choices, or a quote our message cuts (in
    an error's text or in a refusal), or a finish_reason our message quotes."""
    chat.fault = fault
    with pytest.raises(EnhanceError) as failed:
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226, api_key="sk-user-9")
    assert "sk-" not in str(failed.value)


# A key with the characters a JSON string escapes (and a repr escapes): the echo is escaped.
ESCAPED_KEY = 'sk-"quoted"\\with/slash-9'


@pytest.mark.parametrize("fault", ["echo", "echo-json", "echo-late", "echo-refusal"])
def test_an_answer_that_quotes_the_key_escaped_does_not_show_any_of_it(endpoint, chat, fault):
    """A JSON error body spells `"` as `\\"`; our message quotes a parsed answer in its repr."""
    chat.fault = fault
    with pytest.raises(EnhanceError) as failed:
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226, api_key=ESCAPED_KEY)
    assert "sk-" not in str(failed.value) and "quoted" not in str(failed.value)


def test_a_key_echoed_with_its_slashes_escaped_is_taken_out():
    """PHP's json_encode, among others, writes `/` as `\\/`."""
    echoed = '{"error": "bad key sk-\\"quoted\\"\\\\with\\/slash-9"}'
    assert _redacted(echoed, ESCAPED_KEY) == '{"error": "bad key [the key]"}'


@pytest.mark.parametrize("key", ["a", "at", "light"])
def test_a_short_key_leaves_the_message_and_the_rewrite_as_they_are(endpoint, chat, key):
    """A key of a few letters is inside ordinary words (the rewrite's "morning light"):
    taking it out would mangle them."""
    rewrite = endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226, api_key=key)
    assert rewrite == rewrite_of(PROMPT)
    chat.fault = "500"
    with pytest.raises(EnhanceError) as failed:
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226, api_key=key)
    assert str(failed.value) == (
        f"writer-1 at {chat.base_url} answered HTTP 500: "
        '{"error": {"message": "the model crashed"}}'
    )


def test_a_deployment_key_too_short_to_take_out_is_warned_of_in_setup(monkeypatch, caplog):
    monkeypatch.setenv("COGVIDEOX_ENHANCE_PROMPT", "openai")
    monkeypatch.setenv("COGVIDEOX_ENHANCE_API_KEY", "sk-1")
    with caplog.at_level("WARNING"):
        config_from_env()
    assert "COGVIDEOX_ENHANCE_API_KEY has 4 characters" in caplog.text
    assert "sk-1" not in caplog.text
    caplog.clear()
    monkeypatch.setenv("COGVIDEOX_ENHANCE_API_KEY", "sk-12345")
    with caplog.at_level("WARNING"):
        config_from_env()
    assert "COGVIDEOX_ENHANCE_API_KEY" not in caplog.text


@pytest.mark.parametrize("key", [None, " "])
def test_a_deployment_without_a_key_is_set_up_without_a_warning(monkeypatch, caplog, key):
    """No key is no short key: an endpoint without auth (a local vLLM) is not warned of."""
    monkeypatch.setenv("COGVIDEOX_ENHANCE_PROMPT", "openai")
    if key is None:
        monkeypatch.delenv("COGVIDEOX_ENHANCE_API_KEY", raising=False)
    else:
        monkeypatch.setenv("COGVIDEOX_ENHANCE_API_KEY", key)
    with caplog.at_level("WARNING"):
        config = config_from_env()
    assert config.endpoint.api_key is None
    assert "COGVIDEOX_ENHANCE_API_KEY" not in caplog.text


def test_the_deployments_key_is_sent_to_the_endpoint(monkeypatch, endpoint, chat):
    monkeypatch.setenv(enhance.ENHANCE_ENV, "openai")
    monkeypatch.setenv(BASE_URL_ENV, chat.base_url)
    monkeypatch.setenv(enhance.API_KEY_ENV, "sk-operator-1")
    rewriter = config_from_env().endpoint
    rewriter.rewrite(messages(PROMPT, "t2v"), seed=1, max_tokens=226, api_key=None)
    assert chat.requests[-1]["headers"]["authorization"] == "Bearer sk-operator-1"


def test_the_deployments_timeout_bounds_an_endpoint_rewrite(monkeypatch, endpoint, chat):
    monkeypatch.setenv(enhance.ENHANCE_ENV, "openai")
    monkeypatch.setenv(BASE_URL_ENV, chat.base_url)
    monkeypatch.setenv(enhance.TIMEOUT_ENV, "0.5")
    chat.fault = "slow"
    enhancer = load_enhancer(config_from_env(), CPU, None)
    with pytest.raises(EnhanceError, match=r"did not answer within 0.5 s"):
        enhancer.enhance(PROMPT, task="t2v", seed=1, max_tokens=226)


def test_an_endpoint_url_that_is_not_http_fails_setup(monkeypatch):
    monkeypatch.setenv(enhance.ENHANCE_ENV, "openai")
    monkeypatch.setenv(BASE_URL_ENV, "ftp://llm.example.com/v1")
    with pytest.raises(ConfigError, match=rf"{BASE_URL_ENV}=.* is not an http\(s\) URL"):
        config_from_env()


@pytest.mark.parametrize("key", ["sk-user-9\n", " sk-user-9 "])
def test_a_pasted_key_with_spaces_around_it_is_sent_without_them(endpoint, chat, key):
    endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226, api_key=key)
    assert chat.requests[-1]["headers"]["authorization"] == "Bearer sk-user-9"


@pytest.mark.parametrize("key", ["sk-user\n-9", "sk-us\u00e9r-9", "sk-user -9"])
def test_a_key_no_header_can_carry_is_refused_without_showing_it(endpoint, chat, key):
    with pytest.raises(EnhanceError, match=r"enhance_prompt_api_key holds a character") as bad:
        endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226, api_key=key)
    assert "sk-" not in str(bad.value)
    assert not chat.requests


def test_the_deployments_key_is_checked_in_setup(monkeypatch):
    monkeypatch.setenv("COGVIDEOX_ENHANCE_PROMPT", "openai")
    monkeypatch.setenv("COGVIDEOX_ENHANCE_API_KEY", "sk-op\nerator")
    with pytest.raises(ConfigError, match=r"COGVIDEOX_ENHANCE_API_KEY holds a character") as bad:
        config_from_env()
    assert "erator" not in str(bad.value)


def test_an_endpoint_url_with_a_password_fails_setup_without_showing_it(monkeypatch):
    """urllib sends no user name or password from a URL; kept, the URL went into setup's log
    (served by /health-check) and into every user's error, the password with it."""
    monkeypatch.setenv(enhance.ENHANCE_ENV, "openai")
    monkeypatch.setenv(BASE_URL_ENV, "https://user:s3cret@llm.example.com/v1")
    with pytest.raises(ConfigError, match=rf"{BASE_URL_ENV}=.*COGVIDEOX_ENHANCE_API_KEY") as bad:
        config_from_env()
    assert "s3cret" not in str(bad.value)


@pytest.mark.parametrize("route", ["/chat/completions", "/chat/completions/"])
def test_an_endpoint_url_that_already_ends_in_the_route_fails_setup(monkeypatch, route):
    monkeypatch.setenv(enhance.ENHANCE_ENV, "openai")
    monkeypatch.setenv(BASE_URL_ENV, f"https://llm.example.com/v1{route}?code=t0k")
    with pytest.raises(ConfigError, match=rf"{BASE_URL_ENV}=.*ends in /chat/completions") as bad:
        config_from_env()
    assert "t0k" not in str(bad.value)


def test_an_endpoint_url_with_its_scheme_in_capitals_is_taken(monkeypatch, endpoint, chat):
    """A scheme is case-insensitive (RFC 3986). Refused, setup's error quoted the whole URL,
    a token in its query string included."""
    monkeypatch.setenv(enhance.ENHANCE_ENV, "openai")
    monkeypatch.setenv(BASE_URL_ENV, chat.base_url.replace("http://", "HTTP://", 1) + "?code=t0k")
    rewriter = config_from_env().endpoint
    reply = rewriter.rewrite(messages(PROMPT, "t2v"), seed=1, max_tokens=226, api_key=None)
    assert reply.text == rewrite_of(PROMPT)


def test_an_endpoint_url_with_a_space_fails_setup_without_showing_its_query(monkeypatch):
    """Taken, every rewrite failed with http.client's refusal, which quotes the query string
    (an Azure Function's `?code=` key)."""
    monkeypatch.setenv(enhance.ENHANCE_ENV, "openai")
    monkeypatch.setenv(BASE_URL_ENV, "https://llm.example.com/v1 beta?code=t0k")
    with pytest.raises(ConfigError, match=rf"{BASE_URL_ENV}=.*percent-encode") as bad:
        config_from_env()
    assert "t0k" not in str(bad.value)


def test_an_endpoint_is_named_without_its_query_string(chat):
    """The name goes into setup's log and every error; a query string may carry a token."""
    rewriter = EndpointRewriter(f"{chat.base_url}?code=t0ken", "writer-1", None, timeout=0.5)
    assert "t0ken" not in rewriter.name and chat.base_url in rewriter.name


def test_a_query_string_in_the_endpoint_url_stays_after_the_route(endpoint, chat):
    """An Azure Function, say, takes its key as `?code=`: the route goes into the path."""
    rewriter = EndpointRewriter(f"{chat.base_url}/?code=t0ken", "writer-1", None, timeout=0.5)
    reply = rewriter.rewrite(messages(PROMPT, "t2v"), seed=1, max_tokens=226, api_key=None)
    assert chat.requests[-1]["path"] == "/v1/chat/completions?code=t0ken"
    assert reply.text == rewrite_of(PROMPT)


# Checked with the other inputs


@pytest.fixture(scope="module")
def i2v_generator(chat, tmp_path_factory):
    """Image-to-video on the tiny 1.0 model, rewriting with the chat server."""
    variant = VARIANTS["cogvideox-5b-i2v"]
    weights = save_tiny_weights(tmp_path_factory.mktemp("tiny") / "1.0-i2v", "1.0", "i2v")
    rewriter = EndpointRewriter(chat.base_url, "writer-1", None, timeout=0.5)
    pipe = build_pipeline(variant, weights, CPU, "none", mode="i2v")
    return VideoGenerator(variant, pipe, CPU, "i2v", enhancer=PromptEnhancer(rewriter))


def test_enhance_prompt_without_a_prompt_is_refused_before_the_image_is_fetched(
    i2v_generator, chat
):
    """check() is what a predictor runs before it fetches the image: an empty prompt, which
    image-to-video allows, has nothing to rewrite."""
    chat.requests.clear()
    request = _enhanced_request(prompt="")
    with pytest.raises(InputError, match="enhance_prompt needs a prompt to rewrite"):
        i2v_generator.check(request)
    assert not chat.requests


@pytest.mark.parametrize("key", ["sk-user\n-9", "sk-us\u00e9r-9"])
def test_a_users_key_no_header_can_carry_is_refused_before_the_image_is_fetched(
    i2v_generator, chat, key
):
    """A key the endpoint could never be sent is a bad input like any other: refused by
    check(), not after the image was downloaded and decoded."""
    chat.requests.clear()
    request = _enhanced_request(prompt=PROMPT, enhance_prompt_api_key=cog.Secret(key))
    with pytest.raises(InputError, match="enhance_prompt_api_key holds a character") as bad:
        i2v_generator.check(request)
    assert "sk-" not in str(bad.value)
    assert not chat.requests


# Choosing the backend


def test_enhancement_is_off_unless_the_deployment_enables_it(monkeypatch):
    monkeypatch.delenv(enhance.ENHANCE_ENV, raising=False)
    assert config_from_env() is None


def test_an_unknown_backend_fails_setup_naming_the_choices(monkeypatch):
    monkeypatch.setenv(enhance.ENHANCE_ENV, "gpt")
    with pytest.raises(ConfigError, match="off, local, openai"):
        config_from_env()


def test_a_timeout_that_is_not_seconds_fails_setup(monkeypatch):
    monkeypatch.setenv(enhance.ENHANCE_ENV, "openai")
    monkeypatch.setenv(enhance.TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match=enhance.TIMEOUT_ENV):
        config_from_env()


def test_a_bad_setting_fails_setup_before_the_video_weights_are_fetched(monkeypatch, tmp_path):
    monkeypatch.setenv(enhance.ENHANCE_ENV, "gpt")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", "http://127.0.0.1:9/never.tar")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=enhance.ENHANCE_ENV):
        VideoGenerator.from_env("t2v")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "source", ["s3://bucket/qwen.tar", "hf://Qwen", "https://user:secret@example.com/qwen.tar"]
)
def test_a_local_model_source_that_cannot_work_fails_setup_before_the_video_weights(
    monkeypatch, tmp_path, source
):
    monkeypatch.setenv(enhance.ENHANCE_ENV, "local")
    monkeypatch.setenv(enhance.WEIGHTS_ENV, source)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", "http://127.0.0.1:9/never.tar")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=enhance.WEIGHTS_ENV) as error:
        VideoGenerator.from_env("t2v")
    assert "secret" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


# The local backend and its weights


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory):
    """The tiny Qwen2 checkpoint as a tar (a wrapping folder, as hand-made tars have)."""
    model = save_tiny_causal_lm(tmp_path_factory.mktemp("llm") / "tiny-qwen2")
    served = tmp_path_factory.mktemp("served-llm")
    with tarfile.open(served / "llm.tar", "w") as archive:
        archive.add(model, arcname="tiny-qwen2")
    (model / "chat_template.jinja").rename(served / "chat_template.jinja")
    with tarfile.open(served / "no-template.tar", "w") as archive:
        archive.add(model, arcname="tiny-qwen2")  # a base model's checkpoint has none
    (served / "chat_template.jinja").rename(model / "chat_template.jinja")
    with tarfile.open(served / "no-weights.tar", "w") as archive:
        for path in model.iterdir():
            if path.suffix != ".safetensors":
                archive.add(path, arcname=path.name)
    server = FileServer(served)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local(llm_server, tmp_path_factory):
    """The local backend as setup builds it: fetched into an empty weights cache, loaded."""
    patch = pytest.MonkeyPatch()
    patch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path_factory.mktemp("weights")))
    patch.setenv(enhance.ENHANCE_ENV, "local")
    patch.setenv(enhance.WEIGHTS_ENV, llm_server.url("llm.tar"))
    yield load_enhancer(config_from_env(), CPU, None)
    patch.undo()


def test_the_local_model_is_cached_with_a_completion_marker_and_reused(local, llm_server):
    fetches = len(llm_server.requests)
    root = ensure_causal_lm(llm_server.url("llm.tar"), enhance.WEIGHTS_ENV)
    assert (root.parent / COMPLETE_MARKER).is_file()
    assert (root / "config.json").is_file()
    assert len(llm_server.requests) == fetches  # no download the second time


def test_a_local_model_tar_replaced_at_its_path_is_extracted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    model = save_tiny_causal_lm(tmp_path / "tiny-qwen2")
    tar = tmp_path / "llm.tar"
    with tarfile.open(tar, "w") as archive:
        archive.add(model, arcname="tiny-qwen2")
    root = ensure_causal_lm(str(tar), enhance.WEIGHTS_ENV)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rope_theta": 5000.0}))
    with tarfile.open(tmp_path / "llm.tar.new", "w") as archive:
        archive.add(model, arcname="tiny-qwen2")
    os.replace(tmp_path / "llm.tar.new", tar)
    assert ensure_causal_lm(str(tar), enhance.WEIGHTS_ENV) == root
    assert json.loads((root / "config.json").read_text())["rope_theta"] == 5000.0


def test_a_renewed_presigned_url_reuses_the_cached_model(llm_server, tmp_path, monkeypatch):
    """A presigned URL expires (S3's within 7 days); renewed, it names the same checkpoint."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path))
    signed = llm_server.url("llm.tar") + "?X-Amz-Expires=604800&X-Amz-Signature="
    first = ensure_causal_lm(signed + "sig-one", enhance.WEIGHTS_ENV)
    fetches = len(llm_server.requests)
    assert ensure_causal_lm(signed + "sig-two", enhance.WEIGHTS_ENV) == first
    assert len(llm_server.requests) == fetches
    assert "X-Amz-Signature" not in (first.parent / COMPLETE_MARKER).read_text()


def test_a_hub_model_fetched_under_the_sha256_check_records_every_files_hash(tmp_path, monkeypatch):
    """The Hub gives no sha256: with COGVIDEOX_WEIGHTS_CHECK=sha256 the files are read back
    so that the marker holds every one, as for the video weights."""
    from huggingface_hub import constants

    model = save_tiny_causal_lm(tmp_path / "tiny-qwen2")
    server = HubServer("org/tiny-qwen2", model)
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    template = server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_CHECK", "sha256")
    try:
        root = ensure_causal_lm("hf://org/tiny-qwen2", enhance.WEIGHTS_ENV)
    finally:
        server.stop()
    files = json.loads((root / COMPLETE_MARKER).read_text())["files"]
    assert any(name.endswith(".safetensors") for name in files)
    for name, recorded in files.items():
        assert recorded["sha256"] == hashlib.sha256((model / name).read_bytes()).hexdigest()


def test_leftovers_of_a_killed_delete_beside_the_model_are_removed(
    llm_server, tmp_path, monkeypatch
):
    """A delete killed between its rename and its rmtree leaves a trash folder as big as the
    model, never read: the next fetch removes it, as for the video weights."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path))
    url = llm_server.url("llm.tar")
    entry = f"prompt-enhancer-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
    for leftover in (f".{entry}.trash-456", f".{entry}.staging.trash-789"):
        (tmp_path / leftover / "tiny-qwen2").mkdir(parents=True)
    root = ensure_causal_lm(url, enhance.WEIGHTS_ENV)
    assert root.parent == tmp_path / entry
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([entry, f".{entry}.lock"])


def test_a_url_with_its_scheme_in_capitals_passes_setup_and_is_downloaded(
    llm_server, tmp_path, monkeypatch
):
    """A scheme is case-insensitive (RFC 3986). Taken for a path, the URL failed setup."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv(enhance.ENHANCE_ENV, "local")
    url = llm_server.url("llm.tar?X-Amz-Signature=0123456789abcdef")
    monkeypatch.setenv(enhance.WEIGHTS_ENV, url.replace("http://", "HTTP://", 1))
    config = config_from_env()
    assert (ensure_causal_lm(config.weights, enhance.WEIGHTS_ENV) / "config.json").is_file()


def test_a_cached_model_that_fails_to_load_is_fetched_again_once(llm_server, tmp_path, monkeypatch):
    """Bit rot at the same size passes the size check: the video weights' cache healed it,
    this one failed every setup until someone emptied it by hand."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv(enhance.ENHANCE_ENV, "local")
    monkeypatch.setenv(enhance.WEIGHTS_ENV, llm_server.url("llm.tar"))
    root = ensure_causal_lm(llm_server.url("llm.tar"), enhance.WEIGHTS_ENV)
    weights = next(root.glob("*.safetensors"))
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = re.sub(rb'"dtype":"\w+"', b'"dtype":"X32"', data[8 : 8 + length], count=1)
    weights.write_bytes(data[:8] + header + data[8 + length :])  # same size, unreadable
    fetches = len(llm_server.requests)
    assert load_enhancer(config_from_env(), CPU, None) is not None
    assert len(llm_server.requests) > fetches


def test_a_read_only_cache_that_needs_the_model_says_so_as_for_the_video_weights(
    llm_server, tmp_path, monkeypatch
):
    """As root (the Cog image's user) a read-only mount is the kernel's EROFS, which only
    os.access reports before a write: it stands in here for such a mount. Before, setup
    failed with a bare OSError on the entry's lock file."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode))
    with pytest.raises(WeightsError, match=r"weights cache .* is not writable.*Mount it"):
        ensure_causal_lm(llm_server.url("llm.tar"), enhance.WEIGHTS_ENV)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_without_weights_is_refused(llm_server, tmp_path, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(BadSource, match=r"no weights \(.safetensors\)"):
        ensure_causal_lm(llm_server.url("no-weights.tar"), enhance.WEIGHTS_ENV)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("prompt-enhancer")]
    assert not list(tmp_path.glob(".prompt-enhancer-*.staging"))  # wrong bytes: no resume


def test_a_folder_holding_two_checkpoints_is_refused(tmp_path):
    """Which of two wrapped checkpoints is meant cannot be told: neither is taken."""
    model = save_tiny_causal_lm(tmp_path / "tiny-qwen2")
    both = tmp_path / "both"
    for name in ("a", "b"):
        shutil.copytree(model, both / name)
    with pytest.raises(BadSource, match=r"config\.json: missing"):
        ensure_causal_lm(str(both), enhance.WEIGHTS_ENV)


def test_a_checkpoint_with_only_a_tokenizer_model_passes_the_layout_check(tmp_path):
    """Llama- and Mistral-style checkpoints ship tokenizer.model, with no tokenizer.json:
    the layout check must know it for a tokenizer (what the file holds is the loader's)."""
    model = save_tiny_causal_lm(tmp_path / "sentencepiece")
    (model / "tokenizer.json").rename(model / "tokenizer.model")
    assert ensure_causal_lm(str(model), enhance.WEIGHTS_ENV) == model


def test_a_checkpoint_whose_shard_index_names_a_missing_shard_is_refused(tmp_path):
    """A sharded checkpoint copied without one of its shards: refused in setup, naming it."""
    model = save_tiny_causal_lm(tmp_path / "sharded")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BadSource, match=r"names shard model-00002-of-00002\.safetensors"):
        ensure_causal_lm(str(model), enhance.WEIGHTS_ENV)


def test_a_config_without_a_model_type_is_refused(tmp_path):
    """A config.json without model_type (a diffusers component's, say) is no transformers
    checkpoint's: refused in setup, not when transformers cannot load it."""
    model = save_tiny_causal_lm(tmp_path / "tiny-qwen2")
    config = json.loads((model / "config.json").read_text())
    del config["model_type"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadSource, match=r"config\.json: no model_type"):
        ensure_causal_lm(str(model), enhance.WEIGHTS_ENV)


def test_a_checkpoint_whose_chat_template_refuses_a_system_message_fails_setup(tmp_path):
    model = save_tiny_causal_lm(tmp_path / "no-system")
    tokenizer = build_tiny_tokenizer()  # as Gemma's template does:
    refuse = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role') }}"
    tokenizer.chat_template = refuse + "{% endif %}" + CHAT_TEMPLATE
    tokenizer.save_pretrained(model)
    with pytest.raises(ConfigError, match=r"COGVIDEOX_ENHANCE_WEIGHTS_URL: .*System role"):
        LocalRewriter.load(model, "no-system", CPU, video_peak_gib=None, timeout=5)


def test_a_checkpoint_without_a_chat_template_fails_setup(tmp_path):
    """transformers refuses it with a ValueError: every rewrite would have failed instead."""
    model = save_tiny_causal_lm(tmp_path / "no-template")
    (model / "chat_template.jinja").unlink()  # a base model's checkpoint has none
    with pytest.raises(ConfigError, match=r"COGVIDEOX_ENHANCE_WEIGHTS_URL: .*chat template"):
        LocalRewriter.load(model, "no-template", CPU, video_peak_gib=None, timeout=5)


def test_a_downloaded_checkpoint_setup_refuses_is_kept_and_not_fetched_again(
    llm_server, tmp_path, monkeypatch
):
    """Its chat template is the setting's fault, not the bytes': the checkpoint was discarded
    as a bad download and the refusal reported as one, and each setup fetched it again."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv(enhance.ENHANCE_ENV, "local")
    monkeypatch.setenv(enhance.WEIGHTS_ENV, llm_server.url("no-template.tar"))
    with pytest.raises(ConfigError, match="chat template"):
        load_enhancer(config_from_env(), CPU, None)
    fetches = len(llm_server.requests)
    with pytest.raises(ConfigError, match="chat template"):
        load_enhancer(config_from_env(), CPU, None)
    assert len(llm_server.requests) == fetches


def test_a_local_model_is_asked_with_its_thinking_mode_off(tmp_path):
    """Qwen3's template opens a reasoning block unless told enable_thinking=false, and the
    model thinks past the token cap: the rewrite would be its thoughts, cut."""
    model_dir = save_tiny_causal_lm(tmp_path / "thinking")
    tokenizer = build_tiny_tokenizer()  # the generation prompt as Qwen3's template ends it:
    no_thinking = "{% if enable_thinking is defined and enable_thinking is false %}"
    tokenizer.chat_template = CHAT_TEMPLATE.replace(
        "{% endif %}", no_thinking + "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}"
    )
    tokenizer.save_pretrained(model_dir)
    rewriter = LocalRewriter.load(model_dir, "thinking", CPU, video_peak_gib=None, timeout=5)
    asked = []
    rewriter.model.model.register_forward_pre_hook(
        lambda module, args, kwargs: asked.append(kwargs["input_ids"][0].tolist()),
        with_kwargs=True,
    )
    rewriter.rewrite(messages(PROMPT, "t2v"), seed=1, max_tokens=1, api_key=None)
    assert rewriter.tokenizer.decode(asked[0]).endswith("assistant\n<think>\n\n</think>\n\n")


def test_the_local_rewrite_is_the_same_whatever_the_random_state(local):
    torch.manual_seed(1)
    first = local.enhance(PROMPT, task="t2v", seed=1, max_tokens=8)
    torch.manual_seed(2)
    second = local.enhance(PROMPT, task="t2v", seed=1, max_tokens=8)
    assert first == second
    assert first


def test_the_local_rewrite_stops_at_the_token_cap(local):
    rewriter = local.rewriter
    reply = rewriter.rewrite(messages(PROMPT, "t2v"), seed=1, max_tokens=5, api_key=None)
    assert reply.cut
    assert len(rewriter.tokenizer(reply.text, add_special_tokens=False).input_ids) <= 5


ANSWER_TOKENS = 12  # of the answer a model taught by _ends_its_answer_after writes


def _ends_its_answer_after(rewriter: LocalRewriter, chat: list[dict], tokens: int) -> str:
    """Teach the tiny model, which never stops by itself, to end its turn (<|im_end|>) after
    `tokens` tokens of its greedy answer to `chat`, which stays the same: that token's output
    row is set orthogonal to the states before it and aligned with the one after. Returns the
    answer."""
    inputs = rewriter.tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        whole = rewriter.model.generate(**inputs, max_new_tokens=tokens, eos_token_id=None)
        states = []
        hook = rewriter.model.lm_head.register_forward_pre_hook(lambda m, a: states.append(a[0]))
        rewriter.model(input_ids=whole)
        hook.remove()
        before, after = states[0][0, -tokens - 1 : -1], states[0][0, -1]
        logits = rewriter.model.lm_head(states[0][0, -tokens - 1 :])
        assert (logits[:-1].max(dim=-1).values > 0).all()  # so a 0 for the end never wins
        basis, _ = torch.linalg.qr(before.T)
        row = after - basis @ (basis.T @ after)
        row *= (logits[-1].max() + 10) / row.dot(after)
        end = rewriter.tokenizer.convert_tokens_to_ids(IM_END)
        rewriter.model.lm_head.weight[end] = row
    return rewriter.tokenizer.decode(whole[0, inputs["input_ids"].shape[1] :])


@pytest.fixture(scope="module")
def ends_its_answer(tmp_path_factory):
    """The local backend on a tiny model that ends its answer to PROMPT after ANSWER_TOKENS
    tokens, and that answer."""
    directory = save_tiny_causal_lm(tmp_path_factory.mktemp("llm") / "ends")
    rewriter = LocalRewriter.load(directory, "tiny", CPU, video_peak_gib=None, timeout=30)
    return rewriter, _ends_its_answer_after(rewriter, messages(PROMPT, "t2v"), ANSWER_TOKENS)


@pytest.mark.parametrize(
    ("cap", "cut"),
    [
        (ANSWER_TOKENS - 1, True),
        (ANSWER_TOKENS, True),  # the answer fills the cap: whether it ended is not known
        (ANSWER_TOKENS + 1, False),  # its end is the cap's last token
        (ANSWER_TOKENS + 2, False),
    ],
)
def test_a_local_rewrite_is_cut_only_when_the_cap_came_before_its_end(ends_its_answer, cap, cut):
    rewriter, answer = ends_its_answer
    reply = rewriter.rewrite(messages(PROMPT, "t2v"), seed=1, max_tokens=cap, api_key=None)
    assert reply.cut is cut
    assert reply.text == answer[:cap]  # one byte a token


@pytest.mark.parametrize(("cap", "warned"), [(ANSWER_TOKENS, True), (ANSWER_TOKENS + 1, False)])
def test_only_a_local_rewrite_the_cap_cut_is_logged_as_cut(ends_its_answer, caplog, cap, warned):
    rewriter, answer = ends_its_answer
    with caplog.at_level(logging.INFO, logger="cogvideox_cog"):
        text = PromptEnhancer(rewriter).enhance(
            PROMPT, task="t2v", seed=1, max_tokens=cap, record_metric=lambda *_: None
        )
    assert ("reached the cap of" in caplog.text) is warned
    assert text == (whole_sentences(tidy(answer)) if warned else tidy(answer))


def test_a_checkpoint_whose_generation_config_names_no_end_stops_at_its_tokenizers(tmp_path):
    """The rewrite ran on past the model's end of turn to the cap, and kept what the model
    wrote after it (the end token itself is a special token, left out of the text)."""
    directory = save_tiny_causal_lm(tmp_path / "no-eos")
    (directory / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    tokenizer = build_tiny_tokenizer()
    tokenizer.eos_token = IM_END  # as Qwen2.5-Instruct's tokenizer names it
    tokenizer.save_pretrained(directory)
    rewriter = LocalRewriter.load(directory, "tiny", CPU, video_peak_gib=None, timeout=30)
    answer = _ends_its_answer_after(rewriter, messages(PROMPT, "t2v"), ANSWER_TOKENS)
    reply = rewriter.rewrite(messages(PROMPT, "t2v"), seed=1, max_tokens=40, api_key=None)
    assert reply == Reply(answer, cut=False)


def test_a_ranks_cancel_stops_the_local_rewrite_at_the_next_token(local):
    """On a rank a cancel is a flag no exception carries: the rewrite checks it after each
    token, as the endpoint's wait does, instead of running on to its cap or its timeout."""
    canceled = threading.Event()
    canceled.set()
    with stop_waiting_when(OwnCancel(canceled)), pytest.raises(StepCanceled):
        local.rewriter.rewrite(messages(PROMPT, "t2v"), seed=1, max_tokens=226, api_key=None)


class _MoveCutShort(torch.nn.Module):
    """A model whose move to the GPU is cut short (a cancel, or out of memory part way)."""

    def __init__(self):
        super().__init__()
        self.moves: list[str] = []

    def to(self, device):
        self.moves.append(str(device))
        if str(device) != "cpu":
            raise cog.CancelationException()
        return self


def _gpu_with_free(monkeypatch, free: int) -> None:
    """A GPU that reports `free` bytes free, for the machines without one that run tests."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))


def test_a_local_model_whose_move_to_the_gpu_is_cut_short_is_moved_back(monkeypatch):
    """What had reached the GPU before the cut would otherwise stay there beside the video
    model, under offload, until the next rewrite."""
    _gpu_with_free(monkeypatch, 80 * 2**30)
    model = _MoveCutShort()
    tokenizer = build_tiny_tokenizer()
    rewriter = LocalRewriter(
        model, tokenizer, "tiny", torch.device("cuda"), resident=False, timeout=5
    )
    with pytest.raises(cog.CancelationException):
        rewriter.rewrite(messages(PROMPT, "t2v"), seed=1, max_tokens=5, api_key=None)
    assert model.moves == ["cuda", "cpu"]


class _MoveBackCutShort(torch.nn.Module):
    """A model whose first move back to the CPU is cut short by a cancel, after a rewrite."""

    def __init__(self):
        super().__init__()
        self.moves: list[str] = []
        self.generation_config = GenerationConfig(eos_token_id=0)

    def to(self, device):
        self.moves.append(str(device))
        if self.moves == ["cuda", "cpu"]:
            raise cog.CancelationException()
        return self

    def generate(self, input_ids, **kwargs):
        return torch.cat([input_ids, torch.zeros_like(input_ids[:, :1])], dim=1)


def test_a_cancel_during_the_move_back_still_moves_the_whole_model_back(monkeypatch):
    """The cancel may land in the move's loop over the parameters: the model must not stay
    part on the GPU, in the video model's room (and in the next visit's)."""
    _gpu_with_free(monkeypatch, 80 * 2**30)
    model = _MoveBackCutShort()
    rewriter = LocalRewriter(
        model, build_tiny_tokenizer(), "tiny", torch.device("cuda"), resident=False, timeout=5
    )
    with pytest.raises(cog.CancelationException):
        rewriter.rewrite(messages(PROMPT, "t2v"), seed=1, max_tokens=5, api_key=None)
    assert model.moves == ["cuda", "cpu", "cpu"]


class _MoveBackFails(_MoveBackCutShort):
    """A model whose first move back to the CPU fails (a CUDA error), after a rewrite."""

    def to(self, device):
        self.moves.append(str(device))
        if self.moves == ["cuda", "cpu"]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self


def test_a_move_back_that_fails_is_raised_not_tried_again(monkeypatch):
    """Only a cancel is worth moving on for: a failed move would fail again, for ever where
    the fault stays, and the prediction never ended."""
    _gpu_with_free(monkeypatch, 80 * 2**30)
    model = _MoveBackFails()
    rewriter = LocalRewriter(
        model, build_tiny_tokenizer(), "tiny", torch.device("cuda"), resident=False, timeout=5
    )
    with pytest.raises(RuntimeError, match="illegal memory access"):
        rewriter.rewrite(messages(PROMPT, "t2v"), seed=1, max_tokens=5, api_key=None)
    assert model.moves == ["cuda", "cpu"]


class _SlowToMove(torch.nn.Module):
    """The tiny model, whose move to the GPU takes `move_s` (a large model's, over PCIe) and
    each token `token_s`; it stays on the CPU, where the test runs."""

    def __init__(self, vocab_size: int, move_s: float, token_s: float):
        super().__init__()
        self.lm = build_tiny_causal_lm(vocab_size)
        self.generation_config = self.lm.generation_config
        self.move_s, self.tokens = move_s, 0
        self.lm.model.register_forward_pre_hook(lambda module, args: self._token(token_s))

    def _token(self, seconds: float) -> None:
        self.tokens += 1
        time.sleep(seconds)

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def to(self, device):
        if str(device) != "cpu":
            time.sleep(self.move_s)
        return self

    def generate(self, **kwargs):
        return self.lm.generate(**kwargs)


def _slow_rewriter(monkeypatch, move_s: float, token_s: float, timeout: float) -> LocalRewriter:
    """Kept in CPU memory and moved to a GPU with room, for each rewrite."""
    _gpu_with_free(monkeypatch, 80 * 2**30)
    tokenizer = build_tiny_tokenizer()
    model = _SlowToMove(len(tokenizer), move_s, token_s)
    device = torch.device("cuda")
    return LocalRewriter(model, tokenizer, "tiny", device, resident=False, timeout=timeout)


def test_a_local_rewrite_longer_than_the_timeout_with_its_move_fails_at_the_timeout(
    monkeypatch,
):
    """COGVIDEOX_ENHANCE_TIMEOUT bounds the rewrite, not only its generation: a 1 s move and
    1 s of tokens pass a 1.5 s timeout."""
    rewriter = _slow_rewriter(monkeypatch, move_s=1.0, token_s=0.2, timeout=1.5)
    with pytest.raises(EnhanceError, match=r"tiny did not finish within 1\.5 s"):
        rewriter.rewrite(messages(PROMPT, "t2v"), seed=1, max_tokens=5, api_key=None)
    assert rewriter.model.tokens < 5  # stopped at the deadline, not at the token cap


def test_a_move_to_the_gpu_that_takes_the_whole_timeout_fails_before_generating(monkeypatch):
    rewriter = _slow_rewriter(monkeypatch, move_s=1.0, token_s=0.0, timeout=0.5)
    with pytest.raises(EnhanceError, match=r"tiny did not finish within 0\.5 s"):
        rewriter.rewrite(messages(PROMPT, "t2v"), seed=1, max_tokens=5, api_key=None)
    assert rewriter.model.tokens == 0


def test_a_local_rewrite_within_the_timeout_with_its_move_succeeds(monkeypatch):
    rewriter = _slow_rewriter(monkeypatch, move_s=0.3, token_s=0.1, timeout=5)
    reply = rewriter.rewrite(messages(PROMPT, "t2v"), seed=1, max_tokens=5, api_key=None)
    assert reply.cut and reply.text
    assert rewriter.model.tokens == 5


def test_a_visit_needs_room_for_the_weights_and_the_rewrite():
    weights = 15 * 2**30  # a 7-8B model in bf16
    assert visit_fits(weights + REWRITE_MARGIN_BYTES, weights)
    assert not visit_fits(weights + REWRITE_MARGIN_BYTES - 1, weights)


def test_a_rewrite_out_of_gpu_memory_says_what_to_send_instead():
    """Not torch's raw text: the rewrite's own memory (its chat's KV cache) ran out."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm(len(tokenizer))

    def fail(module, args, kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    model.model.register_forward_pre_hook(fail, with_kwargs=True)
    rewriter = LocalRewriter(model, tokenizer, "tiny", CPU, resident=True, timeout=5)
    with pytest.raises(GpuMemoryError, match="tiny was rewriting the prompt") as raised:
        rewriter.rewrite(messages(PROMPT, "t2v"), seed=1, max_tokens=5, api_key=None)
    assert "enhance_prompt=false" in str(raised.value)
    assert "CUDA out of memory" not in str(raised.value)


def test_a_rewrite_the_gpu_has_no_room_for_fails_before_the_model_moves(monkeypatch):
    """A move that ran out of memory part way would fail with CUDA's error in the middle of
    the prediction; the refusal says what it needed and leaves the model whole on the CPU."""
    _gpu_with_free(monkeypatch, 2**20)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm(len(tokenizer))
    rewriter = LocalRewriter(
        model, tokenizer, "tiny", torch.device("cuda"), resident=False, timeout=5
    )
    with pytest.raises(EnhanceError, match=r"needs 1\.0 GiB of GPU memory and the GPU has 0\.0"):
        rewriter.rewrite(messages(PROMPT, "t2v"), seed=1, max_tokens=5, api_key=None)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_a_local_model_the_gpu_never_has_room_for_fails_setup(monkeypatch, tmp_path):
    """Setup is the best case: under offload the video model is off the GPU, without it
    only its weights are there, as at every later rewrite."""
    model = save_tiny_causal_lm(tmp_path / "tiny-qwen2")
    _gpu_with_free(monkeypatch, 2**20)
    with pytest.raises(
        ConfigError, match=f"{enhance.WEIGHTS_ENV}.*every enhance_prompt would fail"
    ) as refused:
        LocalRewriter.load(model, "tiny", torch.device("cuda"), video_peak_gib=None, timeout=5)
    assert "COGVIDEOX_OFFLOAD" not in str(refused.value)  # offload is on already


def test_the_deployments_timeout_bounds_a_local_rewrite(llm_server, tmp_path, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv(enhance.ENHANCE_ENV, "local")
    monkeypatch.setenv(enhance.WEIGHTS_ENV, llm_server.url("llm.tar"))
    monkeypatch.setenv(enhance.TIMEOUT_ENV, "0.001")
    enhancer = load_enhancer(config_from_env(), CPU, None)
    with pytest.raises(EnhanceError, match=r"llm.tar did not finish within 0\.001 s"):
        enhancer.enhance(PROMPT, task="t2v", seed=1, max_tokens=226)


def test_a_local_model_the_gpu_has_room_to_visit_waits_in_cpu_memory(monkeypatch, tmp_path):
    """Under offload it visits the GPU for each rewrite; setup passes."""
    model = save_tiny_causal_lm(tmp_path / "tiny-qwen2")
    _gpu_with_free(monkeypatch, REWRITE_MARGIN_BYTES + 2**30)
    rewriter = LocalRewriter.load(
        model, "tiny", torch.device("cuda"), video_peak_gib=None, timeout=5
    )
    assert not rewriter.resident
    assert {p.device.type for p in rewriter.model.parameters()} == {"cpu"}


def test_setup_without_room_for_the_local_model_suggests_offload_where_it_is_off(
    monkeypatch, tmp_path
):
    model = save_tiny_causal_lm(tmp_path / "tiny-qwen2")
    _gpu_with_free(monkeypatch, 2**20)
    with pytest.raises(ConfigError, match="COGVIDEOX_OFFLOAD=model"):
        LocalRewriter.load(model, "tiny", torch.device("cuda"), video_peak_gib=30.0, timeout=5)


def _enhanced_request(**fields) -> Request:
    """A small request that asks for enhance_prompt."""
    defaults = dict(
        negative_prompt="",
        num_frames=9,
        num_inference_steps=2,
        guidance_scale=6.0,
        use_dynamic_cfg=None,
        fps=None,
        seed=5,
        enhance_prompt=True,
    )
    return Request(**{**defaults, **fields})


def test_tidy_removes_the_spaces_inside_the_quotes_it_removes():
    assert tidy('" A cat sits. "') == "A cat sits."


def test_a_rewrite_cut_at_the_cap_loses_the_space_after_its_unclosed_opening_quote():
    assert enhance._without_unclosed_quote('" A cat sits. It plays') == "A cat sits. It plays"


def test_a_rewrite_of_exactly_the_logged_length_is_logged_whole(endpoint, chat, caplog):
    chat.fault = "verbatim"
    prompt = ("a cat plays piano " * 20)[: enhance.LOGGED_CHARS - 1] + "."
    assert len(prompt) == enhance.LOGGED_CHARS
    with caplog.at_level("INFO"):
        endpoint.enhance(prompt, task="t2v", seed=1, max_tokens=226, record_metric=dict().get)
    assert repr(prompt) in caplog.text and "characters)" not in caplog.text


def test_tidy_removes_any_kind_of_quotes_wrapped_around_the_rewrite():
    for wrapped in ('"A cat sits."', "'A cat sits.'", "\u201cA cat sits.\u201d"):
        assert tidy(wrapped) == "A cat sits."


def test_a_long_rewrite_is_logged_shortened_and_recorded_whole(endpoint, caplog):
    prompt = "a cat playing a grand piano " * 15  # its rewrite is over 300 characters
    recorded = {}
    with caplog.at_level("INFO"):
        rewrite = endpoint.enhance(
            prompt, task="t2v", seed=1, max_tokens=226, record_metric=recorded.__setitem__
        )
    assert rewrite == rewrite_of(tidy(prompt)) and len(rewrite) > enhance.LOGGED_CHARS
    assert recorded["enhanced_prompt"] == rewrite
    assert f"{rewrite[: enhance.LOGGED_CHARS]}... ({len(rewrite):,} characters)" in caplog.text
    assert rewrite not in caplog.text


def test_the_seconds_a_rewrite_took_are_recorded_as_a_metric(endpoint):
    recorded = {}
    endpoint.enhance(PROMPT, task="t2v", seed=1, max_tokens=226, record_metric=recorded.__setitem__)
    assert isinstance(recorded["enhance_seconds"], float)
    assert 0 <= recorded["enhance_seconds"] < 5


def test_a_key_of_as_many_characters_as_setup_accepts_without_a_warning_is_taken_out():
    """Setup warns only of a key shorter than MIN_REDACTED_KEY_CHARS: one that long must not
    show in an error."""
    key = "k" * MIN_REDACTED_KEY_CHARS
    assert _redacted(f"bad key {key}", key) == "bad key [the key]"


def test_an_error_quotes_only_the_first_300_characters_of_the_endpoints_answer():
    assert _excerpt(b"x" * 1000, None) == "x" * ERROR_BODY_CHARS == "x" * 300


def test_a_refusal_is_quoted_on_one_line_and_at_most_300_characters():
    """A chat model may decline at length, over several paragraphs."""
    message = refused("writer-1", "I'm sorry.\n\nI can't " + "x" * 400)
    quoted = re.search(r"the prompt: \"(.*)\"\. Rephrase", message)[1]
    assert "\n" not in message and quoted.startswith("I'm sorry. I can't x")
    assert quoted.endswith("...") and len(quoted) == 300 + len("...")


def test_a_local_model_stays_on_the_gpu_only_if_the_video_models_peak_still_fits(monkeypatch):
    """Its weights come out of what the video model's denoising would have had: kept
    where they don't fit, the first video runs out of memory."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm(len(tokenizer))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2**30)
    _gpu_with_free(monkeypatch, 20 * 2**30 + weights)
    assert _fits_beside(model, torch.device("cuda"), video_peak_gib=21)
    _gpu_with_free(monkeypatch, 20 * 2**30 + weights - 1)
    assert not _fits_beside(model, torch.device("cuda"), video_peak_gib=21)


@pytest.mark.parametrize("opening", ['"', "\u201c"])
def test_a_rewrite_cut_at_the_cap_loses_an_unclosed_opening_quote_of_either_kind(opening):
    assert (
        enhance._without_unclosed_quote(f"{opening}A cat sits. It plays") == "A cat sits. It plays"
    )


def test_the_backend_is_named_in_any_case(monkeypatch):
    """`OpenAI`, as the company writes it, is the same backend, not a failed setup."""
    monkeypatch.setenv(enhance.ENHANCE_ENV, " OpenAI ")
    assert config_from_env().backend == "openai"
