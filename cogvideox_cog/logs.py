"""Log lines for the Cog server: plain messages on stdout, which Cog attaches to predictions."""

import logging
import sys


def setup_logging() -> None:
    logger = logging.getLogger("cogvideox_cog")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
