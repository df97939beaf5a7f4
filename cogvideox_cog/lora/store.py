"""LoRA files by URL: fetched once, checked, and kept by content in a bounded cache.

A `lora_url` is downloaded into a private staging file, checked (a safetensors file whose
header accounts for every byte; a pickle is refused without being read; a tar is searched for
its LoRA file), hashed, and published as `blobs/<sha256>.safetensors` with one atomic rename,
so a half-downloaded file is never loaded. `urls/` maps each URL to the hash it gave, in a
file named by the whole URL's sha256 that records the URL as logs show it (download.shown):
a presigned URL's signature is a credential, never written to the cache volume. URLs are
taken as immutable, as Replicate's own LoRA caches do: publish new weights under a new URL
(or add a query string) to fetch them again. When the blobs pass the cache's size bound, the
least recently used ones are evicted; downloads in progress count against that bound, and
one a killed process left behind is removed by the next request (leftovers.py). A LoRA larger
than the whole bound is refused, its download stopped there: kept, it would hold the cache
over its bound; used once and dropped, it would be downloaded again by every request.

The index is bounded too: each presigned URL's new signature is a new entry, so it would
otherwise grow by one file per request, outside the size bound. An eviction forgets the URLs
of the blobs it removed; past MAX_URL_ENTRIES the least recently used URLs are forgotten. A
forgotten URL costs one download again (stored once: the content finds its blob), never a
wrong file: an entry whose blob is gone was a miss already.

Servers may share the folder (one volume, a GPU each). The file get() returns is held open
under a shared flock until that cache's next get(), and eviction passes over a file so held:
another server's download cannot remove it between this server's lookup and its read. The
kernel drops the lock of a process that dies.

Downloads reuse the weights downloader (download.py: ranged parallel GETs, retries with
backoff, resume) under one overall deadline; hf:// goes through huggingface_hub.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import heapq
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from .. import leftovers
from ..errors import LoraError
from ..files import replace_atomically
from ..settings import folder_from_env, seconds_from_env, size_from_env
from ..weights import cache, download, weights_root, writable
from ..weights.manifest import sha256_file
from ..weights.verify import check_safetensors
from .fetch import MAX_SIZE_ENV, Cap, check_lora_url, fetch_lora

log = logging.getLogger(__name__)

LORA_DIR_ENV = "COGVIDEOX_LORA_DIR"
CACHE_SIZE_ENV = "COGVIDEOX_LORA_CACHE_SIZE"
TIMEOUT_ENV = "COGVIDEOX_LORA_TIMEOUT"
DEFAULT_MAX_SIZE = "2G"  # a rank-128 LoRA of every linear layer of 5B in float32 is ~2.0 GB
DEFAULT_CACHE_SIZE = "20G"
DEFAULT_TIMEOUT_S = 600.0
PARTIAL_MAX_AGE_S = 24 * 3600  # a staging folder without an owner lock (older versions)
MAX_URL_ENTRIES = 10_000  # files in urls/, ~4 KB of disk each
URL_ENTRIES_KEPT = 9_000  # what a pass past the bound keeps: that pass comes once per 1,000
T = TypeVar("T")


def timeout_s() -> float:
    """COGVIDEOX_LORA_TIMEOUT: seconds a LoRA download may take in all."""
    return seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


class LoraCache:
    def __init__(self, root: Path, max_file_bytes: int, max_cache_bytes: int, timeout_s: float):
        self.root, self.timeout_s = Path(root), timeout_s
        self.max_file_bytes, self.max_cache_bytes = max_file_bytes, max_cache_bytes
        self.blobs, self.urls = self.root / "blobs", self.root / "urls"
        self.partial = self.root / "partial"
        self._held: BinaryIO | None = None  # the file the last get() returned, held open

    @classmethod
    def from_env(cls) -> LoraCache:
        """The cache as the settings configure it, within its bound from setup on: a bound
        lowered since the last start applies now, not at a download that may never come."""
        lora_cache = cls(
            folder_from_env(LORA_DIR_ENV, weights_root() / "loras"),
            size_from_env(MAX_SIZE_ENV, DEFAULT_MAX_SIZE, positive=True),
            size_from_env(CACHE_SIZE_ENV, DEFAULT_CACHE_SIZE, positive=True),
            timeout_s(),
        )
        try:
            lora_cache._remove_dead_partials()  # a download killed with the last server
            lora_cache.evict()
        except OSError as error:  # a read-only volume of LoRAs put there beforehand, say
            log.warning(f"lora: the cache stays over {CACHE_SIZE_ENV}: {error}")
        return lora_cache

    def get(self, url: str) -> Path:
        """The verified LoRA file for `url`, from the cache or downloaded now."""
        url = check_lora_url(url)
        self._remove_dead_partials()
        cached = self._lookup(url)
        if cached is not None:
            self._hold(cached)
            # Now the most recently used, and so too its URL: the last evicted and forgotten.
            # Neither is needed to serve it: a read-only folder (the weights volume mounted
            # read-only, say) evicts nothing, and the URL may be forgotten by another server.
            with contextlib.suppress(OSError):
                os.utime(cached.fileno())
            with contextlib.suppress(OSError):
                os.utime(self._index_path(url))
            blob = Path(cached.name)
            log.info(f"lora: {download.shown(url)} cached as {blob.stem[:12]}")
            return blob
        if not writable(self.root):
            raise LoraError(
                f"the LoRA at {download.shown(url)} is not cached, and the LoRA folder "
                f"{self.root} is not writable to download it into: mount it read-write, or "
                f"set {LORA_DIR_ENV} to a writable folder"
            )
        for folder in (self.blobs, self.urls, self.partial):
            folder.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        blob, held = self._fetch_making_room(url, started)
        self._hold(held)
        self._record(url, blob)
        self.evict(keep=blob)
        size = os.fstat(held.fileno()).st_size
        seconds = time.monotonic() - started
        log.info(
            f"lora: {download.shown(url)} fetched ({download.human(size)}) in {seconds:.1f} s"
            f" as {blob.stem[:12]}"
        )
        return blob

    def evict(self, keep: Path | None = None, room: int = 0) -> int:
        """Drop least recently used blobs until they and the downloads in progress fit the
        cache's bound (never `keep`), and the volume has `room` bytes free, and the URLs that
        led to them; then bound the index. Returns how many blobs went."""
        blobs = []
        for path in self.blobs.glob("*.safetensors"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            blobs.append((stat.st_mtime, stat.st_size, path))
        partial = leftovers.folder_size(self.partial)
        total = partial + sum(size for _, size, _ in blobs)
        free = _free_bytes(self.root) if room else None
        evicted = set()
        for _, size, path in sorted(blobs):
            if total <= self.max_cache_bytes and (free is None or free >= room):
                break
            if path == keep or not _unlink_unless_held(path):
                continue
            total -= size
            free = None if free is None else free + size
            evicted.add(path.stem)
            downloading = f"; {download.human(partial)} downloading" if partial else ""
            log.info(
                f"lora: evicted {path.name} ({download.human(size)}), least recently used"
                + downloading
            )
        self._prune_index(evicted)
        return len(evicted)

    # URL index ------------------------------------------------------------------------------

    def _index_path(self, url: str) -> Path:
        return self.urls / f"{hashlib.sha256(url.encode()).hexdigest()}.json"

    def _lookup(self, url: str) -> BinaryIO | None:
        """The blob `url` gave, opened under a shared lock; None: fetch it."""
        try:
            entry = json.loads(self._index_path(url).read_text())
        except (OSError, ValueError):
            return None
        # Not an entry of ours (a JSON list, say): a miss, as the index's pruning takes it.
        if not isinstance(entry, dict) or entry.get("url") != download.shown(url):
            return None
        blob = self.blobs / f"{entry.get('sha256')}.safetensors"
        held = _open_shared(blob)
        if held is None:
            return None  # evicted: fetch again
        # The header check of every download, again (it reads the header only): a blob cut
        # short on disk would otherwise fail every request for this URL and never be evicted.
        try:
            problems = check_safetensors(blob)
        except FileNotFoundError:  # removed regardless of the lock: by an older version
            held.close()
            return None
        if problems:
            held.close()
            try:
                blob.unlink(missing_ok=True)
            except OSError as error:  # a read-only volume that serves its LoRAs as they are
                raise LoraError(
                    f"the cached LoRA for {download.shown(url)} ({blob}) is damaged "
                    f"({problems[0]}), and the LoRA folder {self.root} is not writable to "
                    f"fetch it again ({error.strerror or error}): mount it read-write or "
                    f"replace that file, or set {LORA_DIR_ENV} to a writable folder"
                ) from None
            log.warning(f"lora: cached {blob.name} is damaged ({problems[0]}): fetching again")
            return None
        return held

    def _hold(self, file: BinaryIO) -> None:
        """Keep `file` from eviction until the next get(), and let the last one go."""
        previous, self._held = self._held, file
        if previous is not None:
            previous.close()

    def _record(self, url: str, blob: Path) -> None:
        entry = {"url": download.shown(url), "sha256": blob.stem, "fetched": time.time()}
        replace_atomically(self._index_path(url), json.dumps(entry))

    def _prune_index(self, evicted: set[str]) -> None:
        """Forget the URLs of the blobs named in `evicted` that are still gone, and the least
        recently used URLs past MAX_URL_ENTRIES. Reads at most the bounded index's entries,
        and only in a pass that evicted a blob."""
        try:
            with os.scandir(self.urls) as listing:
                count = sum(1 for _ in listing)
        except FileNotFoundError:
            return
        if count > MAX_URL_ENTRIES:
            self._forget_least_recently_used()
        if not evicted:
            return
        for path in self.urls.glob("*.json"):  # not a writer's temporary file
            try:
                sha256 = json.loads(path.read_text()).get("sha256")
            except (OSError, ValueError, AttributeError):
                continue  # forgotten by another server meanwhile, or not ours
            if sha256 in evicted and not (self.blobs / f"{sha256}.safetensors").exists():
                path.unlink(missing_ok=True)

    def _forget_least_recently_used(self) -> None:
        """Remove all but the URL_ENTRIES_KEPT most recently used files of the index, in one
        pass that holds no more than those (an older version's index may hold millions)."""
        kept: list[tuple[float, str]] = []
        forgotten = 0
        with os.scandir(self.urls) as listing:
            for entry in listing:
                try:
                    heapq.heappush(kept, (entry.stat().st_mtime, entry.name))
                except FileNotFoundError:  # forgotten by another server meanwhile
                    continue
                if len(kept) > URL_ENTRIES_KEPT:
                    (self.urls / heapq.heappop(kept)[1]).unlink(missing_ok=True)
                    forgotten += 1
        if forgotten:
            log.info(
                f"lora: forgot the {forgotten:,} least recently used URLs past "
                f"{MAX_URL_ENTRIES:,}: they are fetched again if asked for"
            )

    # Fetching -------------------------------------------------------------------------------

    def _fetch_making_room(self, url: str, started: float) -> tuple[Path, BinaryIO]:
        """_fetch under the deadline. A volume that fills up (a bound larger than the disk
        holds, or a disk shared with the weights) fails the download with ENOSPC, and the
        cache evicts only after a download succeeds: the least recently used LoRAs are
        evicted then until one download of the largest size allowed fits, and the download
        is tried once more in what is left of the timeout."""

        def work(staging: Path, stop: threading.Event) -> tuple[Path, BinaryIO]:
            return self._fetch(url, staging, stop)

        try:
            return self._with_deadline(url, work)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            evicted = self.evict(room=self._cap().size)
            left = self.timeout_s - (time.monotonic() - started)
            if not evicted or left <= 0:
                raise self._no_room(url, error) from None
        log.warning(
            f"lora: no space left for {download.shown(url)} in {self.root}: evicted {evicted} "
            f"least recently used LoRAs, downloading again"
        )
        try:
            return self._with_deadline(url, work, left)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            raise self._no_room(url, error) from None

    def _no_room(self, url: str, error: OSError) -> LoraError:
        free = _free_bytes(self.root)
        said = error.strerror or str(error)
        if free is not None:
            said += f", {download.human(free)} free"
        return LoraError(
            f"no space left to download the LoRA at {download.shown(url)} into {self.root} "
            f"({said}) after evicting the cached LoRAs it could: free disk space there, or set "
            f"{LORA_DIR_ENV} to a larger volume and {CACHE_SIZE_ENV} below what it holds"
        )

    def _with_deadline(
        self, url: str, work: Callable[[Path, threading.Event], T], seconds: float | None = None
    ) -> T:
        """Run work(staging, cancelled) under the timeout (download.with_deadline).

        The staging folder is the worker's alone and removed whatever happens; if the process
        dies first, by the next request (its owner lock is gone then).
        """
        staging = leftovers.claim(self.partial, f"{os.getpid()}-")

        def staged(cancelled: threading.Event) -> Path:
            try:
                return work(staging, cancelled)
            finally:
                leftovers.release(staging)

        try:
            seconds = self.timeout_s if seconds is None else seconds
            return download.with_deadline(staged, seconds, "lora-download")
        except download.DeadlineExceeded:
            raise LoraError(
                f"downloading the LoRA at {download.shown(url)} took longer than "
                f"{self.timeout_s:g} s ({TIMEOUT_ENV}); check the URL, or host the file closer "
                f"to the server"
            ) from None

    def _cap(self) -> Cap:
        """The most a download may take: COGVIDEOX_LORA_MAX_SIZE, or the whole cache's bound
        where that is smaller."""
        if self.max_cache_bytes >= self.max_file_bytes:
            return Cap(self.max_file_bytes)
        return Cap(
            self.max_cache_bytes,
            CACHE_SIZE_ENV,
            f"the whole LoRA cache's bound: raise {CACHE_SIZE_ENV} to serve LoRAs this large",
        )

    def _fetch(self, url: str, staging: Path, cancelled: threading.Event) -> tuple[Path, BinaryIO]:
        """The published blob, and it opened under a shared lock taken before it was
        published, so that no eviction comes between (a file object: closed when dropped,
        as after the deadline)."""
        lora = fetch_lora(url, staging, cancelled, self._cap())
        blob = self.blobs / f"{sha256_file(lora).hexdigest()}.safetensors"
        # The same content from another URL (a presigned URL's new signature): the file
        # there stays, for another server may hold it, and a new file in its place would
        # leave that hold on a file the name no longer leads to, evictable under it.
        existing = _open_shared(blob)
        if existing is not None:
            with contextlib.suppress(FileNotFoundError):  # removed by an older version
                if not check_safetensors(blob):
                    with contextlib.suppress(OSError):  # as a hit: the most recently used
                        os.utime(existing.fileno())
                    return blob, existing
            existing.close()  # damaged on disk: replaced by the file just checked
        cache.fsync(lora)  # on disk before its name says it is whole
        held = _open_shared(lora)  # staging is this process's alone: it is there
        if existing is None and not _link(lora, blob):
            # Another server published the same content since the look above (during the
            # fsync): theirs stays, as above, for they may hold it already.
            theirs = _open_shared(blob)
            if theirs is not None:
                held.close()
                return blob, theirs
        if existing is not None or not blob.exists():
            os.replace(lora, blob)  # a damaged blob, or one evicted again meanwhile
        cache.fsync(self.blobs)
        return blob, held

    def _remove_dead_partials(self) -> None:
        """Downloads whose process died: at once where they hold an owner lock, else (left by
        older versions) after a day."""
        leftovers.remove_dead(self.partial, "")
        if not self.partial.is_dir():
            return
        for leftover in self.partial.iterdir():
            try:
                owned = (leftover / leftovers.LOCK_NAME).exists()
                if not owned and time.time() - leftover.stat().st_mtime > PARTIAL_MAX_AGE_S:
                    shutil.rmtree(leftover, ignore_errors=True)
            except FileNotFoundError:
                pass


def _free_bytes(folder: Path) -> int | None:
    """Bytes free on `folder`'s volume; None where that cannot be told."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _link(source: Path, name: Path) -> bool:
    """Publish `source` as `name` unless a file has that name: False then. A volume without
    hard links (some network and FUSE ones) publishes with a rename, which replaces."""
    try:
        os.link(source, name)
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        os.replace(source, name)
    return True


def _open_shared(path: Path) -> BinaryIO | None:
    """`path` opened under a shared flock, which evict() in any process respects; None if it
    is gone, or was evicted while the lock was awaited."""
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return None
    with contextlib.suppress(OSError):  # a volume that refuses locks: used unheld, as before
        fcntl.flock(file, fcntl.LOCK_SH)  # waits only for an eviction under way: one unlink
    try:
        if os.path.samestat(os.fstat(file.fileno()), path.stat()):
            return file
    except FileNotFoundError:
        pass
    file.close()
    return None


def _unlink_unless_held(path: Path) -> bool:
    """Remove `path` unless a server holds it (get() returned it and its file is being read);
    True when it is gone."""
    try:
        try:
            file = path.open("r+b")  # NFS's flock takes an exclusive lock only for writing
        except OSError:  # a read-only file or volume: locked where the volume allows it
            file = path.open("rb")
        with file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            except OSError:  # a volume that refuses locks (ENOLCK): removed unheld, as before
                pass
            if not os.path.samestat(os.fstat(file.fileno()), path.stat()):
                return False  # published again meanwhile, and so just now
            path.unlink()
    except FileNotFoundError:  # evicted by another server meanwhile
        pass
    return True
