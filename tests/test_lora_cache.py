"""Where LoRA files come from: URL forms, downloads over loopback HTTP with faults, tars of
training runs, size and time limits, and the content-addressed LRU cache."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save, save_file

from cogvideox_cog import leftovers
from cogvideox_cog.errors import LoraError
from cogvideox_cog.lora import fetch, store
from cogvideox_cog.lora.fetch import check_lora_url
from cogvideox_cog.lora.store import LoraCache
from cogvideox_cog.settings import parse_size
from cogvideox_cog.weights import download
from tests.file_server import FileServer
from tests.hub_server import SIGNATURE, HubServer

LORA = "pytorch_lora_weights.safetensors"
PROJECT = Path(__file__).resolve().parent.parent


def _lora_bytes(seed: int, rank: int = 4) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(
            rank, 32, generator=generator
        ),
        "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(
            32, rank, generator=generator
        ),
    }
    return save(tensors)


def _tar(members: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def served(tmp_path) -> tuple[Path, FileServer]:
    root = tmp_path / "served"
    root.mkdir()
    server = FileServer(root)
    yield root, server
    server.stop()


@pytest.fixture
def cache(tmp_path) -> LoraCache:
    return LoraCache(
        tmp_path / "cache", max_file_bytes=1 << 20, max_cache_bytes=1 << 30, timeout_s=30
    )


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_S", 0.01)
    monkeypatch.setattr(download, "RETRIES", 2)


def _serve(root: Path, name: str, data: bytes) -> None:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)


def _gets(server: FileServer, name: str) -> int:
    return sum(1 for method, path, _ in server.requests if method == "GET" and path == name)


def _left_over(cache: LoraCache) -> list[str]:
    return sorted(str(p.relative_to(cache.root)) for p in cache.root.rglob("*") if p.is_file())


def test_a_lora_another_server_publishes_meanwhile_is_kept_not_replaced(served, cache, monkeypatch):
    """Two servers fetching one new LoRA at once: the one that publishes second (here, while
    this one makes its download durable) takes the other's file, which the other already
    holds. Replaced, that hold would be on a file the name no longer leads to, and an
    eviction could remove the LoRA between its lookup and its load."""
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    blob = cache.blobs / f"{hashlib.sha256(data).hexdigest()}.safetensors"
    theirs: list = []
    real_fsync = store.cache.fsync

    def another_server_publishes(path):
        real_fsync(path)
        if not theirs and Path(path).is_file():  # the download, before it is published
            blob.write_bytes(data)
            theirs.append(store._open_shared(blob))  # their hold, taken as they publish

    monkeypatch.setattr(store.cache, "fsync", another_server_publishes)
    assert cache.get(server.url("a.safetensors")) == blob
    assert os.path.samestat(os.fstat(theirs[0].fileno()), blob.stat())
    assert os.path.samestat(os.fstat(cache._held.fileno()), blob.stat())
    theirs[0].close()


def test_downloaded_lora_is_stored_under_its_sha256(served, cache):
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    blob = cache.get(server.url("a.safetensors"))
    assert blob.name == f"{hashlib.sha256(data).hexdigest()}.safetensors"
    assert blob.read_bytes() == data


def test_same_url_is_downloaded_once(served, cache):
    root, server = served
    _serve(root, "a.safetensors", _lora_bytes(1))
    first = cache.get(server.url("a.safetensors"))
    gets = _gets(server, "a.safetensors")
    assert cache.get(server.url("a.safetensors")) == first
    assert _gets(server, "a.safetensors") == gets


def test_a_cached_file_cut_short_on_disk_is_fetched_again(served, cache):
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    blob = cache.get(server.url("a.safetensors"))
    with blob.open("r+b") as file:
        file.truncate(len(data) // 2)
    sent = server.bytes_sent
    assert cache.get(server.url("a.safetensors")).read_bytes() == data
    assert server.bytes_sent - sent >= len(data)


def test_a_cached_file_evicted_by_another_server_as_it_is_checked_is_fetched_again(
    served, cache, monkeypatch
):
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    cache.get(server.url("a.safetensors"))
    check = store.check_safetensors

    def evicted_meanwhile(path: Path) -> list[str]:
        path.unlink()  # another server sharing the folder evicts it between two lines
        return check(path)

    monkeypatch.setattr(store, "check_safetensors", evicted_meanwhile)
    gets = _gets(server, "a.safetensors")
    assert cache.get(server.url("a.safetensors")).read_bytes() == data
    assert _gets(server, "a.safetensors") > gets


@pytest.mark.parametrize("entry", ["[]", "null", '"abc"', "3"])
def test_a_url_index_entry_that_is_no_json_object_is_a_miss(served, cache, entry):
    """An index file that parses but is not the object this cache writes (another tool's,
    or a damaged write) is fetched again, as one that does not parse is; pruning the index
    already passes over such files."""
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    url = server.url("a.safetensors")
    cache.get(url)
    cache._index_path(url).write_text(entry)
    gets = _gets(server, "a.safetensors")
    assert cache.get(url).read_bytes() == data
    assert _gets(server, "a.safetensors") > gets


def test_two_urls_with_the_same_content_share_one_file(served, cache):
    root, server = served
    _serve(root, "a.safetensors", _lora_bytes(1))
    _serve(root, "copy/a.safetensors", _lora_bytes(1))
    assert cache.get(server.url("a.safetensors")) == cache.get(server.url("copy/a.safetensors"))
    assert len(list(cache.blobs.iterdir())) == 1


def test_cache_evicts_the_least_recently_used_past_its_bound(served, tmp_path):
    root, server = served
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        _serve(root, f"{name}.safetensors", _lora_bytes(seed))
    size = len(_lora_bytes(1))
    cache = LoraCache(
        tmp_path / "cache", 1 << 20, max_cache_bytes=2 * size + size // 2, timeout_s=30
    )
    a = cache.get(server.url("a.safetensors"))
    b = cache.get(server.url("b.safetensors"))
    os.utime(a, (time.time() - 120, time.time() - 120))  # a fetched first, two minutes ago
    os.utime(b, (time.time() - 60, time.time() - 60))  # b a minute ago
    assert cache.get(server.url("a.safetensors")) == a  # a used now
    c = cache.get(server.url("c.safetensors"))
    assert a.exists() and c.exists() and not b.exists()
    gets = _gets(server, "b.safetensors")
    assert cache.get(server.url("b.safetensors")).exists()  # fetched again
    assert _gets(server, "b.safetensors") > gets


def test_interrupted_download_resumes_and_gives_the_whole_file(served, cache):
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    server.drop_at("a.safetensors", len(data) // 2)
    assert cache.get(server.url("a.safetensors")).read_bytes() == data
    assert server.bytes_sent == len(data) + 1  # every byte once (and the 1-byte probe)
    resumed = ("GET", "a.safetensors", f"bytes={len(data) // 2}-{len(data) - 1}")
    assert server.requests[-1] == resumed  # from where the connection dropped


def test_truncated_download_is_never_published(served, cache):
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    server.truncate_after("a.safetensors", len(data) // 2)
    with pytest.raises(LoraError, match=r"could not download the LoRA.*failed after"):
        cache.get(server.url("a.safetensors"))
    assert _left_over(cache) == []


def test_file_over_the_size_limit_is_refused_before_its_body_is_read(served, tmp_path):
    root, server = served
    _serve(root, "a.safetensors", _lora_bytes(1, rank=64))
    cache = LoraCache(
        tmp_path / "cache", max_file_bytes=4096, max_cache_bytes=1 << 30, timeout_s=30
    )
    with pytest.raises(LoraError, match=r"over the 4\.1 kB limit \(COGVIDEOX_LORA_MAX_SIZE\)"):
        cache.get(server.url("a.safetensors"))
    assert server.bytes_sent <= 1  # the probe's first byte at most


def test_a_lora_larger_than_the_whole_cache_is_refused_naming_its_bound(served, tmp_path):
    """Kept, it would hold the cache over COGVIDEOX_LORA_CACHE_SIZE; the announced length
    refuses it before its body is read."""
    root, server = served
    data = _lora_bytes(1, rank=64)
    _serve(root, "a.safetensors", data)
    cache = LoraCache(tmp_path / "cache", 1 << 20, max_cache_bytes=len(data) // 2, timeout_s=30)
    with pytest.raises(
        LoraError,
        match=rf"is {len(data) / 1e3:.1f} kB, over the {len(data) // 2 / 1e3:.1f} kB limit "
        r"\(COGVIDEOX_LORA_CACHE_SIZE\); the whole LoRA "
        r"cache's bound: raise COGVIDEOX_LORA_CACHE_SIZE to serve LoRAs this large",
    ):
        cache.get(server.url("a.safetensors"))
    assert server.bytes_sent <= 1  # the probe's first byte at most
    assert _left_over(cache) == []


def test_a_lora_of_unknown_length_is_stopped_once_it_passes_the_whole_cache(tmp_path):
    """Sent chunked, without ranges (no size known): the download stops past the bound."""
    root = tmp_path / "served"
    data = _lora_bytes(1, rank=1024)
    _serve(root, "a.safetensors", data)
    server = FileServer(root, ranges=False, chunked=True)
    try:
        bound = len(data) // 4
        cache = LoraCache(tmp_path / "cache", 1 << 30, max_cache_bytes=bound, timeout_s=30)
        refused = r"more than [0-9.]+ kB, over the [0-9.]+ kB.*COGVIDEOX_LORA_CACHE_SIZE"
        with pytest.raises(LoraError, match=refused):
            cache.get(server.url("a.safetensors"))  # "more than": counted as it came
    finally:
        server.stop()
    assert _left_over(cache) == []


def test_a_lora_of_unknown_length_whose_download_breaks_fails_as_a_lora_error(tmp_path):
    """Chunked, the body cut off: it was an IncompleteRead that named no LoRA."""
    root = tmp_path / "served"
    data = _lora_bytes(1, rank=64)
    _serve(root, "a.safetensors", data)
    server = FileServer(root, ranges=False, chunked=True)
    server.drop_at("a.safetensors", len(data) // 2, times=None)
    try:
        cache = LoraCache(tmp_path / "cache", 1 << 30, 1 << 30, timeout_s=30)
        with pytest.raises(LoraError, match=r"the download broke after [0-9,]+ bytes"):
            cache.get(server.url("a.safetensors"))
    finally:
        server.stop()
    assert _left_over(cache) == []


def test_a_lora_whose_header_safetensors_refuses_is_not_cached(served, cache):
    """Overlapping tensors pass the header's own checks; safetensors refuses them on load,
    which failed every request for the URL with a SafetensorError, the file kept."""
    root, server = served
    name = "transformer_blocks.0.attn1.to_q"
    header = {
        f"{name}.lora_{side}.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
        for side in "AB"
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    _serve(root, "a.safetensors", len(text).to_bytes(8, "little") + text + bytes(8))
    with pytest.raises(LoraError, match=r"cannot be read as safetensors: .*invalid offset"):
        cache.get(server.url("a.safetensors"))
    assert _left_over(cache) == []


def test_a_gzip_compressed_lora_is_told_apart_from_a_broken_tar(served, cache):
    """As an object stored with Content-Encoding: gzip arrives: it was refused as a tar
    whose header is invalid."""
    root, server = served
    _serve(root, "a.safetensors", gzip.compress(_lora_bytes(1)))
    with pytest.raises(LoraError, match="is a compressed safetensors file, not a tar"):
        cache.get(server.url("a.safetensors"))
    assert _left_over(cache) == []


def test_stalled_download_fails_at_the_timeout(served, tmp_path):
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    server.stall_at("a.safetensors", 10, seconds=30, times=None)
    cache = LoraCache(tmp_path / "cache", 1 << 20, 1 << 30, timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(LoraError, match=r"longer than 1 s \(COGVIDEOX_LORA_TIMEOUT\)"):
        cache.get(server.url("a.safetensors"))
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("order", ["checkpoint-first", "final-first"])
def test_tar_of_a_training_run_gives_its_final_lora(served, cache, order):
    """Whatever the order of its members: the tar is read once, front to back."""
    root, server = served
    final, checkpoint = _lora_bytes(1), _lora_bytes(2)
    run = {
        f"output/checkpoint-500/{LORA}": checkpoint,
        f"output/{LORA}": final,
        "output/logs.txt": b"step 1000",
        f"output/checkpoint-1000/{LORA}": checkpoint,
    }
    if order == "final-first":
        run = dict(reversed(run.items()))
    _serve(root, "run.tar", _tar(run))
    _serve(root, "run.tar.gz", _tar(run, "w:gz"))
    assert cache.get(server.url("run.tar")).read_bytes() == final
    assert cache.get(server.url("run.tar.gz")).read_bytes() == final


def test_tar_with_one_safetensors_file_of_another_name_gives_it(served, cache):
    root, server = served
    _serve(root, "one.tar", _tar({"my-style.safetensors": _lora_bytes(1), "README": b"hi"}))
    assert cache.get(server.url("one.tar")).read_bytes() == _lora_bytes(1)


def test_tar_whose_only_lora_has_its_suffix_in_capitals_gives_it(served, cache):
    root, server = served
    _serve(root, "one.tar", _tar({"output/MyStyle.SafeTensors": _lora_bytes(1)}))
    assert cache.get(server.url("one.tar")).read_bytes() == _lora_bytes(1)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"README": b"no weights"}, r"holds no \.safetensors file"),
        ({"adapter_model.bin": b"\x80\x04"}, r"only pickle files.*adapter_model\.bin"),
        ({"a.safetensors": b"", "b.safetensors": b""}, r"several \.safetensors files"),
        ({f"a/{LORA}": b"", f"b/{LORA}": b""}, rf"several {LORA} at the same depth"),
    ],
)
def test_tar_without_one_clear_lora_file_is_refused(served, cache, members, message):
    root, server = served
    _serve(root, "x.tar", _tar(members))
    with pytest.raises(LoraError, match=message):
        cache.get(server.url("x.tar"))
    assert not list(cache.blobs.iterdir())


@pytest.mark.parametrize(
    "page",
    [b"<!DOCTYPE html><html>login</html>", b"\n\n  <!DOCTYPE html><html>login</html>"],
    ids=["at-once", "after-blank-lines"],
)
def test_web_page_instead_of_a_file_gets_a_hint(served, cache, page):
    root, server = served
    _serve(root, "blob/main/lora.safetensors", page)
    with pytest.raises(LoraError, match=r"returned a web page.*resolve"):
        cache.get(server.url("blob/main/lora.safetensors"))


def test_zip_of_a_lora_is_refused_as_a_zip_not_as_a_pickle(served, cache):
    root, server = served
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(LORA, _lora_bytes(1))
    _serve(root, "lora.zip", buffer.getvalue())
    with pytest.raises(LoraError, match=r"is a zip archive; serve the \.safetensors file itself"):
        cache.get(server.url("lora.zip"))


def test_unknown_file_is_refused_quoting_its_first_bytes(served, cache):
    root, server = served
    _serve(root, "lora", b"GIF89a" + bytes(1000))
    with pytest.raises(
        LoraError, match=r"neither a \.safetensors LoRA nor a tar.*b'GIF89a\\x00\\x00'"
    ):
        cache.get(server.url("lora"))


def test_an_oversized_lora_inside_a_compressed_tar_is_refused_by_its_size(served, tmp_path):
    root, server = served
    zeros = {"transformer.blocks.0.to_q.lora_A.weight": torch.zeros(64, 32)}  # compresses
    _serve(root, "run.tar.gz", _tar({LORA: save(zeros)}, "w:gz"))
    assert (root / "run.tar.gz").stat().st_size < 4096 < len(save(zeros))
    cache = LoraCache(tmp_path / "cache", 4096, 1 << 30, timeout_s=30)
    with pytest.raises(LoraError, match=rf"run\.tar\.gz \({LORA}\) is .* over the"):
        cache.get(server.url("run.tar.gz"))


def test_a_tar_member_over_the_size_limit_is_refused_without_being_copied_out(
    served, tmp_path, monkeypatch
):
    """What a download stages counts against the cache's bound: a LoRA over the limit is
    refused from its tar header, not after its bytes are written to the staging folder."""
    root, server = served
    zeros = {"transformer.blocks.0.to_q.lora_A.weight": torch.zeros(64, 32)}
    _serve(root, "run.tar.gz", _tar({LORA: save(zeros)}, "w:gz"))
    cache = LoraCache(tmp_path / "cache", 4096, 1 << 30, timeout_s=30)
    copy, copied = shutil.copyfileobj, []

    def counted_copy(source, out, *args, **kwargs):
        copied.append(out.name)
        return copy(source, out, *args, **kwargs)

    monkeypatch.setattr(fetch.shutil, "copyfileobj", counted_copy)
    with pytest.raises(LoraError, match=rf"run\.tar\.gz \({LORA}\) is .* over the"):
        cache.get(server.url("run.tar.gz"))
    assert copied == []


def test_a_compressed_tar_that_expands_past_its_bound_is_refused(served, cache):
    """A few kB of gzip can hold terabytes: the bound is a few times the size limit."""
    root, server = served
    zeros = bytes(fetch.TAR_EXPANSION * cache.max_file_bytes)  # weights never compress so
    _serve(root, "run.tar.gz", _tar({"output/optimizer.bin": zeros, LORA: _lora_bytes(1)}, "w:gz"))
    assert (root / "run.tar.gz").stat().st_size < cache.max_file_bytes
    with pytest.raises(LoraError, match=r"run\.tar\.gz decompresses to more than 4\.2 MB"):
        cache.get(server.url("run.tar.gz"))


def test_a_compressed_tar_is_read_without_staging_it_decompressed(served, tmp_path, monkeypatch):
    """Downloads in progress count against the cache's bound, so what one stages is what
    another server's eviction makes room for. Before, a compressed tar was staged
    decompressed (up to 4 times COGVIDEOX_LORA_MAX_SIZE) beside itself and the LoRA copied
    out of it: 3 MB of zeros beside the LoRA evicted a LoRA from a cache bound of 2 MB."""
    root, server = served
    padding = bytes(3 << 20)  # an optimizer state, say: under the 4 MB decompression bound
    _serve(
        root, "run.tar.gz", _tar({"output/optimizer.bin": padding, LORA: _lora_bytes(2)}, "w:gz")
    )
    fetcher, other = (LoraCache(tmp_path / "cache", 1 << 20, 2 << 20, timeout_s=30) for _ in "ab")
    kept = _cached(other, "https://example.com/a.safetensors", 1)
    copy, evictions = shutil.copyfileobj, []

    def evict_then_copy(*args, **kwargs):
        other.evict()  # another server's download ends while the LoRA is copied out
        evictions.append(kept.exists())
        return copy(*args, **kwargs)

    monkeypatch.setattr(shutil, "copyfileobj", evict_then_copy)
    assert fetcher.get(server.url("run.tar.gz")).read_bytes() == _lora_bytes(2)
    assert evictions and all(evictions)


def test_a_tar_of_too_many_entries_is_refused(served, tmp_path):
    """Each entry listed takes memory, and listing millions takes minutes of a CPU core."""
    root, server = served
    members = {f"output/{i}.txt": b"" for i in range(fetch.MAX_TAR_MEMBERS)}
    _serve(root, "run.tar.gz", _tar({**members, LORA: _lora_bytes(1)}, "w:gz"))
    cache = LoraCache(tmp_path / "cache", 8 << 20, 1 << 30, timeout_s=30)
    with pytest.raises(LoraError, match=r"run\.tar\.gz holds more than 10,000 entries"):
        cache.get(server.url("run.tar.gz"))


def test_a_pickle_in_a_tar_is_refused_as_a_pickle_whatever_its_name(served, cache):
    root, server = served
    _serve(root, "run.tar", _tar({f"output/{LORA}": pickle.dumps({"lora": 1})}))
    with pytest.raises(LoraError, match=rf"output/{LORA} in .* is a PyTorch pickle checkpoint"):
        cache.get(server.url("run.tar"))


def test_a_link_in_a_tar_named_like_the_lora_is_not_followed(served, cache):
    """Only the tar's regular files are candidates: a link could name any file."""
    root, server = served
    link = tarfile.TarInfo(LORA)
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/hostname"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.addfile(link)
    _serve(root, "run.tar", buffer.getvalue())
    with pytest.raises(LoraError, match=r"holds no \.safetensors file"):
        cache.get(server.url("run.tar"))


def test_truncated_safetensors_file_is_refused(served, cache):
    root, server = served
    _serve(root, "cut.safetensors", _lora_bytes(1)[:-10])
    with pytest.raises(LoraError, match=r"not a valid safetensors file.*truncated"):
        cache.get(server.url("cut.safetensors"))
    assert not list(cache.blobs.iterdir())


def test_http_error_names_the_status(served, cache):
    _, server = served
    with pytest.raises(LoraError, match=r"could not download the LoRA.*HTTP 404"):
        cache.get(server.url("missing.safetensors"))


def test_a_presigned_urls_signature_is_in_no_log_or_error(served, cache, caplog):
    root, server = served
    caplog.set_level("INFO", logger="cogvideox_cog")
    _serve(root, "a.safetensors", _lora_bytes(1))
    _serve(root, "cut.safetensors", _lora_bytes(1)[:-10])
    signed = "?X-Amz-Expires=3600&X-Amz-Signature=secret-signature"
    cache.get(server.url("a.safetensors") + signed)
    for name in ("cut.safetensors", "missing.safetensors"):
        with pytest.raises(LoraError) as error:
            cache.get(server.url(name) + signed)
        assert "secret-signature" not in str(error.value)
    assert "a.safetensors" in caplog.text and "secret-signature" not in caplog.text


def test_a_presigned_urls_signature_is_in_no_error_about_what_it_served(served, cache):
    root, server = served
    _serve(root, "page.safetensors", b"<!DOCTYPE html><html>login</html>")
    signed = server.url("page.safetensors") + "?X-Amz-Signature=secret-signature"
    with pytest.raises(LoraError, match=r"returned a web page") as refused:
        cache.get(signed)
    assert "secret-signature" not in str(refused.value)


def test_a_lora_url_is_used_without_the_spaces_around_it():
    """Pasted into a form, a URL often brings a space or a line break with it."""
    url = "https://host.example/lora.safetensors"
    assert check_lora_url(f"  {url}\n") == url


@pytest.mark.parametrize(
    "url",
    [
        "s3://bucket/lora.safetensors",
        "file:///etc/passwd",
        "lora.safetensors",
        "hf://just-an-org",
        "https://example.com/adapter_model.bin",
        "https://example.com/lora.ckpt?download=1",
        "https://example.com/LORA.PT",
        "hf://org/repo/lora.pt",
    ],
)
def test_unusable_lora_url_is_refused_without_a_download(url):
    with pytest.raises(LoraError, match=r"lora_url="):
        check_lora_url(url)


def test_a_pickle_named_lora_url_is_refused_without_its_query_string():
    signed = "https://bucket.example.com/run/adapter_model.bin?X-Amz-Signature=secret-signature"
    with pytest.raises(LoraError, match=r"names a PyTorch pickle file") as refused:
        check_lora_url(signed)
    assert "adapter_model.bin" in str(refused.value)
    assert "secret-signature" not in str(refused.value)


def test_a_lora_url_urllib_cannot_fetch_is_refused_without_echoing_it_whole():
    with pytest.raises(LoraError, match=r"the lora_url is not a valid URL"):
        check_lora_url("http://[::1")
    with pytest.raises(LoraError, match=r"holds a user name or password") as refused:
        check_lora_url("https://user:secret@127.0.0.1/lora.safetensors")
    assert "secret" not in str(refused.value)
    with pytest.raises(LoraError, match=r"\(200,006 characters\)") as refused:
        check_lora_url("ftp://" + "a" * 200_000)
    assert len(str(refused.value)) < 500


@pytest.mark.parametrize(
    "url",
    [
        "htps://user:secret-key@host.example/lora.safetensors",
        "s3://AKIA:secret-key@bucket/lora.safetensors",
        "hf://user:secret-key@org/repo",
    ],
)
def test_a_lora_url_refused_for_its_scheme_echoes_no_password(url):
    with pytest.raises(LoraError, match=r"lora_url=") as refused:
        check_lora_url(url)
    assert "secret-key" not in str(refused.value)


def test_a_lora_url_whose_password_holds_a_slash_is_refused_unseen():
    with pytest.raises(LoraError, match=r"holds a user name or password") as refused:
        check_lora_url("https://AKIA:secret/key@127.0.0.1/lora.safetensors")
    assert "secret" not in str(refused.value)


def test_a_hub_revision_after_an_at_sign_is_kept_in_what_is_shown():
    """What hides a password cut short by a `/` must not take `org/repo@` for one."""
    assert (
        download.shown("hf://org/repo@v1/lora.safetensors") == "hf://org/repo@v1/lora.safetensors"
    )


def test_a_long_lora_url_of_another_scheme_is_refused_at_once():
    started = time.monotonic()
    with pytest.raises(LoraError, match=r"lora_url="):
        check_lora_url("ftp://" + "a" * 200_000)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    ("url", "repo", "revision", "filename"),
    [
        ("hf://org/repo", "org/repo", None, None),
        ("hf://org/repo/lora.safetensors", "org/repo", None, "lora.safetensors"),
        ("hf://org/repo@v2/sub/x.safetensors", "org/repo", "v2", "sub/x.safetensors"),
        ("hf://org/repo/", "org/repo", None, None),
        ("hf://org/repo/sub/x.safetensors/", "org/repo", None, "sub/x.safetensors"),
    ],
)
def test_hf_url_downloads_that_file_through_huggingface_hub(
    monkeypatch, tmp_path, cache, url, repo, revision, filename
):
    """The hub itself is replaced by a function that writes where hf_hub_download would:
    everything around it (file choice, size check, verification, cache) is the real code."""
    import huggingface_hub

    data = _lora_bytes(1)
    calls = []

    def hf_hub_download(repo_id, name, revision=None, local_dir=None):
        calls.append((repo_id, revision, name))
        path = Path(local_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    class Api:
        def list_repo_files(self, repo_id, revision=None):
            return ["README.md", "checkpoint-10/" + LORA, LORA, "training.log"]

    class Info:
        size = len(data)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url: Info())
    assert cache.get(url).read_bytes() == data
    assert calls == [(repo, revision, filename or LORA)]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A loopback Hub serving hf://org/lora (one LoRA), its CDN on a server of its own."""
    from huggingface_hub import constants

    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / LORA).write_bytes(_lora_bytes(1))
    hub = HubServer("org/lora", tmp_path / "repo")
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    template = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    yield hub
    hub.stop()


def test_a_hub_lora_its_cdn_refuses_fails_without_the_presigned_urls_signature(hub, cache):
    """huggingface_hub's error quotes the CDN URL it was refused at (an expired signature),
    which the prediction's error repeated to the user."""
    hub.cdn.fail_with(LORA, 403, times=None)
    with pytest.raises(LoraError, match=r"could not download the LoRA .*403") as failed:
        cache.get("hf://org/lora")
    assert f"{hub.cdn.url(LORA)}?<query hidden>" in str(failed.value)
    assert SIGNATURE not in str(failed.value)


def test_a_hub_lora_over_the_size_limit_is_refused_before_its_download(hub, tmp_path):
    """The Hub says a file's size before sending it: a 5 GB file is not fetched to learn it."""
    cache = LoraCache(tmp_path / "cache", 512, 1 << 30, timeout_s=30)
    with pytest.raises(LoraError, match=r"hf://org/lora is .*, over the .* limit"):
        cache.get("hf://org/lora")
    assert _gets(hub.cdn, LORA) == 0


def test_a_hub_lora_that_arrives_after_the_timeout_is_not_cached(hub, tmp_path, monkeypatch):
    """huggingface_hub cannot be stopped mid-download: once the request has failed at the
    timeout, what the download brings later is dropped, not published."""
    import huggingface_hub

    real_download = huggingface_hub.hf_hub_download
    finished = []

    def slow_hub(*args, **kwargs):
        time.sleep(1.5)  # a slow CDN, past the timeout
        try:
            return real_download(*args, **kwargs)
        finally:
            finished.append(True)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", slow_hub)
    cache = LoraCache(tmp_path / "cache", 1 << 20, 1 << 30, timeout_s=0.5)
    with pytest.raises(LoraError, match=r"longer than 0\.5 s"):
        cache.get("hf://org/lora")
    deadline = time.monotonic() + 10
    while not finished and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # what the download does once the file is there
    assert finished and _left_over(cache) == []


def test_sizes_parse_with_binary_suffixes():
    assert parse_size("2G", "X") == 2 << 30
    assert parse_size("500M", "X") == 500 << 20
    assert parse_size("1.5GiB", "X") == 3 << 29
    assert parse_size("1234", "X") == 1234
    with pytest.raises(ValueError, match=r"X='lots' is not a size"):
        parse_size("lots", "X")


def test_stale_partial_downloads_are_removed(served, cache):
    root, server = served
    _serve(root, "a.safetensors", _lora_bytes(1))
    stale = cache.partial / "1-2-3"
    stale.mkdir(parents=True)
    (stale / "download").write_bytes(b"half")
    old = time.time() - 2 * 24 * 3600
    os.utime(stale, (old, old))
    cache.get(server.url("a.safetensors"))
    assert not stale.exists()


_GET_IN_A_PROCESS = (
    "import sys; from pathlib import Path; from cogvideox_cog.lora.store import LoraCache; "
    "LoraCache(Path(sys.argv[1]), 1 << 30, 1 << 30, timeout_s=120).get(sys.argv[2])"
)


def test_a_killed_download_counts_against_the_bound_until_the_next_request_removes_it(
    served, tmp_path
):
    """kill -9 or the OOM killer mid-download: its partial file is neither left for a day nor
    outside COGVIDEOX_LORA_CACHE_SIZE; a live download's is counted and kept."""
    root, server = served
    for name, seed in (("a", 1), ("b", 2)):
        _serve(root, f"{name}.safetensors", _lora_bytes(seed))
    big = _lora_bytes(3, rank=1024)
    _serve(root, "big.safetensors", big)
    server.stall_at("big.safetensors", len(big) // 2, seconds=60, times=None)
    small = len(_lora_bytes(1))
    cache = LoraCache(tmp_path / "cache", 1 << 20, max_cache_bytes=2 * small + 1000, timeout_s=30)
    a = cache.get(server.url("a.safetensors"))
    os.utime(a, (time.time() - 60, time.time() - 60))
    process = subprocess.Popen(
        [sys.executable, "-c", _GET_IN_A_PROCESS, str(cache.root), server.url("big.safetensors")],
        cwd=PROJECT,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            partial = [p for p in cache.partial.rglob("download") if p.stat().st_size]
            if partial and partial[0].stat().st_size >= len(big) // 4:
                break
            time.sleep(0.05)
        assert partial, "the download in the other process never started"
        b = cache.get(server.url("b.safetensors"))
        assert b.exists() and not a.exists()  # a and b fit the bound, not with the download
        assert partial[0].exists()  # a live download is left alone
    finally:
        process.kill()
        process.wait()
    assert cache.get(server.url("b.safetensors")) == b  # any request, even a cached one
    assert list(cache.partial.iterdir()) == []


def test_safetensors_save_file_is_what_we_call_a_lora_file(tmp_path, served, cache):
    """A LoRA written by safetensors' own save_file (not through diffusers) is accepted."""
    root, server = served
    save_file({"x.lora_A.weight": torch.ones(1, 2)}, root / "plain.safetensors")
    assert cache.get(server.url("plain.safetensors")).stat().st_size > 0


def test_a_presigned_urls_signature_is_written_to_no_cache_file(served, cache):
    root, server = served
    _serve(root, "a.safetensors", _lora_bytes(1))
    cache.get(server.url("a.safetensors") + "?X-Amz-Signature=secret-signature")
    files = [p for p in cache.root.rglob("*") if p.is_file()]
    assert files
    assert not [p for p in files if b"secret-signature" in p.read_bytes()]


def test_a_presigned_url_is_cached_under_its_signature(served, cache):
    root, server = served
    _serve(root, "a.safetensors", _lora_bytes(1))
    signed = server.url("a.safetensors") + "?X-Amz-Signature=secret-signature"
    cache.get(signed)
    gets = _gets(server, "a.safetensors")
    cache.get(signed)
    assert _gets(server, "a.safetensors") == gets
    cache.get(server.url("a.safetensors"))  # no proof of access: not served from the cache
    assert _gets(server, "a.safetensors") > gets


def test_blobs_that_fill_the_cache_to_its_bound_exactly_are_all_kept(tmp_path):
    """COGVIDEOX_LORA_CACHE_SIZE is what the cache may hold: reaching it evicts nothing."""
    cache = LoraCache(tmp_path / "cache", 1 << 20, max_cache_bytes=2000, timeout_s=30)
    cache.blobs.mkdir(parents=True)
    for name in ("a", "b"):
        (cache.blobs / f"{name}.safetensors").write_bytes(bytes(1000))
    cache.evict()
    assert _left_over(cache) == ["blobs/a.safetensors", "blobs/b.safetensors"]


def _cached(cache: LoraCache, url: str, seed: int) -> Path:
    """A LoRA in the cache as a past download of `url` left it, without a server."""
    data = _lora_bytes(seed)
    for folder in (cache.blobs, cache.urls):
        folder.mkdir(parents=True, exist_ok=True)
    blob = cache.blobs / f"{hashlib.sha256(data).hexdigest()}.safetensors"
    blob.write_bytes(data)
    cache._record(url, blob)
    return blob


def test_eviction_follows_the_last_use_not_the_download(tmp_path):
    """Eviction goes by last use, not by download: a LoRA fetched long ago but asked for now
    stays, and the one untouched since is evicted."""
    size = len(_lora_bytes(1))
    bound = 2 * size + size // 2
    cache = LoraCache(tmp_path / "cache", 1 << 20, max_cache_bytes=bound, timeout_s=30)
    blobs = {}
    for seed, (name, age) in enumerate((("old", 120), ("recent", 60)), 1):
        blobs[name] = _cached(cache, f"https://example.com/{name}.safetensors", seed)
        os.utime(blobs[name], (time.time() - age, time.time() - age))
    assert cache.get("https://example.com/old.safetensors") == blobs["old"]
    # The next get() lets go of old: the hold, not its last use, would keep it otherwise.
    _cached(cache, "https://example.com/new.safetensors", 3)
    cache.get("https://example.com/new.safetensors")
    cache.evict()
    assert blobs["old"].exists() and not blobs["recent"].exists()


def test_a_recent_partial_download_without_an_owner_lock_is_kept(cache):
    """An older version sharing the folder stages its download without a lock: removed only
    after a day, not while it may still be downloading."""
    url = "https://example.com/a.safetensors"
    _cached(cache, url, 1)
    recent = cache.partial / "1-2-3"
    recent.mkdir(parents=True)
    (recent / "download").write_bytes(b"half")
    cache.get(url)
    assert (recent / "download").read_bytes() == b"half"


def _servers_sharing(folder: Path, size: int) -> list[LoraCache]:
    """Two servers' caches of one folder (a volume, a GPU each) with room for one LoRA."""
    return [LoraCache(folder, 1 << 20, size + size // 2, timeout_s=30) for _ in range(2)]


@pytest.mark.parametrize("how", ["downloaded", "cached"])
def test_a_lora_one_server_got_is_not_evicted_by_another_before_it_is_read(served, tmp_path, how):
    """Between get() and the read of the file, another server's download may evict."""
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    reader, other = _servers_sharing(tmp_path / "cache", len(data))
    if how == "cached":
        _cached(reader, server.url("a.safetensors"), 1)
    got = reader.get(server.url("a.safetensors"))
    _cached(other, "https://example.com/b.safetensors", 2)  # newer: a is the one to go
    other.evict()
    assert got.read_bytes() == data


def test_a_lora_is_evictable_again_once_its_server_gets_the_next(tmp_path):
    size = len(_lora_bytes(1))
    reader, other = _servers_sharing(tmp_path / "cache", size)
    a = _cached(reader, "https://example.com/a.safetensors", 1)
    reader.get("https://example.com/a.safetensors")
    b = _cached(reader, "https://example.com/b.safetensors", 2)
    reader.get("https://example.com/b.safetensors")
    os.utime(a, (time.time() - 60, time.time() - 60))
    other.evict()
    assert b.exists() and not a.exists()


def test_a_lowered_cache_bound_is_applied_at_setup(monkeypatch, tmp_path):
    """A restart with a smaller COGVIDEOX_LORA_CACHE_SIZE shrinks the cache then, not at a
    download that may never come (a deployment serving LoRAs it already holds)."""
    size = len(_lora_bytes(1))
    before = LoraCache(tmp_path / "cache", 1 << 20, 1 << 30, timeout_s=30)
    blobs = [_cached(before, f"https://example.com/{seed}.safetensors", seed) for seed in (1, 2)]
    os.utime(blobs[0], (time.time() - 60, time.time() - 60))
    monkeypatch.setenv(store.LORA_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(store.CACHE_SIZE_ENV, str(size + size // 2))
    LoraCache.from_env()
    assert not blobs[0].exists() and blobs[1].exists()


def test_a_cache_over_its_bound_on_a_read_only_volume_passes_setup_with_a_warning(
    monkeypatch, tmp_path, caplog
):
    """Setup never wrote to the LoRA folder before it applied the bound: a folder it cannot
    shrink fails no setup (the predictions without a LoRA still run)."""
    size = len(_lora_bytes(1))
    before = LoraCache(tmp_path / "cache", 1 << 20, 1 << 30, timeout_s=30)
    for seed in (1, 2):
        _cached(before, f"https://example.com/{seed}.safetensors", seed)

    def read_only(path: Path) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.setenv(store.LORA_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(store.CACHE_SIZE_ENV, str(size + size // 2))
    LoraCache.from_env()
    assert "the cache stays over COGVIDEOX_LORA_CACHE_SIZE: [Errno 30]" in caplog.text


def test_the_urls_of_an_evicted_lora_are_forgotten(served, tmp_path):
    """Each presigned URL of a LoRA is an entry of the index: its eviction removes them all,
    and the URLs of the LoRA kept stay hits."""
    root, server = served
    _serve(root, "a.safetensors", _lora_bytes(1))
    _serve(root, "b.safetensors", _lora_bytes(2))
    size = len(_lora_bytes(1))
    cache = LoraCache(tmp_path / "cache", 1 << 20, size + size // 2, timeout_s=30)
    for signature in range(3):
        cache.get(server.url("a.safetensors") + f"?X-Amz-Signature={signature}")
    b = cache.get(server.url("b.safetensors"))  # evicts a
    assert [p.name for p in cache.urls.iterdir()] == [
        cache._index_path(server.url("b.safetensors")).name
    ]
    gets = _gets(server, "b.safetensors")
    assert cache.get(server.url("b.safetensors")) == b
    assert _gets(server, "b.safetensors") == gets


def test_the_url_index_never_holds_more_than_its_bound(served, cache, monkeypatch):
    """A new signature per request is a new URL each time: the index stays within its bound
    (one LoRA, one file in blobs/)."""
    monkeypatch.setattr(store, "MAX_URL_ENTRIES", 5)
    monkeypatch.setattr(store, "URL_ENTRIES_KEPT", 3)
    root, server = served
    _serve(root, "a.safetensors", _lora_bytes(1))
    for signature in range(12):
        cache.get(server.url("a.safetensors") + f"?X-Amz-Signature={signature}")
        assert len(list(cache.urls.iterdir())) <= 5
    assert len(list(cache.blobs.iterdir())) == 1


def test_a_url_in_use_stays_a_hit_when_the_index_passes_its_bound(served, cache, monkeypatch):
    """The index forgets the least recently used URLs, not the first fetched: a URL asked for
    now is still served from the cache after the pass, the untouched ones are forgotten."""
    monkeypatch.setattr(store, "MAX_URL_ENTRIES", 5)
    monkeypatch.setattr(store, "URL_ENTRIES_KEPT", 3)
    root, server = served
    _serve(root, "a.safetensors", _lora_bytes(1))
    urls = [server.url("a.safetensors") + f"?X-Amz-Signature={n}" for n in range(6)]
    for minutes_ago, url in enumerate(reversed(urls), 1):  # urls[0] fetched first
        _cached(cache, url, 1)
        os.utime(cache._index_path(url), (time.time() - 60 * minutes_ago,) * 2)
    cache.get(urls[0])  # used now
    cache.evict()
    assert len(list(cache.urls.iterdir())) == 3
    assert not cache._index_path(urls[1]).exists()
    assert cache.get(urls[0]).read_bytes() == _lora_bytes(1)
    assert _gets(server, "a.safetensors") == 0


def _read_only(monkeypatch, folder: Path) -> None:
    """As root (the Cog image's user) a read-only mount is the kernel's EROFS, which only
    os.access reports before a write: it stands in here for such a mount of `folder`, whose
    files cannot be touched, removed or replaced."""
    real_access = os.access

    def refused(real):
        def call(path, *args, **kwargs):
            if isinstance(path, int) or Path(path).is_relative_to(folder):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, *args, **kwargs)

        return call

    for name in ("utime", "unlink", "replace", "rename"):
        monkeypatch.setattr(os, name, refused(getattr(os, name)))
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != folder and real_access(p, mode))


def test_a_cached_lora_is_served_from_a_read_only_folder(cache, monkeypatch):
    """The LoRA folder is in the weights folder, which may be mounted read-only: marking the
    file used is for eviction, which such a folder never does. Before, the prediction failed
    with a bare `[Errno 30] Read-only file system`."""
    url = "https://example.com/a.safetensors"
    blob = _cached(cache, url, 1)
    _read_only(monkeypatch, cache.root)
    assert cache.get(url) == blob


def test_a_lora_not_cached_in_a_read_only_folder_names_the_setting(cache, monkeypatch):
    cache.root.mkdir()
    _read_only(monkeypatch, cache.root)
    with pytest.raises(LoraError, match=r"LoRA folder .* is not writable.*COGVIDEOX_LORA_DIR"):
        cache.get("https://example.com/a.safetensors")
    assert list(cache.root.iterdir()) == []


def test_a_damaged_lora_in_a_read_only_folder_says_so_and_what_to_do(cache, monkeypatch):
    """It cannot be removed to fetch it again: before, the prediction failed with a bare
    `[Errno 30] Read-only file system`. As for a LoRA not cached there, nothing is fetched."""
    url = "https://example.com/a.safetensors"
    blob = _cached(cache, url, 1)
    with blob.open("r+b") as file:
        file.truncate(blob.stat().st_size // 2)
    _read_only(monkeypatch, cache.root)
    with pytest.raises(
        LoraError,
        match=rf"the cached LoRA for {url} \({blob}\) is damaged \(.+\), and the LoRA "
        rf"folder {cache.root} is not writable to fetch it again \(Read-only file system\): "
        rf"mount it read-write or replace that file, or set COGVIDEOX_LORA_DIR to a writable "
        rf"folder",
    ):
        cache.get(url)
    assert blob.exists()


def test_a_lora_one_server_got_survives_another_fetching_it_under_a_new_url(served, tmp_path):
    """A presigned URL's new signature is downloaded again and stored once: the second
    download must not put a new file in place of the one the first server holds, or the
    hold no longer keeps that name from eviction."""
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    _serve(root, "b.safetensors", _lora_bytes(2))
    reader, other = _servers_sharing(tmp_path / "cache", len(data))
    got = reader.get(server.url("a.safetensors") + "?X-Amz-Signature=1")
    assert other.get(server.url("a.safetensors") + "?X-Amz-Signature=2") == got
    other.get(server.url("b.safetensors"))  # evicts what it can: a is held by the reader
    assert got.read_bytes() == data


def test_a_lora_fetched_again_under_a_new_url_counts_as_just_used(served, tmp_path):
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    _serve(root, "b.safetensors", _lora_bytes(2))
    cache = LoraCache(tmp_path / "cache", 1 << 20, 3 * len(data), timeout_s=30)
    a = cache.get(server.url("a.safetensors") + "?X-Amz-Signature=1")
    os.utime(a, (time.time() - 120,) * 2)
    b = cache.get(server.url("b.safetensors"))
    os.utime(b, (time.time() - 60,) * 2)
    assert cache.get(server.url("a.safetensors") + "?X-Amz-Signature=2") == a
    _cached(cache, "https://example.com/c.safetensors", 3)
    cache.get("https://example.com/c.safetensors")  # a is no longer held
    cache.max_cache_bytes = 2 * len(data) + len(data) // 2
    cache.evict()
    assert a.exists() and not b.exists()


def test_a_download_killed_with_the_last_server_evicts_no_lora_at_setup(monkeypatch, tmp_path):
    """Setup applies the bound, and a killed download's partial file counts against it only
    while its process lives: setup removes that file, not the LoRAs that fit the bound."""
    size = len(_lora_bytes(1))
    before = LoraCache(tmp_path / "cache", 1 << 20, 1 << 30, timeout_s=30)
    blobs = [_cached(before, f"https://example.com/{seed}.safetensors", seed) for seed in (1, 2)]
    killed = before.partial / "123-abc"
    killed.mkdir(parents=True)
    (killed / leftovers.LOCK_NAME).touch()  # its owner's lock, let go of by the kill
    (killed / "download").write_bytes(b"x" * size)
    monkeypatch.setenv(store.LORA_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(store.CACHE_SIZE_ENV, str(2 * size + size // 2))
    LoraCache.from_env()
    assert all(blob.exists() for blob in blobs)
    assert not killed.exists()


class _SmallVolume:
    """The cache's folder on a volume of `size` bytes: disk_usage reports what the folder
    leaves of it, and a download's write past it fails with ENOSPC, as a full disk's does
    (the staging folder is removed as after any failed download)."""

    def __init__(self, monkeypatch, cache: LoraCache, size: int):
        self.cache, self.size = cache, size
        monkeypatch.setattr(store.shutil, "disk_usage", self.usage)
        fetch_capped = download.fetch_capped

        def on_the_volume(url, out, *args, **kwargs):
            return fetch_capped(url, _FillingFile(out, self), *args, **kwargs)

        monkeypatch.setattr(download, "fetch_capped", on_the_volume)

    def usage(self, path):
        used = leftovers.folder_size(self.cache.root)
        return SimpleNamespace(total=self.size, used=used, free=max(0, self.size - used))


class _FillingFile:
    def __init__(self, out, volume: _SmallVolume):
        self.out, self.volume = out, volume

    def write(self, block) -> int:
        self.out.flush()
        if self.volume.usage(None).free < len(block):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.out.write(block)


def _on_a_volume_for_two(served, tmp_path, monkeypatch, timeout_s: float):
    """A cache of LoRAs a, b and c (served), on a volume with room for two of them."""
    root, server = served
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        _serve(root, f"{name}.safetensors", _lora_bytes(seed))
    size = len(_lora_bytes(1))
    cache = LoraCache(
        tmp_path / "cache", size + size // 4, max_cache_bytes=1 << 30, timeout_s=timeout_s
    )
    _SmallVolume(monkeypatch, cache, 2 * size + size // 2)
    return cache, server


def test_a_full_volume_makes_room_evicting_the_least_recently_used(served, tmp_path, monkeypatch):
    """A bound larger than the volume holds (the 20 GiB default on a smaller disk, or a disk
    shared with the weights) fills the disk: the next download fails with ENOSPC. Evicting
    only after a download succeeds, the cache then never frees a byte, and every new LoRA
    failed until someone emptied the folder by hand."""
    cache, server = _on_a_volume_for_two(served, tmp_path, monkeypatch, timeout_s=30)
    a = cache.get(server.url("a.safetensors"))
    os.utime(a, (time.time() - 60, time.time() - 60))  # a used a minute ago
    b = cache.get(server.url("b.safetensors"))
    c = cache.get(server.url("c.safetensors"))  # no room for it: a goes
    assert b.exists() and c.exists() and not a.exists()


def test_a_full_volume_with_no_lora_to_evict_fails_naming_the_folder(served, tmp_path, monkeypatch):
    root, server = served
    _serve(root, "a.safetensors", _lora_bytes(1))
    size = len(_lora_bytes(1))
    cache = LoraCache(tmp_path / "cache", 1 << 20, max_cache_bytes=1 << 30, timeout_s=30)
    _SmallVolume(monkeypatch, cache, size // 2)
    with pytest.raises(LoraError, match=r"no space left") as failed:
        cache.get(server.url("a.safetensors"))
    assert str(cache.root) in str(failed.value)
    assert store.LORA_DIR_ENV in str(failed.value)


def test_a_full_volume_with_no_lora_to_evict_is_not_downloaded_again(served, tmp_path, monkeypatch):
    """With nothing evicted the volume is as full as before: a second try would fail the
    same way, after downloading again."""
    root, server = served
    _serve(root, "a.safetensors", _lora_bytes(1))
    size = len(_lora_bytes(1))
    cache = LoraCache(tmp_path / "cache", 1 << 20, max_cache_bytes=1 << 30, timeout_s=30)
    _SmallVolume(monkeypatch, cache, size // 2)
    with pytest.raises(LoraError, match=r"no space left"):
        cache.get(server.url("a.safetensors"))
    probes = [r for r in server.requests if r == ("GET", "a.safetensors", "bytes=0-0")]
    assert len(probes) == 1


def test_a_full_volume_evicts_only_the_loras_one_download_needs(served, tmp_path, monkeypatch):
    """Room for one download of the largest size allowed, not an emptied cache."""
    root, server = served
    for name, seed in (("a", 1), ("b", 2), ("c", 3), ("d", 4)):
        _serve(root, f"{name}.safetensors", _lora_bytes(seed, rank=64))
    size = len(_lora_bytes(1, rank=64))  # the URL index's files are small beside it
    cache = LoraCache(tmp_path / "cache", size + size // 4, max_cache_bytes=1 << 30, timeout_s=30)
    _SmallVolume(monkeypatch, cache, 3 * size + size // 2)
    a, b, c = (cache.get(server.url(f"{name}.safetensors")) for name in "abc")
    os.utime(a, (time.time() - 120, time.time() - 120))  # a used two minutes ago
    os.utime(b, (time.time() - 60, time.time() - 60))  # b a minute ago
    d = cache.get(server.url("d.safetensors"))  # no room for it: a goes, and only a
    assert b.exists() and c.exists() and d.exists() and not a.exists()


def test_a_download_tried_again_after_a_full_volume_ends_within_the_timeout(
    served, tmp_path, monkeypatch
):
    """COGVIDEOX_LORA_TIMEOUT bounds both tries together: the second gets what is left."""
    cache, server = _on_a_volume_for_two(served, tmp_path, monkeypatch, timeout_s=3)
    for name in "ab":
        cache.get(server.url(f"{name}.safetensors"))  # the volume holds no third
    on_the_volume, waits = download.fetch_capped, [2.5, 1.0]  # the first try, then the second

    def slow(url, out, *args, **kwargs):
        time.sleep(waits.pop(0))  # a slow network before the volume is found full
        return on_the_volume(url, out, *args, **kwargs)

    monkeypatch.setattr(download, "fetch_capped", slow)
    started = time.monotonic()
    with pytest.raises(LoraError, match=r"longer than 3 s \(COGVIDEOX_LORA_TIMEOUT\)"):
        cache.get(server.url("c.safetensors"))
    assert time.monotonic() - started < 3 + 1
    for thread in threading.enumerate():  # the second try, let go: done before the server stops
        if thread.name == "lora-download":
            thread.join(10)


def test_a_lora_of_unknown_length_that_fills_the_volume_makes_room_too(tmp_path, monkeypatch):
    """Sent chunked, the download's full disk was reported as a broken download (the write's
    ENOSPC caught with the read's errors), so nothing was evicted and no retry made."""
    root = tmp_path / "served"
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        _serve(root, f"{name}.safetensors", _lora_bytes(seed))
    size = len(_lora_bytes(1))
    server = FileServer(root, ranges=False, chunked=True)
    cache = LoraCache(tmp_path / "cache", size + size // 4, max_cache_bytes=1 << 30, timeout_s=30)
    _SmallVolume(monkeypatch, cache, 2 * size + size // 2)
    try:
        a, b = (cache.get(server.url(f"{name}.safetensors")) for name in "ab")
        c = cache.get(server.url("c.safetensors"))  # no room for it: a goes
    finally:
        server.stop()
    assert b.exists() and c.exists() and not a.exists()


def test_a_tar_that_fills_the_volume_is_not_called_unreadable(served, cache, monkeypatch):
    """Running out of disk while the LoRA is copied out of a tar is the disk's fault."""
    root, server = served
    _serve(root, "run.tar", _tar({"out/" + LORA: _lora_bytes(1)}))

    def full(source, out, length=0):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fetch.shutil, "copyfileobj", full)
    with pytest.raises(LoraError) as failed:
        cache.get(server.url("run.tar"))
    assert "no space left" in str(failed.value)
    assert "cannot be read" not in str(failed.value)


def test_a_volume_with_exactly_the_room_asked_for_evicts_nothing(tmp_path, monkeypatch):
    """Making room stops once the volume has the room one download needs: free bytes equal
    to it are enough."""
    cache = LoraCache(tmp_path / "cache", 1 << 20, max_cache_bytes=1 << 30, timeout_s=30)
    blobs = [_cached(cache, f"https://example.com/{seed}.safetensors", seed) for seed in (1, 2)]
    volume = _SmallVolume(monkeypatch, cache, 4 * blobs[0].stat().st_size)
    assert cache.evict(room=volume.usage(None).free) == 0
    assert all(blob.exists() for blob in blobs)


def test_a_lora_just_downloaded_stays_on_a_volume_that_refuses_locks(served, tmp_path, monkeypatch):
    """Where flock fails (ENOLCK on some network volumes) nothing is held, and the eviction
    after a download, with downloads in progress filling the bound, must pass over the LoRA
    it is about to return."""
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    cache = LoraCache(tmp_path / "cache", 1 << 20, len(data) + len(data) // 2, timeout_s=30)
    in_progress = cache.partial / "1-2-3"  # an older version's download: no owner lock
    in_progress.mkdir(parents=True)
    (in_progress / "download").write_bytes(bytes(len(data)))

    def refused(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(store, "fcntl", SimpleNamespace(**{**vars(store.fcntl), "flock": refused}))
    assert cache.get(server.url("a.safetensors")).read_bytes() == data


def test_an_index_at_its_bound_exactly_forgets_no_url(cache, monkeypatch):
    """MAX_URL_ENTRIES is what the index may hold: reaching it forgets nothing."""
    monkeypatch.setattr(store, "MAX_URL_ENTRIES", 5)
    monkeypatch.setattr(store, "URL_ENTRIES_KEPT", 3)
    for n in range(5):
        _cached(cache, f"https://example.com/a.safetensors?X-Amz-Signature={n}", 1)
    cache.evict()
    assert len(list(cache.urls.iterdir())) == 5


def test_the_urls_of_a_lora_published_again_as_it_is_evicted_stay_hits(
    served, tmp_path, monkeypatch
):
    """Another server may fetch a LoRA again between this one's eviction of it and the
    pruning of the index: the URLs of a file that is there again still lead to it."""
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    size = len(data)
    cache, other = _servers_sharing(tmp_path / "cache", size)
    a = _cached(cache, "https://example.com/a.safetensors", 1)
    os.utime(a, (time.time() - 60,) * 2)
    _cached(cache, "https://example.com/b.safetensors", 2)
    again = server.url("a.safetensors") + "?X-Amz-Signature=2"
    unlink = store._unlink_unless_held

    def published_again(path: Path) -> bool:
        gone = unlink(path)
        if gone and path == a:  # the other server's download of it ends now
            a.write_bytes(data)
            other._record(again, a)
        return gone

    monkeypatch.setattr(store, "_unlink_unless_held", published_again)
    assert cache.evict() == 1
    assert cache.get(again) == a
    assert _gets(server, "a.safetensors") == 0


def test_a_url_index_entry_that_records_another_url_is_a_miss(served, cache):
    """The entry's file is named by the URL's hash, and the entry says which URL it is for:
    one that names another URL (copied from another folder, say) does not serve its blob."""
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    url = server.url("a.safetensors")
    blob = _cached(cache, "https://example.com/other.safetensors", 2)
    entry = {"url": "https://example.com/other.safetensors", "sha256": blob.stem}
    cache._index_path(url).write_text(json.dumps(entry))
    assert cache.get(url).read_bytes() == data
    assert _gets(server, "a.safetensors") > 0


def test_a_damaged_file_of_the_same_content_is_replaced_by_a_new_urls_download(served, cache):
    """A new URL of a LoRA already stored is stored once, in the file that is there, unless
    that file is damaged on disk: then the download just checked takes its place."""
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    blob = _cached(cache, "https://example.com/a.safetensors", 1)
    with blob.open("r+b") as file:
        file.truncate(len(data) // 2)
    assert cache.get(server.url("a.safetensors")) == blob
    assert blob.read_bytes() == data


def test_a_download_is_on_disk_before_its_name_and_its_name_after(served, cache, monkeypatch):
    """A power cut must leave no blob that a cut-short file is published as, nor lose a
    published name the index already records: the file is synced before its link, the
    folder after it."""
    root, server = served
    _serve(root, "a.safetensors", _lora_bytes(1))
    events, fsync, link = [], store.cache.fsync, os.link

    def synced(path):
        events.append(("fsync", Path(path)))
        return fsync(path)

    def linked(source, name):
        events.append(("link", Path(name)))
        return link(source, name)

    monkeypatch.setattr(store.cache, "fsync", synced)
    monkeypatch.setattr(os, "link", linked)
    blob = cache.get(server.url("a.safetensors"))
    published = events.index(("link", blob))
    staged = [path for kind, path in events[:published] if kind == "fsync"]
    assert [path for path in staged if path.parent.parent == cache.partial]
    assert ("fsync", cache.blobs) in events[published:]


def test_a_download_that_fails_writing_for_another_reason_evicts_no_lora(
    served, tmp_path, monkeypatch
):
    """Only a full volume is made room on: a failing disk (EIO) fails the download as it is,
    and the LoRAs cached stay, however little room the volume has."""
    root, server = served
    _serve(root, "a.safetensors", _lora_bytes(1))
    size = len(_lora_bytes(1))
    cache = LoraCache(tmp_path / "cache", 1 << 20, max_cache_bytes=1 << 30, timeout_s=30)
    kept = _cached(cache, "https://example.com/b.safetensors", 2)
    _SmallVolume(monkeypatch, cache, 2 * size)

    def failing_disk(url, out, *args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(download, "fetch_capped", failing_disk)
    with pytest.raises(OSError) as failed:
        cache.get(server.url("a.safetensors"))
    assert failed.value.errno == errno.EIO
    assert kept.exists()


def test_a_full_volume_found_at_the_timeout_fails_as_full_without_a_second_try(
    served, tmp_path, monkeypatch
):
    """Making room can take the rest of COGVIDEOX_LORA_TIMEOUT (a slow network volume): with
    no time left the download is not started again, and the error says why it failed."""
    cache, server = _on_a_volume_for_two(served, tmp_path, monkeypatch, timeout_s=2)
    for name in "ab":
        cache.get(server.url(f"{name}.safetensors"))  # the volume holds no third
    unlink, on_the_volume = store._unlink_unless_held, download.fetch_capped

    def slow_unlink(path):
        time.sleep(2.0)
        return unlink(path)

    def slow_network(url, out, *args, **kwargs):
        time.sleep(0.5)
        return on_the_volume(url, out, *args, **kwargs)

    monkeypatch.setattr(store, "_unlink_unless_held", slow_unlink)
    monkeypatch.setattr(download, "fetch_capped", slow_network)
    with pytest.raises(LoraError, match=r"no space left"):
        cache.get(server.url("c.safetensors"))
    probes = [r for r in server.requests if r == ("GET", "c.safetensors", "bytes=0-0")]
    assert len(probes) == 1


def test_a_lora_another_server_publishes_and_evicts_meanwhile_is_published(
    served, cache, monkeypatch
):
    """Two servers fetching one new LoRA at once: should the other's file be evicted again
    between its publication and this one's look at it, this download takes the name."""
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    link = store._link

    def published_and_evicted(source: Path, name: Path) -> bool:
        name.write_bytes(data)  # the other server publishes it first
        linked = link(source, name)
        name.unlink()  # and its eviction removes it before this server opens it
        return linked

    monkeypatch.setattr(store, "_link", published_and_evicted)
    assert cache.get(server.url("a.safetensors")).read_bytes() == data


@pytest.mark.parametrize("refusal", [errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK])
def test_a_volume_without_hard_links_publishes_with_a_rename(served, cache, monkeypatch, refusal):
    """Some network and FUSE volumes refuse link(2), each with an errno of its own."""
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)

    def no_hard_links(source, name):
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(os, "link", no_hard_links)
    assert cache.get(server.url("a.safetensors")).read_bytes() == data


def _flock_with(monkeypatch, before_lock) -> None:
    """store's flock, calling before_lock(file, operation) first: what another server does
    while this one waits for the lock."""
    real = store.fcntl.flock

    def flock(file, operation):
        before_lock(file, operation)
        return real(file, operation)

    monkeypatch.setattr(store, "fcntl", SimpleNamespace(**{**vars(store.fcntl), "flock": flock}))


def test_a_cached_lora_replaced_while_its_lock_is_awaited_is_held_as_it_is_now(
    served, tmp_path, monkeypatch
):
    """The shared lock waits for an eviction under way, and another server may publish the
    LoRA again before it is granted: the hold must be on the file the name leads to now, or
    an eviction can remove that file before it is read."""
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    url = server.url("a.safetensors")
    reader, other = _servers_sharing(tmp_path / "cache", len(data))
    blob = _cached(reader, url, 1)
    replaced = []

    def evicted_and_published_again(file, operation):
        if operation == store.fcntl.LOCK_SH and Path(file.name) == blob and not replaced:
            blob.unlink()
            blob.write_bytes(data)
            replaced.append(blob)

    _flock_with(monkeypatch, evicted_and_published_again)
    got = reader.get(url)
    _cached(other, "https://example.com/b.safetensors", 2)  # newer: a is the one to go
    other.evict()
    assert replaced and got.read_bytes() == data


def test_a_lora_published_again_as_its_eviction_locks_it_is_kept(tmp_path, monkeypatch):
    """Between the eviction's open of a file and its lock, another server may publish the
    same LoRA again under that name: that new file is just used, not the one to remove."""
    size = len(_lora_bytes(1))
    cache = LoraCache(tmp_path / "cache", 1 << 20, max_cache_bytes=size + size // 2, timeout_s=30)
    old = _cached(cache, "https://example.com/a.safetensors", 1)
    os.utime(old, (time.time() - 60,) * 2)
    _cached(cache, "https://example.com/b.safetensors", 2)

    def published_again(file, operation):
        if operation & store.fcntl.LOCK_EX and Path(file.name) == old:
            again = old.with_suffix(".again")
            again.write_bytes(_lora_bytes(1))
            os.replace(again, old)

    _flock_with(monkeypatch, published_again)
    cache.evict()
    assert old.read_bytes() == _lora_bytes(1)


def test_an_eviction_passes_over_an_index_entry_that_is_no_json_object(tmp_path):
    """Forgetting the URLs of an evicted LoRA reads every entry: one that is not this cache's
    (a JSON list, say) is left as it is, as a lookup takes it for a miss."""
    size = len(_lora_bytes(1))
    cache = LoraCache(tmp_path / "cache", 1 << 20, max_cache_bytes=size + size // 2, timeout_s=30)
    old = _cached(cache, "https://example.com/a.safetensors", 1)
    os.utime(old, (time.time() - 60,) * 2)
    _cached(cache, "https://example.com/b.safetensors", 2)
    not_ours = cache._index_path("https://example.com/c.safetensors")
    not_ours.write_text("[]")
    assert cache.evict() == 1
    assert not old.exists() and not_ours.read_text() == "[]"


def test_a_full_volume_that_cannot_tell_its_free_space_fails_naming_the_folder(
    served, tmp_path, monkeypatch
):
    """statvfs fails on some FUSE volumes: the full volume's error is still the one given."""
    root, server = served
    _serve(root, "a.safetensors", _lora_bytes(1))
    size = len(_lora_bytes(1))
    cache = LoraCache(tmp_path / "cache", 1 << 20, max_cache_bytes=1 << 30, timeout_s=30)
    _SmallVolume(monkeypatch, cache, size // 2)

    def unknown_free_space(path):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(store.shutil, "disk_usage", unknown_free_space)
    with pytest.raises(LoraError, match=r"no space left") as failed:
        cache.get(server.url("a.safetensors"))
    assert str(cache.root) in str(failed.value)


def test_a_lora_removed_from_the_folder_by_hand_is_fetched_again(served, cache):
    """Its URL still names it in the index: a miss, not an error."""
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    url = server.url("a.safetensors")
    cache.get(url).unlink()
    gets = _gets(server, "a.safetensors")
    assert cache.get(url).read_bytes() == data
    assert _gets(server, "a.safetensors") > gets


def test_the_lora_settings_default_to_what_the_configuration_page_says(monkeypatch, tmp_path):
    documented = {}
    for line in (PROJECT / "docs" / "configuration.md").read_text().splitlines():
        cells = [cell.strip().strip("`") for cell in line.strip("|").split("|")]
        if len(cells) > 1:
            documented[cells[0]] = cells[1]
    for name in (store.CACHE_SIZE_ENV, store.MAX_SIZE_ENV, store.TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(store.LORA_DIR_ENV, str(tmp_path / "cache"))
    cache = LoraCache.from_env()
    assert cache.max_cache_bytes == parse_size(documented[store.CACHE_SIZE_ENV], "size")
    assert cache.max_file_bytes == parse_size(documented[store.MAX_SIZE_ENV], "size")
    assert cache.timeout_s == float(documented[store.TIMEOUT_ENV])


def test_a_partial_download_without_an_owner_lock_is_kept_for_a_day(cache):
    """An older version's download is not known to be dead: a slow one may take hours."""
    url = "https://example.com/a.safetensors"
    _cached(cache, url, 1)
    hours_old = cache.partial / "1-2-3"
    hours_old.mkdir(parents=True)
    (hours_old / "download").write_bytes(b"half")
    old = time.time() - 23 * 3600
    os.utime(hours_old, (old, old))
    cache.get(url)
    assert (hours_old / "download").read_bytes() == b"half"


def test_a_lora_of_exactly_the_size_limit_is_accepted(served, tmp_path):
    """COGVIDEOX_LORA_MAX_SIZE is the most a LoRA may be: one of that size is served."""
    root, server = served
    data = _lora_bytes(1)
    _serve(root, "a.safetensors", data)
    cache = LoraCache(tmp_path / "cache", len(data), max_cache_bytes=1 << 30, timeout_s=30)
    assert cache.get(server.url("a.safetensors")).read_bytes() == data


def test_a_hub_lora_of_exactly_the_size_limit_is_accepted(hub, tmp_path):
    size = len(_lora_bytes(1))
    cache = LoraCache(tmp_path / "cache", size, max_cache_bytes=1 << 30, timeout_s=30)
    assert cache.get("hf://org/lora").read_bytes() == _lora_bytes(1)


def test_a_lora_in_a_compressed_tar_of_exactly_the_size_limit_is_accepted(served, tmp_path):
    root, server = served
    data = save({"transformer.blocks.0.to_q.lora_A.weight": torch.zeros(64, 32)})  # compresses
    _serve(root, "run.tar.gz", _tar({f"output/{LORA}": data}, "w:gz"))
    cache = LoraCache(tmp_path / "cache", len(data), max_cache_bytes=1 << 30, timeout_s=30)
    assert cache.get(server.url("run.tar.gz")).read_bytes() == data


def test_a_tar_whose_first_name_has_a_brace_as_its_ninth_byte_is_read_as_a_tar(served, cache):
    """A safetensors file starts with its header's length and `{`; a tar starts with its
    first entry's name, which may hold a `{` there too (a folder named by a template)."""
    root, server = served
    _serve(root, "run.tar", _tar({f"outputs/{{lr}}/{LORA}": _lora_bytes(1)}))
    assert cache.get(server.url("run.tar")).read_bytes() == _lora_bytes(1)


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_a_tar_compressed_each_way_tar_knows_gives_its_lora(served, cache, mode):
    root, server = served
    _serve(root, "run.tar", _tar({f"output/{LORA}": _lora_bytes(1)}, mode))
    assert cache.get(server.url("run.tar")).read_bytes() == _lora_bytes(1)


def test_a_compressed_file_that_is_neither_tar_nor_safetensors_is_an_unreadable_tar(served, cache):
    """Only a compressed file that starts as a safetensors file is called one."""
    root, server = served
    _serve(root, "run.tar.gz", gzip.compress(b"training log, not a tar\n" * 40))
    with pytest.raises(LoraError, match=r"the tar at .* cannot be read"):
        cache.get(server.url("run.tar.gz"))


@pytest.mark.parametrize("name", ["data.pkl", "archive/data.pkl"])
def test_a_torch_zip_checkpoint_is_refused_as_a_pickle(served, cache, name):
    root, server = served
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, pickle.dumps({"lora": 1}))
    _serve(root, "lora.safetensors", buffer.getvalue())
    with pytest.raises(LoraError, match=r"is a PyTorch pickle checkpoint"):
        cache.get(server.url("lora.safetensors"))


def test_a_file_that_starts_as_a_zip_but_cannot_be_read_as_one_is_refused_as_a_pickle(
    served, cache
):
    """A zip's magic over what no zip reader can list is taken for the checkpoint it may be:
    its names are not known to be safe."""
    root, server = served
    _serve(root, "lora.safetensors", b"PK\x03\x04" + bytes(100))
    with pytest.raises(LoraError, match=r"is a PyTorch pickle checkpoint"):
        cache.get(server.url("lora.safetensors"))


def test_a_compressed_tar_that_expands_to_its_bound_exactly_is_read(served, tmp_path):
    """TAR_EXPANSION times the size limit is what a tar may decompress to."""
    root, server = served
    data = save({"transformer.blocks.0.to_q.lora_A.weight": torch.zeros(4, 32)})
    tar = _tar({LORA: data})
    assert len(tar) % fetch.TAR_EXPANSION == 0
    _serve(root, "run.tar.gz", gzip.compress(tar))
    cap = len(tar) // fetch.TAR_EXPANSION
    cache = LoraCache(tmp_path / "cache", cap, max_cache_bytes=1 << 30, timeout_s=30)
    assert cache.get(server.url("run.tar.gz")).read_bytes() == data


def test_a_tar_of_exactly_as_many_entries_as_allowed_is_read(served, cache, monkeypatch):
    monkeypatch.setattr(fetch, "MAX_TAR_MEMBERS", 10)
    root, server = served
    members = {f"output/{i}.txt": b"" for i in range(fetch.MAX_TAR_MEMBERS - 1)}
    _serve(root, "run.tar", _tar({**members, LORA: _lora_bytes(1)}))
    assert cache.get(server.url("run.tar")).read_bytes() == _lora_bytes(1)


def test_a_hub_repo_whose_only_safetensors_file_has_another_name_gives_it(hub, cache):
    """hf://org/repo picks the LoRA among the repository's files, as a tar's are picked."""
    (hub.directory / LORA).rename(hub.directory / "my-style.safetensors")
    assert cache.get("hf://org/lora").read_bytes() == _lora_bytes(1)


def test_a_hub_lora_refused_for_its_size_is_not_blamed_on_the_repository(hub, tmp_path):
    """The refusal says what to change (the size limit), not to check the repository."""
    cache = LoraCache(tmp_path / "cache", 512, 1 << 30, timeout_s=30)
    with pytest.raises(LoraError, match=r"over the .* limit") as refused:
        cache.get("hf://org/lora")
    assert "could not download" not in str(refused.value)


def test_a_gzip_file_whose_header_is_damaged_is_refused_as_an_unreadable_tar(served, cache):
    """gzip reports a damaged header as an OSError (BadGzipFile): a LoraError all the same."""
    root, server = served
    _serve(root, "run.tar.gz", b"\x1f\x8b\x09" + bytes(100))  # 9: no compression method
    with pytest.raises(LoraError, match=r"the tar at .* cannot be read"):
        cache.get(server.url("run.tar.gz"))


def test_the_url_index_bounds_are_those_lora_md_gives():
    """lora.md: at most 10,000 URLs remembered, the least recently used forgotten to 9,000."""
    docs = " ".join((PROJECT / "docs/lora.md").read_text().split())
    assert (
        f"remembers at most {store.MAX_URL_ENTRIES:,} URLs" in docs
        and f"least recently used, down to {store.URL_ENTRIES_KEPT:,}." in docs
    )


def test_the_decompressed_tar_bound_is_the_one_lora_md_gives():
    """lora.md: a compressed tar decompresses to at most 4 times the file limit."""
    docs = " ".join((PROJECT / "docs/lora.md").read_text().split())
    assert f"at most {fetch.TAR_EXPANSION} times `COGVIDEOX_LORA_MAX_SIZE`" in docs


def test_the_tar_entry_bound_is_the_one_lora_md_gives():
    """lora.md: a tar holds at most 10,000 entries."""
    docs = " ".join((PROJECT / "docs/lora.md").read_text().split())
    assert f"hold at most {fetch.MAX_TAR_MEMBERS:,} entries" in docs
