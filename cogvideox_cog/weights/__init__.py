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
4. A marked entry that fails to load (load_weights) is discarded and fetched again, once,
   unless its files still have the sha256 its marker recorded: then the fault is elsewhere
   (an ImportError, a diffusers that cannot read them) and the weights are kept.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .. import leftovers
from ..errors import BadSource, ConfigError, WeightsError
from ..settings import folder_from_env, setting
from ..variants import MODEL_ENV, Variant
from . import cache, download
from .cache import CHECK_ENV, COMPLETE_MARKER, WEIGHTS_DIR_ENV
from .hub import hub_online, parse_hf_url
from .manifest import Manifest, load_manifest, sha256_file
from .untar import Journal, extract
from .verify import check_contained, verify

__all__ = [
    "COMPLETE_MARKER",
    "WeightsError",
    "check_settings",
    "ensure_weights",
    "load_weights",
    "weights_root",
]

log = logging.getLogger(__name__)

WEIGHTS_URL_ENV = "COGVIDEOX_WEIGHTS_URL"
# "sha256": check every cached file's content against the sha256 its marker recorded, on every
# setup (reads all the weights); "size" (default): sizes only.
CHECKS = ("size", "sha256")
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"  # the project root's
# What a hub snapshot needs: the pipeline index and the component folders (no README, media).
HF_PATTERNS = ("model_index.json", "*/*")
PR_SET_PDEATHSIG = 1  # prctl(2)
# pget gives up on a connect or TLS handshake, not on a body that stops coming: it is stopped
# once the staging folder stops growing for this many COGVIDEOX_WEIGHTS_TIMEOUTs (5 minutes
# by default; the built-in downloader retries a connection after one, and gives up after 5).
PGET_STALL_TIMEOUTS = 5
T = TypeVar("T")


@dataclass
class Resolved:
    """Weights found or fetched for a load: where they are, and the cache entry they are in."""

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
    return load_healing(lambda: _ensure(variant), load, WEIGHTS_URL_ENV, f"not {variant.id}")


def load_healing(
    resolve: Callable[[], Resolved], load: Callable[[Path], T], setting: str, expected: str
) -> T:
    """load(resolve().root), and once more after a fresh fetch when a cached entry fails to
    load for a reason its bytes may be (see _keep_if_not_the_files). setting: the env var
    that names the source; expected: what a bad source may be instead ("not cogvideox-5b")."""
    resolved = resolve()
    try:
        return load(resolved.root)
    except (MemoryError, ConfigError):
        raise  # the machine's or a setting's fault: a new copy of the same bytes fails alike
    except Exception as error:
        if resolved.entry is None:
            raise  # the user's own folder, used in place: nothing to fetch again
        _keep_if_not_the_files(resolved, error)
        discarded = _discard_unchanged(resolved)
        if resolved.marker is None:  # fetched just now: the source itself is bad
            raise WeightsError(
                f"the weights just downloaded from {download.shown(resolved.source)} failed to "
                f"load: {error!r}. They were discarded. Check the source, or set {setting} to "
                f"another copy."
            ) from error
        done = (
            "discarded, fetching it again"
            if discarded
            else "another setup replaced it meanwhile: loading its copy"
        )
        log.warning(
            f"weights: {resolved.entry} passed its cache checks but failed to load "
            f"({error!r}): {done}"
        )
    resolved = resolve()
    try:
        return load(resolved.root)
    except (MemoryError, ConfigError):
        raise
    except Exception as error:
        _keep_if_not_the_files(resolved, error)
        _discard_unchanged(resolved)
        raise WeightsError(
            f"the weights from {download.shown(resolved.source)} failed to load again after a "
            f"fresh download: {error!r}. They were discarded. The source itself is bad or is "
            f"{expected}: check it, or set {setting} to another copy."
        ) from error


def _keep_if_not_the_files(resolved: Resolved, error: Exception) -> None:
    """Raise, keeping the entry, when the load failed for a reason other than its bytes.

    Discarding a 20 GB entry that is fine costs a download, and on a volume seeded for an
    offline machine the weights themselves, for an error a new copy cannot fix.
    """
    assert resolved.entry is not None
    advice = (
        "Check the installed packages, and that the weights are a model the installed "
        "diffusers and transformers read."
    )
    if isinstance(error, ImportError):
        why = "an ImportError is about the installed packages, not the weights"
    elif _out_of_memory(error):
        why = "running out of memory is about the machine, not the weights"
        advice = "Give the machine more memory, or stop what else holds it."
    elif resolved.marker is not None and cache.intact(resolved.entry):
        why = "every file still has the sha256 recorded when it was downloaded"
    else:
        return
    raise WeightsError(
        f"the weights in {resolved.entry} failed to load: {error!r}. They were kept: {why}. "
        f"{advice}"
    ) from error


def _out_of_memory(error: Exception) -> bool:
    """torch reports a failed allocation as a RuntimeError ("DefaultCPUAllocator: can't
    allocate memory", or its OutOfMemoryError), not as a MemoryError."""
    if isinstance(error, OSError):
        return error.errno == errno.ENOMEM
    said = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in said or "out of memory" in said
    )


def _discard_unchanged(resolved: Resolved) -> bool:
    """Discard the entry that failed to load, unless another setup replaced it meanwhile;
    whether it was discarded."""
    assert resolved.entry is not None
    with cache.entry_lock(resolved.entry):
        try:
            marker = (resolved.entry / COMPLETE_MARKER).read_text()
        except OSError:
            marker = None
        if resolved.marker is None or marker == resolved.marker:
            cache.discard(resolved.entry)
            return True
    return False


def check_settings(variant: Variant) -> Manifest:
    """The variant's manifest, once every weights setting (downloader, cache, content check,
    manifest) has been checked: on every start, not only on one that downloads, and before
    anything is fetched. ConfigError or WeightsError naming the variable."""
    download.timeout_s()
    download.connections()
    cache.durable()
    content_check()
    return load_manifest(variant.id)


def _ensure(variant: Variant) -> Resolved:
    manifest = check_settings(variant)
    url = setting(WEIGHTS_URL_ENV)
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
    check = content_check()
    local = Path(sources[0]).expanduser()
    folders = [source for source in sources if Path(source).expanduser().is_dir()]
    if len(sources) > 1 and folders:  # before a download that falls back on it
        raise WeightsError(
            f"the weights source {folders[0]} is a directory, one of {len(sources)} sources: "
            f"a directory is used in place only as the one source. Make it the only one "
            f"({WEIGHTS_URL_ENV}, or the manifest's sources), or list a tar of it."
        )
    if len(sources) == 1 and local.is_dir():
        # Used in place, never copied: structure and sizes are checked on every setup, the
        # manifest's hashes only with COGVIDEOX_WEIGHTS_CHECK=sha256 (that reads every byte of
        # the weights on each start, which the operator asked for).
        hashed = check == "sha256"
        verified = verify(local, manifest, sources[0], hash_missing=hashed, in_place=True)
        return Resolved(verified.root)

    cache_root = weights_root()
    # The cache knows a source by its identity: a presigned URL renewed is the same file.
    keys = [download.identity(source) for source in sources]
    entry = cache_root / cache.entry_name(variant, keys, manifest)
    hashed: dict = {}  # sha256 computed by the first look, reused by the second
    root = cache.published(entry, keys, manifest, check, hashed)
    if root is not None:
        log.info(f"weights: using cached {root}")
        return from_cache(root, entry)
    if not writable(cache_root):
        cache.published(entry, keys, manifest, check, hashed, explain=True)  # logs why
        raise not_writable(cache_root, "the weights", explained=True)
    cache_root.mkdir(parents=True, exist_ok=True)
    with cache.entry_lock(entry):
        root = cache.published(entry, keys, manifest, check, hashed, explain=True)
        if root is not None:
            log.info(f"weights: using {root}, completed by another process while we waited")
            return from_cache(root, entry)
        root = cache.reverified(entry, keys, manifest, check)
        if root is not None:
            return from_cache(root, entry)
        cache.discard(entry)
        cache.remove_leftovers(entry)
        root = cache.adopted(entry, variant.id, keys, manifest)
        if root is not None:
            return from_cache(root, entry)
        errors = []
        for number, source in enumerate(sources, 1):
            try:
                return Resolved(_fetch(variant, source, entry, manifest, check), entry, source)
            except WeightsError as error:
                errors.append(error)
                if number < len(sources):
                    log.warning(f"weights: {error}\nweights: trying the next source")
        if len(errors) == 1:
            raise errors[0]
        raise WeightsError("every source failed:\n" + "\n".join(f"- {e}" for e in errors))


def writable(folder: Path) -> bool:
    """Whether `folder` (or the parent it would be made in) can be written: a read-only
    volume otherwise fails at the lock with a bare PermissionError or EROFS."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return os.access(existing, os.W_OK | os.X_OK)


def not_writable(folder: Path, what: str, explained: bool = False) -> WeightsError:
    """The error for a cache `folder` that `what` must be fetched into but cannot be written;
    explained: the log above says why the cached copy was not taken."""
    why = " (the log above says why, if an entry is there)" if explained else ""
    return WeightsError(
        f"the weights cache {folder} is not writable, and {what} must be fetched into it{why}. "
        f"Mount it read-write, or set {WEIGHTS_DIR_ENV} to a writable folder."
    )


def weights_root() -> Path:
    """The weights cache folder (COGVIDEOX_WEIGHTS_DIR); the compile cache lives there too."""
    return folder_from_env(WEIGHTS_DIR_ENV, DEFAULT_WEIGHTS_DIR)


def content_check() -> str:
    value = setting(CHECK_ENV, "size").lower()
    if value not in CHECKS:
        raise ConfigError(f"{CHECK_ENV}={value!r}: use one of {', '.join(CHECKS)}")
    return value


def from_cache(root: Path, entry: Path) -> Resolved:
    """A published entry, with its marker as it was when found (see _discard_unchanged)."""
    marker = cache.read_marker(entry) or {}
    text = (entry / COMPLETE_MARKER).read_text()
    return Resolved(root, entry, marker.get("source", ""), text)


def _fetch(variant: Variant, source: str, entry: Path, manifest: Manifest, check: str) -> Path:
    staging = entry.parent / f".{entry.name}.staging"
    phases: dict[str, float] = {}
    started = time.monotonic()
    shown = download.shown(source)
    log.info(f"weights: fetching {variant.id} from {shown} into {entry}")
    version = download.local_version(source)  # before the copy: a change during it shows later
    try:
        if source.startswith("hf://"):
            fetch_hub(source, staging)
            hashes = {}
        else:
            hashes = fetch_tar(source, staging)
        phases["download"] = time.monotonic() - started
        mark = time.monotonic()
        verified = verify(staging, manifest, shown, hashes)
        if check == "sha256":  # pget and the Hub give no hashes: read the files back
            hash_unhashed(verified)
        phases["verify"] = time.monotonic() - mark
    except BadSource:
        cache.discard(staging)  # the bytes themselves are wrong: nothing worth resuming
        raise
    mark = time.monotonic()
    marker = {"format": cache.MARKER_FORMAT, "variant": variant.id}
    marker["source"] = download.identity(source)  # never a presigned URL's signature
    if version is not None:
        marker["validator"] = version
    marker.update(cache.marker_fields(verified, staging, manifest))
    marker["seconds"] = {k: round(v, 3) for k, v in phases.items()}
    cache.publish(staging, entry, marker)
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


def hash_unhashed(verified) -> None:
    """Fill in the sha256 of the files `verified` holds none for (pget's and the Hub's),
    reading them back in parallel: for a marker that COGVIDEOX_WEIGHTS_CHECK=sha256 holds."""
    missing = [rel for rel, f in verified.files.items() if not f["sha256"]]
    with ThreadPoolExecutor(min(cache.HASH_THREADS, os.cpu_count() or 1)) as pool:
        digests = pool.map(lambda rel: sha256_file(verified.root / rel).hexdigest(), missing)
        for rel, digest in zip(missing, digests, strict=True):
            verified.files[rel]["sha256"] = digest


def fetch_tar(source: str, staging: Path, setting: str = WEIGHTS_URL_ENV) -> dict[str, str | None]:
    """Download and extract a tar into `staging`; sha256 of the files hashed on the way.

    Also used for the prompt-enhancement model (weights/causal_lm.py). `setting`: the
    variable that gives the source, named by an error when it cannot be downloaded.
    """
    local = Path(source).expanduser()
    response = None
    shown = download.shown(source)
    if local.is_file():
        stat = local.stat()
        size, validator = stat.st_size, download.local_validator(stat)
    elif download.is_http(source):
        if problem := download.url_problem(source):
            raise WeightsError(f"the weights URL {shown} {problem}.")
        pget = shutil.which("pget")
        if pget and _fetch_pget(pget, source, staging, setting):
            return {}
        remote, response = _probe(source, setting)
        size, validator = remote.size, remote.validator
    else:
        raise WeightsError(
            f"{WEIGHTS_URL_ENV}={shown!r} is neither an http(s) URL, an hf:// repository nor "
            f"an existing file or directory."
        )
    key = download.identity(source)  # a renewed presigned URL resumes the same download
    journal = _resumable(staging, key, size, validator, shown)
    if journal is None:
        cache.discard(staging)
        staging.mkdir(parents=True)
        journal = Journal(key, size, validator)
    resume_at = journal.resume_at(staging)
    cache.check_disk(staging.parent, size, resume_at, shown)
    if not journal.done:

        def open_stream(start: int) -> download.Stream:
            if local.is_file():
                return download.open_file(local, start, f"extraction of {local}")
            return download.open_url(remote, response, start, f"download of {shown}")

        # Hashed as written: the marker records every file's sha256 for COGVIDEOX_WEIGHTS_CHECK.
        extract(open_stream, staging, journal, shown, durable=cache.durable())
    elif response is not None:
        response.close()
    # Each member was vetted as it came, but a later symlink can redirect an earlier one.
    check_contained(staging, shown)
    return {name: f["sha256"] for name, f in journal.files.items()}


def _resumable(staging: Path, source: str, size: int | None, validator: str | None, shown: str):
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
                f"weights: {shown} changed on the server since the last attempt (size "
                f"{journal.size}, validator {journal.validator}; now {size}, {validator}): "
                f"starting again from byte 0, not from byte {at:,}"
            )
        return None
    if journal.done:
        return journal
    if validator is None:
        if at:
            log.warning(
                f"weights: {shown} sends neither ETag nor Last-Modified, so the {at:,} bytes "
                f"already on disk cannot be proven to be of the file it serves now: starting "
                f"again from byte 0"
            )
        return None
    rest = f", {size - at:,} still to fetch" if size is not None else ""
    log.info(f"weights: resuming {shown}: {at:,} bytes already on disk{rest}")
    return journal


def _probe(url: str, setting: str):
    """download.probe(url), its error naming the variable to change: the URL alone does not
    say where it came from (a built-in manifest's, or COGVIDEOX_WEIGHTS_URL)."""
    try:
        return download.probe(url)
    except WeightsError as error:
        raise WeightsError(
            f"{error}. Check the URL and the network, or set {setting} to another copy."
        ) from error


def _fetch_pget(pget: str, url: str, staging: Path, setting: str) -> bool:
    """pget -x: Replicate's parallel downloader, extracting as it streams. False when pget
    left PATH since it was found there: the built-in downloader fetches the tar then, as
    it does when pget was never there."""
    shown = download.shown(url)
    remote, response = _probe(url, setting)  # the size for the disk check; a clear 404
    if response is not None:
        response.close()
    # pget refuses an existing destination without -f; a fresh folder rather than -f also
    # keeps an earlier attempt's files out. pget does its own retries (no resume across runs),
    # so those files are freed before the disk check, which counts the whole tar.
    cache.discard(staging)
    cache.check_disk(staging.parent, remote.size, 0, shown)
    log.info(f"weights: pget -x {shown}")
    stall_s = PGET_STALL_TIMEOUTS * download.timeout_s()
    stalled = threading.Event()
    # pget logs the whole URL (a presigned one's signature too): its log is passed on with
    # the query strings hidden, never straight to the server's.
    try:
        process = subprocess.Popen(
            [pget, "-x", url, str(staging)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            preexec_fn=_ends_with_this_process(),
        )
    except FileNotFoundError:
        log.warning(
            f"weights: pget ({pget}) is gone since it was found on PATH: using the built-in "
            f"downloader"
        )
        return False
    except OSError as error:  # not executable after all, or not a program this machine runs
        raise WeightsError(
            f"pget ({pget}) could not be started: {error.strerror}. Fix or remove it, or take "
            f"it off PATH to use the built-in downloader."
        ) from error
    with process:
        watchdog = threading.Thread(
            target=_stop_when_stalled, args=(process, staging, stall_s, stalled), daemon=True
        )
        watchdog.start()
        try:
            for line in process.stdout:
                log.info(f"weights: pget: {download.hide_urls(line.rstrip())}")
        except BaseException:  # as subprocess.run: no pget left writing into the staging
            process.kill()
            raise
    if stalled.is_set():
        raise WeightsError(
            f"pget received nothing for {stall_s:g} s ({PGET_STALL_TIMEOUTS} x "
            f"{download.TIMEOUT_ENV}) fetching {shown} and was stopped. Run setup again, or "
            f"take pget off PATH to use the built-in downloader, which resumes."
        )
    if process.returncode != 0:
        raise WeightsError(
            f"pget failed (exit {process.returncode}) fetching {shown}; its log "
            f"is above. Run setup again, or take pget off PATH to use the built-in downloader."
        )
    check_contained(staging, shown)
    return True


def _stop_when_stalled(
    process: subprocess.Popen, folder: Path, stall_s: float, stalled: threading.Event
) -> None:
    """Kill `process` once `folder` has not grown for `stall_s` seconds, and say so in
    `stalled`: pget extracts as it streams, so its bytes on disk are its progress."""
    size, grew = -1, time.monotonic()
    while True:
        try:
            process.wait(timeout=min(5.0, stall_s / 5))
            return
        except subprocess.TimeoutExpired:
            pass
        now = leftovers.folder_size(folder)
        if now != size:
            size, grew = now, time.monotonic()
        elif time.monotonic() - grew > stall_s:
            log.warning(f"weights: pget received nothing for {stall_s:g} s: stopping it")
            stalled.set()
            process.kill()
            return


def _ends_with_this_process() -> Callable[[], None] | None:
    """For Popen's preexec_fn: the child is killed when this process dies, SIGKILL included.

    pget does not hold the entry's lock (its descriptor is close-on-exec): orphaned by a
    setup that the OOM killer took, it would go on writing into the staging folder that the
    next setup, on another worker sharing the volume, empties and fills with its own pget.
    prctl(PR_SET_PDEATHSIG) fires when the thread that started the child ends; that thread
    waits here for pget to end, so it ends only with the process.
    """
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)  # Linux only
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return preexec


def fetch_hub(source: str, staging: Path, patterns: tuple[str, ...] = HF_PATTERNS) -> None:
    """snapshot_download of the files matching `patterns` into the staging folder, which it
    resumes itself."""
    ref = parse_hf_url(source)
    if ref is None or ref.file is not None:
        raise WeightsError(
            f"{WEIGHTS_URL_ENV}={download.shown(source)!r} is not a Hugging Face Hub source: use "
            f"hf://org/repo or hf://org/repo@revision (a branch, tag or commit)"
        )
    repo, revision = ref.repo, ref.revision
    import huggingface_hub

    journal = Journal.resume(staging, source, None, revision)
    if journal is None:
        cache.discard(staging)
        staging.mkdir(parents=True)
        Journal(source, None, revision).save(staging)
    backend = "hf_xet" if importlib.util.find_spec("hf_xet") else "HTTP"
    log.info(f"weights: {repo}@{revision or 'main'} from the Hub ({backend} transfers)")
    kwargs = {
        "repo_id": repo,
        "revision": revision,
        "local_dir": staging,
        "allow_patterns": list(patterns),
    }
    try:
        with hub_online():
            plan = huggingface_hub.snapshot_download(**kwargs, dry_run=True)
            size = sum(f.file_size or 0 for f in plan)
            cache.check_disk(staging.parent, size, size - _pending(plan), source)
            huggingface_hub.snapshot_download(**kwargs)
    except WeightsError:
        raise
    except Exception as error:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            # Not the repository's fault: the disk filled after the check above (another
            # download on the same volume, or a file whose size the Hub did not say).
            raise WeightsError(
                f"could not write the files from {source} into {staging}: {error.strerror}. "
                f"Free disk space or set {WEIGHTS_DIR_ENV} to another volume; the next setup "
                f"resumes."
            ) from None
        said = download.hide_urls(str(error))  # a presigned URL of the Hub's CDN, say
        raise WeightsError(
            f"could not download {source} from the Hugging Face Hub: {said}. Check the "
            f"repository name and revision, and HF_TOKEN for a gated or private one; the next "
            f"setup resumes."
        ) from None  # the error's own text (in a traceback) may hold a presigned URL
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # the hub's own download state
    check_contained(staging, source)


def _pending(plan) -> int:
    return sum(f.file_size or 0 for f in plan if f.will_download)
