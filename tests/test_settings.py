"""COGVIDEOX_* settings: a bad value fails setup with a ConfigError naming it, never a
ValueError in the middle of a download or a request; a blank one is the default, and spaces
around any value are dropped."""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path

import pytest
import torch
from torch.distributed import TCPStore

from cogvideox_cog import pipeline, postprocess, settings
from cogvideox_cog.attention import ATTENTION_BACKEND_ENV, attention_backend
from cogvideox_cog.errors import ConfigError, VariantError, WeightsError
from cogvideox_cog.generator import VideoGenerator
from cogvideox_cog.inputs import RESOLUTION_ENV, resolution_setting
from cogvideox_cog.lora import store as lora_store
from cogvideox_cog.media import fetch
from cogvideox_cog.parallel.gpus import GPUS_ENV, gpus_from_env, start_generator
from cogvideox_cog.parallel.ranks import collective_timeout
from cogvideox_cog.pipeline import COMPILE_ENV, OFFLOAD_ENV, VAE_TILING_ENV
from cogvideox_cog.prompts import enhance
from cogvideox_cog.prompts.endpoint import BASE_URL_ENV
from cogvideox_cog.variants import MODEL_ENV, VARIANTS, variant_from_env
from cogvideox_cog.weights import (
    WEIGHTS_URL_ENV,
    cache,
    content_check,
    download,
    ensure_weights,
    weights_root,
)

SECONDS = [
    (download.TIMEOUT_ENV, download.timeout_s),
    (fetch.TIMEOUT_ENV, fetch.timeout_s),
    (lora_store.TIMEOUT_ENV, lora_store.timeout_s),
    (enhance.TIMEOUT_ENV, enhance._timeout),
]


@pytest.mark.parametrize(("env", "read"), SECONDS)
@pytest.mark.parametrize("value", ["0", "-5", "ten", "nan", "inf", "1e3", "1_0", "\u0665"])
def test_a_timeout_that_is_not_positive_seconds_is_refused_naming_the_variable(
    monkeypatch, env, read, value
):
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=f"{env}='{value}': give a number of seconds"):
        read()


@pytest.mark.parametrize(("env", "read"), SECONDS)
def test_an_unset_or_empty_timeout_is_the_default_and_a_given_one_is_taken(monkeypatch, env, read):
    monkeypatch.setenv(env, "")
    default = read()
    monkeypatch.setenv(env, " 2.5 ")
    assert default > 0 and read() == 2.5


def test_a_prompt_rewrite_may_take_at_most_600_seconds(monkeypatch):
    monkeypatch.setenv(enhance.TIMEOUT_ENV, "600")
    assert enhance._timeout() == 600
    monkeypatch.setenv(enhance.TIMEOUT_ENV, "601")
    with pytest.raises(ConfigError, match=f"{enhance.TIMEOUT_ENV}='601': .* at most 600"):
        enhance._timeout()


@pytest.mark.parametrize(("env", "read"), SECONDS[:3])
def test_a_timeout_past_the_longest_wait_is_refused_naming_the_variable(monkeypatch, env, read):
    """Taken, 1e10 s passed setup, and every download then failed with an OverflowError."""
    monkeypatch.setenv(env, "10000000000")
    with pytest.raises(ConfigError, match=f"{env}='10000000000': .* at most 1000000000$"):
        read()


def test_the_longest_timeouts_taken_are_ones_sockets_threads_and_collectives_can_wait_for(
    monkeypatch,
):
    longest = str(settings.LONGEST_WAIT_S)
    monkeypatch.setenv(download.TIMEOUT_ENV, longest)
    monkeypatch.setenv(lora_store.TIMEOUT_ENV, longest)
    monkeypatch.setenv(enhance.ENHANCE_ENV, "openai")
    monkeypatch.setenv(enhance.TIMEOUT_ENV, "600")
    with socket.socket() as connection:
        connection.settimeout(download.timeout_s())
    assert threading.Lock().acquire(timeout=lora_store.timeout_s())
    # The ranks' store waits for the LoRA download and two prompt rewrites, and a margin.
    store = TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=collective_timeout())
    store.set("key", "value")
    assert store.get("key") == b"value"


@pytest.mark.parametrize("value", ["0", "-1", "many", "2.5", "65", "1_6", "+2", "\uff18"])
def test_download_connections_must_be_a_whole_number_from_1_to_64(monkeypatch, value):
    monkeypatch.setenv(download.CONNECTIONS_ENV, value)
    with pytest.raises(ConfigError, match=re.escape(f"{download.CONNECTIONS_ENV}='{value}'")):
        download.connections()


@pytest.mark.parametrize("value", ["1", "64"])
def test_download_connections_from_1_to_64_are_taken(monkeypatch, value):
    monkeypatch.setenv(download.CONNECTIONS_ENV, value)
    assert download.connections() == int(value)


@pytest.mark.parametrize("mode", ["i2v", "v2v"])
def test_a_predictor_that_fetches_inputs_checks_their_limits_in_setup(monkeypatch, mode):
    monkeypatch.setenv(fetch.TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match=f"{fetch.TIMEOUT_ENV}='soon'"):
        VideoGenerator.from_env(mode)


@pytest.mark.parametrize(
    ("env", "value"),
    [(download.CONNECTIONS_ENV, "0"), (cache.FSYNC_ENV, "no"), (cache.CHECK_ENV, "sha265")],
)
def test_the_downloaders_settings_are_checked_even_when_nothing_is_downloaded(
    monkeypatch, tiny_weights, env, value
):
    monkeypatch.setenv(WEIGHTS_URL_ENV, str(tiny_weights["1.0-t2v"]))  # used in place
    assert ensure_weights(VARIANTS["cogvideox-5b"]) == tiny_weights["1.0-t2v"]
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=f"{env}='{value}'"):
        ensure_weights(VARIANTS["cogvideox-5b"])


def test_lora_settings_are_checked_before_the_weights(monkeypatch):
    # The weights source is unreachable: reaching it would fail otherwise, and later.
    monkeypatch.setenv(WEIGHTS_URL_ENV, "http://127.0.0.1:9/cogvideox-5b.tar")
    monkeypatch.setenv(lora_store.CACHE_SIZE_ENV, "lots")
    with pytest.raises(ConfigError, match=f"{lora_store.CACHE_SIZE_ENV}='lots'"):
        VideoGenerator.from_env("t2v")


@pytest.mark.parametrize("value", ["768*1360", "720p", "0x720"])
def test_a_resolution_that_is_not_height_x_width_fails_before_the_weights(monkeypatch, value):
    monkeypatch.setenv(WEIGHTS_URL_ENV, "http://127.0.0.1:9/cogvideox-5b.tar")  # unreachable
    monkeypatch.setenv(RESOLUTION_ENV, value)
    with pytest.raises(ConfigError, match=f"{RESOLUTION_ENV}='?{re.escape(value)}"):
        VideoGenerator.from_env("t2v")


def test_a_resolution_that_is_not_height_x_width_fails_before_any_rank_starts(monkeypatch):
    monkeypatch.setenv(GPUS_ENV, "2")
    monkeypatch.setenv(WEIGHTS_URL_ENV, "http://127.0.0.1:9/cogvideox-5b.tar")  # unreachable
    monkeypatch.setenv(RESOLUTION_ENV, "720p")
    with pytest.raises(ConfigError, match=f"{RESOLUTION_ENV}='720p'"):
        start_generator("t2v")


@pytest.mark.parametrize(
    ("env", "mode"),
    [
        (fetch.MAX_SIZE_ENV, "i2v"),
        (lora_store.MAX_SIZE_ENV, "t2v"),
        (lora_store.CACHE_SIZE_ENV, "t2v"),  # a LoRA larger than the whole cache is refused
    ],
)
@pytest.mark.parametrize("value", ["0", "0.5", "0K"])
def test_a_largest_download_of_0_bytes_is_refused_at_setup_naming_the_variable(
    monkeypatch, env, mode, value
):
    """Every input or LoRA would be refused as too large, request after request."""
    monkeypatch.setenv(WEIGHTS_URL_ENV, "http://127.0.0.1:9/cogvideox-5b.tar")
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=f"{env}='{value}': give a size above 0"):
        VideoGenerator.from_env(mode)


@pytest.mark.parametrize("value", ["\u0665G", "\uff18M", "1_0G", "+2G", "1e3"])
def test_a_size_that_is_not_plain_decimal_digits_is_refused_naming_the_variable(value):
    with pytest.raises(ConfigError, match=re.escape(f"X='{value}' is not a size")):
        settings.parse_size(value, "X")


def test_a_size_too_large_for_a_float_is_refused_naming_the_variable():
    with pytest.raises(ConfigError, match=r"^X='9{309}' is too large a size"):
        settings.parse_size("9" * 309, "X")
    with pytest.raises(ConfigError, match=r"^X='9{308}T' is too large a size"):
        settings.parse_size("9" * 308 + "T", "X")


@pytest.mark.parametrize(
    ("text", "size"),
    [("2g", 2 << 30), ("500m", 500 << 20), ("1.5gib", 3 << 29), ("2 G", 2 << 30)],
)
def test_a_size_is_taken_in_lower_case_and_with_a_space_before_its_suffix(text, size):
    """`2g` is how docker writes a size (`--memory 2g`): refused, it would fail setup."""
    assert settings.parse_size(text, "X") == size


@pytest.mark.parametrize(
    ("env", "value", "read", "expected"),
    [
        (download.CONNECTIONS_ENV, "65", download.connections, "from 1 to 64"),
        (GPUS_ENV, "0", lambda: gpus_from_env(visible_cuda=0), "1 or more"),
    ],
)
def test_a_count_out_of_range_is_refused_naming_the_range_it_takes(
    monkeypatch, env, value, read, expected
):
    """Told "1 or more", an operator who set 65 connections would try 100 next."""
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=f"^{env}='{value}': give a whole number {expected}$"):
        read()


@pytest.mark.parametrize("env", [cache.WEIGHTS_DIR_ENV, lora_store.LORA_DIR_ENV])
def test_a_cache_folder_that_names_a_file_is_refused_at_setup(monkeypatch, tmp_path, env):
    a_file = tmp_path / "adapter.safetensors"
    a_file.write_bytes(b"{}")
    monkeypatch.setenv(env, str(a_file))
    monkeypatch.setenv(WEIGHTS_URL_ENV, "http://127.0.0.1:9/cogvideox-5b.tar")  # unreachable
    with pytest.raises(ConfigError, match=f"{env}=.*is a file"):
        VideoGenerator.from_env("t2v")


@pytest.mark.parametrize("env", [cache.WEIGHTS_DIR_ENV, lora_store.LORA_DIR_ENV])
def test_a_cache_folder_that_links_to_nothing_is_refused_naming_the_variable(
    monkeypatch, tmp_path, env
):
    """A link to a volume that is not mounted: making the folder failed with "[Errno 17] File
    exists", naming neither the folder nor the setting."""
    link = tmp_path / "cache"
    link.symlink_to(tmp_path / "unmounted" / "cache")
    monkeypatch.setenv(env, str(link))
    monkeypatch.setenv(WEIGHTS_URL_ENV, "http://127.0.0.1:9/cogvideox-5b.tar")  # unreachable
    with pytest.raises(ConfigError, match=f"{env}=.*links to .*unmounted/cache"):
        VideoGenerator.from_env("t2v")


def test_spaces_around_a_cache_folder_are_not_part_of_its_name(monkeypatch, tmp_path):
    """A trailing space would name another, empty, cache: 20 GB downloaded again."""
    monkeypatch.setenv(cache.WEIGHTS_DIR_ENV, f" {tmp_path} ")
    monkeypatch.setenv(lora_store.LORA_DIR_ENV, f"{tmp_path / 'loras'}\n")
    assert weights_root() == tmp_path
    assert lora_store.LoraCache.from_env().root == tmp_path / "loras"


def documented_settings() -> list[str]:
    table = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    return re.findall(r"^\| `(COGVIDEOX_[A-Z0-9_]+)` \|", table, flags=re.MULTILINE)


def documented_defaults() -> list[tuple[str, str, str]]:
    """(page, setting, default) for each settings row of docs/*.md whose `default` cell holds
    code: the span's text. configuration.md lists them all; other pages repeat some."""
    found = []
    for page in sorted((Path(__file__).parent.parent / "docs").glob("*.md")):
        rows = re.findall(
            r"^\| `(COGVIDEOX_[A-Z0-9_]+)` \| ([^|]*) \|", page.read_text(), flags=re.MULTILINE
        )
        for name, cell in rows:
            if span := re.search(r"`([^`]*)`", cell):
                found.append((page.name, name, span[1]))
    return found


def _lora(field: str):
    return lambda: getattr(lora_store.LoraCache.from_env(), field)


def _seconds(text: str) -> float:
    return float(text)


def _size(text: str) -> int:
    return settings.parse_size(text, "the docs")


def _on(text: str) -> bool:
    return text == "1"


# What each setting is when unset, read by the code that uses it, and how its docs cell reads.
READ_WHEN_UNSET = [
    (download.TIMEOUT_ENV, download.timeout_s, _seconds),
    (download.CONNECTIONS_ENV, download.connections, int),
    (fetch.TIMEOUT_ENV, fetch.timeout_s, _seconds),
    (fetch.MAX_SIZE_ENV, fetch.max_bytes, _size),
    (lora_store.TIMEOUT_ENV, lora_store.timeout_s, _seconds),
    (lora_store.MAX_SIZE_ENV, _lora("max_file_bytes"), _size),
    (lora_store.CACHE_SIZE_ENV, _lora("max_cache_bytes"), _size),
    (enhance.TIMEOUT_ENV, enhance._timeout, _seconds),
    (cache.CHECK_ENV, content_check, str),
    (cache.FSYNC_ENV, cache.durable, _on),
    (postprocess.UPSCALE_ENV, lambda: postprocess._enabled(postprocess.UPSCALE_ENV), _on),
    (postprocess.INTERPOLATE_ENV, lambda: postprocess._enabled(postprocess.INTERPOLATE_ENV), _on),
    # Unset, these two run upstream's reference path: tiled VAE decode, eager transformer.
    (pipeline.VAE_TILING_ENV, pipeline.vae_tiling_setting, str),
    (pipeline.COMPILE_ENV, pipeline.compile_setting, str),
]


@pytest.mark.parametrize(
    ("env", "read", "parse"), READ_WHEN_UNSET, ids=[env for env, _, _ in READ_WHEN_UNSET]
)
def test_the_documented_default_is_what_the_code_reads_when_unset(monkeypatch, env, read, parse):
    monkeypatch.delenv(env, raising=False)
    documented = [(page, parse(text)) for page, name, text in documented_defaults() if name == env]
    assert "configuration.md" in {page for page, _ in documented}
    assert documented == [(page, read()) for page, _ in documented]


def _variant_of_a_predictor():
    """COGVIDEOX_MODEL as the predictor whose task it names reads it."""
    try:
        return variant_from_env("t2v")
    except VariantError:
        return variant_from_env("i2v")


_CPU = torch.device("cpu")
_OPENAI = {enhance.ENHANCE_ENV: "openai"}
# Each setting whose value has rules, read by the code that uses it (a bad value raises), with
# what else it needs set to be read at all.
READ_WHEN_SET = {
    MODEL_ENV: (_variant_of_a_predictor, {}),
    OFFLOAD_ENV: (
        lambda: pipeline.choose_offload(
            settings.setting(OFFLOAD_ENV, "auto"), VARIANTS["cogvideox-5b"], _CPU
        ),
        {},
    ),
    VAE_TILING_ENV: (
        lambda: pipeline.choose_vae_tiling(
            pipeline.vae_tiling_setting(), VARIANTS["cogvideox-5b"], _CPU
        ),
        {},
    ),
    COMPILE_ENV: (lambda: pipeline.choose_compile(pipeline.compile_setting(), _CPU), {}),
    ATTENTION_BACKEND_ENV: (lambda: attention_backend(settings.setting(ATTENTION_BACKEND_ENV)), {}),
    GPUS_ENV: (lambda: gpus_from_env(visible_cuda=0), {}),
    RESOLUTION_ENV: (resolution_setting, {}),
    cache.CHECK_ENV: (content_check, {}),
    cache.FSYNC_ENV: (cache.durable, {}),
    postprocess.UPSCALE_ENV: (lambda: postprocess._enabled(postprocess.UPSCALE_ENV), {}),
    postprocess.INTERPOLATE_ENV: (lambda: postprocess._enabled(postprocess.INTERPOLATE_ENV), {}),
    enhance.ENHANCE_ENV: (enhance.config_from_env, {}),
    BASE_URL_ENV: (enhance.config_from_env, _OPENAI),
    enhance.API_KEY_ENV: (enhance.config_from_env, _OPENAI),
    **{env: (read, {}) for env, read in SECONDS},
    download.CONNECTIONS_ENV: (download.connections, {}),
}
# `NAME=value` in prose or code; a value with a placeholder (`sk-...`, `$PWD/...`) is skipped.
_ASSIGNMENT = re.compile(r"\b(COGVIDEOX_[A-Z0-9_]+)=([^\s`'\"),;|]+)")


def documented_assignments(text: str) -> list[tuple[str, str]]:
    """(setting, value) of every `COGVIDEOX_...=value` the text shows, placeholders left out."""
    return [
        (name, value.rstrip("."))
        for name, value in _ASSIGNMENT.findall(text)
        if not any(mark in value for mark in ("...", "$", "<"))
    ]


def assignment_problems(assignments: list[tuple[str, str]], monkeypatch) -> list[str]:
    """Each assignment naming no setting, or a value its setting refuses."""
    problems = []
    for name, value in assignments:
        if name not in settings.NAMES:
            problems.append(f"{name}={value}: no such setting")
            continue
        read, context = READ_WHEN_SET.get(name, (None, {}))
        if read is None:
            continue
        with monkeypatch.context() as env:
            for other, other_value in {**context, name: value}.items():
                env.setenv(other, other_value)
            try:
                read()
            except ConfigError as error:
                problems.append(f"{name}={value}: {error}")
    return problems


def test_every_setting_value_the_docs_show_is_one_the_setting_takes(monkeypatch):
    """What an operator copies from a page must not fail setup."""
    root = Path(__file__).parent.parent
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    shown = [
        (page.name, found) for page in pages for found in documented_assignments(page.read_text())
    ]
    assert len({found[0] for _, found in shown} & set(READ_WHEN_SET)) >= 10
    problems = [
        f"{page}: {problem}"
        for page, found in shown
        for problem in assignment_problems([found], monkeypatch)
    ]
    assert not problems, "\n".join(problems)


def test_a_documented_value_a_setting_refuses_is_reported(monkeypatch):
    text = (
        "Set `COGVIDEOX_OFFLOAD=cpu`, COGVIDEOX_COMPILE=yes or `COGVIDEOX_OFLOAD=none`; "
        "`COGVIDEOX_VAE_TILING=off` and `COGVIDEOX_ENHANCE_API_KEY=sk-...` are fine."
    )
    problems = assignment_problems(documented_assignments(text), monkeypatch)
    assert [p.split(":")[0] for p in problems] == [
        "COGVIDEOX_OFFLOAD=cpu",
        "COGVIDEOX_COMPILE=yes",
        "COGVIDEOX_OFLOAD=none",
    ]


# The prompt enhancer's settings that only the backend using them reads, and what it reads.
ENHANCE_READ_WHEN_UNSET = [
    (enhance.WEIGHTS_ENV, "local", lambda config: config.weights),
    (enhance.MODEL_ENV, "openai", lambda config: config.endpoint.model),
    (
        enhance.BASE_URL_ENV,
        "openai",
        lambda config: config.endpoint.url.removesuffix("/chat/completions"),
    ),
]


@pytest.mark.parametrize(
    ("env", "backend", "read"),
    ENHANCE_READ_WHEN_UNSET,
    ids=[e for e, _, _ in ENHANCE_READ_WHEN_UNSET],
)
def test_the_documented_enhance_default_is_what_its_backend_reads_when_unset(
    monkeypatch, env, backend, read
):
    monkeypatch.setenv(enhance.ENHANCE_ENV, backend)
    monkeypatch.delenv(env, raising=False)
    documented = [(page, text) for page, name, text in documented_defaults() if name == env]
    assert "configuration.md" in {page for page, _ in documented}
    assert documented == [(page, read(enhance.config_from_env())) for page, _ in documented]


def test_every_setting_left_blank_is_its_default(monkeypatch, tiny_weights, tmp_path):
    """Orchestrators write `value: ""` to leave a variable unset; that must not fail setup."""
    assert len(documented_settings()) > 20
    for env in documented_settings():
        monkeypatch.setenv(env, " ")
    monkeypatch.setenv(WEIGHTS_URL_ENV, str(tiny_weights["1.0-t2v"]))
    monkeypatch.setenv(cache.WEIGHTS_DIR_ENV, str(tmp_path))
    generator = VideoGenerator.from_env("v2v")  # also reads the input-fetch settings
    assert generator.variant.id == "cogvideox-5b" and generator.pipe.vae.use_tiling
    assert gpus_from_env(visible_cuda=0) == 1


def test_spaces_around_a_choice_are_dropped(monkeypatch, tiny_weights, tmp_path):
    monkeypatch.setenv(WEIGHTS_URL_ENV, str(tiny_weights["1.0-t2v"]))
    monkeypatch.setenv(cache.WEIGHTS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(MODEL_ENV, " cogvideox-5b ")
    monkeypatch.setenv(OFFLOAD_ENV, " none ")
    monkeypatch.setenv(COMPILE_ENV, "0\n")
    monkeypatch.setenv(VAE_TILING_ENV, " off ")
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, " native ")
    generator = VideoGenerator.from_env("t2v")
    assert not generator.pipe.vae.use_tiling


def test_the_settings_are_the_names_the_code_reads_and_the_docs_table_lists():
    root = Path(__file__).parent.parent
    sources = [*root.joinpath("cogvideox_cog").rglob("*.py"), *root.glob("predict_*.py")]
    read = {
        name
        for source in sources
        if source.name != "settings.py"
        for name in re.findall(r"\"(COGVIDEOX_[A-Z0-9_]+)\"", source.read_text())
    }
    assert read == settings.NAMES == set(documented_settings())


def test_a_misspelt_setting_is_named_at_setup_with_the_one_it_may_mean(monkeypatch, caplog):
    monkeypatch.setenv("COGVIDEOX_OFLOAD", "none")
    monkeypatch.setenv("COGVIDEOX_SOMETHING_ELSE", "1")
    monkeypatch.setenv(MODEL_ENV, "cogvideox-6b")  # setup then fails before any weights
    with pytest.raises(ConfigError, match="cogvideox-6b"):
        start_generator("t2v")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        m.startswith("COGVIDEOX_OFLOAD is not a setting") and "Did you mean COGVIDEOX_OFFLOAD?" in m
        for m in warnings
    )
    assert any(
        m.startswith("COGVIDEOX_SOMETHING_ELSE is not a setting") and "Did you mean" not in m
        for m in warnings
    )


@pytest.mark.parametrize(
    ("name", "meant"),
    [
        ("COGVIDEO_MODEL", "COGVIDEOX_MODEL"),  # upstream's name for the project
        ("cogvideox_offload", "COGVIDEOX_OFFLOAD"),
        ("COGVIDEOX-GPUS", "COGVIDEOX_GPUS"),
        ("COGVIDEOX_model", "COGVIDEOX_MODEL"),
    ],
)
def test_a_setting_with_a_mistyped_prefix_or_case_is_named_with_the_one_it_may_mean(
    monkeypatch, caplog, name, meant
):
    monkeypatch.setenv(name, "1")
    assert name in settings.warn_unknown_settings()
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{name} ")]
    assert warned and f"Did you mean {meant}?" in warned[0]


def test_known_settings_raise_no_warning(monkeypatch):
    for env in settings.NAMES:
        monkeypatch.setenv(env, "")
    assert settings.warn_unknown_settings() == []


def _read_upscale() -> None:
    postprocess.Postprocessor.from_env(torch.device("cpu"))


MISTYPED_URLS = [
    (
        WEIGHTS_URL_ENV,
        "htps://deploy:hunter2@weights.example/cogvideox.tar",
        lambda: ensure_weights(VARIANTS["cogvideox-5b"]),
    ),
    (postprocess.UPSCALE_URL_ENV, "htps://deploy:hunter2@models.example/x4.pth", _read_upscale),
    (enhance.BASE_URL_ENV, "htps://deploy:hunter2@llm.example/v1", enhance.config_from_env),
]


def _set_url_setting(monkeypatch, tmp_path, env: str, url: str) -> None:
    """`env` set to `url`, with the settings that make its reader use it."""
    monkeypatch.setenv(cache.WEIGHTS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(postprocess.UPSCALE_ENV, "1")
    monkeypatch.setenv(enhance.ENHANCE_ENV, "openai")
    monkeypatch.setenv(env, url)


@pytest.mark.parametrize(
    ("env", "url", "read"), MISTYPED_URLS, ids=[env for env, _, _ in MISTYPED_URLS]
)
def test_a_url_setting_with_a_mistyped_scheme_fails_without_showing_its_password(
    monkeypatch, tmp_path, caplog, env, url, read
):
    """Only http(s) URLs lost their user name and password in errors and logs: one letter
    off the scheme put the password in setup's error, which /health-check serves."""
    _set_url_setting(monkeypatch, tmp_path, env, url)
    with pytest.raises((ConfigError, WeightsError), match="htps://") as failed:
        read()
    assert "hunter2" not in str(failed.value)
    assert "hunter2" not in caplog.text


SLASHED_URLS = [
    (env, url.replace("htps://deploy:hunter2", "https://deploy:hun/ter2"), read)
    for env, url, read in MISTYPED_URLS
]


@pytest.mark.parametrize(
    ("env", "url", "read"), SLASHED_URLS, ids=[env for env, _, _ in SLASHED_URLS]
)
def test_a_url_setting_whose_password_holds_a_slash_fails_without_showing_it(
    monkeypatch, tmp_path, caplog, env, url, read
):
    """An unencoded `/` ends the host early: the password's start, read as a port, was quoted
    in urlsplit's error, and the whole URL shown beside it."""
    _set_url_setting(monkeypatch, tmp_path, env, url)
    with pytest.raises((ConfigError, WeightsError), match="user name or password") as failed:
        read()
    assert "hun" not in str(failed.value) and "ter2" not in str(failed.value)
    assert "hun" not in caplog.text


@pytest.mark.parametrize(
    "url",
    ["https//deploy:hunter2@models.example/x4.pth", "https:/deploy:hunter2@models.example/x4.pth"],
)
def test_a_url_setting_with_no_host_after_its_scheme_fails_without_its_password(
    monkeypatch, caplog, url
):
    monkeypatch.setenv(postprocess.UPSCALE_ENV, "1")
    monkeypatch.setenv(postprocess.UPSCALE_URL_ENV, url)
    with pytest.raises((ConfigError, WeightsError), match=r"x4\.pth") as failed:
        _read_upscale()
    assert "hunter2" not in str(failed.value)
    assert "hunter2" not in caplog.text


def test_a_cache_folder_that_names_a_pipe_is_refused_as_a_file(monkeypatch, tmp_path):
    """Not only a regular file: a pipe or a device (/dev/null) cannot hold a cache either."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    monkeypatch.setenv(cache.WEIGHTS_DIR_ENV, str(pipe))
    with pytest.raises(ConfigError, match=f"{cache.WEIGHTS_DIR_ENV}=.*is a file"):
        weights_root()


def test_a_timeout_written_without_a_leading_0_is_taken(monkeypatch):
    monkeypatch.setenv(fetch.TIMEOUT_ENV, ".5")
    assert fetch.timeout_s() == 0.5


def test_unknown_settings_are_returned_sorted(monkeypatch):
    monkeypatch.setenv("COGVIDEOX_ZZ_UNKNOWN", "1")
    monkeypatch.setenv("COGVIDEOX_AA_UNKNOWN", "1")
    unknown = settings.warn_unknown_settings()
    assert {"COGVIDEOX_ZZ_UNKNOWN", "COGVIDEOX_AA_UNKNOWN"} <= set(unknown)
    assert unknown == sorted(unknown)
