"""The server's log (logs.py): the package's lines once each on stdout, and the libraries'
noise dropped before it reaches a prediction's log."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import diffusers
import pytest
import transformers
from diffusers.hooks import faster_cache
from diffusers.pipelines.cogvideo import (
    pipeline_cogvideox,
    pipeline_cogvideox_image2video,
    pipeline_cogvideox_video2video,
)

import cogvideox_cog.pipeline  # noqa: F401  (importing it puts the filters on)
from cogvideox_cog.logs import setup_logging

TRUNCATED = (
    "The following part of your input was truncated because `max_sequence_length` is set to "
    " 226 tokens: ['a pasted document']"
)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def package_logger() -> Iterator[logging.Logger]:
    """The package's logger, put back as it was: other tests read its records through
    pytest's root handler."""
    logger = logging.getLogger("cogvideox_cog")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    logger.handlers.clear()
    try:
        yield logger
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture
def progress_bars() -> Iterator[None]:
    enabled = (
        diffusers.utils.logging.is_progress_bar_enabled(),
        transformers.utils.logging.is_progress_bar_enabled(),
    )
    yield
    for library, was_enabled in zip((diffusers, transformers), enabled, strict=True):
        if was_enabled:
            library.utils.logging.enable_progress_bar()
        else:
            library.utils.logging.disable_progress_bar()


def test_an_info_line_goes_to_stdout_as_its_message_alone(package_logger, capsys):
    """Cog attaches the worker's stdout to the prediction: an info line is what a user reads."""
    setup_logging()
    logging.getLogger("cogvideox_cog.generator").info("seed: 5")
    out, err = capsys.readouterr()
    assert (out, err) == ("seed: 5\n", "")


def test_setting_up_the_log_twice_writes_each_line_once(package_logger, capsys):
    """Each predictor's setup sets it up, and the demo after a predictor in one process."""
    setup_logging()
    setup_logging()
    logging.getLogger("cogvideox_cog").info("ready")
    assert capsys.readouterr().out == "ready\n"


def test_the_packages_lines_do_not_reach_the_root_loggers_handlers(package_logger, capsys):
    """A handler on the root logger (Cog's, a library's basicConfig) would write each line a
    second time."""
    root = _Records()
    logging.getLogger().addHandler(root)
    try:
        setup_logging()
        logging.getLogger("cogvideox_cog").warning("once")
    finally:
        logging.getLogger().removeHandler(root)
    assert root.messages == []
    assert capsys.readouterr().out == "once\n"


def test_setting_up_the_log_turns_off_the_libraries_progress_bars(package_logger, progress_bars):
    diffusers.utils.logging.enable_progress_bar()
    transformers.utils.logging.enable_progress_bar()
    setup_logging()
    assert not diffusers.utils.logging.is_progress_bar_enabled()
    assert not transformers.utils.logging.is_progress_bar_enabled()


@pytest.mark.parametrize(
    "pipeline_module",
    [pipeline_cogvideox, pipeline_cogvideox_image2video, pipeline_cogvideox_video2video],
    ids=lambda module: module.__name__.rsplit(".", 1)[-1],
)
def test_each_pipelines_echo_of_a_truncated_prompt_is_dropped(pipeline_module):
    """The echo copies all the dropped text (megabytes for a pasted document); the generator
    logs its own, shortened line. The pipeline's other warnings still come through."""
    records = _Records()
    pipeline_module.logger.addHandler(records)
    try:
        pipeline_module.logger.warning(TRUNCATED)
        pipeline_module.logger.warning("another warning")
    finally:
        pipeline_module.logger.removeHandler(records)
    assert records.messages == ["another warning"]


def test_fastercaches_experimental_notice_is_dropped():
    """Logged each time speed_mode faster runs: a user reads it as a fault of the prediction."""
    records = _Records()
    faster_cache.logger.addHandler(records)
    try:
        faster_cache.logger.warning(
            "FasterCache is a purely experimental feature and may not work as expected."
        )
        faster_cache.logger.warning("another warning")
    finally:
        faster_cache.logger.removeHandler(records)
    assert records.messages == ["another warning"]
