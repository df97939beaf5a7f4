"""The built-in downloader on its own (weights/download.py): a file read through probe() and
open_url() from a real server on 127.0.0.1, as the weights tar is."""

from __future__ import annotations

import email.message
import os
import urllib.error
from pathlib import Path

import pytest

from cogvideox_cog.errors import BadSource, WeightsError
from cogvideox_cog.weights import download
from tests.file_server import FileServer

SIZE = 300_000


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_S", 0.01)
    monkeypatch.setenv(download.TIMEOUT_ENV, "5")
    (tmp_path / "blob.bin").write_bytes(os.urandom(SIZE))
    server = FileServer(tmp_path)
    yield server
    server.stop()


def _fetch(server: FileServer, retries: int | None = None) -> bytes:
    remote, response = download.probe(server.url("blob.bin"), retries)
    with download.open_url(remote, response, 0, "download of blob.bin", retries=retries) as s:
        return s.read(remote.size)


def _served_bytes(server: FileServer) -> bytes:
    return (Path(server.directory) / "blob.bin").read_bytes()


def test_a_range_that_keeps_making_progress_is_retried_past_the_budget(served):
    """The budget is for failures in a row: each drop here comes after new bytes."""
    for at in (50_000, 100_000, 150_000):
        served.drop_at("blob.bin", at)
    assert _fetch(served, retries=1) == _served_bytes(served)


@pytest.mark.parametrize("status", [500, 429])
def test_a_500_or_429_answer_is_retried(served, status):
    served.fail_with("blob.bin", status, times=2)  # the probe, then its retry
    assert _fetch(served, retries=2) == _served_bytes(served)


def test_each_retry_waits_twice_as_long_as_the_one_before_up_to_the_cap(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_S", 1.0)
    for failures, (low, high) in {1: (0.75, 1.0), 2: (1.5, 2.0), 3: (3.0, 4.0)}.items():
        assert low <= download._backoff(failures, None) <= high
    assert download._backoff(20, None) <= download.BACKOFF_MAX_S


def _unavailable(retry_after: str) -> urllib.error.HTTPError:
    headers = email.message.Message()
    headers["Retry-After"] = retry_after
    return urllib.error.HTTPError("http://127.0.0.1/blob.bin", 503, "busy", headers, None)


@pytest.mark.parametrize(("retry_after", "waited"), [("7", 7.0), ("3600", 30.0)])
def test_a_retry_after_is_waited_up_to_the_cap(retry_after, waited):
    waits: list[float] = []
    policy = download._Retries(3, wait=waits.append)
    policy.failed(_unavailable(retry_after), "blob.bin", lambda reason: reason)
    assert waits == [waited]


def test_a_file_whose_size_changed_since_the_probe_fails_saying_to_start_over(tmp_path):
    """A host without ETag or Last-Modified: the size in Content-Range is all that tells."""
    (tmp_path / "blob.bin").write_bytes(os.urandom(SIZE))
    server = FileServer(tmp_path, etag=False)
    try:
        remote, _ = download.probe(server.url("blob.bin"))
        with (tmp_path / "blob.bin").open("ab") as grown:
            grown.write(b"more")
        changed = r"changed on the server .*size 300,000, now 300,004"
        stream = download.open_url(remote, None, 0, "download of blob.bin")
        with stream, pytest.raises(WeightsError, match=changed):
            stream.read(SIZE)
    finally:
        server.stop()


def test_a_file_replaced_on_a_server_without_range_support_is_not_read_on(tmp_path):
    """Without Range, a retry fetches the whole file again: a new ETag means another file."""
    (tmp_path / "blob.bin").write_bytes(os.urandom(SIZE))
    server = FileServer(tmp_path, ranges=False)
    try:
        server.drop_at("blob.bin", SIZE // 2)
        server.replace_after("blob.bin", responses=1)  # the probe's own whole-file answer
        with pytest.raises(WeightsError, match=r"changed on the server during the download"):
            _fetch(server)
    finally:
        server.stop()


def test_a_local_file_read_past_its_end_is_a_truncated_tar(tmp_path):
    """A truncated tar is the source's fault, not the network's: nothing to resume."""
    (tmp_path / "short.tar").write_bytes(bytes(1000))
    stream = download.open_file(tmp_path / "short.tar", 0, "extraction of short.tar")
    truncated = r"truncated tar: extraction of short.tar ended at byte 1,000"
    with stream, pytest.raises(BadSource, match=truncated):
        stream.read(2000)
