"""setup()'s weights step: verified, atomic, resumable downloads and a cache that never lies.

Every download test runs against a real HTTP server on 127.0.0.1 (tests/file_server.py)
serving tars of a real tiny diffusers pipeline, and injects one fault at a time. For each,
setup either recovers with weights identical to the served ones or fails with an error
naming what failed, and no cache entry is ever marked complete when it is not.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import traceback
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest

from cogvideox_cog import files, weights
from cogvideox_cog.errors import BadSource, ConfigError, WeightsError
from cogvideox_cog.variants import VARIANTS
from cogvideox_cog.weights import (
    COMPLETE_MARKER,
    download,
    ensure_weights,
    hub_online,
    parse_hf_url,
    untar,
)
from cogvideox_cog.weights import cache as cache_module
from cogvideox_cog.weights import manifest as manifest_module
from cogvideox_cog.weights.manifest import (
    MANIFEST_DIR,
    FileSpec,
    Manifest,
    load_manifest,
    manifest_of_directory,
    sha256_file,
)
from cogvideox_cog.weights.manifest import main as manifest_main
from cogvideox_cog.weights.untar import JOURNAL
from cogvideox_cog.weights.verify import (
    check_contained,
    check_safetensors,
    check_shard_index,
    verify,
)
from tests.file_server import FileServer
from tests.hub_server import SIGNATURE, HubServer

PROJECT = Path(__file__).resolve().parent.parent
VARIANT = VARIANTS["cogvideox-5b"]
BIG = "transformer/diffusion_pytorch_model.safetensors"  # the largest member of the tiny tar
ABSOLUTE = "/cogvideox-weights-test-absolute.txt"


# Fixtures: one tiny pipeline, its tars, a server, an empty cache.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from cogvideox_cog.devtools.tiny import save_tiny_weights

    return save_tiny_weights(tmp_path_factory.mktemp("tiny") / "pipeline", "1.0", "t2v")


def _tar(path: Path, directory: Path, prefix: str = "", extra=()) -> Path:
    """`directory` as a tar (model_index.json at the top), plus `extra` (TarInfo, bytes)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for file in sorted(directory.rglob("*")):
            archive.add(file, arcname=prefix + str(file.relative_to(directory)), recursive=False)
        for info, data in extra:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, data: bytes | None = b"x", **attrs) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data) if data is not None else 0
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def _data_offset(tar: Path, name: str) -> tuple[int, int]:
    """(offset of the member's data in the tar, its size)."""
    with tarfile.open(tar) as archive:
        member = archive.getmember(name)
        return member.offset_data, member.size


@pytest.fixture(scope="module")
def served_dir(tiny, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    _tar(root / "model.tar", tiny)
    _tar(root / "wrapped.tar", tiny, prefix="model_cache/")
    return root


@pytest.fixture
def served(served_dir):
    server = FileServer(served_dir)
    yield server
    server.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(cache))
    for name in ("COGVIDEOX_WEIGHTS_URL", "COGVIDEOX_WEIGHTS_MANIFEST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_TIMEOUT", "5")
    monkeypatch.setattr(weights.shutil, "which", lambda name, **kw: None)  # built-in downloader
    monkeypatch.setattr(download, "BACKOFF_S", 0.01)
    monkeypatch.setattr(download, "RETRIES", 3)
    return cache


def _same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    theirs = sorted(
        p.relative_to(b) for p in b.rglob("*") if p.is_file() and not p.name.startswith(".")
    )
    return files == theirs and all(
        sha256_file(a / f).digest() == sha256_file(b / f).digest() for f in files
    )


def _markers(cache: Path) -> list[Path]:
    """Every completion marker under the cache: where one is, weights are claimed."""
    return list(cache.rglob(COMPLETE_MARKER)) if cache.exists() else []


def _nothing_published(cache: Path) -> bool:
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")] if cache.exists() else []
    return not entries and not _markers(cache)


# The basics: download, reuse, layout.


def test_http_tar_is_downloaded_verified_and_marked_complete(served, cache, tiny, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    root = ensure_weights(VARIANT)
    assert _same_tree(tiny, root)
    marker = json.loads((root / COMPLETE_MARKER).read_text())
    assert marker["source"] == served.url("model.tar")
    assert {"layout", "configs", "safetensors", "shard indexes"} <= set(marker["checks"])
    assert marker["files"][BIG]["size"] == (tiny / BIG).stat().st_size
    assert set(marker["seconds"]) == {"download", "verify"}
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [root.name]


def test_cached_weights_are_reused_without_any_network(served, cache, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    first = ensure_weights(VARIANT)
    sent = served.bytes_sent
    served.stop()  # a second setup must not need the server at all
    assert ensure_weights(VARIANT) == first
    assert served.bytes_sent == sent


def test_a_tar_wrapping_one_folder_is_found_inside_it(served, cache, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("wrapped.tar"))
    root = ensure_weights(VARIANT)
    assert root.name == "model_cache"
    assert (root / "model_index.json").is_file()
    assert ensure_weights(VARIANT) == root  # and its marker is found again


def test_a_missing_url_names_the_url(served, cache, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("nope.tar"))
    with pytest.raises(
        WeightsError, match=r"could not download http://127.0.0.1:\d+/nope.tar.*404"
    ):
        ensure_weights(VARIANT)
    assert _nothing_published(cache)


@pytest.mark.parametrize("downloader", ["built-in", "pget"])
def test_a_url_that_cannot_be_downloaded_names_the_setting(
    served, cache, tmp_path, monkeypatch, downloader, request
):
    """A built-in manifest's URL can 404 too: the error says which setting gives another."""
    if downloader == "pget":
        request.getfixturevalue("fake_pget")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("nope.tar"))
    expected = r"nope.tar: HTTP 404 Not Found\. .*set COGVIDEOX_WEIGHTS_URL to another copy"
    with pytest.raises(WeightsError, match=expected):
        ensure_weights(VARIANT)


def test_a_local_tar_is_extracted_into_the_cache(served_dir, cache, tiny, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(served_dir / "model.tar"))
    root = ensure_weights(VARIANT)
    assert root.parent == cache
    assert _same_tree(tiny, root)


def test_a_local_tar_replaced_at_its_path_is_extracted_again(tiny, tmp_path, cache, monkeypatch):
    """New weights baked into an image at the same path (or a cache volume that outlived the
    old image) were taken for the cached ones: the old weights served, with no sign of it."""
    tar = _tar(tmp_path / "model.tar", tiny)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(tar))
    root = ensure_weights(VARIANT)
    newer = _replace_tar(tar, tiny, tmp_path)
    assert ensure_weights(VARIANT) == root
    assert _same_tree(newer, root)
    tar.unlink()  # gone from its path: the cached copy stands
    assert ensure_weights(VARIANT) == root


def _replace_tar(tar: Path, tiny: Path, tmp_path: Path) -> Path:
    """Put a tar of other weights (same file sizes) at `tar`'s path; the folder it holds."""
    newer = shutil.copytree(tiny, tmp_path / "newer")
    scheduler = newer / "scheduler/scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "steps_offset": 1}))
    _tar(tmp_path / "model.tar.new", newer)
    os.replace(tmp_path / "model.tar.new", tar)
    return newer


def test_a_local_directory_is_used_in_place_and_checked(tiny, tmp_path, cache, monkeypatch):
    local = shutil.copytree(tiny, tmp_path / "local")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(local))
    assert ensure_weights(VARIANT) == local
    assert not cache.exists()
    (local / "vae/config.json").unlink()
    with pytest.raises(WeightsError, match=r"vae/config\.json: missing"):
        ensure_weights(VARIANT)


@pytest.mark.parametrize("asked", ["sha256", "SHA256"])
def test_a_directory_used_in_place_is_held_to_its_manifests_sha256_when_asked(
    tiny, tmp_path, cache, monkeypatch, asked
):
    """COGVIDEOX_WEIGHTS_CHECK=sha256 checked cached entries only: a pinned directory whose
    bytes changed at the same size loaded, the operator's check silently skipped. The value
    is read in any case, as the hash is."""
    local = shutil.copytree(tiny, tmp_path / "local")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(local))
    _pin(local, tmp_path, monkeypatch)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_CHECK", asked)
    assert ensure_weights(VARIANT) == local
    _flip(local / BIG, (local / BIG).stat().st_size - 1)
    with pytest.raises(WeightsError, match=rf"{BIG}: sha256 \w+, the manifest says"):
        ensure_weights(VARIANT)


def test_a_directory_used_in_place_is_held_to_sizes_only_unless_sha256_is_asked(
    tiny, tmp_path, cache, monkeypatch
):
    """Hashing reads every byte of the weights (20 GB) on each start: only when asked."""
    local = shutil.copytree(tiny, tmp_path / "local")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(local))
    _pin(local, tmp_path, monkeypatch)
    _flip(local / BIG, (local / BIG).stat().st_size - 1)
    assert ensure_weights(VARIANT) == local


def test_a_directory_among_several_sources_is_refused_before_any_download(
    served, tiny, tmp_path, cache, monkeypatch
):
    """Only a sole directory is used in place. One among a manifest's sources was tried as a
    tar once the sources before it failed, and refused as "neither ... nor an existing file
    or directory": a fallback that could never work, found only when it was needed."""
    local = shutil.copytree(tiny, tmp_path / "local")
    _pin(local, tmp_path, monkeypatch, served.url("model.tar"), str(local))
    with pytest.raises(WeightsError, match=rf"{local} is a directory, one of 2 sources"):
        ensure_weights(VARIANT)
    assert served.bytes_sent == 0


def test_a_damaged_directory_used_in_place_is_named_to_be_fixed(tiny, tmp_path, cache, monkeypatch):
    """It is the user's own folder: it is not dropped and fetched again, as a download is."""
    local = shutil.copytree(tiny, tmp_path / "local")
    (local / "vae/config.json").unlink()
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(local))
    with pytest.raises(WeightsError) as failed:
        ensure_weights(VARIANT)
    assert f"Fix {local}, or set COGVIDEOX_WEIGHTS_URL" in str(failed.value)
    assert "not published" not in str(failed.value)


def test_a_directory_that_is_not_a_pipeline_is_refused(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(tmp_path))
    with pytest.raises(WeightsError, match=r"no model_index\.json"):
        ensure_weights(VARIANT)


def test_a_variant_without_public_tar_says_how_to_supply_weights(cache):
    expected = r"cogvideox-2b has no public weights tar.*hf://THUDM/CogVideoX-2b"
    with pytest.raises(WeightsError, match=expected):
        ensure_weights(VARIANTS["cogvideox-2b"])


def test_a_changed_source_does_not_reuse_another_sources_cache(served, cache, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    first = ensure_weights(VARIANT)
    sent = served.bytes_sent
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("wrapped.tar"))
    second = ensure_weights(VARIANT)
    assert second != first
    # The new source's own files, fetched: not the other entry's, taken over or in place.
    assert second.name == "model_cache" and served.bytes_sent > sent


# A cache that never lies.


def test_an_entry_without_completion_marker_is_replaced(served, cache, tiny, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    root = ensure_weights(VARIANT)
    (root / COMPLETE_MARKER).unlink()
    (root / BIG).write_bytes(b"half")
    sent = served.bytes_sent
    root = ensure_weights(VARIANT)
    assert served.bytes_sent > sent
    assert _same_tree(tiny, root)


def test_leftovers_of_killed_or_older_setups_are_removed(served, cache, tiny, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_FSYNC", "0")  # and the no-fsync path works
    name = f"cogvideox-5b-{hashlib.sha256(served.url('model.tar').encode()).hexdigest()[:12]}"
    for leftover in (f".{name}.partial-123", f".{name}.trash-456", f".{name}.adopting-7-8"):
        (cache / leftover / "transformer").mkdir(parents=True)
    root = ensure_weights(VARIANT)
    assert _same_tree(tiny, root)
    assert sorted(p.name for p in cache.iterdir()) == sorted([name, f".{name}.lock"])


def _leftovers_of_another_entry(cache: Path, age_s: float) -> list[Path]:
    """What a setup of another entry killed part way leaves: its lock file, a take-over's
    folder of links and a discard's trash, last changed `age_s` ago."""
    cache.mkdir(parents=True, exist_ok=True)
    (cache / ".cogvideox-2b-0123456789ab.lock").write_text("pid 7 on another-host")
    folders = [cache / ".cogvideox-2b-0123456789ab.adopting-7-8", cache / ".cogvideox-2b.trash-9-1"]
    (cache / ".cogvideox-2b.lock").touch()
    for folder in folders:
        (folder / "transformer").mkdir(parents=True)
        os.utime(folder, (time.time() - age_s,) * 2)
    return folders


def test_another_entrys_leftovers_a_day_old_are_removed_when_no_one_holds_it(
    served, cache, monkeypatch
):
    """An entry never set up again (another variant or manifest now) kept them for good."""
    leftovers = _leftovers_of_another_entry(cache, age_s=25 * 3600)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    ensure_weights(VARIANT)
    assert not any(folder.exists() for folder in leftovers)


def test_another_entrys_leftovers_less_than_a_day_old_are_kept(served, cache, monkeypatch):
    """On a volume whose locks another machine does not see, the age alone tells a killed
    setup's folder from one a setup there is still working in."""
    leftovers = _leftovers_of_another_entry(cache, age_s=23 * 3600)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    ensure_weights(VARIANT)
    assert all(folder.is_dir() for folder in leftovers)


def test_another_entrys_leftovers_are_kept_while_a_setup_holds_its_lock(served, cache, monkeypatch):
    """A machine sharing the volume may be working in them: its pid means nothing here."""
    leftovers = _leftovers_of_another_entry(cache, age_s=25 * 3600)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    with (cache / ".cogvideox-2b-0123456789ab.lock").open("r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        ensure_weights(VARIANT)
    assert leftovers[0].is_dir()
    assert not leftovers[1].exists()  # another entry's, whose lock is free


def _abandoned_download(served, cache, monkeypatch, age_s: float, journal_age_s: float) -> Path:
    """A download of model.tar that broke part way, its staging folder last changed `age_s`
    ago and its journal `journal_age_s` ago; then the source is changed to mirror.tar."""
    tar = Path(served.directory) / "model.tar"
    shutil.copy(tar, Path(served.directory) / "mirror.tar")
    offset, length = _data_offset(tar, BIG)
    served.truncate_after("model.tar", offset + length // 2)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    with pytest.raises(WeightsError, match="connection closed"):
        ensure_weights(VARIANT)
    staging = next(cache.glob(".*.staging"))
    os.utime(staging / JOURNAL, (time.time() - journal_age_s,) * 2)
    os.utime(staging, (time.time() - age_s,) * 2)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("mirror.tar"))
    return staging


def test_an_unfinished_download_of_another_source_a_day_old_is_removed(served, cache, monkeypatch):
    """Its source changed after a download broke, the staging folder (up to a whole entry's
    size) was kept for good, and on a volume with room for one copy the next source failed
    on disk space."""
    staging = _abandoned_download(
        served, cache, monkeypatch, age_s=25 * 3600, journal_age_s=25 * 3600
    )
    ensure_weights(VARIANT)
    assert not staging.exists()


def test_an_unfinished_download_whose_journal_moved_within_a_day_is_kept(
    served, cache, monkeypatch
):
    """The folder's own time moves only when a member is added at its top; the journal is
    rewritten as the download goes."""
    staging = _abandoned_download(served, cache, monkeypatch, age_s=25 * 3600, journal_age_s=3600)
    ensure_weights(VARIANT)
    assert staging.is_dir()


def test_a_damaged_entry_is_replaced_even_beside_trash_left_under_this_pid(
    served, cache, tiny, monkeypatch
):
    """A container's pids repeat: a delete killed in an earlier life left this pid's trash."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    root = ensure_weights(VARIANT)
    (root / BIG).write_bytes(b"damaged")
    (cache / f".{root.name}.trash-{os.getpid()}" / "transformer").mkdir(parents=True)
    assert _same_tree(tiny, ensure_weights(VARIANT))
    assert sorted(p.name for p in cache.iterdir()) == sorted([root.name, f".{root.name}.lock"])


def test_a_file_changed_after_publishing_is_noticed_and_replaced(served, cache, tiny, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    root = ensure_weights(VARIANT)
    with (root / BIG).open("r+b") as file:
        file.truncate(100)
    sent = served.bytes_sent
    assert _same_tree(tiny, ensure_weights(VARIANT))
    assert served.bytes_sent > sent


def _flip(path: Path, offset: int) -> None:
    """Flip the bits of one byte in place: bit rot, the file keeps its size."""
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 0xFF]))


def test_flipped_bytes_at_the_same_size_are_found_by_the_content_check(
    served, cache, tiny, monkeypatch, caplog
):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    root = ensure_weights(VARIANT)
    recorded = json.loads((root / COMPLETE_MARKER).read_text())["files"]
    assert all(recorded[rel]["sha256"] == sha256_file(root / rel).hexdigest() for rel in recorded)
    _flip(root / BIG, (root / BIG).stat().st_size - 10)  # deep in tensor data
    sent = served.bytes_sent
    assert ensure_weights(VARIANT) == root  # by default sizes only (README: what is checked)
    assert served.bytes_sent == sent
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_CHECK", "sha256")
    caplog.set_level("INFO", logger="cogvideox_cog")
    assert _same_tree(tiny, ensure_weights(VARIANT))
    assert served.bytes_sent > sent
    assert f"{BIG} has sha256" in caplog.text and "same size: its bytes changed" in caplog.text
    sent = served.bytes_sent
    assert ensure_weights(VARIANT) == root  # an intact entry passes the check
    assert served.bytes_sent == sent


def test_a_read_only_cache_that_needs_a_download_says_so_and_why(
    served, cache, monkeypatch, caplog
):
    """As root (the Cog image's user) a read-only mount is the kernel's EROFS, which only
    os.access reports before a write: it stands in here for such a mount."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    root = ensure_weights(VARIANT)
    with (root / BIG).open("r+b") as file:
        file.truncate(100)
    real_access = os.access
    monkeypatch.setattr(
        weights.os, "access", lambda p, mode: Path(p) != cache and real_access(p, mode)
    )
    with pytest.raises(WeightsError, match=r"weights cache .* is not writable.*Mount it"):
        ensure_weights(VARIANT)
    assert f"changed since it was verified: {BIG} is 100 bytes" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens any file read-write")
def test_a_lock_file_left_by_another_user_still_locks(tmp_path):
    lock = tmp_path / ".entry.lock"
    lock.write_text("pid 1 on another host")
    lock.chmod(0o444)
    with cache_module.locked(lock):
        assert lock.read_text() == "pid 1 on another host"


def test_a_cache_volume_without_file_locks_fails_setup_saying_so(served, cache, monkeypatch):
    """NFS mounted without its lock manager answers flock with ENOLCK, some FUSE volumes
    with ENOSYS: it stands in here for such a mount."""

    def flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(cache_module.fcntl, "flock", flock)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    with pytest.raises(
        WeightsError, match=r"cannot lock .*No locks available.*set COGVIDEOX_WEIGHTS_DIR"
    ):
        ensure_weights(VARIANT)
    assert served.requests == []


def test_an_unknown_content_check_is_refused(cache, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_CHECK", "md5")
    with pytest.raises(ConfigError, match=r"COGVIDEOX_WEIGHTS_CHECK='md5': use one of size"):
        ensure_weights(VARIANT)


@pytest.fixture
def generator_env(cache, monkeypatch, tmp_path):
    """What VideoGenerator.from_env reads, for the tiny pipeline; a TMPDIR of the test's own."""
    import tempfile

    for name in ("COGVIDEOX_MODEL", "COGVIDEOX_RESOLUTION", "COGVIDEOX_COMPILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COGVIDEOX_OFFLOAD", "none")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return temp


def _damage_header(path: Path) -> None:
    """Same size, and verify's structure check still passes: an unknown dtype name."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length].replace(b'"dtype":"F32"', b'"dtype":"X32"', 1)
    assert header != data[8 : 8 + length]
    path.write_bytes(data[:8] + header + data[8 + length :])


def test_a_cached_entry_that_fails_to_load_is_fetched_again_once(
    served, cache, tiny, generator_env, monkeypatch, caplog
):
    from cogvideox_cog.generator import VideoGenerator

    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    root = ensure_weights(VARIANT)
    _damage_header(root / BIG)
    sent = served.bytes_sent
    generator = VideoGenerator.from_env("t2v")
    assert generator.pipe.transformer is not None
    assert served.bytes_sent - sent == (Path(served.directory) / "model.tar").stat().st_size + 1
    assert _same_tree(tiny, root)
    assert "passed its cache checks but failed to load" in caplog.text


def test_weights_that_fail_to_load_again_after_the_refetch_fail_setup_clearly(
    served_dir, tmp_path, cache, tiny, generator_env, monkeypatch
):
    from cogvideox_cog.generator import VideoGenerator

    directory = tmp_path / "host"
    directory.mkdir()
    tar = Path(shutil.copy(served_dir / "model.tar", directory / "model.tar"))
    server = FileServer(directory)
    try:
        monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", server.url("model.tar"))
        _damage_header(ensure_weights(VARIANT) / BIG)
        bad = shutil.copytree(tiny, tmp_path / "bad")  # and the host now serves a bad copy
        _damage_header(bad / BIG)
        _tar(directory / "bad.tar", bad)
        os.replace(directory / "bad.tar", tar)
        with pytest.raises(WeightsError, match=r"failed to load again after a fresh download"):
            VideoGenerator.from_env("t2v")
    finally:
        server.stop()
    assert not _markers(cache)  # discarded: the next setup does not trust it


def _fails_with(error: Exception):
    def load(root: Path):
        raise error

    return load


def test_an_intact_cached_entry_that_fails_to_load_is_kept(served, cache, monkeypatch):
    """Every file still has its recorded sha256: a new copy would fail the same way."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    root = ensure_weights(VARIANT)
    sent = served.bytes_sent
    expected = r"failed to load: KeyError\('norm'\)\. They were kept: every file still has"
    with pytest.raises(WeightsError, match=expected):
        weights.load_weights(VARIANT, _fails_with(KeyError("norm")))
    assert served.bytes_sent == sent
    assert _markers(cache) == [root / COMPLETE_MARKER]


def _put_in_place_by_another_setup(root: Path) -> None:
    """The entry's marker rewritten as another setup's fresh copy would leave it: pget's,
    with no sha256 recorded."""
    marker = json.loads((root / COMPLETE_MARKER).read_text())
    for file in marker["files"].values():
        file["sha256"] = None
    (root / COMPLETE_MARKER).write_text(json.dumps(marker))


def test_an_entry_another_setup_replaced_while_this_one_failed_to_load_is_not_discarded(
    served, cache, monkeypatch, caplog
):
    """Its marker changed between this setup's look and its failed load: the entry is the
    other setup's fresh copy (pget's here, with no sha256 recorded), loaded as it is."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    root = ensure_weights(VARIANT)
    loads = []

    def replaced_meanwhile(loaded: Path) -> Path:
        loads.append(loaded)
        if len(loads) == 1:
            _put_in_place_by_another_setup(root)
            raise KeyError("norm")
        return loaded

    sent = served.bytes_sent
    assert weights.load_weights(VARIANT, replaced_meanwhile) == root
    assert loads == [root, root]
    assert served.bytes_sent == sent
    assert _markers(cache) == [root / COMPLETE_MARKER]
    assert "another setup replaced it meanwhile: loading its copy" in caplog.text
    assert "discarded, fetching it again" not in caplog.text


def test_a_replacing_copy_that_fails_to_load_too_names_its_source(served, cache, monkeypatch):
    """The entry another setup put in place meanwhile failed as well: the error names the
    source that copy came from (its marker's), the place to look."""
    url = served.url("model.tar")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", url)
    root = ensure_weights(VARIANT)
    loads = []

    def replaced_meanwhile_and_bad_too(loaded: Path) -> Path:
        loads.append(loaded)
        if len(loads) == 1:
            _put_in_place_by_another_setup(root)
        raise KeyError("norm")

    with pytest.raises(WeightsError, match=rf"the weights from {re.escape(url)} failed to load"):
        weights.load_weights(VARIANT, replaced_meanwhile_and_bad_too)
    assert loads == [root, root]


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "just-downloaded"])
def test_weights_are_kept_when_loading_fails_on_a_missing_package(
    served, cache, monkeypatch, cached
):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    if cached:
        ensure_weights(VARIANT)
    missing = ImportError("T5Tokenizer requires the SentencePiece library")
    with pytest.raises(WeightsError, match=r"They were kept: an ImportError is about the"):
        weights.load_weights(VARIANT, _fails_with(missing))
    assert len(_markers(cache)) == 1


def _runs_out_of_host_memory(root: Path):
    """A load that asks for more RAM than the machine has: torch's own error, a RuntimeError."""
    import torch

    torch.empty(1 << 50, dtype=torch.uint8)


def _maps_more_than_the_machine_has(root: Path):
    """A load that maps more than memory allows (safetensors maps its files): mmap's OSError
    ENOMEM, not a MemoryError."""
    import mmap

    mmap.mmap(-1, 1 << 50)


def _runs_out_of_gpu_memory(root: Path):
    """A load onto a GPU without room for the weights: torch raises its OutOfMemoryError, a
    RuntimeError, with this text (no GPU here to run out of)."""
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.")


@pytest.mark.parametrize(
    "load", [_runs_out_of_host_memory, _maps_more_than_the_machine_has, _runs_out_of_gpu_memory]
)
@pytest.mark.parametrize("cached", [True, False], ids=["cached", "just-downloaded"])
def test_weights_without_recorded_hashes_are_kept_when_loading_runs_out_of_memory(
    served, cache, fake_pget, monkeypatch, cached, load
):
    """pget's and the Hub's entries record no sha256, so any load error discarded them; host
    RAM running out is a RuntimeError, and an offline volume lost its weights to it."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    if cached:
        ensure_weights(VARIANT)
        served.stop()  # offline from here: a discarded entry could not come back
    with pytest.raises(WeightsError, match=r"They were kept: running out of memory"):
        weights.load_weights(VARIANT, load)
    assert len(_markers(cache)) == 1


def test_setup_removes_the_temporary_folders_of_a_killed_worker(
    served, cache, generator_env, monkeypatch
):
    from cogvideox_cog.generator import OUTPUT_PREFIX, VideoGenerator

    code = (
        "import sys, time; from pathlib import Path; from cogvideox_cog import leftovers; "
        "print(leftovers.claim(Path(sys.argv[1]), sys.argv[2]), flush=True); time.sleep(60)"
    )
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(generator_env), OUTPUT_PREFIX],
            cwd=PROJECT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    dead, alive = (Path(worker.stdout.readline().strip()) for worker in workers)
    (dead / "video.mp4").write_bytes(b"x" * 1000)
    workers[0].kill()
    workers[0].wait()
    try:
        monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
        VideoGenerator.from_env("t2v")
        assert not dead.exists()
        assert alive.is_dir()  # its worker still runs
    finally:
        workers[1].kill()
        workers[1].wait()


def test_a_new_manifest_reverifies_in_place_without_downloading(
    served, served_dir, cache, tiny, tmp_path, monkeypatch
):
    """Adding hashes to a manifest (or upgrading the marker format) costs a re-check, not a
    download; and a published entry that fails the new manifest is replaced."""
    url = served.url("model.tar")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", url)
    root = ensure_weights(VARIANT)
    sent = served.bytes_sent
    manifest = _pin(tiny, tmp_path, monkeypatch, url)
    assert ensure_weights(VARIANT) == root
    assert served.bytes_sent == sent
    assert "sha256" in json.loads((root / COMPLETE_MARKER).read_text())["checks"]

    data = json.loads(manifest.read_text())
    data["files"]["vae/config.json"]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(data))
    with pytest.raises(BadSource, match=r"vae/config\.json: sha256 \w+, the manifest says 0+"):
        ensure_weights(VARIANT)
    assert not _markers(cache)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_reverified_entry_is_used_when_its_marker_cannot_be_updated(
    served, cache, tiny, tmp_path, monkeypatch
):
    """A new manifest on a full volume: the files passed, then the marker's write failed
    setup with a bare OSError, the good weights unused."""
    url = served.url("model.tar")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", url)
    root = ensure_weights(VARIANT)
    sent, marker = served.bytes_sent, (root / COMPLETE_MARKER).read_text()
    _pin(tiny, tmp_path, monkeypatch, url)
    full = files.temporary_name(root / COMPLETE_MARKER)
    full.symlink_to("/dev/full")  # the marker's write fails with ENOSPC, as on a full disk
    assert ensure_weights(VARIANT) == root
    assert served.bytes_sent == sent
    assert (root / COMPLETE_MARKER).read_text() == marker  # verified again next time


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_lock_whose_holder_note_cannot_be_written_does_not_stop_setup(
    served, cache, tiny, monkeypatch
):
    """The note (which process holds the lock) is a hint for a waiting setup's log; on a full
    volume writing it failed setup with a bare OSError before the disk-space check spoke."""
    url = served.url("model.tar")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", url)
    entry = f"cogvideox-5b-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f".{entry}.lock").symlink_to("/dev/full")
    assert _same_tree(tiny, ensure_weights(VARIANT))


def _default_entry(served, tmp_path: Path, monkeypatch, source: str | None = None) -> Path:
    """The built-in manifest's entry, fetched: its source is the served tar, or `source`
    (the real one's is Replicate's)."""
    data = json.loads((MANIFEST_DIR / f"{VARIANT.id}.json").read_text())
    data["sources"] = [source or served.url("model.tar")]
    builtin = tmp_path / "built-in manifests"
    builtin.mkdir()
    (builtin / f"{VARIANT.id}.json").write_text(json.dumps(data))
    monkeypatch.setattr(manifest_module, "MANIFEST_DIR", builtin)
    root = ensure_weights(VARIANT)
    assert root.name == VARIANT.id
    return root


def _pin(folder: Path, tmp_path: Path, monkeypatch, *sources: str) -> Path:
    """COGVIDEOX_WEIGHTS_MANIFEST: the files of `folder` with their sizes and sha256."""
    manifest = tmp_path / "pinned.json"
    manifest.write_text(json.dumps(manifest_of_directory(folder, VARIANT.id, list(sources))))
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_MANIFEST", str(manifest))
    return manifest


@pytest.mark.parametrize("downloader", ["built-in", "pget"])
def test_a_manifest_pinning_the_default_entrys_files_takes_them_over_without_a_download(
    served, cache, tiny, tmp_path, monkeypatch, request, downloader
):
    """A manifest of one's own names another entry: pinning the 20 GB already on disk
    downloaded all of it again. The files are linked, not copied, and both entries serve.
    pget records no sha256: the manifest's alone hold the files then."""
    if downloader == "pget":
        request.getfixturevalue("fake_pget")
    default = _default_entry(served, tmp_path, monkeypatch)
    sent = served.bytes_sent
    _pin(tiny, tmp_path, monkeypatch, served.url("model.tar"))
    root = ensure_weights(VARIANT)
    assert root != default and served.bytes_sent == sent
    assert _same_tree(tiny, root)
    assert (root / BIG).stat().st_ino == (default / BIG).stat().st_ino
    marker = json.loads((root / COMPLETE_MARKER).read_text())
    assert "sha256" in marker["checks"] and marker["adopted_from"] == default.name
    monkeypatch.delenv("COGVIDEOX_WEIGHTS_MANIFEST")
    assert ensure_weights(VARIANT) == default
    assert served.bytes_sent == sent


def test_the_default_source_set_as_the_weights_url_takes_over_the_default_entry(
    served, cache, tiny, tmp_path, monkeypatch
):
    """Without a manifest's sha256, the ones recorded when the entry was downloaded."""
    default = _default_entry(served, tmp_path, monkeypatch)
    sent = served.bytes_sent
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    root = ensure_weights(VARIANT)
    assert root != default and served.bytes_sent == sent
    assert _same_tree(tiny, root)


def test_an_entry_whose_local_tar_was_replaced_since_is_not_taken_over(
    served, cache, tiny, tmp_path, monkeypatch
):
    """Its files still pass every check: only the tar's date and size say they are old."""
    tar = _tar(tmp_path / "model.tar", tiny)
    default = _default_entry(served, tmp_path, monkeypatch, str(tar))
    newer = _replace_tar(tar, tiny, tmp_path)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(tar))
    root = ensure_weights(VARIANT)
    assert root != default
    assert _same_tree(newer, root)
    assert "adopted_from" not in json.loads((root / COMPLETE_MARKER).read_text())


def test_a_local_tar_replaced_during_a_take_over_is_extracted_instead(
    served, cache, tiny, tmp_path, monkeypatch, caplog
):
    """The tar was checked before the files were linked and hashed, which takes minutes for
    20 GB: replaced meanwhile, the old weights were served for that setup, and only the next
    one extracted the new tar."""
    tar = _tar(tmp_path / "model.tar", tiny)
    _default_entry(served, tmp_path, monkeypatch, str(tar))
    link, newer = os.link, []

    def link_while_the_tar_is_replaced(source, target):
        link(source, target)
        if not newer:
            newer.append(_replace_tar(tar, tiny, tmp_path))

    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(tar))
    with monkeypatch.context() as patch:
        patch.setattr(os, "link", link_while_the_tar_is_replaced)
        root = ensure_weights(VARIANT)
    assert _same_tree(newer[0], root)
    assert "replaced at its path during the take-over" in caplog.text


def test_an_entry_whose_bytes_changed_since_it_was_verified_is_not_taken_over(
    served, cache, tiny, tmp_path, monkeypatch
):
    """Its sizes still match: only the sha256 recorded when it was downloaded knows."""
    default = _default_entry(served, tmp_path, monkeypatch)
    _flip(default / BIG, (default / BIG).stat().st_size - 10)
    sent = served.bytes_sent
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    root = ensure_weights(VARIANT)
    assert served.bytes_sent > sent
    assert _same_tree(tiny, root)


def test_files_no_sha256_vouches_for_are_not_taken_over(
    served, cache, tiny, fake_pget, tmp_path, monkeypatch
):
    """pget recorded none, and a weights URL leaves the built-in manifest's layout only."""
    _default_entry(served, tmp_path, monkeypatch)
    sent = served.bytes_sent
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    assert _same_tree(tiny, ensure_weights(VARIANT))
    assert served.bytes_sent > sent


def test_files_that_fail_the_new_manifest_are_not_taken_over(
    served, cache, tiny, tmp_path, monkeypatch
):
    """A manifest pinning other weights than the entry holds: the download is checked
    against it, and fails, as it would have without the entry."""
    default = _default_entry(served, tmp_path, monkeypatch)
    manifest = _pin(tiny, tmp_path, monkeypatch, served.url("model.tar"))
    data = json.loads(manifest.read_text())
    data["files"]["vae/config.json"]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(data))
    sent = served.bytes_sent
    with pytest.raises(BadSource, match=r"vae/config\.json: sha256 \w+, the manifest says 0+"):
        ensure_weights(VARIANT)
    assert served.bytes_sent > sent
    assert _markers(cache) == [default / COMPLETE_MARKER]


def test_a_take_over_cut_short_leaves_nothing_and_the_next_setup_completes_it(
    served, cache, tiny, tmp_path, monkeypatch
):
    """A cancel (or any error) between two links: no marker, no folder of links left."""
    default = _default_entry(served, tmp_path, monkeypatch)
    link, links = os.link, []

    def link_then_stop(source, target):
        if len(links) == 3:
            raise KeyboardInterrupt
        links.append(target)
        link(source, target)

    sent = served.bytes_sent
    _pin(tiny, tmp_path, monkeypatch, served.url("model.tar"))
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(os, "link", link_then_stop)
        ensure_weights(VARIANT)
    assert len(links) == 3
    assert _markers(cache) == [default / COMPLETE_MARKER]
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [VARIANT.id]
    assert _same_tree(tiny, ensure_weights(VARIANT))
    assert served.bytes_sent == sent


def test_a_folder_that_vanishes_during_a_take_over_fails_it_naming_the_folder(
    served, cache, tiny, tmp_path, monkeypatch, caplog
):
    """Another setup discards the entry being taken over (renamed aside, as discard() does)
    while its files are linked: os.walk skipped the folders it could no longer list, and the
    take-over failed later on a file it called changed. The folder is named, then the
    weights are downloaded."""
    default = _default_entry(served, tmp_path, monkeypatch)
    link = os.link

    def link_then_discard(source, target):
        link(source, target)
        if default.exists():
            os.rename(default, default.with_name(f".{default.name}.trash-1-2"))

    sent = served.bytes_sent
    _pin(tiny, tmp_path, monkeypatch, served.url("model.tar"))
    with monkeypatch.context() as patch:
        patch.setattr(os, "link", link_then_discard)
        root = ensure_weights(VARIANT)
    assert _same_tree(tiny, root)
    assert served.bytes_sent > sent
    assert re.search(
        rf"cannot take over the files of {re.escape(str(default))} \(\[Errno 2\] No such file "
        rf"or directory: '{re.escape(str(default))}/\w+'\): downloading",
        caplog.text,
    )


def _stale_marker(root: Path) -> None:
    """As a marker written against an earlier manifest looks."""
    marker = json.loads((root / COMPLETE_MARKER).read_text())
    marker["manifest"] = "an-earlier-manifest"
    (root / COMPLETE_MARKER).write_text(json.dumps(marker))


def test_reverifying_keeps_the_hashes_the_old_marker_recorded(served, cache, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    root = ensure_weights(VARIANT)
    recorded = json.loads((root / COMPLETE_MARKER).read_text())["files"]
    _stale_marker(root)
    assert ensure_weights(VARIANT) == root
    assert json.loads((root / COMPLETE_MARKER).read_text())["files"] == recorded


@pytest.mark.parametrize("check", ["size", "sha256"])
def test_reverifying_replaces_an_entry_that_changed_since_its_old_marker(
    served, cache, tiny, monkeypatch, check
):
    """A truncated file is caught by its recorded size; a flipped byte by its recorded
    sha256 (COGVIDEOX_WEIGHTS_CHECK=sha256): neither is taken over into the new marker."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_CHECK", check)
    root = ensure_weights(VARIANT)
    if check == "size":
        with (root / "tokenizer/tokenizer.json").open("r+b") as file:
            file.truncate(1000)  # no check reads it: only the recorded size knows
    else:
        _flip(root / BIG, (root / BIG).stat().st_size - 10)
    _stale_marker(root)
    sent = served.bytes_sent
    assert _same_tree(tiny, ensure_weights(VARIANT))
    assert served.bytes_sent > sent


@pytest.mark.parametrize(
    "damage",
    [
        lambda m, entry, outside: m.update(files=[]),
        lambda m, entry, outside: m["files"].update({"model_index.json": 7}),
        lambda m, entry, outside: m["files"]["model_index.json"].update(size="7"),
        # Roots naming a folder outside the entry that holds every recorded file at its size:
        # only the marker's shape check keeps setup from loading that folder.
        lambda m, entry, outside: m.update(root=str(outside)),
        lambda m, entry, outside: m.update(root=os.path.relpath(outside, entry)),
    ],
    ids=["files-a-list", "entry-a-number", "size-a-string", "absolute-root", "root-up-and-out"],
)
def test_a_marker_of_the_wrong_shape_is_replaced_like_a_missing_one(
    served, cache, tiny, monkeypatch, damage
):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    root = ensure_weights(VARIANT)
    marker = json.loads((root / COMPLETE_MARKER).read_text())
    damage(marker, root, tiny)
    (root / COMPLETE_MARKER).write_text(json.dumps(marker))
    sent = served.bytes_sent
    assert _same_tree(tiny, ensure_weights(VARIANT))
    assert served.bytes_sent > sent


# Faults on the wire: recover, or fail clearly with nothing marked complete.


def test_a_connection_dropped_mid_body_is_resumed_where_it_stopped(
    served, cache, tiny, monkeypatch
):
    size = (Path(served.directory) / "model.tar").stat().st_size
    served.drop_at("model.tar", size // 2, times=2)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    assert _same_tree(tiny, ensure_weights(VARIANT))
    assert served.bytes_sent == size + 1  # every byte once (and the 1-byte probe)
    assert served.requests[-1] == ("GET", "model.tar", f"bytes={size // 2}-{size - 1}")


def test_503_a_few_times_then_success(served, cache, tiny, monkeypatch, caplog):
    served.fail_with("model.tar", 503, times=3)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    assert _same_tree(tiny, ensure_weights(VARIANT))
    assert "HTTP 503" in caplog.text and "retry 3/3" in caplog.text


def test_503_for_good_fails_clearly(served, cache, monkeypatch):
    served.fail_with("model.tar", 503, times=None)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    with pytest.raises(WeightsError, match=r"could not download .*model.tar: HTTP 503.*4 attempts"):
        ensure_weights(VARIANT)
    assert _nothing_published(cache)


@pytest.mark.parametrize("delta", [1000, -1000])
def test_a_wrong_content_length_fails_clearly(served, cache, monkeypatch, delta):
    served.lie_about_length("model.tar", delta)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    with pytest.raises(
        WeightsError, match=r"model.tar failed after 0 of [\d,]+ bytes: Content-Length"
    ):
        ensure_weights(VARIANT)
    assert _nothing_published(cache)


def test_a_wrong_content_length_once_is_retried(served, cache, tiny, monkeypatch):
    served.lie_about_length("model.tar", 1000, times=2)  # the probe and the first range
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    assert _same_tree(tiny, ensure_weights(VARIANT))


def test_a_download_cut_short_fails_clearly_and_leaves_nothing_cached(served, cache, monkeypatch):
    served.truncate_after("model.tar", 300_000)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    cut_short = r"model.tar failed after 300,000 of [\d,]+ bytes: connection closed"
    with pytest.raises(WeightsError, match=cut_short):
        ensure_weights(VARIANT)
    assert _nothing_published(cache)


def test_a_failed_download_resumes_without_refetching_what_arrived(
    served, cache, tiny, monkeypatch
):
    size = (Path(served.directory) / "model.tar").stat().st_size
    served.truncate_after("model.tar", 300_000)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    with pytest.raises(WeightsError):
        ensure_weights(VARIANT)
    assert served.bytes_sent == 300_000 + 1
    served.truncate_after("model.tar", 10**12)
    sent = served.bytes_sent
    assert _same_tree(tiny, ensure_weights(VARIANT))
    # At most the headers of the member that was cut are fetched again.
    assert size - 300_000 + 1 <= served.bytes_sent - sent <= size - 300_000 + 1 + 1024


def test_a_flipped_byte_fails_its_sha256_and_is_not_kept(
    served, cache, tiny, tmp_path, monkeypatch
):
    offset, length = _data_offset(Path(served.directory) / "model.tar", BIG)
    served.flip_byte("model.tar", offset + length - 10, times=None)  # deep in tensor data
    url = served.url("model.tar")
    _pin(tiny, tmp_path, monkeypatch, url)
    expected = rf"{BIG}: sha256 \w+, the manifest says {sha256_file(tiny / BIG).hexdigest()}"
    with pytest.raises(BadSource, match=expected):
        ensure_weights(VARIANT)
    assert _nothing_published(cache)
    assert not any(cache.glob(".*.staging"))  # corrupt bytes are not resumed
    served.clear()
    root = ensure_weights(VARIANT)  # the built-in manifest's sources, replaced by ours
    assert _same_tree(tiny, root)
    assert "sha256" in json.loads((root / COMPLETE_MARKER).read_text())["checks"]


def test_a_flipped_byte_in_a_safetensors_header_fails_without_a_manifest(
    served, cache, monkeypatch
):
    offset, _ = _data_offset(Path(served.directory) / "model.tar", BIG)
    served.flip_byte("model.tar", offset + 3)  # the high bytes of the header length
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    with pytest.raises(BadSource, match=rf"{BIG}: header length [\d,]+ does not fit the file"):
        ensure_weights(VARIANT)
    assert _nothing_published(cache)


def test_a_truncated_tar_fails_clearly(served, cache, monkeypatch):
    tar = Path(served.directory) / "model.tar"
    offset, length = _data_offset(tar, BIG)
    (Path(served.directory) / "short.tar").write_bytes(tar.read_bytes()[: offset + length // 2])
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("short.tar"))
    with pytest.raises(BadSource, match=rf"truncated tar .*short.tar.*in the middle of {BIG}"):
        ensure_weights(VARIANT)
    assert _nothing_published(cache)


def test_a_tar_truncated_between_members_fails_clearly(served, cache, monkeypatch):
    """tarfile's stream mode would accept this silently; the end-of-archive block is required."""
    tar = Path(served.directory) / "model.tar"
    offset, _ = _data_offset(tar, "vae/config.json")
    (Path(served.directory) / "cut.tar").write_bytes(tar.read_bytes()[: offset - 512])
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("cut.tar"))
    with pytest.raises(BadSource, match=r"truncated tar .*cut.tar"):
        ensure_weights(VARIANT)
    assert _nothing_published(cache)


def test_a_stalled_transfer_times_out_and_resumes(served, cache, tiny, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_TIMEOUT", "0.3")
    served.stall_at("model.tar", 200_000, seconds=30, times=1)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    assert _same_tree(tiny, ensure_weights(VARIANT))


def test_a_server_stalled_for_good_fails_with_the_timeout(served, cache, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_TIMEOUT", "0.3")
    monkeypatch.setattr(download, "RETRIES", 1)
    served.stall_at("model.tar", 200_000, seconds=30, times=None)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    expected = (
        r"failed after 200,000 of [\d,]+ bytes: no data for 0.3 s \(COGVIDEOX_WEIGHTS_TIMEOUT\)"
    )
    with pytest.raises(WeightsError, match=expected):
        ensure_weights(VARIANT)
    assert _nothing_published(cache)


def test_a_presigned_urls_query_string_is_never_logged(served, cache, monkeypatch, caplog):
    """A presigned URL's query string is its credential: logs and errors show the rest."""
    caplog.set_level("INFO", logger="cogvideox_cog")
    served.fail_with("model.tar", 503, times=1)
    size = (Path(served.directory) / "model.tar").stat().st_size
    served.truncate_after("model.tar", size // 2)
    secret = "X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=0123456789abcdef"
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url(f"model.tar?{secret}"))
    with pytest.raises(WeightsError) as failed:
        ensure_weights(VARIANT)
    shown = f"{served.url('model.tar')}?<query hidden>"
    assert f"download of {shown} failed after {size // 2:,}" in str(failed.value)
    assert f"fetching cogvideox-5b from {shown}" in caplog.text
    assert "retry 1/3" in caplog.text
    assert "X-Amz" not in caplog.text + str(failed.value)
    assert all(r[1] == "model.tar" for r in served.requests)
    assert served.queries and set(served.queries) == {secret}  # the server saw the whole URL


def test_a_url_with_its_scheme_in_capitals_is_downloaded(served, cache, tiny, monkeypatch):
    """A scheme is case-insensitive (RFC 3986). Taken for a path, the URL was refused with
    an error quoting all of it, a presigned URL's signature included."""
    url = served.url("model.tar?X-Amz-Signature=0123456789abcdef")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", url.replace("http://", "HTTP://", 1))
    assert _same_tree(tiny, ensure_weights(VARIANT))


def test_a_renewed_presigned_url_finds_the_weights_already_fetched(served, cache, monkeypatch):
    """A presigned URL expires (S3's within 7 days); its renewal names the same file."""
    signed = "X-Amz-Date=20261130T000000Z&X-Amz-Expires=604800&X-Amz-Signature={}"
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url(f"model.tar?v=2&{signed.format('aa')}"))
    first = ensure_weights(VARIANT)
    marker = json.loads((first / COMPLETE_MARKER).read_text())
    assert marker["source"] == served.url("model.tar?v=2")  # no signature kept on the volume
    sent = served.bytes_sent
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url(f"model.tar?v=2&{signed.format('bb')}"))
    assert ensure_weights(VARIANT) == first
    assert served.bytes_sent == sent
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url(f"model.tar?v=3&{signed.format('bb')}"))
    assert ensure_weights(VARIANT) != first  # another query names another file
    assert served.bytes_sent > sent  # fetched from it, not taken over from the other entry


@pytest.mark.parametrize(
    ("url", "identity"),
    [
        (
            "https://b.s3.amazonaws.com/w.tar?X-Amz-Credential=K&x-amz-signature=S",
            "https://b.s3.amazonaws.com/w.tar",
        ),
        (
            "https://storage.googleapis.com/b/w.tar?X-Goog-Signature=S&X-Goog-Expires=9",
            "https://storage.googleapis.com/b/w.tar",
        ),
        (
            "https://d.cloudfront.net/w.tar?Expires=9&Signature=S&Key-Pair-Id=K",
            "https://d.cloudfront.net/w.tar",
        ),
        (
            "https://a.blob.core.windows.net/c/w.tar?sv=2024&se=2026&sp=r&sig=S&v=1",
            "https://a.blob.core.windows.net/c/w.tar?v=1",
        ),
        ("https://example.com/w.tar?sp=1&st=2", "https://example.com/w.tar?sp=1&st=2"),
        ("https://example.com/w.tar?a=%2F&b", "https://example.com/w.tar?a=%2F&b"),
        ("/srv/w.tar", "/srv/w.tar"),
    ],
    ids=["s3", "gcs", "cloudfront", "azure", "no-signature", "untouched", "path"],
)
def test_a_urls_identity_drops_only_what_signs_it(url, identity):
    assert download.identity(url) == identity


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://user:hunter2@{host}/model.tar", "holds a user name or password"),
        ("http://127.0.0.1:99999/model.tar", "is not a valid URL"),
        ("http:///model.tar", "has no host"),
        ("http://{host}/model tar?X-Amz-Signature=hunter2", "holds a space"),
        ("http://{host}/model.tar?X-Amz-Signature=hunter2\x7f", "a control character"),
        ("http://{host}/modèle.tar?X-Amz-Signature=hunter2", "a letter outside ASCII"),
    ],
    ids=["password", "port", "no-host", "space", "control", "non-ascii"],
)
def test_a_weights_url_that_cannot_work_fails_at_once(
    served, cache, monkeypatch, caplog, url, problem
):
    """Not retried with backoff as a network fault, and the password never echoed."""
    host = served.url("").split("/")[2]  # 127.0.0.1:port
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", url.format(host=host))
    with pytest.raises(WeightsError, match=re.escape(problem)) as failed:
        ensure_weights(VARIANT)
    assert "retry" not in caplog.text and "attempts" not in str(failed.value)
    assert "hunter2" not in caplog.text + str(failed.value)
    assert served.requests == []


def test_a_server_without_range_support(served_dir, cache, tiny, monkeypatch, caplog):
    server = FileServer(served_dir, ranges=False)
    try:
        server.drop_at("model.tar", 300_000, times=1)  # and a drop: start over, keep going
        monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", server.url("model.tar"))
        assert _same_tree(tiny, ensure_weights(VARIANT))
        assert all(r[2] is None or r[2] == "bytes=0-0" for r in server.requests)
        assert "does not support Range requests" in caplog.text
        assert "fetches the first 300,000 bytes again" in caplog.text
    finally:
        server.stop()


def test_ranges_sent_chunked_without_a_content_length(served_dir, cache, tiny, monkeypatch):
    """HTTP/1.1 lets a 206 go chunked, its length in Content-Range alone (some proxies)."""
    server = FileServer(served_dir, chunked=True)
    try:
        size = (served_dir / "model.tar").stat().st_size
        server.drop_at("model.tar", size // 2)  # and a chunked body cut short resumes
        monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", server.url("model.tar"))
        assert _same_tree(tiny, ensure_weights(VARIANT))
        assert server.requests[-1] == ("GET", "model.tar", f"bytes={size // 2}-{size - 1}")
    finally:
        server.stop()


def test_parallel_ranges_with_faults_in_several_chunks(served, cache, tiny, monkeypatch):
    monkeypatch.setattr(download, "CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(download, "READ_BYTES", 16 << 10)
    monkeypatch.setattr(download, "PUBLISH_BYTES", 16 << 10)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_CONNECTIONS", "4")
    tar = Path(served.directory) / "model.tar"
    size = tar.stat().st_size
    offset, length = _data_offset(tar, BIG)
    for at in (100_000, 333_333, offset + length - 1000):
        served.drop_at("model.tar", at)
    served.fail_with("model.tar", 502, times=2)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    assert _same_tree(tiny, ensure_weights(VARIANT))
    ranges = [r[2] for r in served.requests if r[2] != "bytes=0-0"]
    assert len(ranges) >= size // (64 << 10)
    # No byte twice (the tar's end padding may be left unfetched once its end is read).
    assert offset + length < served.bytes_sent <= size + 1


def test_progress_is_logged_with_bytes_rate_and_eta(served, cache, monkeypatch, caplog):
    monkeypatch.setattr(download, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(download, "PUBLISH_BYTES", 64 << 10)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    caplog.set_level("INFO", logger="cogvideox_cog")
    ensure_weights(VARIANT)
    assert re.search(r"[\d.]+ [kMG]B of [\d.]+ [kMG]B \(\d+%\) at \d+ MB/s, ETA \d+ s", caplog.text)
    assert "ready in" in caplog.text and "verify" in caplog.text


@pytest.mark.parametrize("downloader", ["built-in", "pget"])
def test_a_disk_space_shortfall_fails_before_downloading(
    served, cache, monkeypatch, request, downloader
):
    if downloader == "pget":
        request.getfixturevalue("fake_pget")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(weights.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 5_000))
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    expected = r"not enough disk space in .*: 0\.\d\d GB needed \(0\.00 GB in all.*0\.00 GB free"
    with pytest.raises(WeightsError, match=expected):
        ensure_weights(VARIANT)
    assert served.bytes_sent <= 1  # the probe only: pget never started
    assert _nothing_published(cache)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_disk_that_fills_up_mid_download_fails_clearly_and_resumes(
    served, cache, tiny, monkeypatch
):
    """The progress journal is the first write after a member's data: with the disk full
    there, setup must say so (and resume later), not end on a bare OSError."""
    size = (Path(served.directory) / "model.tar").stat().st_size
    offset, length = _data_offset(Path(served.directory) / "model.tar", BIG)
    served.truncate_after("model.tar", offset + length // 2)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    with pytest.raises(WeightsError, match="connection closed"):
        ensure_weights(VARIANT)
    served.clear()
    staging = next(cache.glob(".*.staging"))
    # The journal's next temporary file is /dev/full: writing it fails with ENOSPC, as on a
    # full disk.
    full = files.temporary_name(staging / JOURNAL)
    full.symlink_to("/dev/full")
    with pytest.raises(WeightsError, match=r"No space left on device.*the next setup resumes"):
        ensure_weights(VARIANT)
    assert _nothing_published(cache)
    full.unlink(missing_ok=True)  # the failed write removed it already
    sent = served.bytes_sent
    assert _same_tree(tiny, ensure_weights(VARIANT))
    assert served.bytes_sent - sent < size - offset  # resumed, not fetched again


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_complete_download_that_fails_to_publish_is_not_fetched_again(
    served, cache, tiny, monkeypatch
):
    """Publishing syncs every file before the marker: a setup killed then, or failing on a
    disk full at the marker, must leave the complete download for the next setup."""
    url = served.url("model.tar")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", url)
    entry = cache / f"cogvideox-5b-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
    staging = cache / f".{entry.name}.staging"
    weights.fetch_tar(url, staging)  # what setup downloads and extracts before publishing
    # The marker's temporary file is /dev/full.
    full = files.temporary_name(staging / COMPLETE_MARKER)
    full.symlink_to("/dev/full")
    with pytest.raises(WeightsError, match="No space left on device"):
        cache_module.publish(staging, entry, {"source": url})
    assert _nothing_published(cache)
    sent = served.bytes_sent
    assert _same_tree(tiny, ensure_weights(VARIANT))
    assert served.bytes_sent - sent == 1  # the probe: published, not downloaded again
    assert not list(cache.rglob(JOURNAL))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_disk_full_while_publishing_fails_setup_naming_the_setting(
    served, cache, tiny, monkeypatch
):
    """Publishing writes too (the marker, and a network volume may report a full disk only at
    fsync): setup says what to do, as for a disk full mid-download, not a bare OSError."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    verify = weights.verify

    def verify_then_fill_the_disk(staging: Path, *args, **kwargs):
        verified = verify(staging, *args, **kwargs)
        # The marker's temporary file is /dev/full.
        full = files.temporary_name(staging / COMPLETE_MARKER)
        full.symlink_to("/dev/full")
        monkeypatch.setattr(weights, "verify", verify)  # once
        return verified

    monkeypatch.setattr(weights, "verify", verify_then_fill_the_disk)
    expected = (
        r"could not publish the weights in .*: No space left on device\. Free disk space or "
        r"set COGVIDEOX_WEIGHTS_DIR to another volume, then run setup again"
    )
    with pytest.raises(WeightsError, match=expected):
        ensure_weights(VARIANT)
    assert _nothing_published(cache)
    sent = served.bytes_sent
    assert _same_tree(tiny, ensure_weights(VARIANT))
    assert served.bytes_sent - sent == 1  # the probe: published, not downloaded again


# Unsafe tars: refused, nothing written outside the staging folder, nothing kept.


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ([_member("../escaped.txt")], r"'\.\./escaped\.txt' has a '\.\.' component"),
        ([_member(ABSOLUTE)], rf"'{ABSOLUTE}' has an absolute path"),
        (
            [_member("vae/evil", None, type=tarfile.SYMTYPE, linkname="../../../escaped.txt")],
            r"would link to .*outside the destination",
        ),
        (
            [_member("vae/evil", None, type=tarfile.SYMTYPE, linkname="/etc/passwd")],
            r"is a link to an absolute path",
        ),
        (
            [_member("evil", None, type=tarfile.LNKTYPE, linkname="../escaped.txt")],
            r"'\.\./escaped\.txt'|would link to",
        ),
        ([_member("dev", None, type=tarfile.CHRTYPE)], r"'dev' is a special file"),
    ],
    ids=["dotdot", "absolute", "symlink-out", "symlink-absolute", "hardlink-out", "device"],
)
@pytest.mark.parametrize("vetting", ["stdlib", "own"])
def test_an_unsafe_tar_is_refused_and_nothing_is_written_outside(
    tiny, tmp_path, served_dir, cache, monkeypatch, extra, problem, vetting
):
    """own: the vetting used where tarfile has no data_filter (Python before 3.11.4)."""
    if vetting == "stdlib" and not hasattr(tarfile, "data_filter"):
        pytest.skip(f"tarfile of Python {sys.version.split()[0]} has no data_filter (3.11.4+)")
    if vetting == "own":
        monkeypatch.setattr(untar, "_data_filter", untar._own_data_filter)
        monkeypatch.setattr(untar, "_FilterError", untar._UnsafeMember)
    evil = _tar(tmp_path / "evil.tar", tiny, extra=extra)
    server = FileServer(evil.parent)
    try:
        monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", server.url("evil.tar"))
        with pytest.raises(BadSource, match=r"refusing unsafe weights tar .*" + problem):
            ensure_weights(VARIANT)
    finally:
        server.stop()
    assert not (tmp_path / "escaped.txt").exists() and not (cache / "escaped.txt").exists()
    assert not Path(ABSOLUTE).exists()
    assert _nothing_published(cache)
    assert not any(cache.glob(".*.staging"))


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ([_member("model_index.json/x")], r"'model_index.json/x' cannot be written"),
        ([_member("a" * 300)], rf"'{'a' * 300}' cannot be written"),
    ],
    ids=["file-under-a-file", "name-too-long"],
)
def test_a_tar_whose_member_cannot_be_written_is_discarded_not_resumed(
    tiny, tmp_path, cache, monkeypatch, extra, problem
):
    """Such a tar fails the same way on every resume: blamed on the disk and kept, it would
    fail every setup, asking to free space that is not short."""
    server = _serve_tar(_tar(tmp_path / "bad.tar", tiny, extra=extra), monkeypatch)
    try:
        with pytest.raises(BadSource, match=r"corrupt tar .*" + problem) as failed:
            ensure_weights(VARIANT)
    finally:
        server.stop()
    assert "disk space" not in str(failed.value)
    assert _nothing_published(cache)
    assert not any(cache.glob(".*.staging"))


def _serve_tar(tar: Path, monkeypatch) -> FileServer:
    server = FileServer(tar.parent)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", server.url(tar.name))
    return server


@pytest.mark.parametrize("vetting", ["stdlib", "own"])
def test_a_hard_link_through_a_symlink_cannot_reach_outside(
    tiny, tmp_path, cache, monkeypatch, vetting
):
    """The vetting resolves `d/../..` through the symlink d (inside); the link must too."""
    if vetting == "stdlib" and not hasattr(tarfile, "data_filter"):
        pytest.skip(f"tarfile of Python {sys.version.split()[0]} has no data_filter (3.11.4+)")
    if vetting == "own":
        monkeypatch.setattr(untar, "_data_filter", untar._own_data_filter)
        monkeypatch.setattr(untar, "_FilterError", untar._UnsafeMember)
    cache.mkdir()
    victim = cache / "victim.txt"  # beside the staging folder: one '..' too far
    victim.write_text("original")
    extra = [
        _member("a/b", None, type=tarfile.DIRTYPE),
        _member("d", None, type=tarfile.SYMTYPE, linkname="a/b"),
        _member("h", None, type=tarfile.LNKTYPE, linkname="d/../../victim.txt"),
        _member("h", b"overwritten"),
    ]
    server = _serve_tar(_tar(tmp_path / "evil.tar", tiny, extra=extra), monkeypatch)
    try:
        with pytest.raises(BadSource, match=r"hard link 'h' to .* does not name a file"):
            ensure_weights(VARIANT)
    finally:
        server.stop()
    assert victim.read_text() == "original"
    assert not _markers(cache)


def test_a_member_named_again_replaces_a_hard_link_instead_of_writing_through_it(
    tiny, tmp_path, cache, monkeypatch
):
    extra = [
        _member("extra.txt", None, type=tarfile.LNKTYPE, linkname="model_index.json"),
        _member("extra.txt", b"not the model index"),
    ]
    server = _serve_tar(_tar(tmp_path / "relinked.tar", tiny, extra=extra), monkeypatch)
    try:
        root = ensure_weights(VARIANT)
    finally:
        server.stop()
    assert (root / "model_index.json").read_bytes() == (tiny / "model_index.json").read_bytes()
    assert (root / "extra.txt").read_bytes() == b"not the model index"


def test_a_setup_stopped_as_a_member_replaces_a_hard_link_resumes_without_writing_through_it(
    tiny, tmp_path, cache, monkeypatch
):
    """Stopped once the journal names the new extra.txt, before it is written: the next
    setup must not take the old link's bytes for the new file's and write on into them."""
    extra = [
        _member("extra.txt", None, type=tarfile.LNKTYPE, linkname="model_index.json"),
        _member("extra.txt", b"not the model index"),
    ]
    server = _serve_tar(_tar(tmp_path / "relinked.tar", tiny, extra=extra), monkeypatch)
    write_file = untar._Extractor.write_file

    def stopped_at_extra(self, stream, member, written):
        if member["name"] == "extra.txt":
            raise KeyboardInterrupt  # where a SIGKILL would stop it
        return write_file(self, stream, member, written)

    try:
        monkeypatch.setattr(untar._Extractor, "write_file", stopped_at_extra)
        with pytest.raises(KeyboardInterrupt):
            ensure_weights(VARIANT)
        monkeypatch.setattr(untar._Extractor, "write_file", write_file)
        root = ensure_weights(VARIANT)
    finally:
        server.stop()
    assert (root / "model_index.json").read_bytes() == (tiny / "model_index.json").read_bytes()
    assert (root / "extra.txt").read_bytes() == b"not the model index"


def test_a_symlink_redirected_by_a_later_member_is_refused(tiny, tmp_path, cache, monkeypatch):
    """x is inside when it is extracted (y is deep then); y made '.' afterwards points x
    outside, so the finished extraction is checked too."""
    extra = [
        _member("y", None, type=tarfile.SYMTYPE, linkname="a/b/c/d"),
        _member("x", None, type=tarfile.SYMTYPE, linkname="y/../../../../escaped.txt"),
        _member("y", None, type=tarfile.SYMTYPE, linkname="."),
    ]
    server = _serve_tar(_tar(tmp_path / "evil.tar", tiny, extra=extra), monkeypatch)
    try:
        with pytest.raises(BadSource, match=r"x links to .*escaped\.txt, outside the weights"):
            ensure_weights(VARIANT)
    finally:
        server.stop()
    assert _nothing_published(cache)


# Two processes, and a process killed mid-download.


def _setup_process(env: dict[str, str], bin_dir: Path | None = None) -> subprocess.Popen:
    """ensure_weights() in a process of its own; `bin_dir`, where given, first on its PATH."""
    code = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
        from cogvideox_cog.variants import VARIANTS
        from cogvideox_cog.weights import ensure_weights
        print(ensure_weights(VARIANTS["cogvideox-5b"]))
        """
    )
    path = f"{Path(sys.executable).parent}{os.pathsep}/usr/bin{os.pathsep}/bin"
    if shutil.which("pget", path=path):
        pytest.skip("pget is installed: these processes would use it")
    if bin_dir is not None:
        path = f"{bin_dir}{os.pathsep}{path}"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=PROJECT,
        env={**os.environ, "PATH": path, "PYTHONPATH": str(PROJECT), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_concurrent_setups_on_one_cache_download_once(served, cache, tiny):
    size = (Path(served.directory) / "model.tar").stat().st_size
    served.stall_at("model.tar", size // 2, seconds=1.5, times=1)  # keep the first one busy
    env = {
        "COGVIDEOX_WEIGHTS_URL": served.url("model.tar"),
        "COGVIDEOX_WEIGHTS_DIR": str(cache),
        "COGVIDEOX_WEIGHTS_TIMEOUT": "30",
    }
    processes = [_setup_process(env) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], results
    roots = {out.strip() for out, _ in results}
    assert len(roots) == 1
    assert _same_tree(tiny, Path(roots.pop()))
    assert served.bytes_sent == size + 1  # one download: the other process waited and reused it
    logs = "".join(err for _, err in results)
    assert "waiting for another setup to finish" in logs
    assert "completed by another process" in logs


def _kill_setup_mid_file(server: FileServer, cache: Path) -> int:
    """Run a setup in a process of its own, kill -9 it halfway through BIG; the tar offset."""
    offset, length = _data_offset(Path(server.directory) / "model.tar", BIG)
    cut = offset + length // 2
    server.stall_at("model.tar", cut, seconds=60, times=None)
    url = server.url("model.tar")
    process = _setup_process({"COGVIDEOX_WEIGHTS_URL": url, "COGVIDEOX_WEIGHTS_DIR": str(cache)})
    partial = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        partial = next(cache.glob(f".*.staging/{BIG}"), None)  # written up to the stall?
        if partial and partial.stat().st_size == length // 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert partial is not None and partial.stat().st_size == length // 2
    assert json.loads((partial.parents[1] / JOURNAL).read_text())["member"]["name"] == BIG
    server.clear()
    return cut


def test_a_setup_killed_mid_download_resumes_without_refetching(
    served, cache, tiny, monkeypatch, caplog
):
    size = (Path(served.directory) / "model.tar").stat().st_size
    cut = _kill_setup_mid_file(served, cache)
    sent = served.bytes_sent
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    caplog.set_level("INFO", logger="cogvideox_cog")
    assert _same_tree(tiny, ensure_weights(VARIANT))
    assert served.bytes_sent - sent == size - cut + 1  # the rest, and the probe's byte
    # Where the download really resumed, not where the file being written starts.
    assert f"{cut:,} bytes already on disk, {size - cut:,} still to fetch" in caplog.text


@pytest.mark.parametrize("validator", ["Last-Modified", None])
def test_a_resume_keeps_only_bytes_proven_to_be_of_the_same_file(
    served_dir, tmp_path, cache, tiny, monkeypatch, caplog, validator
):
    """Without ETag or Last-Modified, a file that changed at the same size between a kill and
    the next setup would be published half old, half new: such a host is fetched from byte 0."""
    directory = tmp_path / "host"
    directory.mkdir()
    tar = Path(shutil.copy(served_dir / "model.tar", directory / "model.tar"))
    size = tar.stat().st_size
    offset, length = _data_offset(tar, BIG)
    server = FileServer(directory, etag=False, last_modified=validator == "Last-Modified")
    try:
        cut = _kill_setup_mid_file(server, cache)
        expected = (tiny / BIG).read_bytes()
        if validator is None:  # the file changes on the host, before and after the cut
            data = bytearray(tar.read_bytes())
            for at in (length // 4, 3 * length // 4):
                data[offset + at] ^= 0xFF
            (directory / "new.tar").write_bytes(data)
            os.replace(directory / "new.tar", tar)
            expected = bytes(data[offset : offset + length])
        sent = server.bytes_sent
        monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", server.url("model.tar"))
        root = ensure_weights(VARIANT)
        assert (root / BIG).read_bytes() == expected
        if validator is None:
            assert server.bytes_sent - sent == size + 1  # from byte 0
            assert "sends neither ETag nor Last-Modified" in caplog.text
        else:
            assert server.bytes_sent - sent == size - cut + 1
    finally:
        server.stop()


def test_a_file_replaced_mid_download_fails_and_the_next_setup_starts_over(
    served_dir, tmp_path, cache, tiny, monkeypatch, caplog
):
    """The bytes on disk belong to the old file, so the error must not promise a resume."""
    directory = tmp_path / "host"
    directory.mkdir()
    size = Path(shutil.copy(served_dir / "model.tar", directory / "model.tar")).stat().st_size
    server = FileServer(directory)
    try:
        server.drop_at("model.tar", size // 2)
        server.replace_after("model.tar", responses=2)  # the probe, then the range cut short
        monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", server.url("model.tar"))
        monkeypatch.setenv("COGVIDEOX_WEIGHTS_CONNECTIONS", "1")
        with pytest.raises(
            WeightsError, match="changed on the server during the download"
        ) as error:
            ensure_weights(VARIANT)
        assert "from the start" in str(error.value) and "resume" not in str(error.value)
        # The failed setup's last answer (the rest of the old range, refused by its validator)
        # may still be counted by the server's thread after the error: its requests are
        # logged before they are answered, so the next setup's are told apart by position.
        sent, seen = server.bytes_sent, len(server.requests)
        assert _same_tree(tiny, ensure_weights(VARIANT))
        ranges = [r[2] for r in server.requests[seen:] if r[2] != "bytes=0-0"]
        assert ranges and all(r is None or r.startswith("bytes=0-") for r in ranges)
        assert server.bytes_sent - sent >= size + 1  # the whole file, as the error said
        assert f"starting again from byte 0, not from byte {size // 2:,}" in caplog.text
    finally:
        server.stop()


# Verification without a manifest entry: structure.


def _broken_copy(tiny: Path, tmp_path: Path, damage) -> Path:
    copy = shutil.copytree(tiny, tmp_path / "copy")
    damage(copy)
    return copy


def _shard(copy: Path) -> None:
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}
    index["weight_map"]["b"] = "model-00002-of-00002.safetensors"
    (copy / "text_encoder/model.safetensors").rename(
        copy / "text_encoder/model-00001-of-00002.safetensors"
    )
    (copy / "text_encoder/model.safetensors.index.json").write_text(json.dumps(index))


def _safetensors_header_length(copy: Path) -> None:
    path = copy / "vae/diffusion_pytorch_model.safetensors"
    data = bytearray(path.read_bytes())
    data[0:8] = (len(data)).to_bytes(8, "little")
    path.write_bytes(data)


def _safetensors_garbled(copy: Path) -> None:
    path = copy / "vae/diffusion_pytorch_model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{]"
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda c: (c / "vae/config.json").unlink(), r"vae/config\.json: missing"),
        (
            lambda c: (c / "scheduler/scheduler_config.json").write_text("{"),
            r"scheduler/scheduler_config\.json: unreadable",
        ),
        (
            lambda c: (c / "transformer/diffusion_pytorch_model.safetensors").unlink(),
            r"transformer/: no weights file",
        ),
        (
            lambda c: os.truncate(c / BIG, (c / BIG).stat().st_size - 1),
            rf"{BIG}: the header describes [\d,]+ bytes of tensor data, the file holds",
        ),
        (_safetensors_header_length, r"vae/diffusion_pytorch_model.safetensors: header length"),
        (_safetensors_garbled, r"vae/diffusion_pytorch_model.safetensors: .*does not parse"),
        (_shard, r"model.safetensors.index.json: names shard model-00002-of-00002.safetensors"),
        (lambda c: (c / "model_index.json").write_text("[1]"), r"model_index.json: unreadable"),
    ],
    ids=[
        "config-missing",
        "config-garbled",
        "weights-missing",
        "safetensors-truncated",
        "safetensors-header-length",
        "safetensors-header-garbled",
        "shard-missing",
        "model-index-garbled",
    ],
)
def test_verification_names_the_file_and_the_check(tiny, tmp_path, damage, problem):
    copy = _broken_copy(tiny, tmp_path, damage)
    with pytest.raises(BadSource, match=problem):
        verify(copy, load_manifest(VARIANT.id).layout_only(), "test")


def test_the_intact_tiny_pipeline_passes_and_a_sharded_one_too(tiny, tmp_path):
    verified = verify(tiny, load_manifest(VARIANT.id), "test")
    assert verified.root == tiny and "shard indexes" in verified.checks

    def both_shards(copy):
        _shard(copy)
        shutil.copy(
            copy / "text_encoder/model-00001-of-00002.safetensors",
            copy / "text_encoder/model-00002-of-00002.safetensors",
        )

    verify(_broken_copy(tiny, tmp_path, both_shards), load_manifest(VARIANT.id), "test")


def test_a_folder_of_several_folders_is_not_taken_for_a_wrapped_pipeline(tiny, tmp_path):
    """Which of two pipelines is meant cannot be told: neither is picked."""
    for name in ("a", "b"):
        shutil.copytree(tiny, tmp_path / "two" / name)
    with pytest.raises(WeightsError, match=r"nor in a single top folder"):
        verify(tmp_path / "two", load_manifest(VARIANT.id).layout_only(), "test")


def test_a_wrapped_pipeline_is_found_beside_a_hidden_folder(tiny, tmp_path):
    wrapped = shutil.copytree(tiny, tmp_path / "top" / "model_cache")
    (tmp_path / "top" / ".cache" / "huggingface").mkdir(parents=True)
    verified = verify(tmp_path / "top", load_manifest(VARIANT.id).layout_only(), "test")
    assert verified.root == wrapped


def test_a_special_file_among_the_weights_is_refused(tmp_path):
    """A FIFO among the weights would block the loader's read for good."""
    (tmp_path / "vae").mkdir()
    os.mkfifo(tmp_path / "vae" / "config.json")
    with pytest.raises(BadSource, match=r"vae/config\.json is not a regular file or folder"):
        check_contained(tmp_path, "test")


def _pinned(tiny: Path, rel: str, sha256: str | None = None) -> Manifest:
    """The built-in manifest's layout, with `rel`'s size and sha256 (its own, or `sha256`)."""
    spec = FileSpec((tiny / rel).stat().st_size, sha256 or sha256_file(tiny / rel).hexdigest())
    layout = load_manifest(VARIANT.id).layout_only()
    return Manifest(VARIANT.id, files={**layout.files, rel: spec})


def test_a_hash_computed_while_writing_counts_for_a_file_under_a_wrapping_folder(tiny, tmp_path):
    """The tar's hashes are by path in the tar: a file under the folder it wraps the pipeline
    in is held to the hash of the bytes written, not read back and hashed again."""
    shutil.copytree(tiny, tmp_path / "staging" / "model_cache")
    written = {f"model_cache/{BIG}": "0" * 64}
    with pytest.raises(BadSource, match=rf"{BIG}: sha256 0{{64}}, the manifest says"):
        verify(tmp_path / "staging", _pinned(tiny, BIG), "test", written)


def test_a_manifests_sha256_written_in_capitals_matches(tiny):
    manifest = _pinned(tiny, BIG, sha256_file(tiny / BIG).hexdigest().upper())
    assert verify(tiny, manifest, "test").files[BIG]["sha256"] is not None


def test_a_failed_verification_names_every_problem(tiny, tmp_path):
    def twice(copy):
        (copy / "vae/config.json").unlink()
        (copy / "scheduler/scheduler_config.json").write_text("{")

    with pytest.raises(BadSource) as failed:
        verify(_broken_copy(tiny, tmp_path, twice), load_manifest(VARIANT.id), "test")
    assert "vae/config.json: missing" in str(failed.value)
    assert "scheduler/scheduler_config.json: unreadable" in str(failed.value)


def test_a_hidden_folder_is_no_part_of_the_verified_weights(tiny, tmp_path):
    """`hf download --local-dir` keeps its state in .cache/: not weights, not counted."""

    def hub_state(copy):
        (copy / ".cache/huggingface/download").mkdir(parents=True)
        (copy / ".cache/huggingface/download/model_index.json.metadata").write_text("x")

    verified = verify(_broken_copy(tiny, tmp_path, hub_state), load_manifest(VARIANT.id), "t")
    assert not [rel for rel in verified.files if rel.startswith(".")]


def test_a_component_the_model_index_declares_absent_is_not_looked_for(tiny, tmp_path):
    def optional_component(copy):
        index = json.loads((copy / "model_index.json").read_text())
        index["image_encoder"] = [None, None]
        (copy / "model_index.json").write_text(json.dumps(index))

    copy = _broken_copy(tiny, tmp_path, optional_component)
    verify(copy, load_manifest(VARIANT.id).layout_only(), "test")


def test_a_component_whose_weights_are_a_bin_file_holds_weights(tiny, tmp_path):
    def as_bin(copy):
        (copy / BIG).rename(copy / "transformer/diffusion_pytorch_model.bin")

    verify(_broken_copy(tiny, tmp_path, as_bin), load_manifest(VARIANT.id).layout_only(), "t")


def _safetensors(path: Path, tensors: dict, data: bytes) -> Path:
    """A safetensors file written by hand: `tensors` as its header, then `data`."""
    header = json.dumps(tensors).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def test_a_safetensors_file_without_tensors_passes_the_structure_check(tmp_path):
    """Its header fills the file, to the last byte."""
    assert check_safetensors(_safetensors(tmp_path / "empty.safetensors", {}, b"")) == []


def test_a_safetensors_tensor_whose_bytes_do_not_fit_its_shape_and_dtype_is_named(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}
    path = _safetensors(tmp_path / "w.safetensors", header, bytes(8))
    assert check_safetensors(path) == ["tensor w: 8 bytes for its shape and dtype"]


def test_bytes_past_a_safetensors_files_tensors_are_refused(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    path = _safetensors(tmp_path / "w.safetensors", header, bytes(16))
    assert check_safetensors(path) == [
        "the header describes 8 bytes of tensor data, the file holds 16 (truncated or corrupt)"
    ]


def test_a_safetensors_header_listing_tensors_out_of_offset_order_passes(tmp_path):
    """The format does not order the header: the data ends where its last tensor does."""
    header = {
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    path = _safetensors(tmp_path / "w.safetensors", header, bytes(16))
    assert check_safetensors(path) == []


def test_a_symlink_to_a_folder_outside_the_weights_is_refused(tmp_path):
    """os.walk lists a link to a folder among the folders, not the files."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "vae").symlink_to(tmp_path / "outside")
    with pytest.raises(BadSource, match=r"vae links to .*outside, outside the weights folder"):
        check_contained(tmp_path / "weights", "test")


def test_a_link_inside_weights_reached_through_a_symlinked_folder_is_accepted(tmp_path):
    """A cache on a volume mounted through a link: links resolve to the real path, so the
    folder they are held to must be resolved too."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text("{}")
    (real / "alias.json").symlink_to("config.json")
    (tmp_path / "mounted").symlink_to(real)
    check_contained(tmp_path / "mounted", "test")


def test_a_manifest_giving_one_files_size_records_the_size_check(tiny):
    """The marker's checks say what was verified: a manifest's files, and sizes where any
    is given."""
    layout = load_manifest(VARIANT.id).layout_only()
    assert {"manifest files"} <= set(verify(tiny, layout, "test").checks)
    assert "sizes" not in verify(tiny, layout, "test").checks
    sized = FileSpec((tiny / "model_index.json").stat().st_size)
    manifest = Manifest(VARIANT.id, files={**layout.files, "model_index.json": sized})
    assert {"manifest files", "sizes"} <= set(verify(tiny, manifest, "test").checks)


def test_a_file_of_another_size_than_the_manifests_is_not_hashed_too(tiny):
    """Its size already condemns it: reading gigabytes to name a second problem is waste."""
    size = (tiny / BIG).stat().st_size
    layout = load_manifest(VARIANT.id).layout_only()
    manifest = Manifest(VARIANT.id, files={**layout.files, BIG: FileSpec(size + 1, "0" * 64)})
    with pytest.raises(BadSource) as failed:
        verify(tiny, manifest, "test")
    assert f"{BIG}: {size:,} bytes, the manifest says {size + 1:,}" in str(failed.value)
    assert "sha256" not in str(failed.value)


def test_a_verification_with_more_than_12_problems_shows_12_and_counts_the_rest(tiny):
    layout = load_manifest(VARIANT.id).layout_only()
    absent = {f"extra/file-{n:02}.bin": FileSpec() for n in range(13)}
    with pytest.raises(BadSource) as failed:
        verify(tiny, Manifest(VARIANT.id, files={**layout.files, **absent}), "test")
    said = str(failed.value)
    assert "extra/file-11.bin: missing" in said and "extra/file-12.bin" not in said
    assert "\n  ... and 1 more\n" in said


@pytest.mark.parametrize(
    ("component", "cls", "config"),
    [
        ("tokenizer", "T5TokenizerFast", None),
        ("feature_extractor", "CLIPFeatureExtractor", "preprocessor_config.json"),
    ],
)
def test_a_components_config_is_looked_for_under_the_name_its_loader_reads(
    tiny, tmp_path, component, cls, config
):
    """Neither holds a config.json nor weights: asking for them refuses a sound pipeline."""

    def declare(copy):
        index = json.loads((copy / "model_index.json").read_text())
        index[component] = ["transformers", cls]
        (copy / "model_index.json").write_text(json.dumps(index))
        if config:
            (copy / component).mkdir()
            (copy / component / config).write_text("{}")

    copy = _broken_copy(tiny, tmp_path, declare)
    verify(copy, load_manifest(VARIANT.id).layout_only(), "test")


def test_a_components_config_that_cannot_be_read_is_named_not_raised(tiny, tmp_path):
    def folder_for_a_config(copy):
        (copy / "vae/config.json").unlink()
        (copy / "vae/config.json").mkdir()

    copy = _broken_copy(tiny, tmp_path, folder_for_a_config)
    with pytest.raises(BadSource, match=r"vae/config\.json: unreadable \(\[Errno 21\]"):
        verify(copy, load_manifest(VARIANT.id).layout_only(), "test")


def test_a_safetensors_header_over_the_formats_limit_is_refused_unread(tmp_path):
    """100 MiB, as the format allows: a garbled length is not read into memory (the file is
    sparse here, so the length fits it)."""
    length = (100 << 20) + 1
    path = tmp_path / "w.safetensors"
    with path.open("wb") as file:
        file.write(length.to_bytes(8, "little"))
        file.truncate(length + 64)
    size = length + 64
    assert check_safetensors(path) == [
        f"header length {length:,} does not fit the file ({size:,} bytes)"
    ]


@pytest.mark.parametrize(
    ("dtype", "width"),
    [("BF16", 2), ("F16", 2), ("F8_E4M3", 1), ("BOOL", 1), ("U32", 4), ("I64", 8)],
)
def test_a_safetensors_tensor_is_held_to_its_dtypes_width(tmp_path, dtype, width):
    """The real weights are bfloat16: a wrong width would refuse every file of them."""
    header = {"w": {"dtype": dtype, "shape": [3], "data_offsets": [0, 3 * width]}}
    path = _safetensors(tmp_path / "w.safetensors", header, bytes(3 * width))
    assert check_safetensors(path) == []


@pytest.mark.parametrize(
    "index", [["model.safetensors"], {"weight_map": ["model.safetensors"]}], ids=["list", "map"]
)
def test_a_shard_index_of_the_wrong_shape_is_named_not_raised(tmp_path, index):
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    assert check_shard_index(path)[0].startswith("shard index does not parse (")


# Manifests.


def test_builtin_manifests_match_the_variants_and_invent_no_hashes():
    for variant in VARIANTS.values():
        manifest = load_manifest(variant.id)
        assert "model_index.json" in manifest.files
        for component in ("scheduler", "text_encoder", "tokenizer", "transformer", "vae"):
            assert any(name.startswith(f"{component}/") for name in manifest.files)
        # None are known (no copy of the real weights was at hand): structure is checked.
        assert all(s.size is None and s.sha256 is None for s in manifest.files.values())
    assert sorted(p.stem for p in MANIFEST_DIR.glob("*.json")) == sorted(VARIANTS)


def test_the_builtin_manifests_name_a_command_that_exists():
    """Their note says how to fill in sizes and hashes: the module it names must run."""
    import importlib.util

    for path in sorted(MANIFEST_DIR.glob("*.json")):
        commands = re.findall(r"python -m ([\w.]+)", json.loads(path.read_text())["note"])
        assert commands, path.name
        assert all(importlib.util.find_spec(module) for module in commands), path.name


def test_a_manifest_lists_sources_tried_in_order(served, cache, tiny, tmp_path, monkeypatch):
    manifest = tmp_path / "manifest.json"
    data = manifest_of_directory(
        tiny, VARIANT.id, [served.url("gone.tar"), served.url("model.tar")]
    )
    manifest.write_text(json.dumps(data))
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_MANIFEST", str(manifest))
    root = ensure_weights(VARIANT)
    assert json.loads((root / COMPLETE_MARKER).read_text())["source"] == served.url("model.tar")


def test_a_manifest_written_of_an_entry_whose_tar_wrapped_the_weights_pins_it_in_place(
    served, cache, tmp_path, monkeypatch, capsys
):
    """The entry holds such weights in the tar's top folder; the manifest listed them under
    it, so the trusted entry failed verification, was discarded, and every setup failed."""
    url = served.url("wrapped.tar")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", url)
    root = ensure_weights(VARIANT)
    sent = served.bytes_sent
    manifest_main([str(root.parent), VARIANT.id, url])
    manifest = tmp_path / "manifest.json"
    manifest.write_text(capsys.readouterr().out)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_MANIFEST", str(manifest))
    assert ensure_weights(VARIANT) == root
    assert served.bytes_sent == sent


def test_the_documented_manifest_command_prints_the_manifest_and_no_warning(tiny):
    """The weights package imports the manifest code: running that module as __main__ made
    runpy warn that it was already imported, before every manifest written."""
    argv = [sys.executable, "-m", "cogvideox_cog.weights.manifest"]
    done = subprocess.run(
        [*argv, str(tiny), VARIANT.id], cwd=PROJECT, capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout) == manifest_of_directory(tiny, VARIANT.id, [])


def test_a_manifest_of_a_hub_download_folder_leaves_out_its_hidden_state(
    tiny, cache, tmp_path, monkeypatch
):
    """`hf download --local-dir` keeps its state in .cache/, which verification does not
    read: a manifest listing it failed the very folder it was written of."""
    folder = tmp_path / "cogvideox-5b"
    shutil.copytree(tiny, folder)
    state = folder / ".cache" / "huggingface" / "download" / "model_index.json.metadata"
    state.parent.mkdir(parents=True)
    state.write_text("0123abcd\n1700000000.0\n")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(folder))
    _pin(folder, tmp_path, monkeypatch)
    assert ensure_weights(VARIANT) == folder


def test_a_manifest_leaves_out_hidden_files_another_copy_lacks(tiny, cache, tmp_path, monkeypatch):
    """A copy made on a Mac holds .DS_Store files beside the weights: a manifest listing them
    would refuse every other copy, fetched from the tar or the Hub."""
    folder = shutil.copytree(tiny, tmp_path / "mac-copy")
    (folder / "transformer" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(tiny))
    _pin(folder, tmp_path, monkeypatch)
    assert ensure_weights(VARIANT) == tiny


def test_a_manifest_may_pin_an_empty_file_at_size_0(tiny, tmp_path, cache, monkeypatch):
    """The manifest command records an empty file as size 0: setup must read it back."""
    local = shutil.copytree(tiny, tmp_path / "local")
    (local / "tokenizer" / "added_tokens.json").write_bytes(b"")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(local))
    _pin(local, tmp_path, monkeypatch)
    assert ensure_weights(VARIANT) == local


def test_a_manifest_sha256_left_empty_is_read_as_unknown(tiny, tmp_path, cache, monkeypatch):
    """A hand-written manifest may leave a hash as "" (as null): that file is checked
    without one, not refused as a malformed hash."""
    manifest = tmp_path / "manifest.json"
    spec = {"model_index.json": {"size": (tiny / "model_index.json").stat().st_size, "sha256": ""}}
    manifest.write_text(json.dumps({"variant": VARIANT.id, "files": spec}))
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(tiny))
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_MANIFEST", str(manifest))
    assert ensure_weights(VARIANT) == tiny


def test_a_weights_url_is_held_to_the_built_in_manifests_layout_not_its_sizes(
    served, cache, tiny, tmp_path, monkeypatch
):
    """A built-in manifest's sizes and hashes describe its own sources: pinned, they would
    refuse every other copy of the same model that a COGVIDEOX_WEIGHTS_URL names."""
    builtin = tmp_path / "manifests"
    builtin.mkdir()
    files = manifest_of_directory(tiny, VARIANT.id, [])["files"]
    pinned = {name: {"size": spec["size"] + 1, "sha256": None} for name, spec in files.items()}
    (builtin / f"{VARIANT.id}.json").write_text(
        json.dumps({"variant": VARIANT.id, "sources": ["https://host/w.tar"], "files": pinned})
    )
    monkeypatch.setattr(manifest_module, "MANIFEST_DIR", builtin)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    assert _same_tree(tiny, ensure_weights(VARIANT))


def test_a_manifest_setting_naming_no_file_is_refused(tmp_path, cache, monkeypatch):
    """A mistyped COGVIDEOX_WEIGHTS_MANIFEST would otherwise check the weights against
    nothing: no sizes, no hashes, no files required."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_MANIFEST", str(tmp_path / "missing.json"))
    with pytest.raises(WeightsError, match=r"COGVIDEOX_WEIGHTS_MANIFEST=.*missing\.json: no such"):
        ensure_weights(VARIANT)


def test_a_manifest_for_another_variant_is_refused(tmp_path, cache, monkeypatch):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"variant": "cogvideox-2b", "files": {}}))
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_MANIFEST", str(manifest))
    with pytest.raises(WeightsError, match="describes 'cogvideox-2b', not 'cogvideox-5b'"):
        ensure_weights(VARIANT)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"files": {"a.json": {"size": "12"}}}, r"a\.json: size '12' is not a number of bytes"),
        ({"files": {"a.json": {"sha256": "abc"}}}, r"a\.json: sha256 'abc' is not 64 hex"),
        ({"files": {"a.json": {"sha256": "a" * 65}}}, r"a\.json: sha256 'a{65}' is not 64 hex"),
        ({"sources": "https://host/w.tar"}, r'"sources" must be a list of URLs'),
        ({"files": ["a.json"]}, r"'list' object has no attribute 'items'"),
    ],
    ids=["size-a-string", "short-sha256", "long-sha256", "sources-a-string", "files-a-list"],
)
def test_a_manifest_of_the_wrong_shape_is_refused_naming_the_field(
    tmp_path, cache, monkeypatch, data, problem
):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"variant": VARIANT.id, **data}))
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_MANIFEST", str(manifest))
    with pytest.raises(WeightsError, match=r"is not a valid weights manifest: " + problem):
        ensure_weights(VARIANT)


# hf:// sources and pget.


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("hf://THUDM/CogVideoX-5b", ("THUDM/CogVideoX-5b", None)),
        ("hf://zai-org/CogVideoX1.5-5B@main", ("zai-org/CogVideoX1.5-5B", "main")),
        ("hf://a/b@refs/pr/3", ("a/b", "refs/pr/3")),
        (
            "hf://a/b@" + "0123456789abcdef" * 2 + "01234567",
            ("a/b", "0123456789abcdef" * 2 + "01234567"),
        ),
    ],
)
def test_hf_urls_parse(url, parsed):
    ref = parse_hf_url(url)
    assert (ref.repo, ref.revision, ref.file) == (*parsed, None)


@pytest.mark.parametrize(
    "url",
    ["hf://THUDM", "hf://a/b/c", "hf://a/b@", "hf:///b", "hf://a/b@x y", "hf://../b", "hf://a/.."],
)
def test_bad_hf_urls_say_what_is_expected(url, cache, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", url)
    with pytest.raises(WeightsError, match=r"use hf://org/repo or hf://org/repo@revision"):
        ensure_weights(VARIANT)


def test_hf_source_downloads_with_the_offline_switch_lifted_for_that_call_only(
    tiny, cache, monkeypatch
):
    """The tests cannot reach the Hugging Face Hub (loopback only), so snapshot_download is
    replaced by a stand-in that records its arguments and the offline switch, and writes the
    tiny pipeline where the hub's files would land. Everything around it is the real code."""
    import huggingface_hub
    from huggingface_hub import constants

    calls = []

    def snapshot_download(repo_id, *, revision, local_dir, allow_patterns, dry_run=False):
        calls.append((repo_id, revision, Path(local_dir).name, allow_patterns, dry_run))
        calls.append(("offline", constants.HF_HUB_OFFLINE))
        files = [p for p in tiny.rglob("*") if p.is_file()]
        if dry_run:
            return [SimpleNamespace(file_size=p.stat().st_size, will_download=True) for p in files]
        shutil.copytree(tiny, local_dir, dirs_exist_ok=True)
        (Path(local_dir) / ".cache/huggingface").mkdir(parents=True)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", "hf://zai-org/CogVideoX-5b@v1")
    root = ensure_weights(VARIANT)
    staging = calls[0][2]
    assert calls == [
        ("zai-org/CogVideoX-5b", "v1", staging, ["model_index.json", "*/*"], True),
        ("offline", False),
        ("zai-org/CogVideoX-5b", "v1", staging, ["model_index.json", "*/*"], False),
        ("offline", False),
    ]
    assert staging.endswith(".staging")
    assert constants.HF_HUB_OFFLINE is True  # lifted for those calls only
    assert _same_tree(tiny, root) and not (root / ".cache").exists()
    assert (
        json.loads((root / COMPLETE_MARKER).read_text())["source"] == "hf://zai-org/CogVideoX-5b@v1"
    )


def test_overlapping_hub_downloads_keep_the_hub_reachable_until_the_last_ends(monkeypatch):
    """A LoRA download that timed out goes on in its thread while the next one starts."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    first, second = hub_online(), hub_online()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the older one ends first
    assert constants.HF_HUB_OFFLINE is False  # the second download is not cut off
    second.__exit__(None, None, None)
    assert constants.HF_HUB_OFFLINE is True


def test_hf_errors_name_the_repository(cache, monkeypatch):
    import huggingface_hub

    def snapshot_download(repo_id, **kwargs):
        raise OSError("401 Client Error: gated repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", "hf://THUDM/CogVideoX-5b")
    with pytest.raises(
        WeightsError, match=r"could not download hf://THUDM/CogVideoX-5b .*HF_TOKEN"
    ):
        ensure_weights(VARIANT)


@pytest.fixture
def hub(tiny, cache, monkeypatch):
    """The tiny pipeline as the repository org/tiny of a fake Hub (tests/hub_server.py), its
    files behind presigned URLs on a CDN; huggingface_hub pointed at it as HF_ENDPOINT does."""
    from huggingface_hub import constants

    server = HubServer("org/tiny", tiny)
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    template = server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", "hf://org/tiny")
    yield server
    server.stop()


def test_a_manifest_of_a_hub_download_folder_pins_the_same_repository_fetched_from_the_hub(
    tiny, cache, tmp_path, monkeypatch
):
    """A Hub repository holds a README.md and LICENSE beside model_index.json, which a fetch
    from the Hub leaves out: a manifest listing them failed every copy fetched from there."""
    from huggingface_hub import constants

    folder = tmp_path / "cogvideox-5b"
    shutil.copytree(tiny, folder)
    (folder / "README.md").write_text("# CogVideoX-5B\n")
    (folder / "LICENSE").write_text("license text\n")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(manifest_of_directory(folder, VARIANT.id, ["hf://org/tiny"])))
    server = HubServer("org/tiny", folder)
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    template = server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_MANIFEST", str(manifest))
    try:
        root = ensure_weights(VARIANT)
    finally:
        server.stop()
    assert "sha256" in json.loads((root / COMPLETE_MARKER).read_text())["checks"]


def test_the_hubs_log_of_a_dropped_download_hides_the_presigned_urls_signature(
    hub, tiny, cache, caplog
):
    """huggingface_hub logs the CDN URL it resumes at WARNING, and its handler writes that
    into the setup's log."""
    caplog.set_level("WARNING", logger="huggingface_hub")
    hub.cdn.drop_at(BIG, (tiny / BIG).stat().st_size // 2)
    assert _same_tree(tiny, ensure_weights(VARIANT))
    assert f"Error while downloading from {hub.cdn.url(BIG)}?<query hidden>" in caplog.text
    assert "X-Amz" not in caplog.text


def test_a_hub_download_its_cdn_refuses_fails_without_the_presigned_urls_signature(hub, cache):
    """huggingface_hub's error quotes the CDN URL it was refused at (an expired signature),
    which the setup's error and traceback repeated."""
    hub.cdn.fail_with(BIG, 403, times=None)
    with pytest.raises(WeightsError, match=r"could not download hf://org/tiny .*403") as failed:
        ensure_weights(VARIANT)
    assert f"{hub.cdn.url(BIG)}?<query hidden>" in str(failed.value)
    assert SIGNATURE not in "".join(traceback.format_exception(failed.value))


def test_a_hub_download_that_failed_part_way_resumes_without_fetching_its_files_again(
    hub, tiny, cache, monkeypatch
):
    """snapshot_download resumes into the staging folder: an attempt that got every file but
    one leaves them there, and the next setup fetches only that one, needing room for it
    alone."""
    hub.cdn.fail_with(BIG, 403, times=None)
    with pytest.raises(WeightsError, match=r"could not download hf://org/tiny"):
        ensure_weights(VARIANT)
    hub.cdn.clear(BIG)
    sent = hub.cdn.bytes_sent
    room = (tiny / BIG).stat().st_size + cache_module.HEADROOM_BYTES
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(weights.shutil, "disk_usage", lambda path: usage(10**12, 0, room))
    assert _same_tree(tiny, ensure_weights(VARIANT))
    assert hub.cdn.bytes_sent - sent == (tiny / BIG).stat().st_size


def test_a_hub_download_without_the_disk_space_fails_before_fetching(hub, cache, monkeypatch):
    """The Hub says every file's size before the download: a volume without room for them
    fails setup at once, not once it fills part way."""
    room = cache_module.HEADROOM_BYTES + 1_000  # the headroom, and less than the files
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(weights.shutil, "disk_usage", lambda path: usage(10**12, 0, room))
    with pytest.raises(WeightsError, match=r"^not enough disk space in ") as failed:
        ensure_weights(VARIANT)
    assert "HF_TOKEN" not in str(failed.value)  # not the repository's fault
    assert hub.cdn.bytes_sent == 0
    assert _nothing_published(cache)


def test_a_disk_that_fills_during_a_hub_download_says_to_free_space(cache, monkeypatch):
    """The free space check passed, then another download on the volume filled it, and
    huggingface_hub raised its write's ENOSPC: the stand-in raises it where the real
    download would. Before, the advice was to check the repository name and HF_TOKEN."""
    import huggingface_hub

    def snapshot_download(repo_id, *, dry_run=False, **kwargs):
        if dry_run:
            return []
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", "hf://THUDM/CogVideoX-5b")
    expected = r"No space left on device\. Free disk space or set COGVIDEOX_WEIGHTS_DIR"
    with pytest.raises(WeightsError, match=expected) as failed:
        ensure_weights(VARIANT)
    assert "HF_TOKEN" not in str(failed.value)


_FAKE_PGET = """\
import os, sys, tarfile, urllib.request
# A stand-in for Replicate's pget binary: `pget -x URL DEST` extracts the tar at URL into
# DEST and, like pget, refuses an existing DEST without -f. Like pget 0.8.2 at its default
# log level, it logs the whole URL it was given.
with open(os.environ["PGET_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
args = [a for a in sys.argv[1:] if not a.startswith("-")]
url, dest = args
print(f"2026-11-30T00:00:00Z | INFO  | [ Initiating ] dest={dest} url={url}", file=sys.stderr)
if os.path.exists(dest) and "-f" not in sys.argv:
    sys.exit(f"destination {dest} exists; use -f to overwrite")
# A trusted tar; the "data" filter where this Python has it (3.11.4+).
safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
with urllib.request.urlopen(url) as response:
    tarfile.open(fileobj=response, mode="r|").extractall(dest, **safe)
"""


@pytest.fixture
def fake_pget(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pget = bin_dir / "pget"
    pget.write_text(f"#!{sys.executable}\n{_FAKE_PGET}")
    pget.chmod(0o755)
    monkeypatch.setenv("PGET_LOG", str(tmp_path / "pget.log"))
    monkeypatch.setattr(weights.shutil, "which", lambda name, **kw: str(pget))
    return tmp_path / "pget.log"


def _staging_for(cache: Path, url: str) -> Path:
    """Where setup downloads cogvideox-5b's weights from `url` before publishing them."""
    entry = cache / f"cogvideox-5b-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
    return cache / f".{entry.name}.staging"


def test_pget_is_used_when_present_and_its_result_is_verified(
    served, cache, tiny, fake_pget, monkeypatch
):
    url = served.url("model.tar")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", url)
    # An earlier attempt's staging folder: pget would refuse it as its destination.
    staging = _staging_for(cache, url)
    staging.mkdir(parents=True)
    (staging / "leftover").write_text("x")
    root = ensure_weights(VARIANT)
    args = fake_pget.read_text().split()
    assert args == ["-x", url, str(staging)]
    assert _same_tree(tiny, root)


def test_a_pget_download_under_the_sha256_check_records_every_files_hash(
    served, cache, tiny, fake_pget, monkeypatch
):
    """pget gives no sha256: with COGVIDEOX_WEIGHTS_CHECK=sha256 the files are read back, so
    that the next setup's content check has a hash for each one to hold it to."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_CHECK", "sha256")
    root = ensure_weights(VARIANT)
    files = json.loads((root / COMPLETE_MARKER).read_text())["files"]
    assert BIG in files
    for name, recorded in files.items():
        assert recorded["sha256"] == hashlib.sha256((tiny / name).read_bytes()).hexdigest()


def test_pget_logs_a_presigned_urls_query_string_hidden(
    served, cache, tiny, fake_pget, monkeypatch, caplog, capfd
):
    """pget logs the URL it fetches: its log is passed on with the query string hidden."""
    caplog.set_level("INFO", logger="cogvideox_cog")
    secret = "X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=0123456789abcdef"
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url(f"model.tar?{secret}"))
    assert _same_tree(tiny, ensure_weights(VARIANT))
    out, err = capfd.readouterr()
    assert "X-Amz" not in caplog.text + out + err
    assert f"[ Initiating ] dest={cache}" in caplog.text  # its log is still there
    assert f"url={served.url('model.tar')}?<query hidden>" in caplog.text


def test_an_earlier_pget_attempts_files_do_not_count_against_the_disk_check(
    served, cache, tiny, fake_pget, monkeypatch
):
    """pget starts again from nothing: what a killed pget left is freed before the check."""
    url = served.url("model.tar")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", url)
    staging = _staging_for(cache, url)
    staging.mkdir(parents=True)
    with (staging / "half-written.safetensors").open("wb") as half:
        half.truncate(1 << 30)  # sparse: no real disk used
    size = (Path(served.directory) / "model.tar").stat().st_size
    capacity = size + cache_module.HEADROOM_BYTES + (100 << 20)  # room for one copy only
    usage = namedtuple("usage", "total used free")

    def disk_usage(path):
        used = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        return usage(capacity, used, capacity - used)

    monkeypatch.setattr(cache_module.shutil, "disk_usage", disk_usage)
    assert _same_tree(tiny, ensure_weights(VARIANT))


def test_a_pget_download_that_stops_coming_fails_setup_instead_of_hanging_it(
    served, cache, fake_pget, monkeypatch
):
    """pget times out a connect or a TLS handshake, not a body that stops coming: a server
    that keeps the connection open and sends nothing left setup STARTING for good."""
    url = served.url("model.tar")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", url)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_TIMEOUT", "0.4")  # stopped after 5 x 0.4 s
    served.stall_at("model.tar", offset=64 << 10, seconds=60)
    started = time.monotonic()
    with pytest.raises(WeightsError, match=r"pget received nothing for 2 s .*was stopped"):
        ensure_weights(VARIANT)
    assert time.monotonic() - started < 20
    entry = _staging_for(cache, url).name.removeprefix(".").removesuffix(".staging")
    assert not (cache / entry).exists()  # nothing published


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped (Linux /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_setup_killed_while_pget_downloads_takes_pget_with_it(served, cache, tmp_path):
    """pget does not hold the entry's lock: left running, it would go on writing into the
    staging folder that the next setup (another worker on the volume) empties and fills."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pids = tmp_path / "pget.pid"
    pget = bin_dir / "pget"  # a download that takes a minute
    pget.write_text(
        f"#!{sys.executable}\nimport os, time\n"
        f"open({str(pids)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n"
    )
    pget.chmod(0o755)
    env = {"COGVIDEOX_WEIGHTS_URL": served.url("model.tar"), "COGVIDEOX_WEIGHTS_DIR": str(cache)}
    setup = _setup_process(env, bin_dir)
    deadline = time.monotonic() + 60
    while not (pids.exists() and pids.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pids.read_text())
    setup.send_signal(signal.SIGKILL)
    setup.communicate()
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not _running(pid)
    finally:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def test_two_concurrent_setups_with_pget_on_one_cache_run_pget_once(served, cache, tiny, tmp_path):
    """Two ranks, or two servers sharing a volume: the second waits on the entry's lock
    while pget writes the staging folder, and then uses what the first published."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pget = bin_dir / "pget"
    # A pget that takes 1.5 s before it writes anything: the other setup starts meanwhile.
    pget.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(1.5)\n{_FAKE_PGET}")
    pget.chmod(0o755)
    env = {
        "COGVIDEOX_WEIGHTS_URL": served.url("model.tar"),
        "COGVIDEOX_WEIGHTS_DIR": str(cache),
        "PGET_LOG": str(tmp_path / "pget.log"),
    }
    processes = [_setup_process(env, bin_dir) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], results
    roots = {out.strip() for out, _ in results}
    assert len(roots) == 1
    assert _same_tree(tiny, Path(roots.pop()))
    assert len((tmp_path / "pget.log").read_text().splitlines()) == 1
    logs = "".join(err for _, err in results)
    assert "waiting for another setup to finish" in logs
    assert "completed by another process" in logs


def _pget_that(tmp_path, monkeypatch, code: str) -> None:
    """A pget on PATH (as `shutil.which` finds it) that runs `code` after pget's arguments
    are parsed into `url` and `dest`."""
    pget = tmp_path / "bin" / "pget"
    pget.parent.mkdir(exist_ok=True)
    parse = "import sys\nurl, dest = [a for a in sys.argv[1:] if not a.startswith('-')]\n"
    pget.write_text(f"#!{sys.executable}\n{parse}{code}")
    pget.chmod(0o755)
    monkeypatch.setattr(weights.shutil, "which", lambda name, **kw: str(pget))


def test_a_pget_that_fails_part_way_fails_setup_and_its_files_are_not_kept(
    served, cache, tiny, tmp_path, fake_pget, monkeypatch
):
    """pget's exit status is what says its files are whole: a failure leaves part of the tar
    extracted, which is neither verified nor published, and the next setup starts afresh."""
    url = served.url("model.tar")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", url)
    _pget_that(
        tmp_path,
        monkeypatch,
        "import os\nos.makedirs(dest)\nopen(os.path.join(dest, 'model_index.json'), 'w')"
        ".write('{')\nsys.exit('connection reset by peer')\n",
    )
    with pytest.raises(WeightsError, match=r"pget failed \(exit 1\) fetching .*its log is above"):
        ensure_weights(VARIANT)
    assert _nothing_published(cache)
    assert (_staging_for(cache, url) / "model_index.json").exists()  # what it left
    monkeypatch.setattr(weights.shutil, "which", lambda name, **kw: str(tmp_path / "bin" / "pget"))
    (tmp_path / "bin" / "pget").write_text(f"#!{sys.executable}\n{_FAKE_PGET}")
    assert _same_tree(tiny, ensure_weights(VARIANT))


def test_a_pget_that_exits_0_with_a_file_cut_short_is_not_published(
    served, cache, tmp_path, fake_pget, monkeypatch
):
    """An exit status of 0 is not taken for whole weights: the files are verified as the
    built-in downloader's are."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    _pget_that(
        tmp_path,
        monkeypatch,
        f"import os, runpy\nrunpy.run_path({str(tmp_path / 'bin' / 'real-pget')!r})\n"
        f"big = os.path.join(dest, {BIG!r})\nos.truncate(big, os.path.getsize(big) // 2)\n",
    )
    (tmp_path / "bin" / "real-pget").write_text(_FAKE_PGET)
    with pytest.raises(BadSource, match=BIG):
        ensure_weights(VARIANT)
    assert _nothing_published(cache)


def test_a_pget_removed_after_path_found_it_falls_back_to_the_built_in_downloader(
    served, cache, tiny, tmp_path, monkeypatch, caplog
):
    """An image update or a cleanup removing pget between the PATH lookup and its start:
    pget is absent, so the tar is fetched as it is without pget, not failed with a bare
    FileNotFoundError."""
    caplog.set_level("WARNING", logger="cogvideox_cog")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    pget = tmp_path / "bin" / "pget"
    pget.parent.mkdir()
    pget.write_text(f"#!{sys.executable}\n{_FAKE_PGET}")
    pget.chmod(0o755)

    def which_then_removed(name, **kw):
        """Found on PATH as shutil.which finds it, then removed before it is started."""
        found = str(pget) if os.access(pget, os.X_OK) else None
        pget.unlink()
        return found

    monkeypatch.setattr(weights.shutil, "which", which_then_removed)
    assert _same_tree(tiny, ensure_weights(VARIANT))
    assert f"pget ({pget}) is gone since it was found on PATH" in caplog.text


def test_a_pget_that_cannot_be_started_fails_setup_naming_it(served, cache, tmp_path, monkeypatch):
    """A pget on PATH that is not a program this machine runs (a download cut short, another
    architecture's binary): the error names it and what to do."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    pget = tmp_path / "bin" / "pget"
    pget.parent.mkdir()
    pget.write_bytes(b"\x7fELF\x00cut short")
    pget.chmod(0o755)
    monkeypatch.setattr(weights.shutil, "which", lambda name, **kw: str(pget))
    expected = rf"pget \({re.escape(str(pget))}\) could not be started: Exec format error"
    with pytest.raises(WeightsError, match=expected):
        ensure_weights(VARIANT)
    assert _nothing_published(cache)


def test_a_pget_killed_by_a_signal_fails_setup_even_with_every_file_written(
    served, cache, tmp_path, fake_pget, monkeypatch
):
    """A pget the OOM killer took has no exit status of its own (-9): that is a failure too,
    even where what it wrote happens to pass verification."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    _pget_that(
        tmp_path,
        monkeypatch,
        f"import os, runpy, signal\nrunpy.run_path({str(tmp_path / 'bin' / 'real-pget')!r})\n"
        f"os.kill(os.getpid(), signal.SIGKILL)\n",
    )
    (tmp_path / "bin" / "real-pget").write_text(_FAKE_PGET)
    with pytest.raises(WeightsError, match=r"pget failed \(exit -9\)"):
        ensure_weights(VARIANT)
    assert _nothing_published(cache)


def test_a_setup_interrupted_while_pget_downloads_stops_pget(served, cache, tmp_path, monkeypatch):
    """An interrupt (or a cancel) in a setup that lives on: pget is killed, not left writing
    into the staging folder the next attempt empties and fills."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    pids = tmp_path / "pget.pid"
    _pget_that(
        tmp_path,
        monkeypatch,
        f"import os, time\nopen({str(pids)!r}, 'w').write(str(os.getpid()))\n"
        f"print('started', flush=True)\ntime.sleep(60)\n",
    )

    def interrupt_once_pget_runs(signum, frame):
        if pids.exists() and pids.read_text():
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt_once_pget_runs)
    signal.setitimer(signal.ITIMER_REAL, 0.1, 0.1)
    try:
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            ensure_weights(VARIANT)
        assert time.monotonic() - started < 30
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    pid = int(pids.read_text())
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not _running(pid)
    finally:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def test_pget_output_that_fails_verification_is_not_published(
    served, served_dir, cache, tiny, tmp_path, fake_pget, monkeypatch
):
    _tar(served_dir / "broken.tar", _broken_copy(tiny, tmp_path, _shard))
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("broken.tar"))
    with pytest.raises(BadSource, match=r"names shard model-00002-of-00002\.safetensors"):
        ensure_weights(VARIANT)
    assert _nothing_published(cache)


# Tars as tools write them.


def test_a_tar_made_with_tar_dash_c_dot_is_accepted(tiny, tmp_path, cache, monkeypatch):
    """`tar -C DIR -cf x.tar .` (as the README suggests) names members ./model_index.json."""
    tar = tmp_path / "dot.tar"
    subprocess.run(["tar", "-C", str(tiny), "-cf", str(tar), "."], check=True)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(tar))
    assert _same_tree(tiny, ensure_weights(VARIANT))


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_and_pax_headers_are_read(tiny, tmp_path, cache, monkeypatch, tar_format):
    copy = shutil.copytree(tiny, tmp_path / "long")
    (copy / "tokenizer" / ("x" * 150 + ".json")).write_text("{}")  # past ustar's 100 bytes
    tar = tmp_path / "long.tar"
    with tarfile.open(tar, "w", format=tar_format, pax_headers={"comment": "global"}) as archive:
        archive.add(copy, arcname="model_cache")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(tar))
    assert _same_tree(copy, ensure_weights(VARIANT))


def _aligned_sparse_member(tiny: Path, tar: Path) -> None:
    """A pax sparse member (format 0.1) whose real size is its data plus the next member:
    read as a plain file of that size, it swallowed extra.txt and the entry was published
    without it, with holes.bin holding extra.txt's header."""
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as archive:
        archive.add(tiny, arcname=".")
        info, data = _member("./holes.bin", b"d" * 512)
        info.pax_headers = {
            "GNU.sparse.name": "./holes.bin",
            "GNU.sparse.size": str(512 + 1024),  # its data, then extra.txt's header and data
            "GNU.sparse.numblocks": "1",
            "GNU.sparse.map": "0,512",
        }
        archive.addfile(info, io.BytesIO(data))
        info, data = _member("extra.txt", b"extra")
        archive.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("version", ["0.0", "0.1", "1.0", "aligned"])
def test_a_tar_with_a_pax_sparse_member_is_refused_naming_it(
    tiny, tmp_path, cache, monkeypatch, version
):
    """GNU tar --sparse --format=posix: was a "truncated" or "corrupt" tar, or worse, a
    stream that lost its place and took the next members for this one's data."""
    tar = tmp_path / "sparse.tar"
    if version == "aligned":
        _aligned_sparse_member(tiny, tar)
    else:
        version_text = subprocess.run(["tar", "--version"], capture_output=True, text=True)
        if "GNU tar" not in version_text.stdout:
            pytest.skip("needs GNU tar")
        copy = shutil.copytree(tiny, tmp_path / "sparse")
        with (copy / "holes.bin").open("wb") as file:  # a hole, then data, then a hole
            file.seek(1 << 20)
            file.write(b"data")
            file.truncate(2 << 20)
        command = ["tar", "-C", str(copy), "--sparse", f"--sparse-version={version}"]
        subprocess.run([*command, "--format=posix", "-cf", str(tar), "."], check=True)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(tar))
    with pytest.raises(BadSource, match=r"sparse member '\./holes\.bin'\. Rebuild .* --sparse"):
        ensure_weights(VARIANT)
    assert _nothing_published(cache)


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_a_compressed_tar_is_refused_saying_so(tiny, tmp_path, cache, monkeypatch, compression):
    """Was "bad header at byte 0 (invalid header); the download is corrupt or not a tar"."""
    tar = tmp_path / f"model.tar.{compression}"
    with tarfile.open(tar, f"w:{compression}") as archive:
        archive.add(tiny, arcname=".")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(tar))
    name = {"gz": "gzip", "bz2": "bzip2", "xz": "xz"}[compression]
    with pytest.raises(BadSource, match=rf"is {name}-compressed, not a plain tar.*Decompress"):
        ensure_weights(VARIANT)
    assert _nothing_published(cache)


def _documented_command(page: str, heading: str) -> str:
    """The first bash block under `heading` in docs/`page`, as a user would paste it."""
    text = (PROJECT / "docs" / page).read_text()
    section = text[text.index(heading) :]
    start = section.index("```bash\n") + len("```bash\n")
    return section[start : section.index("```", start)]


def test_the_documented_pre_seeding_command_fills_the_volume_and_shows_progress(tiny, tmp_path):
    """A 20 GB download takes minutes: the command must say how it goes, not sit silent."""
    volume = tmp_path / "volume"
    command = _documented_command("weights.md", "## Pre-seeding a volume")
    command = command.replace("/srv/cogvideox-weights", str(volume))
    command = command.replace(".venv/bin/python", sys.executable)
    source = _tar(tmp_path / "weights.tar", tiny)  # in place of the public tar
    env = {**os.environ, weights.WEIGHTS_URL_ENV: str(source)}
    done = subprocess.run(
        ["bash", "-c", command], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    entry = Path(done.stdout.strip().splitlines()[-1])
    assert entry.parent == volume and (entry / weights.COMPLETE_MARKER).is_file()
    assert "weights: fetching cogvideox-5b from" in done.stdout
    assert "weights: cogvideox-5b ready in" in done.stdout


# The cache's own guarantees, each held on its own.


def _entry_of(url: str) -> str:
    return f"cogvideox-5b-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def test_publishing_syncs_every_file_and_writes_the_marker_before_the_one_rename(
    served, cache, monkeypatch
):
    """After a power cut the marker must not outlive the data, and the entry must never be
    seen without its marker: every file is synced, then the marker written in the staging
    folder, then the folder renamed into place."""
    url = served.url("model.tar")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", url)
    entry = cache / _entry_of(url)
    synced, renames = set(), []
    real_fsync, real_rename = os.fsync, os.rename

    def recording_fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def checking_rename(source, target):
        if Path(target) == entry:
            files = {
                str(p) for p in Path(source).rglob("*") if p.is_file() and p.name != COMPLETE_MARKER
            }
            renames.append(((Path(source) / COMPLETE_MARKER).is_file(), files - synced))
        real_rename(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", checking_rename)
    assert ensure_weights(VARIANT) == entry
    assert renames == [(True, set())]


def test_a_delete_killed_part_way_leaves_no_half_entry_under_its_name(
    served, cache, tiny, monkeypatch
):
    """A discarded entry is renamed aside before it is removed: a setup killed while
    deleting leaves hidden trash, never an entry with some of its files gone."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    root = ensure_weights(VARIANT)

    def killed_after_one_file(path, ignore_errors=False):
        next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(cache_module.shutil, "rmtree", killed_after_one_file)
        cache_module.discard(root)
    assert not root.exists()
    assert next(p.name for p in cache.iterdir() if ".trash-" in p.name).startswith(".")
    assert _same_tree(tiny, ensure_weights(VARIANT))
    assert sorted(p.name for p in cache.iterdir()) == sorted([root.name, f".{root.name}.lock"])


def test_a_file_changed_between_the_two_looks_of_one_setup_is_hashed_again(
    served, cache, monkeypatch
):
    """The look before the lock and the one under it share the sha256 computed: a file
    another setup rewrote in between (same size, new bytes) must not pass on the first
    look's hash."""
    url = served.url("model.tar")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", url)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_CHECK", "sha256")
    root = ensure_weights(VARIANT)
    manifest = weights.check_settings(VARIANT).layout_only()
    keys, hashed = [download.identity(url)], {}
    assert cache_module.published(root, keys, manifest, "sha256", hashed) == root
    _flip(root / BIG, (root / BIG).stat().st_size - 10)
    later = (root / BIG).stat().st_mtime_ns + 10**9
    os.utime(root / BIG, ns=(later, later))
    assert cache_module.published(root, keys, manifest, "sha256", hashed) is None


def test_an_entry_with_a_file_of_no_recorded_sha256_is_not_called_intact(
    served, cache, monkeypatch
):
    """Intact means every file still has the sha256 recorded for it: a file with none
    recorded cannot clear its bytes of a failure to load, so the entry is fetched again."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    root = ensure_weights(VARIANT)
    assert cache_module.intact(root)
    marker = json.loads((root / COMPLETE_MARKER).read_text())
    marker["files"][BIG]["sha256"] = None
    (root / COMPLETE_MARKER).write_text(json.dumps(marker))
    assert not cache_module.intact(root)


def test_the_disk_check_counts_what_already_arrived_and_keeps_the_headroom(tmp_path, monkeypatch):
    """A resumed download needs only what is still to come, plus the headroom."""
    usage = namedtuple("usage", "total used free")
    total, done = 10**9, 4 * 10**8
    need = total - done + cache_module.HEADROOM_BYTES
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: usage(0, 0, need))
    cache_module.check_disk(tmp_path, total, done, "model.tar")
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: usage(0, 0, need - 1))
    with pytest.raises(WeightsError, match=r"0\.67 GB needed .*64 MiB headroom"):
        cache_module.check_disk(tmp_path, total, done, "model.tar")


# The cache's markers, entries and checks, each held on its own.


def test_a_marker_of_an_older_format_is_verified_again_before_use(served, cache, tiny, monkeypatch):
    """An older version's marker vouches for what that version checked: its entry is
    verified in place as a new manifest's is, and replaced if the files no longer pass."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    root = ensure_weights(VARIANT)
    marker = json.loads((root / COMPLETE_MARKER).read_text())
    (root / COMPLETE_MARKER).write_text(json.dumps({**marker, "format": 1}))
    _flip(root / BIG, 0)  # the safetensors header no longer fits the file: same size
    sent = served.bytes_sent
    assert _same_tree(tiny, ensure_weights(VARIANT))
    assert served.bytes_sent > sent
    assert json.loads((root / COMPLETE_MARKER).read_text())["format"] == marker["format"]


def test_a_hash_of_a_file_beside_the_wrapping_folder_is_no_part_of_the_weights(tiny, tmp_path):
    """A tar may hold a note beside the folder it wraps the pipeline in: its hash, computed
    while writing, is of no file of the weights, and verifying must not trip over it."""
    shutil.copytree(tiny, tmp_path / "staging" / "model_cache")
    (tmp_path / "staging" / "README.md").write_text("the weights are in model_cache/")
    written = {"README.md": "0" * 64, f"model_cache/{BIG}": sha256_file(tiny / BIG).hexdigest()}
    verified = verify(tmp_path / "staging", _pinned(tiny, BIG), "test", written)
    assert "README.md" not in verified.files
    assert verified.files[BIG]["sha256"] == written[f"model_cache/{BIG}"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an fd by /proc/self/fd")
def test_every_folder_is_synced_before_the_marker_and_the_cache_after_the_rename(
    served, cache, monkeypatch
):
    """A synced file whose folder is not can lose its name in a power cut, and an entry its
    rename: the marker would then vouch for files that are gone, or the weights vanish."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    synced, marked = [], []
    real_fsync, real_write_marker = os.fsync, cache_module.write_marker

    def recording_fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def recording_write_marker(folder, marker):
        marked.append((Path(folder), len(synced)))
        real_write_marker(folder, marker)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(cache_module, "write_marker", recording_write_marker)
    root = ensure_weights(VARIANT)
    [(staging, before)] = marked
    folders = {staging / p.relative_to(root) for p in root.rglob("*") if p.is_dir()} | {staging}
    assert folders <= set(synced[:before])
    assert cache in synced[before:]


def test_a_file_the_manifest_lists_is_required_even_where_no_other_check_looks(tiny, tmp_path):
    """No component check reads a tokenizer's data file: a download that lost it is caught
    by the manifest listing it, or an incomplete copy would be published as complete."""
    rel = "tokenizer/tokenizer.json"
    copy = _broken_copy(tiny, tmp_path, lambda copy: (copy / rel).unlink())
    assert not verify(copy, load_manifest(VARIANT.id), "test").files.get(rel)
    with pytest.raises(BadSource, match=rf"{rel}: missing \(the manifest lists it\)"):
        verify(copy, _pinned(tiny, rel), "test")


def test_the_files_hashed_at_once_are_as_many_as_weights_md_says():
    """weights.md: up to 4 files are hashed in parallel."""
    docs = " ".join((PROJECT / "docs/weights.md").read_text().split())
    assert f"Up to {cache_module.HASH_THREADS} files are hashed in parallel." in docs


def test_the_download_progress_comes_as_often_as_weights_md_says():
    """weights.md: the downloader logs its progress every 15 s."""
    docs = " ".join((PROJECT / "docs/weights.md").read_text().split())
    assert f"logged every {download.PROGRESS_EVERY_S:g} s" in docs


def test_a_stalled_pget_is_stopped_after_as_many_timeouts_as_the_docs_say():
    """weights.md and operations.md: pget is stopped once its folder has not grown for
    5 x COGVIDEOX_WEIGHTS_TIMEOUT."""
    for page in ("weights.md", "operations.md"):
        docs = " ".join((PROJECT / "docs" / page).read_text().split())
        assert f"for {weights.PGET_STALL_TIMEOUTS} x `COGVIDEOX_WEIGHTS_TIMEOUT`" in docs, page
