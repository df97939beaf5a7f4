"""Fetch, verify and cache a variant's weights in setup(); a cache entry never lies.

For a source that is not a local directory:

1. A published entry whose completion marker is valid (same source and manifest, every
   recorded file still there at its recorded size) is used without any network.
2. Otherwise one process takes the entry's lock; others wait for it and use its result.
3. The holder downloads into a staging folder next to the entry (resuming an earlier attempt
   on the same file), verifies it (verify.py), fsyncs it, writes the marker recording what was
   verified, and renames the folder into place. Nothing else ever creates an entry, so an
   entry without a valid marker is only ever replaced, never loaded.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path

from . import download
from .manifest import BadSource, Manifest, WeightsError, load_manifest
from .untar import JOURNAL, Journal, extract
from .variants import MODEL_ENV, Variant
from .verify import check_contained, verify

__all__ = ["COMPLETE_MARKER", "WeightsError", "ensure_weights"]

log = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "COGVIDEOX_WEIGHTS_DIR"
WEIGHTS_URL_ENV = "COGVIDEOX_WEIGHTS_URL"
# "0": skip the fsyncs before the marker, for a cache on a disk that does not outlive the
# machine anyway (a container's own filesystem); the marker then only holds until a power cut.
FSYNC_ENV = "COGVIDEOX_WEIGHTS_FSYNC"
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
COMPLETE_MARKER = ".cogvideox-complete.json"
MARKER_FORMAT = 2
HEADROOM_BYTES = 64 << 20  # free space kept beyond the download itself
LOCK_LOG_EVERY_S = 30.0
# What a hub snapshot needs: the pipeline index and the component folders (no README, media).
HF_PATTERNS = ["model_index.json", "*/*"]
_HF_URL = re.compile(r"hf://([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@([^\s@]+))?/?")


def ensure_weights(variant: Variant) -> Path:
    """Return a directory with the variant's diffusers weights, downloading them if needed."""
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
        return verify(local, manifest, sources[0], hash_missing=False, in_place=True).root

    cache_root = Path(os.environ.get(WEIGHTS_DIR_ENV) or DEFAULT_WEIGHTS_DIR)
    entry = cache_root / _entry_name(variant, sources, manifest)
    root = _published(entry, sources, manifest)
    if root is not None:
        log.info(f"weights: using cached {root}")
        return root
    cache_root.mkdir(parents=True, exist_ok=True)
    with _locked(cache_root / f".{entry.name}.lock"):
        root = _published(entry, sources, manifest, explain=True)
        if root is not None:
            log.info(f"weights: using {root}, completed by another process while we waited")
            return root
        root = _reverified(entry, sources, manifest)
        if root is not None:
            return root
        _discard(entry)
        # Left by a process killed while deleting, or by the per-process staging folders
        # of earlier versions: never read, only removed.
        for leftover in cache_root.glob(f".{entry.name}.*-*"):
            if leftover.is_dir() and (".trash-" in leftover.name or ".partial-" in leftover.name):
                shutil.rmtree(leftover, ignore_errors=True)
        errors = []
        for number, source in enumerate(sources, 1):
            try:
                return _fetch(variant, source, entry, manifest)
            except WeightsError as error:
                errors.append(error)
                if number < len(sources):
                    log.warning(f"weights: {error}\nweights: trying the next source")
        if len(errors) == 1:
            raise errors[0]
        raise WeightsError("every source failed:\n" + "\n".join(f"- {e}" for e in errors))


def parse_hf_url(source: str) -> tuple[str, str | None]:
    """hf://org/repo[@revision] -> ("org/repo", revision or None)."""
    match = _HF_URL.fullmatch(source)
    if not match:
        raise WeightsError(
            f"{WEIGHTS_URL_ENV}={source!r} is not a Hugging Face Hub source: use "
            f"hf://org/repo or hf://org/repo@revision (a branch, tag or commit)"
        )
    return match[1], match[2]


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
    entry: Path, sources: list[str], manifest: Manifest, explain: bool = False
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
    if problem:
        if explain:
            log.warning(f"weights: {entry} {problem}")
        return None
    return root


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


def _fetch(variant: Variant, source: str, entry: Path, manifest: Manifest) -> Path:
    staging = entry.parent / f".{entry.name}.staging"
    phases: dict[str, float] = {}
    started = time.monotonic()
    log.info(f"weights: fetching {variant.id} from {source} into {entry}")
    try:
        if source.startswith("hf://"):
            _fetch_hub(source, staging)
            hashes = {}
        else:
            hashes = _fetch_tar(source, staging, manifest)
        phases["download"] = time.monotonic() - started
        mark = time.monotonic()
        verified = verify(staging, manifest, source, hashes)
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


def _fetch_tar(source: str, staging: Path, manifest: Manifest) -> dict[str, str | None]:
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
    journal = Journal.resume(staging, source, size, validator)
    if journal is None:
        _discard(staging)
        staging.mkdir(parents=True)
        journal = Journal(source, size, validator)
    elif not journal.done:
        log.info(f"weights: resuming at byte {journal.bytes_done:,} of {size or 0:,}")
    _check_disk(staging.parent, size, journal.bytes_done, source)
    if not journal.done:

        def open_stream(start: int) -> download.Stream:
            if local.is_file():
                return download.open_file(local, start, f"extraction of {local}")
            return download.open_url(remote, response, start, f"download of {source}")

        hash_files = any(spec.sha256 for spec in manifest.files.values())
        extract(open_stream, staging, journal, source, hash_files, durable=_durable())
    elif response is not None:
        response.close()
    return {name: f["sha256"] for name, f in journal.files.items()}


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
    repo, revision = parse_hf_url(source)
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
