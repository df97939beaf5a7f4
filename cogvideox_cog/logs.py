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


class _WithoutPromptEcho(logging.Filter):
    """Drops diffusers' prompt-truncation warning, which copies all the dropped text into the
    log (megabytes for a pasted document). The generator logs its own line, shortened."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("The following part of your input was truncated")


_WITHOUT_PROMPT_ECHO = _WithoutPromptEcho()


def drop_diffusers_prompt_echo() -> None:
    for module in (
        "pipeline_cogvideox",
        "pipeline_cogvideox_image2video",
        "pipeline_cogvideox_video2video",
    ):
        logging.getLogger(f"diffusers.pipelines.cogvideo.{module}").addFilter(_WITHOUT_PROMPT_ECHO)
