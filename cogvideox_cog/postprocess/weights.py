"""One post-processing model file in the weights cache: fetched once, verified, then loaded.

The same rules as the CogVideoX weights (weights/): a download goes to a staging folder, is
checked against its pinned sha256 where there is one, fsynced, marked complete and renamed
into place under the entry's lock; then it is loaded, which checks that it reads as a plain
state dict the network accepts. A cached entry is used when its marker matches the source and
the file's size (and sha256, when pinned or with COGVIDEOX_WEIGHTS_CHECK=sha256) and, for a
local file, while that file keeps the size and modification time it was copied with. One that
fails to load is discarded under the lock, only if no other process (a rank) has replaced it
meanwhile: a cached one is fetched again, once; a fresh one fails setup.

Files are read as data only: safetensors, or torch.load(weights_only=True), which refuses
anything but tensors and plain containers, so a crafted pickle cannot run code.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file

from ..errors import BadSource, WeightsError
from ..weights import cache, content_check, download, not_writable, weights_root, writable
from ..weights.manifest import sha256_file

log = logging.getLogger(__name__)

FOLDER = "postprocess"  # under the weights cache root
MAX_BYTES = 2 << 30  # the released files are tens of MB; anything this large is not one
M = TypeVar("M")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `name` for messages and the cache, the env that set it."""

    name: str
    url: str
    sha256: str | None
    url_env: str
    sha256_env: str
    pinned_by: str = ""  # who pins `sha256`, for messages; empty: sha256_env

    @property
    def shown(self) -> str:
        """The URL as logs and errors show it: no query string, no user:password."""
        return download.shown(self.url)

    @property
    def key(self) -> str:
        """What names the file in the cache: a renewed presigned URL is the same file."""
        return download.identity(self.url)


def load_model(source: ModelSource, build: Callable[[dict[str, torch.Tensor]], M]) -> M:
    """build(state dict of the cached file); fetched first if needed, again once if it fails."""
    path, fresh, seen = _ensure(source)
    try:
        return build(read_state_dict(path))
    except Exception as error:
        _discard_unchanged(path.parent, seen)
        if fresh:
            raise _bad(source, error) from error
        log.warning(f"{source.name}: the cached {path} failed to load ({error!r}): fetching again")
    path, _, seen = _ensure(source)
    try:
        return build(read_state_dict(path))
    except Exception as error:
        _discard_unchanged(path.parent, seen)
        raise _bad(source, error) from error


def _bad(source: ModelSource, error: Exception) -> WeightsError:
    return WeightsError(
        f"{source.name} weights from {source.shown} are not usable: {error}. They were "
        f"discarded. Set {source.url_env} to a plain state dict (safetensors, or a .pth/.pkl "
        f"of tensors only) of this architecture."
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors by name, unwrapped from BasicSR's "params_ema"/"params" and DDP's "module."."""
    if zipfile.is_zipfile(path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"not a plain state dict (weights_only=True refused it: {error})"
            ) from None
    else:
        try:
            state = load_file(path)
        except Exception as error:
            raise ValueError(f"neither a torch zip file nor safetensors ({error})") from None
    if isinstance(state, dict):
        state = state.get("params_ema", state.get("params", state))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("the file holds no state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _ensure(source: ModelSource) -> tuple[Path, bool, tuple[int, int] | None]:
    """(the cached file, whether it was fetched just now, its entry's _identity)."""
    name = Path(source.url.split("?")[0]).name or "model"
    digest = hashlib.sha256(f"{source.key} {source.sha256}".encode()).hexdigest()[:12]
    root = weights_root() / FOLDER
    entry = root / f"{source.name.lower()}-{digest}"
    seen = _identity(entry)  # before the check: a copy published after it is not this one
    if seen is not None and _published(entry, name, source):
        log.info(f"{source.name}: using cached {entry / name}")
        return entry / name, False, seen
    if not writable(root):
        raise not_writable(root, f"the {source.name} weights")
    root.mkdir(parents=True, exist_ok=True)
    with cache.entry_lock(entry):
        seen = _identity(entry)
        if seen is not None and _published(entry, name, source, explain=True):
            return entry / name, False, seen
        cache.discard(entry)
        cache.remove_leftovers(entry)
        staging = root / f".{entry.name}.staging"
        cache.discard(staging)
        staging.mkdir()
        started = time.monotonic()
        copied = download.local_version(source.url)  # before the copy: a change shows later
        try:
            found = _fetch(source, staging / name)
        except BaseException:
            cache.discard(staging)
            raise
        size = (staging / name).stat().st_size
        marker = {
            "format": cache.MARKER_FORMAT,
            "source": source.key,  # never a presigned URL's signature
            "files": {name: {"size": size, "sha256": found}},
        }
        if copied is not None:
            marker["validator"] = copied
        cache.publish(staging, entry, marker)
        seen = _identity(entry)
        log.info(
            f"{source.name}: {download.human(size)} from {source.shown} ready in "
            f"{time.monotonic() - started:.1f} s (sha256 {found})"
        )
    return entry / name, True, seen


def _identity(entry: Path) -> tuple[int, int] | None:
    """Which copy the entry is: its marker's inode and mtime, None without one. A copy fetched
    again has the same marker text (same source, size and sha256), but a new file."""
    try:
        stat = (entry / cache.COMPLETE_MARKER).stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _discard_unchanged(entry: Path, seen: tuple[int, int] | None) -> None:
    """Discard the copy that failed to load, unless another process (a rank on another GPU)
    replaced it meanwhile: that one is a fresh download, and may be loading now."""
    with cache.entry_lock(entry):
        if _identity(entry) == seen:
            cache.discard(entry)


def _published(entry: Path, name: str, source: ModelSource, explain: bool = False) -> bool:
    marker = cache.read_marker(entry)
    if not marker or marker.get("source") != source.key:
        return False
    # A local file replaced at the same path (new weights baked into an image, the cache on a
    # volume that outlives it) is another file: the copy is stale. One removed since is not.
    current = download.local_version(source.url)
    if current is not None and marker.get("validator") != current:
        if explain:
            log.info(f"{source.name}: {source.shown} changed since it was cached: copying it")
        return False
    recorded = marker.get("files", {}).get(name, {})
    path = entry / name
    if not path.is_file() or path.stat().st_size != recorded.get("size"):
        return False
    if content_check() == "sha256" or source.sha256:
        return sha256_file(path).hexdigest() == (source.sha256 or recorded.get("sha256"))
    return True


def _fetch(source: ModelSource, dest: Path) -> str:
    """Download (or copy a local file) to `dest`; its sha256, checked against a pinned one."""
    local = Path(source.url).expanduser()
    if local.is_file():
        shutil.copyfile(local, dest)
    elif download.is_http(source.url):
        try:
            with dest.open("wb") as out:
                download.fetch_capped(
                    source.url, out, MAX_BYTES, threading.Event(), f"{source.name} weights"
                )
        except download.TooLarge as error:
            raise BadSource(
                f"{source.name} weights at {source.shown} are {error}, over "
                f"{download.human(MAX_BYTES)}: not a frame model; check {source.url_env}"
            ) from None
        except WeightsError as error:  # its message names the URL, not the setting that gave it
            reason = str(error).rstrip(".")
            raise type(error)(f"{source.name} weights: {reason}; check {source.url_env}") from error
    else:
        raise WeightsError(
            f"{source.url_env}={source.shown!r} is neither an http(s) URL nor an existing file."
        )
    found = sha256_file(dest).hexdigest()
    if source.sha256 and found != source.sha256.lower():
        raise BadSource(
            f"{source.name} weights from {source.shown} have sha256 {found}, not the "
            f"{source.sha256} that {source.pinned_by or f'{source.sha256_env} pins'}: discarded."
        )
    return found
