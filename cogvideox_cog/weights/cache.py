"""The weights cache on disk: entries, their completion markers, and publishing one safely.

An entry is a folder named after the variant and a digest of its sources and manifest. It is
published by one rename of a verified, fsynced staging folder that already holds its marker;
a marked entry is checked against its marker (sizes, and with COGVIDEOX_WEIGHTS_CHECK=sha256
the content) before each use. Writers take the entry's lock; a discarded entry goes to trash
first, so a reader never sees it half deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path

from ..errors import ConfigError, WeightsError
from ..files import replace_atomically
from ..settings import setting
from ..variants import Variant
from . import download
from .manifest import Manifest, sha256_file
from .untar import JOURNAL
from .verify import HIDDEN_PREFIX, check_contained, verify

log = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "COGVIDEOX_WEIGHTS_DIR"
CHECK_ENV = "COGVIDEOX_WEIGHTS_CHECK"

# "0": skip the fsyncs before the marker, for a cache on a disk that does not outlive the
# machine anyway (a container's own filesystem); the marker then only holds until a power cut.
FSYNC_ENV = "COGVIDEOX_WEIGHTS_FSYNC"
COMPLETE_MARKER = ".cogvideox-complete.json"
MARKER_FORMAT = 2
HEADROOM_BYTES = 64 << 20  # free space kept beyond the download itself
LOCK_LOG_EVERY_S = 30.0
HASH_THREADS = 4
# Another entry's leftovers untouched this long, and its lock free, are removed by any setup.
LEFTOVER_MAX_AGE_S = 24 * 3600


def entry_name(variant: Variant, sources: list[str], manifest: Manifest) -> str:
    if manifest.origin == "built-in" and tuple(sources) == manifest.sources:
        return variant.id
    return f"{variant.id}-{sha256(' '.join(sources).encode()).hexdigest()[:12]}"


def read_marker(entry: Path) -> dict | None:
    """The entry's marker, or None when it has none or one not of our making (the entry is
    then replaced like an unmarked one)."""
    try:
        marker = json.loads((entry / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if _well_formed(marker) else None


def _well_formed(marker) -> bool:
    if not isinstance(marker, dict) or not isinstance(marker.get("files", {}), dict):
        return False
    root = marker.get("root", ".")
    if not isinstance(root, str) or root.startswith("/") or ".." in Path(root).parts:
        return False
    return all(
        isinstance(f, dict)
        and type(f.get("size")) is int
        and (f.get("sha256") is None or isinstance(f.get("sha256"), str))
        for f in marker.get("files", {}).values()
    )


def published(
    entry: Path,
    sources: list[str],
    manifest: Manifest,
    check: str = "size",
    hashed: dict | None = None,
    explain: bool = False,
) -> Path | None:
    """The model directory of a completed entry that is still what its marker says."""
    marker = read_marker(entry)
    if marker is None:
        if explain and entry.exists():
            log.warning(f"weights: {entry} has no completion marker: replacing it")
        return None
    root = entry / marker.get("root", ".")
    problem = None
    if marker.get("format") != MARKER_FORMAT or marker.get("manifest") != manifest.digest:
        problem = "was verified against another manifest"
    elif marker.get("source") not in sources:
        problem = f"came from {download.shown(str(marker.get('source')))}"
    elif replaced(marker):
        problem = f"came from {marker['source']}, replaced at that path since: extracting it"
    else:
        problem = _changed(root, marker.get("files", {}), check, hashed)
    if problem:
        if explain:
            log.warning(f"weights: {entry} {problem}")
        return None
    return root


def replaced(marker: dict) -> bool:
    """Whether the local file the entry came from is another file now (see local_version);
    an entry whose marker recorded no version (an older one) is taken as it is."""
    recorded = marker.get("validator")
    current = download.local_version(str(marker.get("source")))
    return recorded is not None and current is not None and current != recorded


def _changed(root: Path, files: dict[str, dict], check: str, hashed: dict | None) -> str | None:
    """What differs from the sizes (and with check "sha256", the content) a marker recorded."""
    for rel, recorded in files.items():
        path = root / rel
        size = path.stat().st_size if path.is_file() else None
        if size != recorded["size"]:
            now = "is missing" if size is None else f"is {size:,} bytes"
            return f"changed since it was verified: {rel} {now}, was {recorded['size']:,}"
    if check == "sha256":
        return _changed_content(root, files, {} if hashed is None else hashed)
    return None


def intact(entry: Path) -> bool:
    """Whether every file of the entry still has the sha256 its marker recorded (False when
    the marker lacks one): if so, what failed to load was not the bytes on disk."""
    marker = read_marker(entry)
    files = (marker or {}).get("files", {})
    if not files or not all(f.get("sha256") for f in files.values()):
        return False
    return _changed(entry / marker.get("root", "."), files, "sha256", None) is None


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


def reverified(
    entry: Path, sources: list[str], manifest: Manifest, check: str = "size"
) -> Path | None:
    """Verify an entry with a stale marker (older format, other manifest) in place.

    Adding hashes to a manifest, or upgrading from an older marker, should not cost a
    20 GB download when the files on disk are right. What the old marker recorded still
    holds them to account: its sizes (and with check "sha256" its hashes) must still match,
    and its hashes are carried into the new marker.
    """
    marker = read_marker(entry)
    if marker is None or marker.get("source") not in sources or replaced(marker):
        return None
    if marker.get("format") == MARKER_FORMAT and marker.get("manifest") == manifest.digest:
        return None  # current and failed its file check: replace it
    started = time.monotonic()
    root, files = marker.get("root", "."), marker.get("files", {})
    problem = _changed(entry / root, files, check, None)
    if problem:
        log.warning(f"weights: {entry} {problem}: replacing it")
        return None
    hashes = {(Path(root) / rel).as_posix(): f.get("sha256") for rel, f in files.items()}
    try:
        verified = verify(entry, manifest, marker["source"], hashes)
    except WeightsError as error:
        log.warning(f"weights: {entry} no longer passes verification, replacing it: {error}")
        return None
    marker.update(marker_fields(verified, entry, manifest))
    try:
        write_marker(entry, marker)
    except OSError as error:  # a full volume, say: the files passed, so they are used
        log.warning(
            f"weights: re-verified {entry}, but could not update its marker "
            f"({error.strerror or error}): the next setup verifies it again"
        )
        return verified.root
    log.info(f"weights: re-verified {entry} in {time.monotonic() - started:.1f} s")
    return verified.root


def adopted(entry: Path, variant_id: str, sources: list[str], manifest: Manifest) -> Path | None:
    """Another complete entry's files of the same source, taken into `entry` when they pass
    `manifest`: the model directory, or None (the caller downloads).

    A manifest of one's own (or COGVIDEOX_WEIGHTS_URL set to the built-in source) names its
    entry apart from the built-in one's, and pinning the files already on disk would cost
    the whole download again. The files are hard-linked (no copy, no space) into a folder of
    their own, hashed, and held to the sha256 their entry recorded and to the manifest's;
    each file the manifest lists must meet one of them. The folder is published as a
    download is, with a fresh marker; anything that fails leaves no trace but the log, and a
    kill leaves the folder to remove_leftovers(). The other entry stays as it was.
    """
    for other in sorted(entry.parent.iterdir()):
        if other == entry or other.name.startswith(".") or not other.is_dir():
            continue
        marker = read_marker(other)
        if (
            marker is None
            or marker.get("format") != MARKER_FORMAT
            or marker.get("variant") != variant_id
            or marker.get("source") not in sources
            or replaced(marker)
        ):
            continue
        root = _adopt(other, marker, entry, manifest)
        if root is not None:
            return root
    return None


def _adopt(other: Path, marker: dict, entry: Path, manifest: Manifest) -> Path | None:
    started = time.monotonic()
    root, files = marker.get("root", "."), marker.get("files", {})
    problem = _changed(other / root, files, "size", None)
    if problem:
        log.warning(f"weights: not taking over {other}: it {problem}")
        return None
    staging = entry.parent / f".{entry.name}.adopting-{os.getpid()}-{time.time_ns()}"
    try:
        _link_tree(other, staging)
        check_contained(staging, str(other))
        hashes = _hash_files(staging)
        recorded = {(Path(root) / rel).as_posix(): f.get("sha256") for rel, f in files.items()}
        for path, digest in sorted(recorded.items()):
            if digest and hashes.get(path) != digest:
                raise WeightsError(f"{path} changed since it was verified")
        verified = verify(staging, manifest, str(other), hashes)
        prefix = verified.root.relative_to(staging)
        for rel, spec in sorted(manifest.files.items()):
            if not (spec.sha256 or recorded.get((prefix / rel).as_posix())):
                raise WeightsError(
                    f"{rel} has no sha256 to hold it to, neither recorded nor in the manifest"
                )
        new = {"format": MARKER_FORMAT, "variant": marker["variant"], "source": marker["source"]}
        if "validator" in marker:
            new["validator"] = marker["validator"]
        new.update(marker_fields(verified, staging, manifest))
        new["adopted_from"] = other.name
        new["seconds"] = {"adopt": round(time.monotonic() - started, 3)}
        # Checked once more after the hashing, which takes minutes: a tar replaced meanwhile
        # would be marked as its old version and served once before the next setup saw it.
        if replaced(marker):
            raise WeightsError(f"{marker['source']} was replaced at its path during the take-over")
        publish(staging, entry, new)
    except (OSError, WeightsError) as error:
        log.warning(f"weights: cannot take over the files of {other} ({error}): downloading")
        return None
    finally:
        discard(staging)  # gone already where it was published
    log.info(
        f"weights: took over the files of {other} into {entry} (hard links, every file hashed "
        f"and checked) in {time.monotonic() - started:.1f} s"
    )
    return entry / prefix


def _link_tree(source: Path, target: Path) -> None:
    """`source`'s files hard-linked into a new folder `target` (its links copied as links),
    without our own marker and journal."""
    target.mkdir()
    for folder, dirs, names in _walk(source):
        here = target / Path(folder).relative_to(source)
        for name in dirs + names:
            path, made = Path(folder, name), here / name
            if path.is_symlink():
                made.symlink_to(os.readlink(path))
            elif path.is_dir():
                made.mkdir()
            elif not name.startswith(HIDDEN_PREFIX):
                os.link(path, made)


def _walk(folder: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk that raises on a folder it cannot list (one removed meanwhile, say) rather
    than passing over it: a take-over then fails naming that folder, not later on a file it
    calls changed."""

    def fail(error: OSError) -> None:
        raise error

    return os.walk(folder, onerror=fail)


def _hash_files(folder: Path) -> dict[str, str]:
    """The sha256 of every file under `folder` (a link's target's, as verify() reads it), by
    path relative to it."""
    paths = [
        Path(top, name)
        for top, _, names in _walk(folder)
        for name in names
        if os.path.isfile(os.path.join(top, name))
    ]
    with ThreadPoolExecutor(min(HASH_THREADS, os.cpu_count() or 1)) as pool:
        digests = pool.map(lambda path: sha256_file(path).hexdigest(), paths)
        return {
            path.relative_to(folder).as_posix(): digest
            for path, digest in zip(paths, digests, strict=True)
        }


def check_disk(folder: Path, total: int | None, done: int, source: str) -> None:
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


def marker_fields(verified, folder: Path, manifest: Manifest) -> dict:
    return {
        "root": verified.root.relative_to(folder).as_posix(),
        "manifest": manifest.digest,
        "manifest_origin": manifest.origin,
        "checks": verified.checks,
        "files": verified.files,
        "bytes": verified.size,
        "verified_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_marker(folder: Path, marker: dict) -> None:
    replace_atomically(folder / COMPLETE_MARKER, json.dumps(marker, indent=2), fsync=fsync)


def publish(staging: Path, entry: Path, marker: dict) -> None:
    """Make the verified staging folder the entry in one rename, durable before it is.

    The journal stays until the rename: a setup killed or failing before it (while the
    files are synced, on a disk full at the marker) leaves a staging folder whose journal
    says it is complete, and the next setup publishes it instead of downloading it again.
    A write that fails (a disk full at the marker, or reported only by an fsync, as network
    volumes do) is a WeightsError that says what to do.
    """
    try:
        # On disk before the marker says so: after a power cut the marker must not outlive
        # data.
        for folder, _, names in os.walk(staging):
            for name in names:
                if not os.path.islink(os.path.join(folder, name)):
                    fsync(Path(folder, name))
            fsync(Path(folder))
        write_marker(staging, marker)
        discard(entry)
        staging.rename(entry)
        fsync(entry.parent)
    except OSError as error:
        raise WeightsError(
            f"could not publish the weights in {staging}: {error.strerror or error}. Free "
            f"disk space or set {WEIGHTS_DIR_ENV} to another volume, then run setup again."
        ) from error
    (entry / JOURNAL).unlink(missing_ok=True)  # hidden, never listed: harmless if left


def durable() -> bool:
    value = setting(FSYNC_ENV, "1")
    if value not in ("0", "1"):
        raise ConfigError(f"{FSYNC_ENV}={value!r}: use 1 (the default) or 0 to skip the fsyncs")
    return value == "1"


def fsync(path: Path) -> None:
    if not durable():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(path: Path) -> None:
    """Remove a folder; renamed aside first, so no half-deleted entry is ever seen."""
    if not os.path.lexists(path):
        return
    # Unique, not just the pid: containers reuse pids, and a killed delete leaves its trash.
    trash = path.with_name(f".{path.name.lstrip('.')}.trash-{os.getpid()}-{time.time_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(entry: Path) -> None:
    """Delete what killed processes left beside `entry`: the trash of a discard killed before
    its rmtree ended (of the entry or its staging folder), the links of an adoption
    (adopted()), and the per-process staging folders of earlier versions. Never read, only
    removed; the caller holds the entry's lock. The other entries' leftovers go too, once
    abandoned (_remove_abandoned)."""
    for leftover in _leftovers(entry.parent, entry.name):
        shutil.rmtree(leftover, ignore_errors=True)
    _remove_abandoned(entry)


def _leftovers(folder: Path, name: str) -> list[Path]:
    kinds = (".trash-", ".partial-", ".adopting-")
    return [
        leftover
        for leftover in folder.glob(f".{name}.*-*")
        if leftover.is_dir() and any(kind in leftover.name for kind in kinds)
    ]


def _remove_abandoned(entry: Path) -> None:
    """The leftovers of the other entries beside `entry` that nothing has changed for
    LEFTOVER_MAX_AGE_S, removed under their own entry's lock, taken without waiting.

    An entry that is never set up again (another variant now, another manifest, another
    URL after a download broke) would keep its leftovers for good, and trash or an
    unfinished download can be a whole entry. Several machines may share the
    volume: a pid in a name says nothing about another machine's processes, while the lock
    is held by whoever works on that entry, on any machine whose locks the volume shares
    (as every setup of one entry already relies on). The age covers a volume whose locks
    another machine does not see (NFS mounted with local_lock, some FUSE filesystems): a
    take-over changes its folder within minutes, never a day. An entry without a lock file
    was never set up by a version that leaves these: its folders are left alone.
    """
    cutoff = time.time() - LEFTOVER_MAX_AGE_S
    for lock in entry.parent.glob(".*.lock"):
        other = lock.name[1 : -len(".lock")]
        if other == entry.name:
            continue
        found = _leftovers(entry.parent, other)
        if (staging := entry.parent / f".{other}.staging").is_dir():
            found.append(staging)  # a download left unfinished when its source was changed
        try:
            stale = [leftover for leftover in found if _last_change(leftover) < cutoff]
        except OSError:  # removed meanwhile by a setup of that entry
            continue
        if not stale:
            continue
        with _taken_now(lock) as taken:
            if not taken:  # being set up now, or a lock this volume will not give
                continue
            for leftover in stale:
                shutil.rmtree(leftover, ignore_errors=True)
                log.info(f"weights: removed {leftover.name}, left by a setup of {other}")


def _last_change(folder: Path) -> float:
    """When `folder` last changed: a download's journal is rewritten as it goes, while the
    folder's own time moves only when an entry is added at its top."""
    journal = folder / JOURNAL
    return max(folder.stat().st_mtime, journal.stat().st_mtime if journal.exists() else 0.0)


def entry_lock(entry: Path) -> AbstractContextManager[None]:
    """locked() on the entry's lock file, beside it: the one every fetcher of it takes."""
    return locked(entry.parent / f".{entry.name}.lock")


@contextmanager
def _taken_now(path: Path) -> Iterator[bool]:
    """An exclusive lock on the existing lock file `path` if no one holds it: True while
    held, False (nothing held) when another process holds it or it cannot be taken."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)  # NFS locks exclusively only for writing
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held; ENOLCK and the like: unknown, so held
            yield False
        else:
            yield True
    finally:
        os.close(fd)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`: one process fetches an entry, the others wait for it.

    fcntl.flock rather than the filelock package: filelock is not one of our pinned
    dependencies, and this is all it would do here. The kernel releases the lock when its
    holder exits or dies, so a killed setup never blocks the next one.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        writable = True
    except PermissionError:  # left by a setup under another user id: flock needs no write
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        writable = False
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
            except OSError as error:  # NFS whose lock service fails (ENOLCK), some FUSE
                raise WeightsError(
                    f"cannot lock {path}: {error.strerror or error}. The lock keeps setups "
                    f"that share the volume from writing the same weights at once. Enable "
                    f"file locks on that volume (NFS 4 has them built in; NFS 3 needs the "
                    f"lock service on client and server), or set {WEIGHTS_DIR_ENV} to a "
                    f"folder on a disk that has them."
                ) from error
        if writable:
            since = datetime.now(UTC)
            holder = f"pid {os.getpid()} on {socket.gethostname()} since {since:%H:%M:%S}"
            # Only a hint for a waiting setup's log: a full volume's ENOSPC is left to the
            # disk-space check that follows, which says what to do.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder.encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
