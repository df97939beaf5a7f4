"""Fetching a LoRA: what a lora_url may be, its download, and the LoRA file inside it.

An http(s) URL goes through the weights downloader (weights/download.py: ranged parallel GETs,
retries with backoff) under a size cap; hf:// goes through huggingface_hub. What arrives is
identified by its first bytes: a safetensors file is used as it is, a tar (a training run's
output folder) is searched for its LoRA file, which is copied out as data; a pickle is refused
without being read, and a web page or a zip gets a message that says what to send instead.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import gzip
import logging
import lzma
import os
import shutil
import tarfile
import threading
import urllib.parse
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from ..errors import LoraError, WeightsError
from ..weights import download
from ..weights.hub import hub_online, parse_hf_url
from ..weights.verify import check_safetensors
from .file import adapted_layers

log = logging.getLogger(__name__)

# What diffusers' save_lora_weights writes, and so what upstream's training scripts leave.
LORA_FILE_NAME = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_SIZE_ENV = "COGVIDEOX_LORA_MAX_SIZE"
# A compressed tar is decompressed to at most this many times the size cap: weights barely
# compress, while a few MB of gzip can hold terabytes of zeros or millions of tar headers.
TAR_EXPANSION = 4
# Entries of a tar listed at most: a training run's output folder holds hundreds, and each
# entry listed takes memory until the tar is closed.
MAX_TAR_MEMBERS = 10_000
_COMPRESSED = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ": lzma.open}


class Cap(NamedTuple):
    """The most bytes a LoRA download may take, the setting that sets it, and what to do
    about a LoRA over it (all named in the error)."""

    size: int
    setting: str = MAX_SIZE_ENV
    advice: str = "a LoRA for CogVideoX is usually well under 1 GB"


_PICKLE_HINT = (
    "pickle checkpoints can run code when loaded and are refused; convert it with "
    "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'lora.safetensors')` "
    "on a machine you trust"
)


def check_lora_url(url: str) -> str:
    """Refuse what can be refused without a download: the scheme, a pickle's file name."""
    url = url.strip()
    # download.shown: no password (a mistyped scheme's, `htps://user:key@host`) nor a
    # presigned URL's signature in the error
    shown = _quoted(download.shown(url))
    scheme = download.scheme_of(url)
    if scheme == "hf":
        if parse_hf_url(url, with_file=True) is None:
            raise LoraError(
                f"lora_url={shown}: use hf://org/repo, hf://org/repo/file.safetensors or "
                f"hf://org/repo@revision/file.safetensors"
            )
    elif scheme not in ("http", "https"):
        raise LoraError(
            f"lora_url={shown}: use an http(s) URL of a .safetensors file or of a tar of a "
            f"training run's output, or hf://org/repo[/file.safetensors]"
        )
    elif problem := download.url_problem(url):
        raise LoraError(f"the lora_url {problem}.")
    if urllib.parse.urlsplit(url).path.lower().endswith(PICKLE_SUFFIXES):
        raise LoraError(f"lora_url={shown} names a PyTorch pickle file: {_PICKLE_HINT}.")
    return url


def _quoted(url: str) -> str:
    """`url` quoted for an error, a long one cut short."""
    return repr(url) if len(url) <= 200 else f"{url[:200]!r}... ({len(url):,} characters)"


def fetch_lora(url: str, staging: Path, cancelled: threading.Event, cap: Cap) -> Path:
    """Download `url` into `staging` and return the checked safetensors LoRA file in it."""
    download_path = staging / "download"
    if url.startswith("hf://"):
        _fetch_hub(url, staging, download_path, cap)
    else:
        _fetch_http(url, download_path, cancelled, cap)
    if cancelled.is_set():
        raise LoraError("download cancelled")
    shown = download.shown(url)  # no presigned URL's signature in errors and logs
    lora = _lora_file(shown, download_path, staging, cap)
    problems = check_safetensors(lora)
    if problems:
        raise LoraError(f"the LoRA at {shown} is not a valid safetensors file: {problems[0]}")
    adapted_layers(lora)  # what safetensors itself refuses in a header: refused, not cached
    return lora


def _fetch_http(url: str, dest: Path, cancelled: threading.Event, cap: Cap) -> None:
    hint = "Check the URL and the network, and try again."
    shown = download.shown(url)
    try:
        with dest.open("wb") as out:
            download.fetch_capped(url, out, cap.size, cancelled, f"LoRA {shown}", hint)
    except download.TooLarge as error:
        raise _too_big(shown, error.size, cap, error.at_least) from None
    except WeightsError as error:
        raise LoraError(f"could not download the LoRA: {error}") from None


def _fetch_hub(url: str, staging: Path, dest: Path, cap: Cap) -> None:
    ref = parse_hf_url(url, with_file=True)
    repo, revision, filename = ref.repo, ref.revision, ref.file
    import huggingface_hub

    try:
        with hub_online():
            api = huggingface_hub.HfApi()
            if filename is None:
                filename = _Choice.among(api.list_repo_files(repo, revision=revision)).pick(url)
            info = huggingface_hub.get_hf_file_metadata(
                huggingface_hub.hf_hub_url(repo, filename, revision=revision)
            )
            if info.size is not None and info.size > cap.size:
                raise _too_big(url, info.size, cap)
            path = huggingface_hub.hf_hub_download(
                repo, filename, revision=revision, local_dir=staging / "hub"
            )
    except LoraError:
        raise
    except Exception as error:
        said = download.hide_urls(str(error))  # a presigned URL of the Hub's CDN, say
        raise LoraError(
            f"could not download the LoRA {url} from the Hugging Face Hub: {said}. Check "
            f"the repository, file and revision, and HF_TOKEN for a private repository."
        ) from None
    os.replace(path, dest)


def _lora_file(url: str, path: Path, staging: Path, cap: Cap) -> Path:
    """The downloaded file itself, or the LoRA file inside a downloaded tar."""
    size = path.stat().st_size
    if size > cap.size:
        raise _too_big(url, size, cap)
    kind = sniff(path)
    if kind == "safetensors":
        return path
    if kind == "tar":
        return _from_tar(url, path, staging / "member.safetensors", cap)
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


def _from_tar(url: str, path: Path, dest: Path, cap: Cap) -> Path:
    """Copy the LoRA member out of a tar: read as data, never extracted by its name.

    The tar is read once, front to back, through its decompressor. Nothing decompressed is
    staged but the member the pick would take among the names read so far (_Choice): a
    download stages at most the archive and one LoRA file, and what it stages counts
    against the cache's bound.
    """
    choice, files, copied = _Choice(), [], None
    try:
        with (
            _tar_stream(url, path, cap) as stream,
            tarfile.open(fileobj=stream, mode="r|", bufsize=download.READ_BYTES) as archive,
        ):
            for member in _members(url, archive):
                if not member.isfile():
                    continue
                files.append(member)
                if choice.add(member.name) == member.name and member.size <= cap.size:
                    with archive.extractfile(member) as source, dest.open("wb") as out:
                        shutil.copyfileobj(source, out, download.READ_BYTES)
                    copied = member
        name = choice.pick(url)
        member = next(m for m in files if m.name == name)
        if member.size > cap.size:
            raise _too_big(f"{url} ({name})", member.size, cap)
        assert copied is member  # the final pick was the choice when it was read
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as error:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise  # the disk is full, not the tar unreadable: the cache makes room
        if _compressed_safetensors(path):
            raise LoraError(
                f"the file at {url} is a compressed safetensors file, not a tar (an object "
                f"stored with Content-Encoding: gzip, say): serve the .safetensors file as it "
                f"is, or a tar of it."
            ) from None
        raise LoraError(f"the tar at {url} cannot be read: {error}") from None
    if sniff(dest) == "pickle":
        raise LoraError(f"{name} in {url} is a PyTorch pickle checkpoint: {_PICKLE_HINT}.")
    log.info(f"lora: using {name} from the tar at {url}")
    return dest


class _Choice:
    """Which file of a run's output is its LoRA: pytorch_lora_weights.safetensors nearest
    the top (the run's final weights, not a checkpoint-N/ copy), else the only .safetensors
    file.

    Kept one name at a time, so that a tar read once can stage the pick as it goes: the
    final pick is the choice at the time its name was added (no name before it wins over
    it, or it would not be the final pick).
    """

    def __init__(self) -> None:
        self.depth: int | None = None
        self.named: list[str] = []  # LORA_FILE_NAME at the least depth so far
        self.others: list[str] = []  # the other .safetensors files
        self.pickles: list[str] = []  # named for the error when there is no .safetensors

    @classmethod
    def among(cls, names: list[str]) -> _Choice:
        choice = cls()
        for name in names:
            choice.add(name)
        return choice

    def add(self, name: str) -> str | None:
        """Take `name` into account; the pick among the names so far, None if none is."""
        if name.rsplit("/", 1)[-1] == LORA_FILE_NAME:
            depth = name.strip("/").count("/")
            if self.depth is None or depth < self.depth:
                self.depth, self.named = depth, []
            if depth == self.depth:
                self.named.append(name)
        elif name.lower().endswith(".safetensors"):
            self.others.append(name)
        elif name.lower().endswith(PICKLE_SUFFIXES):
            self.pickles.append(name)
        unique = self.named if self.named else self.others
        return unique[0] if len(unique) == 1 else None

    def pick(self, url: str) -> str:
        """The LoRA among every name added; LoraError saying why there is none."""
        if self.named:
            if len(self.named) == 1:
                return self.named[0]
            raise LoraError(
                f"{url} holds several {LORA_FILE_NAME} at the same depth: {self.named[:5]}"
            )
        if len(self.others) == 1:
            return self.others[0]
        if not self.others:
            pickles = self.pickles[:5]
            found = f" (only pickle files: {pickles}; {_PICKLE_HINT})" if pickles else ""
            raise LoraError(f"{url} holds no .safetensors file{found}.")
        raise LoraError(
            f"{url} holds several .safetensors files and no {LORA_FILE_NAME}: "
            f"{self.others[:5]}; name the file in the URL."
        )


@contextlib.contextmanager
def _tar_stream(url: str, path: Path, cap: Cap) -> Iterator[_Bounded]:
    """The tar itself, decompressed as it is read where it is compressed, up to
    TAR_EXPANSION times the cap (beyond that, the listing alone would hold a CPU core long
    after the timeout, and a header in memory per entry)."""
    opener = _decompressor(path)
    limit = TAR_EXPANSION * cap.size
    refusal = LoraError(
        f"the tar at {url} decompresses to more than {download.human(limit)}, "
        f"{TAR_EXPANSION} times the {download.human(cap.size)} limit ({cap.setting}): send "
        f"the LoRA file itself, or a tar of the run's output folder without what compresses "
        f"that well"
    )
    with opener(path) if opener else path.open("rb") as source:
        yield _Bounded(source, limit, refusal)


def _decompressor(path: Path):
    """The opener of the compressed file at `path` (gzip.open, ...), or None."""
    with path.open("rb") as file:
        head = file.read(6)
    return next((o for magic, o in _COMPRESSED.items() if head.startswith(magic)), None)


def _compressed_safetensors(path: Path) -> bool:
    """Whether a compressed file that is no tar starts, decompressed, as a safetensors file."""
    opener = _decompressor(path)
    if opener is None:
        return False
    try:
        with opener(path) as source:
            start = source.read(9)
    except (EOFError, OSError, zlib.error, lzma.LZMAError):
        return False
    return len(start) == 9 and start[8:9] == b"{"


class _Bounded:
    """A file read front to back that raises `refusal` once more than `limit` bytes are read."""

    def __init__(self, source: BinaryIO, limit: int, refusal: LoraError):
        self._source, self._limit, self._refusal, self._read = source, limit, refusal, 0

    def read(self, size: int = -1) -> bytes:
        allowed = self._limit + 1 - self._read  # one byte more: passing the bound shows
        data = self._source.read(allowed if size < 0 else min(size, allowed))
        self._read += len(data)
        if self._read > self._limit:
            raise self._refusal
        return data


def _members(url: str, archive: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The tar's entries, at most MAX_TAR_MEMBERS."""
    for count, member in enumerate(archive, 1):
        if count > MAX_TAR_MEMBERS:
            raise LoraError(
                f"the tar at {url} holds more than {MAX_TAR_MEMBERS:,} entries: send the "
                f"LoRA file itself, or a tar of the run's output folder"
            )
        yield member


def _too_big(what: str, size: int, cap: Cap, at_least: bool = False) -> LoraError:
    more = "more than " if at_least else ""
    return LoraError(
        f"the LoRA at {what} is {more}{download.human(size)}, over the "
        f"{download.human(cap.size)} limit ({cap.setting}); {cap.advice}"
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
    if head.startswith(tuple(_COMPRESSED)) or head[257:262] == b"ustar":
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
