"""Fetch, verify and cache a variant's weights in setup(); a cache entry never lies.

For a source that is not a local directory:

1. A published entry whose completion marker is valid (same source and manifest, every
   recorded file still there at its recorded size; with COGVIDEOX_WEIGHTS_CHECK=sha256, at its
   recorded sha256 too) is used without any network.
2. Otherwise one process takes the entry's lock; others wait for it and use its result.
3. The holder downloads into a staging folder next to the entry (resuming an earlier attempt
   on the same file), verifies it (verify.py), fsyncs it, writes the marker recording what was
   verified, and renames the folder into place. Nothing else ever creates an entry, so an
   entry without a valid marker is only ever replaced, never loaded.
4. A marked entry that fails to load (load_weights) is discarded and fetched again, once.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path
from typing import TypeVar

from ..errors import BadSource, WeightsError
from ..variants import MODEL_ENV, Variant
from . import download
from .hub import hub_online, parse_hf_url
from .manifest import Manifest, load_manifest, sha256_file
from .untar import JOURNAL, Journal, extract
from .verify import check_contained, verify

__all__ = ["COMPLETE_MARKER", "WeightsError", "ensure_weights", "load_weights"]

log = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "COGVIDEOX_WEIGHTS_DIR"
WEIGHTS_URL_ENV = "COGVIDEOX_WEIGHTS_URL"
# "0": skip the fsyncs before the marker, for a cache on a disk that does not outlive the
# machine anyway (a container's own filesystem); the marker then only holds until a power cut.
FSYNC_ENV = "COGVIDEOX_WEIGHTS_FSYNC"
# "sha256": check every cached file's content against the sha256 its marker recorded, on every
# setup (reads all the weights); "size" (default): sizes only.
CHECK_ENV = "COGVIDEOX_WEIGHTS_CHECK"
CHECKS = ("size", "sha256")
HASH_THREADS = 4
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"  # the project root's
COMPLETE_MARKER = ".cogvideox-complete.json"
MARKER_FORMAT = 2
# What a hub snapshot needs: the pipeline index and the component folders (no README, media).
HF_PATTERNS = ["model_index.json", "*/*"]
HEADROOM_BYTES = 64 << 20  # free space kept beyond the download itself
LOCK_LOG_EVERY_S = 30.0
T = TypeVar("T")


@dataclass
class _Resolved:
    root: Path
    entry: Path | None = None  # the cache entry it is in (None: a local directory)
    source: str = ""
    marker: str | None = None  # the marker's text when the entry was already there


def ensure_weights(variant: Variant) -> Path:
    """Return a directory with the variant's diffusers weights, downloading them if needed."""
    return _ensure(variant).root


def load_weights(variant: Variant, load: Callable[[Path], T]) -> T:
    """load(ensure_weights(variant)), healing the cache: a marked entry that fails to load
    (bit rot or a bad copy that kept its sizes) is discarded and fetched again, once."""
    resolved = _ensure(variant)
    try:
        return load(resolved.root)
    except MemoryError:
        raise
    except Exception as error:
        if resolved.entry is None:
            raise  # the user's own folder, used in place: nothing to fetch again
        _discard_unchanged(resolved)
        if resolved.marker is None:  # fetched just now: the source itself is bad
            raise WeightsError(
                f"the weights just downloaded from {resolved.source} failed to load: "
                f"{error!r}. They were discarded. Check the source, or set {WEIGHTS_URL_ENV} "
                f"to another copy."
            ) from error
        log.warning(
            f"weights: {resolved.entry} passed its cache checks but failed to load "
            f"({error!r}): discarded, fetching it again"
        )
    resolved = _ensure(variant)
    try:
        return load(resolved.root)
    except MemoryError:
        raise
    except Exception as error:
        _discard_unchanged(resolved)
        raise WeightsError(
            f"the weights from {resolved.source} failed to load again after a fresh download: "
            f"{error!r}. They were discarded. The source itself is bad or is not "
            f"{variant.id}: check it, or set {WEIGHTS_URL_ENV} to another copy."
        ) from error


def _discard_unchanged(resolved: _Resolved) -> None:
    """Discard the entry that failed to load, unless another setup replaced it meanwhile."""
    assert resolved.entry is not None
    with _locked(resolved.entry.parent / f".{resolved.entry.name}.lock"):
        try:
            marker = (resolved.entry / COMPLETE_MARKER).read_text()
        except OSError:
            marker = None
        if resolved.marker is None or marker == resolved.marker:
            _discard(resolved.entry)


def _ensure(variant: Variant) -> _Resolved:
    manifest = load_manifest(variant.id)
    url = (os.environ.get(WEIGHTS_URL_ENV) or "").strip()
    if url and manifest.origin == "built-in":
        manifest = manifest.layout_only()  # its sizes and hashes describe its own sources
    sources = [url] if url else list(manifest.sources)
    if not sources:
        raise WeightsError(
            f"{variant.id} has no public weights tar. Set {WEIGHTS_URL_ENV} to "
            f"hf://{variant.hub_repo} to download it from the Hugging Face Hub, or to an "
            f"http(s) URL or local path of a tar, or a local directory, holding the diffusers "
            f"layout of {variant.hub_repo} (model_index.json at its root), or pick another "
            f"{MODEL_ENV}."
        )
    local = Path(sources[0]).expanduser()
    if len(sources) == 1 and local.is_dir():
        # Used in place, never copied: structure and sizes are checked on every setup, file
        # hashes are not (that would read every byte of the weights on each start).
        verified = verify(local, manifest, sources[0], hash_missing=False, in_place=True)
        return _Resolved(verified.root)

    check = content_check()
    cache_root = Path(os.environ.get(WEIGHTS_DIR_ENV) or DEFAULT_WEIGHTS_DIR)
    entry = cache_root / _entry_name(variant, sources, manifest)
    hashed: dict = {}  # sha256 computed by the first look, reused by the second
    root = _published(entry, sources, manifest, check, hashed)
    if root is not None:
        log.info(f"weights: using cached {root}")
        return _cached(root, entry)
    cache_root.mkdir(parents=True, exist_ok=True)
    with _locked(cache_root / f".{entry.name}.lock"):
        root = _published(entry, sources, manifest, check, hashed, explain=True)
        if root is not None:
            log.info(f"weights: using {root}, completed by another process while we waited")
            return _cached(root, entry)
        root = _reverified(entry, sources, manifest)
        if root is not None:
            return _cached(root, entry)
        _discard(entry)
        # Left by a process killed while deleting, or by the per-process staging folders
        # of earlier versions: never read, only removed.
        for leftover in cache_root.glob(f".{entry.name}.*-*"):
            if leftover.is_dir() and (".trash-" in leftover.name or ".partial-" in leftover.name):
                shutil.rmtree(leftover, ignore_errors=True)
        errors = []
        for number, source in enumerate(sources, 1):
            try:
                return _Resolved(_fetch(variant, source, entry, manifest, check), entry, source)
            except WeightsError as error:
                errors.append(error)
                if number < len(sources):
                    log.warning(f"weights: {error}\nweights: trying the next source")
        if len(errors) == 1:
            raise errors[0]
        raise WeightsError("every source failed:\n" + "\n".join(f"- {e}" for e in errors))


def content_check() -> str:
    value = (os.environ.get(CHECK_ENV) or "size").strip().lower()
    if value not in CHECKS:
        raise WeightsError(f"{CHECK_ENV}={value!r}: use one of {', '.join(CHECKS)}")
    return value


def _cached(root: Path, entry: Path) -> _Resolved:
    marker = _read_marker(entry) or {}
    text = (entry / COMPLETE_MARKER).read_text()
    return _Resolved(root, entry, marker.get("source", ""), text)


def _entry_name(variant: Variant, sources: list[str], manifest: Manifest) -> str:
    if manifest.origin == "built-in" and tuple(sources) == manifest.sources:
        return variant.id
    return f"{variant.id}-{sha256(' '.join(sources).encode()).hexdigest()[:12]}"


def _read_marker(entry: Path) -> dict | None:
    try:
        marker = json.loads((entry / COMPLETE_MARKER).read_text())
        return marker if isinstance(marker, dict) else None
    except (OSError, ValueError):
        return None


def _published(
    entry: Path,
    sources: list[str],
    manifest: Manifest,
    check: str = "size",
    hashed: dict | None = None,
    explain: bool = False,
) -> Path | None:
    """The model directory of a completed entry that is still what its marker says."""
    marker = _read_marker(entry)
    if marker is None:
        if explain and entry.exists():
            log.warning(f"weights: {entry} has no completion marker: replacing it")
        return None
    root = entry / marker.get("root", ".")
    problem = None
    if marker.get("format") != MARKER_FORMAT or marker.get("manifest") != manifest.digest:
        problem = "was verified against another manifest"
    elif marker.get("source") not in sources:
        problem = f"came from {marker.get('source')}"
    else:
        for rel, recorded in marker.get("files", {}).items():
            path = root / rel
            size = path.stat().st_size if path.is_file() else None
            if size != recorded["size"]:
                now = "is missing" if size is None else f"is {size:,} bytes"
                problem = f"changed since it was verified: {rel} {now}, was {recorded['size']:,}"
                break
    if not problem and check == "sha256":
        problem = _changed_content(root, marker.get("files", {}), {} if hashed is None else hashed)
    if problem:
        if explain:
            log.warning(f"weights: {entry} {problem}")
        return None
    return root


def _changed_content(root: Path, files: dict[str, dict], hashed: dict) -> str | None:
    """What differs from the sha256 the marker recorded (files hashed in parallel), or None."""
    recorded = {rel: f["sha256"] for rel, f in files.items() if f.get("sha256")}
    unknown = len(files) - len(recorded)
    if unknown:
        log.warning(
            f"weights: {unknown} of {len(files)} files in {root} have no recorded sha256 "
            f"(fetched by pget or from the Hub without {CHECK_ENV}=sha256, or by an older "
            f"version): only their sizes are checked"
        )
    started = time.monotonic()

    def digest(rel: str) -> str:
        path = root / rel
        stat = path.stat()
        key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key not in hashed:
            hashed[key] = sha256_file(path).hexdigest()
        return hashed[key]

    with ThreadPoolExecutor(min(HASH_THREADS, os.cpu_count() or 1)) as pool:
        found = dict(zip(recorded, pool.map(digest, recorded), strict=True))
    size = sum(files[rel]["size"] for rel in recorded)
    log.info(
        f"weights: sha256 of {len(recorded)} files ({download.human(size)}) checked in "
        f"{time.monotonic() - started:.1f} s ({CHECK_ENV}=sha256)"
    )
    for rel in sorted(recorded):
        if found[rel] != recorded[rel]:
            return (
                f"changed since it was verified: {rel} has sha256 {found[rel]}, was "
                f"{recorded[rel]} (same size: its bytes changed on disk)"
            )
    return None


def _reverified(entry: Path, sources: list[str], manifest: Manifest) -> Path | None:
    """Verify an entry with a stale marker (older format, other manifest) in place.

    Adding hashes to a manifest, or upgrading from an older marker, should not cost a
    20 GB download when the files on disk are right.
    """
    marker = _read_marker(entry)
    if marker is None or marker.get("source") not in sources:
        return None
    if marker.get("format") == MARKER_FORMAT and marker.get("manifest") == manifest.digest:
        return None  # current and failed its file check: replace it
    started = time.monotonic()
    try:
        verified = verify(entry, manifest, marker["source"])
    except WeightsError as error:
        log.warning(f"weights: {entry} no longer passes verification, replacing it: {error}")
        return None
    marker.update(_marker_fields(verified, entry, manifest))
    _write_marker(entry, marker)
    log.info(f"weights: re-verified {entry} in {time.monotonic() - started:.1f} s")
    return verified.root


def _fetch(variant: Variant, source: str, entry: Path, manifest: Manifest, check: str) -> Path:
    staging = entry.parent / f".{entry.name}.staging"
    phases: dict[str, float] = {}
    started = time.monotonic()
    log.info(f"weights: fetching {variant.id} from {source} into {entry}")
    try:
        if source.startswith("hf://"):
            _fetch_hub(source, staging)
            hashes = {}
        else:
            hashes = _fetch_tar(source, staging)
        phases["download"] = time.monotonic() - started
        mark = time.monotonic()
        verified = verify(staging, manifest, source, hashes)
        if check == "sha256":  # pget and the Hub give no hashes: read the files back
            _hash_unhashed(verified)
        phases["verify"] = time.monotonic() - mark
    except BadSource:
        _discard(staging)  # the bytes themselves are wrong: nothing worth resuming
        raise
    mark = time.monotonic()
    marker = {"format": MARKER_FORMAT, "variant": variant.id, "source": source}
    marker.update(_marker_fields(verified, staging, manifest))
    marker["seconds"] = {k: round(v, 3) for k, v in phases.items()}
    _publish(staging, entry, marker)
    phases["sync and publish"] = time.monotonic() - mark
    size = verified.size
    rate = size / max(phases["download"], 1e-9)
    # cog 0.23's current_scope() is a no-op scope during setup() (metrics exist only per
    # prediction), so the phase times are logged and kept in the marker instead.
    log.info(
        f"weights: {variant.id} ready in {time.monotonic() - started:.1f} s: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items())
        + f" ({download.human(size)} at {rate / 1e6:.0f} MB/s; checked: "
        + ", ".join(verified.checks)
        + ")"
    )
    return entry / verified.root.relative_to(staging)


def _hash_unhashed(verified) -> None:
    missing = [rel for rel, f in verified.files.items() if not f["sha256"]]
    with ThreadPoolExecutor(min(HASH_THREADS, os.cpu_count() or 1)) as pool:
        digests = pool.map(lambda rel: sha256_file(verified.root / rel).hexdigest(), missing)
        for rel, digest in zip(missing, digests, strict=True):
            verified.files[rel]["sha256"] = digest


def _fetch_tar(source: str, staging: Path) -> dict[str, str | None]:
    """Download and extract a tar into `staging`; sha256 of the files hashed on the way."""
    local = Path(source).expanduser()
    response = None
    if local.is_file():
        stat = local.stat()
        size, validator = stat.st_size, f"{stat.st_mtime_ns}-{stat.st_size}"
    elif source.startswith(("http://", "https://")):
        pget = shutil.which("pget")
        if pget:
            _fetch_pget(pget, source, staging)
            return {}
        remote, response = download.probe(source)
        size, validator = remote.size, remote.validator
    else:
        raise WeightsError(
            f"{WEIGHTS_URL_ENV}={source!r} is neither an http(s) URL, an hf:// repository nor "
            f"an existing file or directory."
        )
    journal = _resumable(staging, source, size, validator)
    if journal is None:
        _discard(staging)
        staging.mkdir(parents=True)
        journal = Journal(source, size, validator)
    resume_at = journal.resume_at(staging)
    _check_disk(staging.parent, size, resume_at, source)
    if not journal.done:

        def open_stream(start: int) -> download.Stream:
            if local.is_file():
                return download.open_file(local, start, f"extraction of {local}")
            return download.open_url(remote, response, start, f"download of {source}")

        # Always hashed: the marker records every file's sha256 for COGVIDEOX_WEIGHTS_CHECK.
        extract(open_stream, staging, journal, source, hash_files=True, durable=_durable())
    elif response is not None:
        response.close()
    return {name: f["sha256"] for name, f in journal.files.items()}


def _resumable(staging: Path, source: str, size: int | None, validator: str | None):
    """The journal of an earlier attempt to resume, or None (and the log says why not).

    Only bytes proven to be of the same file are kept: without a validator (ETag or
    Last-Modified) a file that changed on the server since would be published half old, half
    new, so the download starts again from byte 0.
    """
    journal = Journal.load(staging)
    if journal is None:
        return None
    at = journal.resume_at(staging)
    if not journal.same_file(source, size, validator):
        if journal.source == source and at:
            log.warning(
                f"weights: {source} changed on the server since the last attempt (size "
                f"{journal.size}, validator {journal.validator}; now {size}, {validator}): "
                f"starting again from byte 0, not from byte {at:,}"
            )
        return None
    if journal.done:
        return journal
    if validator is None:
        if at:
            log.warning(
                f"weights: {source} sends neither ETag nor Last-Modified, so the {at:,} bytes "
                f"already on disk cannot be proven to be of the file it serves now: starting "
                f"again from byte 0"
            )
        return None
    rest = f", {size - at:,} still to fetch" if size is not None else ""
    log.info(f"weights: resuming {source}: {at:,} bytes already on disk{rest}")
    return journal


def _fetch_pget(pget: str, url: str, staging: Path) -> None:
    """pget -x: Replicate's parallel downloader, extracting as it streams."""
    remote, response = download.probe(url)  # the size for the disk check; a clear 404
    if response is not None:
        response.close()
    _check_disk(staging.parent, remote.size, 0, url)
    # pget refuses an existing destination without -f; a fresh folder rather than -f also
    # keeps an earlier attempt's files out. pget does its own retries (no resume across runs).
    _discard(staging)
    log.info(f"weights: pget -x {url}")
    result = subprocess.run([pget, "-x", url, str(staging)], check=False)
    if result.returncode != 0:
        raise WeightsError(
            f"pget failed (exit {result.returncode}) fetching {url}; its log is above. Run "
            f"setup again, or take pget off PATH to use the built-in downloader."
        )
    check_contained(staging, url)


def _fetch_hub(source: str, staging: Path) -> None:
    """snapshot_download into the staging folder, which it resumes itself."""
    ref = parse_hf_url(source)
    if ref is None or ref.file is not None:
        raise WeightsError(
            f"{WEIGHTS_URL_ENV}={source!r} is not a Hugging Face Hub source: use "
            f"hf://org/repo or hf://org/repo@revision (a branch, tag or commit)"
        )
    repo, revision = ref.repo, ref.revision
    import huggingface_hub

    journal = Journal.resume(staging, source, None, revision)
    if journal is None:
        _discard(staging)
        staging.mkdir(parents=True)
        Journal(source, None, revision).save(staging)
    backend = "hf_xet" if importlib.util.find_spec("hf_xet") else "HTTP"
    log.info(f"weights: {repo}@{revision or 'main'} from the Hub ({backend} transfers)")
    kwargs = {
        "repo_id": repo,
        "revision": revision,
        "local_dir": staging,
        "allow_patterns": HF_PATTERNS,
    }
    try:
        with hub_online():
            plan = huggingface_hub.snapshot_download(**kwargs, dry_run=True)
            size = sum(f.file_size or 0 for f in plan)
            _check_disk(staging.parent, size, size - _pending(plan), source)
            huggingface_hub.snapshot_download(**kwargs)
    except WeightsError:
        raise
    except Exception as error:
        raise WeightsError(
            f"could not download {source} from the Hugging Face Hub: {error}. Check the "
            f"repository name and revision, and HF_TOKEN for a gated or private one; the next "
            f"setup resumes."
        ) from error
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # the hub's own download state
    check_contained(staging, source)


def _pending(plan) -> int:
    return sum(f.file_size or 0 for f in plan if f.will_download)


def _check_disk(folder: Path, total: int | None, done: int, source: str) -> None:
    if total is None:
        log.warning(f"weights: the size of {source} is unknown: free disk space not checked")
        return
    need = max(total - done, 0) + HEADROOM_BYTES
    free = shutil.disk_usage(folder).free
    if free < need:
        raise WeightsError(
            f"not enough disk space in {folder} for the weights from {source}: "
            f"{need / 1e9:.2f} GB needed ({total / 1e9:.2f} GB in all, {done / 1e9:.2f} GB "
            f"already downloaded, {HEADROOM_BYTES >> 20} MiB headroom), {free / 1e9:.2f} GB "
            f"free. Free up space or set {WEIGHTS_DIR_ENV} to a larger volume."
        )


def _marker_fields(verified, folder: Path, manifest: Manifest) -> dict:
    return {
        "root": verified.root.relative_to(folder).as_posix(),
        "manifest": manifest.digest,
        "manifest_origin": manifest.origin,
        "checks": verified.checks,
        "files": verified.files,
        "bytes": verified.size,
        "verified_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _write_marker(folder: Path, marker: dict) -> None:
    temp = folder / f"{COMPLETE_MARKER}.tmp"
    temp.write_text(json.dumps(marker, indent=2))
    _fsync(temp)
    temp.replace(folder / COMPLETE_MARKER)
    _fsync(folder)


def _publish(staging: Path, entry: Path, marker: dict) -> None:
    """Make the verified staging folder the entry in one rename, durable before it is."""
    (staging / JOURNAL).unlink(missing_ok=True)
    # On disk before the marker says so: after a power cut the marker must not outlive data.
    for folder, _, names in os.walk(staging):
        for name in names:
            if not os.path.islink(os.path.join(folder, name)):
                _fsync(Path(folder, name))
        _fsync(Path(folder))
    _write_marker(staging, marker)
    _discard(entry)
    staging.rename(entry)
    _fsync(entry.parent)


def _durable() -> bool:
    return os.environ.get(FSYNC_ENV, "1").strip() != "0"


def _fsync(path: Path) -> None:
    if not _durable():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Remove a folder; renamed aside first, so no half-deleted entry is ever seen."""
    if not os.path.lexists(path):
        return
    # Unique, not just the pid: containers reuse pids, and a killed delete leaves its trash.
    trash = path.with_name(f".{path.name.lstrip('.')}.trash-{os.getpid()}-{time.time_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`: one process fetches an entry, the others wait for it.

    fcntl.flock rather than the filelock package: filelock is not one of our pinned
    dependencies, and this is all it would do here. The kernel releases the lock when its
    holder exits or dies, so a killed setup never blocks the next one.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        last_log = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if last_log is None or now - last_log >= LOCK_LOG_EVERY_S:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "?"
                    log.info(f"weights: waiting for another setup to finish ({holder})")
                    last_log = now
                time.sleep(0.2)
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now(UTC):%H:%M:%S}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
