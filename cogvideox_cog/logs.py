"""Log lines for the Cog server: plain messages on stdout, which Cog attaches to predictions."""

import logging
import sys

import diffusers
import transformers


def setup_logging() -> None:
    disable_progress_bars()
    logger = logging.getLogger("cogvideox_cog")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def disable_progress_bars() -> None:
    """Loading bars redraw with carriage returns: noise in a server log, nothing for a reader."""
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


class _Without(logging.Filter):
    """Drops a library's log records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# diffusers' prompt-truncation warning copies all the dropped text into the log (megabytes for
# a pasted document). The generator logs its own line, shortened.
_WITHOUT_PROMPT_ECHO = _Without("The following part of your input was truncated")
# Logged each time `speed_mode` faster puts FasterCache on: "purely experimental ... please
# report any issues", which a user reads as a fault. Its settings and effects are tested here
# (tests/test_speed_modes.py).
_WITHOUT_FASTERCACHE_NOTICE = _Without("FasterCache is a purely experimental")


def drop_diffusers_noise() -> None:
    for module in (
        "pipeline_cogvideox",
        "pipeline_cogvideox_image2video",
        "pipeline_cogvideox_video2video",
    ):
        logging.getLogger(f"diffusers.pipelines.cogvideo.{module}").addFilter(_WITHOUT_PROMPT_ECHO)
    logging.getLogger("diffusers.hooks.faster_cache").addFilter(_WITHOUT_FASTERCACHE_NOTICE)
