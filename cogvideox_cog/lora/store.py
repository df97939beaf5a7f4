"""LoRA files by URL: fetched once, checked, and kept by content in a bounded cache.

A `lora_url` is downloaded into a private staging file, checked (a safetensors file whose
header accounts for every byte; a pickle is refused without being read; a tar is searched for
its LoRA file), hashed, and published as `blobs/<sha256>.safetensors` with one atomic rename,
so a half-downloaded file is never loaded. `urls/` maps each URL to the hash it gave. URLs
are taken as immutable, as Replicate's own LoRA caches do: publish new weights under a new
URL (or add a query string) to fetch them again. When the blobs pass the cache's size bound,
the least recently used ones are evicted; downloads in progress count against that bound, and
one a killed process left behind is removed by the next request (leftovers.py).

Downloads reuse the weights downloader (download.py: ranged parallel GETs, retries with
backoff, resume) under one overall deadline; hf:// goes through huggingface_hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import threading
import time
import urllib.parse
import zipfile
from collections.abc import Callable
from pathlib import Path

from .. import leftovers
from ..errors import ConfigError, LoraError, WeightsError
from ..weights import DEFAULT_WEIGHTS_DIR, WEIGHTS_DIR_ENV, download, hub_online
from ..weights.verify import check_safetensors

log = logging.getLogger(__name__)

LORA_DIR_ENV = "COGVIDEOX_LORA_DIR"
MAX_SIZE_ENV = "COGVIDEOX_LORA_MAX_SIZE"
CACHE_SIZE_ENV = "COGVIDEOX_LORA_CACHE_SIZE"
TIMEOUT_ENV = "COGVIDEOX_LORA_TIMEOUT"
DEFAULT_MAX_SIZE = "2G"  # a rank-256 LoRA of every linear layer of 5B in float32 is ~1.5 GB
DEFAULT_CACHE_SIZE = "20G"
DEFAULT_TIMEOUT_S = 600.0
# What diffusers' save_lora_weights writes, and so what upstream's training scripts leave.
LORA_FILE_NAME = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PARTIAL_MAX_AGE_S = 24 * 3600  # a staging folder without an owner lock (older versions)
_HF_LORA_URL = re.compile(
    r"hf://(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@/]+))?"
    r"(?:/(?P<file>[^\s@]*[^\s@/]))?/?"
)

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", re.IGNORECASE)
_PICKLE_HINT = (
    "pickle checkpoints can run code when loaded and are refused; convert it with "
    "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'lora.safetensors')` "
    "on a machine you trust"
)


def parse_size(text: str, env: str) -> int:
    """'2G', '500M', '1.5GiB' or a plain byte count -> bytes (binary multiples)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ConfigError(f"{env}={text!r} is not a size: use e.g. 2G, 500M or a byte count")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


def check_lora_url(url: str) -> str:
    """Refuse what can be refused without a download: the scheme, a pickle's file name."""
    url = url.strip()
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "hf":
        if not _HF_LORA_URL.fullmatch(url):
            raise LoraError(
                f"lora_url={url!r}: use hf://org/repo, hf://org/repo/file.safetensors or "
                f"hf://org/repo@revision/file.safetensors"
            )
    elif scheme not in ("http", "https"):
        raise LoraError(
            f"lora_url={url!r}: use an http(s) URL of a .safetensors file or of a tar of a "
            f"training run's output, or hf://org/repo[/file.safetensors]"
        )
    if urllib.parse.urlsplit(url).path.lower().endswith(PICKLE_SUFFIXES):
        raise LoraError(f"lora_url={url!r} names a PyTorch pickle file: {_PICKLE_HINT}.")
    return url


class LoraCache:
    def __init__(self, root: Path, max_file_bytes: int, max_cache_bytes: int, timeout_s: float):
        self.root, self.timeout_s = Path(root), timeout_s
        self.max_file_bytes, self.max_cache_bytes = max_file_bytes, max_cache_bytes
        self.blobs, self.urls = self.root / "blobs", self.root / "urls"
        self.partial = self.root / "partial"

    @classmethod
    def from_env(cls) -> LoraCache:
        weights_dir = Path(os.environ.get(WEIGHTS_DIR_ENV) or DEFAULT_WEIGHTS_DIR)
        return cls(
            Path(os.environ.get(LORA_DIR_ENV) or weights_dir / "loras"),
            parse_size(os.environ.get(MAX_SIZE_ENV) or DEFAULT_MAX_SIZE, MAX_SIZE_ENV),
            parse_size(os.environ.get(CACHE_SIZE_ENV) or DEFAULT_CACHE_SIZE, CACHE_SIZE_ENV),
            float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S),
        )

    def get(self, url: str) -> Path:
        """The verified LoRA file for `url`, from the cache or downloaded now."""
        url = check_lora_url(url)
        self._remove_dead_partials()
        cached = self._lookup(url)
        if cached is not None:
            try:
                os.utime(cached)  # now the most recently used: the last one evicted
            except FileNotFoundError:  # evicted by another server sharing the folder just now
                cached = None
        if cached is not None:
            log.info(f"lora: {url} cached as {cached.stem[:12]}")
            return cached
        for folder in (self.blobs, self.urls, self.partial):
            folder.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        blob = self._with_deadline(url, lambda staging, stop: self._fetch(url, staging, stop))
        self._record(url, blob)
        self.evict(keep=blob)
        size = blob.stat().st_size
        log.info(
            f"lora: {url} fetched ({download.human(size)}) in {time.monotonic() - started:.1f} s"
            f" as {blob.stem[:12]}"
        )
        return blob

    def evict(self, keep: Path | None = None) -> None:
        """Drop least recently used blobs until they and the downloads in progress fit the
        cache's bound (never `keep`)."""
        blobs = []
        for path in self.blobs.glob("*.safetensors"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            blobs.append((stat.st_mtime, stat.st_size, path))
        partial = leftovers.folder_size(self.partial)
        total = partial + sum(size for _, size, _ in blobs)
        for _, size, path in sorted(blobs):
            if total <= self.max_cache_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            downloading = f"; {download.human(partial)} downloading" if partial else ""
            log.info(
                f"lora: evicted {path.name} ({download.human(size)}), least recently used"
                + downloading
            )

    # URL index ------------------------------------------------------------------------------

    def _index_path(self, url: str) -> Path:
        return self.urls / f"{hashlib.sha256(url.encode()).hexdigest()}.json"

    def _lookup(self, url: str) -> Path | None:
        try:
            entry = json.loads(self._index_path(url).read_text())
        except (OSError, ValueError):
            return None
        blob = self.blobs / f"{entry.get('sha256')}.safetensors"
        if entry.get("url") != url or not blob.is_file():
            return None  # evicted: fetch again
        return blob

    def _record(self, url: str, blob: Path) -> None:
        index = self._index_path(url)
        temporary = index.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"url": url, "sha256": blob.stem, "fetched": time.time()}))
        os.replace(temporary, index)

    # Fetching -------------------------------------------------------------------------------

    def _with_deadline(self, url: str, work: Callable[[Path, threading.Event], Path]) -> Path:
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
            return download.with_deadline(staged, self.timeout_s, "lora-download")
        except download.DeadlineExceeded:
            raise LoraError(
                f"downloading the LoRA at {url} took longer than {self.timeout_s:g} s "
                f"({TIMEOUT_ENV}); check the URL, or host the file closer to the server"
            ) from None

    def _fetch(self, url: str, staging: Path, cancelled: threading.Event) -> Path:
        download_path = staging / "download"
        if url.startswith("hf://"):
            self._fetch_hub(url, staging, download_path)
        else:
            self._fetch_http(url, download_path, cancelled)
        if cancelled.is_set():
            raise LoraError("download cancelled")
        lora = self._lora_file(url, download_path, staging)
        problems = check_safetensors(lora)
        if problems:
            raise LoraError(f"the LoRA at {url} is not a valid safetensors file: {problems[0]}")
        digest = _sha256(lora)
        blob = self.blobs / f"{digest}.safetensors"
        os.replace(lora, blob)  # the same content from two URLs is the same blob
        return blob

    def _fetch_http(self, url: str, dest: Path, cancelled: threading.Event) -> None:
        hint = "Check the URL and the network, and try again."
        try:
            with dest.open("wb") as out:
                download.fetch_capped(url, out, self.max_file_bytes, cancelled, f"LoRA {url}", hint)
        except download.TooLarge as error:
            raise self._too_big(url, error.size, error.at_least) from None
        except WeightsError as error:
            raise LoraError(f"could not download the LoRA: {error}") from None

    def _fetch_hub(self, url: str, staging: Path, dest: Path) -> None:
        match = _HF_LORA_URL.fullmatch(url)
        repo, revision, filename = match["repo"], match["revision"], match["file"]
        import huggingface_hub

        try:
            with hub_online():
                api = huggingface_hub.HfApi()
                if filename is None:
                    filename = _pick_lora_file(api.list_repo_files(repo, revision=revision), url)
                info = huggingface_hub.get_hf_file_metadata(
                    huggingface_hub.hf_hub_url(repo, filename, revision=revision)
                )
                if info.size is not None and info.size > self.max_file_bytes:
                    raise self._too_big(url, info.size)
                path = huggingface_hub.hf_hub_download(
                    repo, filename, revision=revision, local_dir=staging / "hub"
                )
        except LoraError:
            raise
        except Exception as error:
            raise LoraError(
                f"could not download the LoRA {url} from the Hugging Face Hub: {error}. Check "
                f"the repository, file and revision, and HF_TOKEN for a private repository."
            ) from None
        os.replace(path, dest)

    def _lora_file(self, url: str, path: Path, staging: Path) -> Path:
        """The downloaded file itself, or the LoRA file inside a downloaded tar."""
        size = path.stat().st_size
        if size > self.max_file_bytes:
            raise self._too_big(url, size)
        kind = sniff(path)
        if kind == "safetensors":
            return path
        if kind == "tar":
            return self._from_tar(url, path, staging / "member.safetensors")
        if kind == "pickle":
            raise LoraError(f"the file at {url} is a PyTorch pickle checkpoint: {_PICKLE_HINT}.")
        if kind == "html":
            raise LoraError(
                f"{url} returned a web page, not a file. For a file on the Hugging Face Hub use "
                f"its .../resolve/... link (not .../blob/...) or hf://org/repo/file.safetensors."
            )
        if kind == "zip":
            raise LoraError(
                f"the file at {url} is a zip archive; serve the .safetensors file itself, or a "
                f"tar (.tar, .tar.gz) of the folder."
            )
        with path.open("rb") as file:
            head = file.read(8)
        raise LoraError(
            f"the file at {url} is neither a .safetensors LoRA nor a tar holding one "
            f"({size:,} bytes starting {head!r})."
        )

    def _from_tar(self, url: str, path: Path, dest: Path) -> Path:
        """Copy the LoRA member out of a tar: read as data, never extracted by its name."""
        try:
            with tarfile.open(path, "r:*") as archive:
                members = [m for m in archive.getmembers() if m.isfile()]
                name = _pick_lora_file([m.name for m in members], url)
                member = next(m for m in members if m.name == name)
                if member.size > self.max_file_bytes:
                    raise self._too_big(f"{url} ({name})", member.size)
                with archive.extractfile(member) as source, dest.open("wb") as out:
                    shutil.copyfileobj(source, out, download.READ_BYTES)
        except (tarfile.TarError, EOFError, OSError) as error:
            raise LoraError(f"the tar at {url} cannot be read: {error}") from None
        if sniff(dest) == "pickle":
            raise LoraError(f"{name} in {url} is a PyTorch pickle checkpoint: {_PICKLE_HINT}.")
        log.info(f"lora: using {name} from the tar at {url}")
        return dest

    def _too_big(self, what: str, size: int, at_least: bool = False) -> LoraError:
        more = "more than " if at_least else ""
        return LoraError(
            f"the LoRA at {what} is {more}{download.human(size)}, over the "
            f"{download.human(self.max_file_bytes)} limit ({MAX_SIZE_ENV}); a LoRA for "
            f"CogVideoX is usually well under 1 GB"
        )

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


def _pick_lora_file(names: list[str], url: str) -> str:
    """pytorch_lora_weights.safetensors nearest the top (a run's final weights, not a
    checkpoint-N/ copy), else the only .safetensors file."""
    named = [n for n in names if n.rsplit("/", 1)[-1] == LORA_FILE_NAME]
    if named:
        depth = min(n.strip("/").count("/") for n in named)
        top = [n for n in named if n.strip("/").count("/") == depth]
        if len(top) == 1:
            return top[0]
        raise LoraError(f"{url} holds several {LORA_FILE_NAME} at the same depth: {top[:5]}")
    candidates = [n for n in names if n.lower().endswith(".safetensors")]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
        found = f" (only pickle files: {pickles[:5]}; {_PICKLE_HINT})" if pickles else ""
        raise LoraError(f"{url} holds no .safetensors file{found}.")
    raise LoraError(
        f"{url} holds several .safetensors files and no {LORA_FILE_NAME}: {candidates[:5]}; "
        f"name the file in the URL."
    )


def sniff(path: Path) -> str:
    """What a file is, from its first bytes: safetensors, tar, pickle, zip, html or unknown."""
    with path.open("rb") as file:
        head = file.read(512)
    size = path.stat().st_size
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "pickle" if _is_torch_zip(path) else "zip"
    if head[:1] == b"\x80":
        return "pickle"  # a bare pickle stream (torch.save's legacy format)
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")) or head[257:262] == b"ustar":
        return "tar"  # compressed tars are told apart from other archives when opened
    if head.lstrip()[:1] == b"<":
        return "html"
    return "unknown"


def _is_torch_zip(path: Path) -> bool:
    """torch.save's zip format: a folder holding data.pkl (its names are listed, never read)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(
                name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist()
            )
    except (zipfile.BadZipFile, OSError):
        return True  # unreadable as a zip: treat it as the checkpoint it claims to be


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()
