"""Log lines for the Cog server: plain messages on stdout, which Cog attaches to predictions."""

import logging
import sys

import diffusers
import transformers


def setup_logging() -> None:
    # Loading bars redraw with carriage returns: noise in a server log, nothing for a reader.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    logger = logging.getLogger("cogvideox_cog")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
