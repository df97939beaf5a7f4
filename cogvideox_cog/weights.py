"""Fetch and cache a variant's weights in setup().

A cache entry is published by renaming a fully extracted staging directory that carries a
completion marker, so a download cut short never looks like weights to a later setup.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from hashlib import sha256
from pathlib import Path
from typing import BinaryIO

from .variants import MODEL_ENV, Variant

log = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "COGVIDEOX_WEIGHTS_DIR"
WEIGHTS_URL_ENV = "COGVIDEOX_WEIGHTS_URL"
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
COMPLETE_MARKER = ".cogvideox-complete.json"
MODEL_INDEX = "model_index.json"

READ_TIMEOUT_S = 60
CHUNK_BYTES = 8 << 20
PROGRESS_EVERY_S = 10.0


class WeightsError(RuntimeError):
    pass


def ensure_weights(variant: Variant) -> Path:
    """Return a directory with the variant's diffusers weights, downloading them if needed."""
    source = os.environ.get(WEIGHTS_URL_ENV) or variant.weights_url
    if not source:
        raise WeightsError(
            f"{variant.id} has no public weights tar. Set {WEIGHTS_URL_ENV} to an http(s) URL "
            f"or local path of a tar, or a local directory, holding the diffusers layout of "
            f"{variant.hub_repo} (model_index.json at its root), or pick another {MODEL_ENV}."
        )
    local = Path(source).expanduser()
    if local.is_dir():
        return _model_root(local, source)

    cache_root = Path(os.environ.get(WEIGHTS_DIR_ENV) or DEFAULT_WEIGHTS_DIR)
    entry = cache_root / _entry_name(variant, source)
    cached = _published_root(entry, source)
    if cached is not None:
        log.info("weights: using cached %s (%s)", cached, source)
        return cached

    cache_root.mkdir(parents=True, exist_ok=True)
    staging = cache_root / f".{entry.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    started = time.monotonic()
    try:
        if local.is_file():
            log.info("weights: extracting %s", local)
            with local.open("rb") as stream:
                _extract_tar_stream(stream, staging)
        elif source.startswith(("http://", "https://")):
            _download_tar(source, staging)
        else:
            raise WeightsError(
                f"{WEIGHTS_URL_ENV}={source!r} is neither an http(s) URL nor an existing file or "
                f"directory."
            )
        root = _model_root(staging, source)
        marker = {
            "variant": variant.id,
            "source": source,
            "root": str(root.relative_to(staging)),
            "seconds": round(time.monotonic() - started, 1),
        }
        (staging / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
        shutil.rmtree(entry, ignore_errors=True)
        staging.rename(entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("weights: ready in %s after %.1f s", entry, time.monotonic() - started)
    return entry / marker["root"]


def _entry_name(variant: Variant, source: str) -> str:
    if source == variant.weights_url:
        return variant.id
    return f"{variant.id}-{sha256(source.encode()).hexdigest()[:12]}"


def _published_root(entry: Path, source: str) -> Path | None:
    """The model directory of a completed cache entry for this source, else None."""
    try:
        marker = json.loads((entry / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    root = entry / marker.get("root", ".")
    if marker.get("source") != source or not (root / MODEL_INDEX).is_file():
        return None
    return root


def _model_root(directory: Path, source: str) -> Path:
    """The directory holding model_index.json: the top, or a single folder the tar wrapped."""
    if (directory / MODEL_INDEX).is_file():
        return directory
    children = [p for p in directory.iterdir() if p.is_dir()] if directory.is_dir() else []
    if len(children) == 1 and (children[0] / MODEL_INDEX).is_file():
        return children[0]
    raise WeightsError(
        f"{source} holds no {MODEL_INDEX} at its top (nor in a single top folder): it is not a "
        f"diffusers CogVideoX pipeline."
    )


def _download_tar(url: str, staging: Path) -> None:
    pget = shutil.which("pget")
    if pget:
        log.info("weights: pget -x %s", url)
        result = subprocess.run([pget, "-x", url, str(staging)], check=False)
        if result.returncode != 0:
            raise WeightsError(f"pget failed (exit {result.returncode}) fetching {url}")
        return
    log.info("weights: downloading %s (pget not on PATH: built-in downloader)", url)
    try:
        with urllib.request.urlopen(url, timeout=READ_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0)
            counted = _ProgressReader(response, total)
            try:
                _extract_tar_stream(counted, staging)
                while counted.read():  # the tar's end padding, so the length check below holds
                    pass
            except (OSError, tarfile.TarError, EOFError, http.client.HTTPException) as error:
                raise WeightsError(
                    f"download of {url} failed after {counted.received:,} of "
                    f"{total or 'unknown'} bytes: {error!r}"
                ) from error
            if total and counted.received != total:
                raise WeightsError(
                    f"download of {url} ended after {counted.received:,} of {total:,} bytes"
                )
    except urllib.error.URLError as error:
        raise WeightsError(f"could not download {url}: {error}") from error


def _extract_tar_stream(stream: BinaryIO, staging: Path) -> None:
    staging.mkdir(parents=True)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            # The "data" filter refuses absolute paths, "..", links leaving the destination
            # and device files: a tar from the network cannot write outside staging.
            archive.extractall(staging, filter="data")
    except tarfile.FilterError as error:
        raise WeightsError(f"refusing unsafe weights tar: {error}") from error


class _ProgressReader:
    """A file-like wrapper that counts bytes and logs progress now and then, not per chunk."""

    def __init__(self, raw: BinaryIO, total: int):
        self.raw, self.total, self.received = raw, total, 0
        self.started = self.last_log = time.monotonic()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(CHUNK_BYTES if size < 0 else size)
        self.received += len(data)
        now = time.monotonic()
        if now - self.last_log >= PROGRESS_EVERY_S:
            self.last_log = now
            rate = self.received / max(now - self.started, 1e-9)
            eta = f", ETA {(self.total - self.received) / rate:.0f} s" if self.total else ""
            log.info(
                "weights: %.2f GB of %s at %.0f MB/s%s",
                self.received / 1e9,
                f"{self.total / 1e9:.2f} GB" if self.total else "?",
                rate / 1e6,
                eta,
            )
        return data
