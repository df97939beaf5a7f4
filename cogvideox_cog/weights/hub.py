"""The Hugging Face Hub: one parser for hf:// URLs, the window in which it may be reached, and
its log without the signatures of the URLs it downloads from.

Weights name a snapshot (hf://org/repo[@revision], where a revision such as refs/pr/3 may hold
slashes); a LoRA may also name a file in it (hf://org/repo[@revision]/path/file.safetensors,
a revision without slashes there, since the file follows it).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from . import download

_REPO = r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
_SNAPSHOT = re.compile(rf"hf://{_REPO}(?:@(?P<revision>[^\s@]+))?/?")
_FILE = re.compile(rf"hf://{_REPO}(?:@(?P<revision>[^\s@/]+))?(?:/(?P<file>[^\s@]*[^\s@/]))?/?")


@dataclass(frozen=True)
class HubRef:
    repo: str  # org/repo
    revision: str | None  # a branch, tag or commit; None: main
    file: str | None = None  # a path in the repository; None: the snapshot


def parse_hf_url(url: str, *, with_file: bool = False) -> HubRef | None:
    """hf://org/repo[@revision] (with_file: [/path]) as a HubRef, or None if it is not one."""
    match = (_FILE if with_file else _SNAPSHOT).fullmatch(url)
    if not match:
        return None
    return HubRef(match["repo"], match["revision"], match.groupdict().get("file"))


class _HubOnline:
    """Allow huggingface_hub to reach the hub for the downloads inside `with hub_online():`.

    The package sets HF_HUB_OFFLINE=1 at import so that loading never touches the network.
    huggingface_hub 2.4 reads that variable once, into constants.HF_HUB_OFFLINE, and checks
    the constant before every request: lifting the constant (not the variable) while a
    download runs allows exactly its requests and nothing after. Downloads can overlap (a LoRA
    download that timed out goes on in its thread while the next prediction starts one), so
    the constant goes back only when the last one ends.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.downloads = 0
        self.saved = True

    @contextmanager
    def __call__(self) -> Iterator[None]:
        from huggingface_hub import constants

        with self.lock:
            if self.downloads == 0:
                self.saved = constants.HF_HUB_OFFLINE
            self.downloads += 1
            constants.HF_HUB_OFFLINE = False
        try:
            yield
        finally:
            with self.lock:
                self.downloads -= 1
                if self.downloads == 0:
                    constants.HF_HUB_OFFLINE = self.saved


hub_online = _HubOnline()


class _WithoutUrlQueries(logging.Filter):
    """Hides the query string of every URL in huggingface_hub's log lines.

    A file's bytes come from a presigned URL on the Hub's CDN, which the Hub hands out (for a
    gated or private repository too): huggingface_hub logs it, signature and all, at WARNING
    when a download drops and resumes ("Error while downloading from <url>") or a request is
    retried, and its handler writes that to stderr, into the setup's log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = download.hide_urls(message)
        if hidden != message:
            record.msg, record.args = hidden, ()
        return True


_WITHOUT_URL_QUERIES = _WithoutUrlQueries()
# The modules that log URLs (a logger's filter sees only the records of that logger itself).
for _module in ("file_download", "utils._http", "_snapshot_download"):
    logging.getLogger(f"huggingface_hub.{_module}").addFilter(_WITHOUT_URL_QUERIES)
