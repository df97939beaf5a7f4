"""The built-in downloader on its own (weights/download.py): a file read through probe() and
open_url() from a real server on 127.0.0.1, as the weights tar is."""

from __future__ import annotations

import email.message
import io
import os
import re
import threading
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


@pytest.mark.parametrize("status", [403, 404, 410])
@pytest.mark.parametrize("where", ["probe", "range"])
def test_a_4xx_answer_is_not_retried(served, status, where):
    """A missing file or an expired signature stays so: retrying it held setup for the whole
    backoff. Answered once only, so a retry would have got the file."""
    remote = None
    if where == "range":
        remote, _ = download.probe(served.url("blob.bin"), retries=3)
    served.fail_with("blob.bin", status, times=1)
    requests_before = len(served.requests)
    with pytest.raises(WeightsError, match=rf"HTTP {status} ") as failed:
        if remote is None:
            remote, _ = download.probe(served.url("blob.bin"), retries=3)
        with download.open_url(remote, None, 0, "download of blob.bin", retries=3) as stream:
            stream.read(remote.size)
    assert "attempts" not in str(failed.value)
    assert len(served.requests) == requests_before + 1


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


def test_a_server_that_stops_honouring_range_mid_download_fails_at_once(served):
    """A 200 with the whole file to a ranged GET (a CDN edge that drops Range support after
    the probe) is not the bytes asked for, and the next attempt would be the same."""
    remote, response = download.probe(served.url("blob.bin"))
    assert remote.ranges and response is None
    served.ranges = False
    requests_before = len(served.requests)
    stream = download.open_url(remote, None, 0, "download of blob.bin", retries=3)
    stopped = r"got HTTP 200 without a range: the server stopped honouring Range requests"
    with stream, pytest.raises(WeightsError, match=stopped):
        stream.read(SIZE)
    assert len(served.requests) == requests_before + 1  # not retried


def test_a_whole_file_answer_other_than_200_is_not_read_as_the_file(tmp_path, monkeypatch):
    """Without Range, a retry asks for the whole file again: a 204 (or any 2xx but 200) to
    it is no file's body, and is refused rather than read as one."""
    monkeypatch.setattr(download, "BACKOFF_S", 0.01)
    (tmp_path / "blob.bin").write_bytes(os.urandom(SIZE))
    server = FileServer(tmp_path, ranges=False)
    try:
        server.drop_at("blob.bin", SIZE // 2)  # in the probe's own whole-file answer
        remote, response = download.probe(server.url("blob.bin"))
        server.fail_with("blob.bin", 204)  # the retry's answer
        stream = download.open_url(remote, response, 0, "download of blob.bin", retries=3)
        with stream, pytest.raises(WeightsError, match=r"HTTP 204 for the whole file"):
            stream.read(SIZE)
    finally:
        server.stop()


@pytest.mark.parametrize("ranges", [True, False], ids=["announced size", "chunked, no size"])
def test_a_body_of_exactly_the_size_cap_is_fetched(tmp_path, monkeypatch, ranges):
    """The cap is the largest size allowed, not the smallest refused: an announced size and
    bytes counted as they come are held to it alike."""
    monkeypatch.setattr(download, "BACKOFF_S", 0.01)
    data = os.urandom(SIZE)
    (tmp_path / "blob.bin").write_bytes(data)
    server = FileServer(tmp_path, ranges=ranges, chunked=not ranges)
    out = tmp_path / "out.bin"
    try:
        with out.open("wb") as file:
            download.fetch_capped(server.url("blob.bin"), file, SIZE, threading.Event(), "blob.bin")
    finally:
        server.stop()
    assert out.read_bytes() == data


def _connections_to(port: int) -> int:
    """Established TCP connections of this machine to `port` on 127.0.0.1 (Linux /proc)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(
        1
        for row in rows
        if (fields := row.split())[2] == f"0100007F:{port:04X}" and fields[3] == "01"
    )


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_a_body_refused_as_too_large_has_its_connection_closed(tmp_path):
    """A server without Range answers the probe with the whole body: refused for its size, it
    is hung up at once, not left sending until the refusal's traceback is collected."""
    (tmp_path / "blob.bin").write_bytes(bytes(32 << 20))  # more than socket buffers hold
    server = FileServer(tmp_path, ranges=False)
    port = int(server.url("").rsplit(":", 1)[1].strip("/"))
    try:
        with pytest.raises(download.TooLarge) as refused:
            download.fetch_capped(
                server.url("blob.bin"), io.BytesIO(), SIZE, threading.Event(), "x"
            )
        assert _connections_to(port) == 0
        del refused
    finally:
        server.stop()


def test_a_range_is_given_up_after_five_failures_in_a_row_by_default(served):
    """RETRIES, the budget of a setup's download: five 503s in a row are waited out, the
    sixth fails it (docs/weights.md: retried with backoff)."""
    remote, _ = download.probe(served.url("blob.bin"))
    served.fail_with("blob.bin", 503, times=5)
    with download.open_url(remote, None, 0, "download of blob.bin") as stream:
        assert stream.read(SIZE) == _served_bytes(served)
    served.fail_with("blob.bin", 503, times=6)
    stream = download.open_url(remote, None, 0, "download of blob.bin")
    with stream, pytest.raises(WeightsError, match=r"HTTP 503 .*\(6 attempts\)"):
        stream.read(SIZE)


def test_a_local_file_that_cannot_be_read_fails_at_once(tmp_path, caplog):
    """A local read error is no network's: waiting and trying again cannot help."""
    (tmp_path / "gone.tar").write_bytes(bytes(1000))
    stream = download.open_file(tmp_path / "gone.tar", 0, "extraction of gone.tar")
    (tmp_path / "gone.tar").unlink()
    with stream, pytest.raises(WeightsError, match=r"No such file") as failed:
        stream.read(1000)
    assert "attempts" not in str(failed.value)
    assert "retry" not in caplog.text


def test_a_closed_stream_stops_its_download_threads(served, monkeypatch):
    """An extraction that stops early (an unsafe member, a full disk) closes the stream:
    its workers end rather than wait for good, each holding a chunk's buffer."""
    monkeypatch.setattr(download, "CHUNK_BYTES", 16 << 10)  # many chunks, few read
    before = set(threading.enumerate())
    remote, _ = download.probe(served.url("blob.bin"))
    with download.open_url(remote, None, 0, "download of blob.bin") as stream:
        stream.read(1000)
    workers = set(threading.enumerate()) - before
    for worker in workers:
        worker.join(5)
    assert not [worker.name for worker in workers if worker.is_alive()]


def test_an_empty_file_is_fetched_as_empty(tmp_path):
    """An empty file has no byte 0: the probe's 416 `bytes */0` is its size, not an error."""
    (tmp_path / "empty.bin").write_bytes(b"")
    server = FileServer(tmp_path)
    out = io.BytesIO()
    try:
        download.fetch_capped(server.url("empty.bin"), out, SIZE, threading.Event(), "x")
    finally:
        server.stop()
    assert out.getvalue() == b""


def test_a_capped_fetch_stops_writing_once_cancelled(served, monkeypatch):
    """with_deadline sets `cancelled` when it stops waiting: the work stops at its next
    block rather than fetching the rest of the body for no one."""
    monkeypatch.setattr(download, "CHUNK_BYTES", 16 << 10)
    cancelled = threading.Event()
    cancelled.set()
    out = io.BytesIO()
    download.fetch_capped(served.url("blob.bin"), out, SIZE, cancelled, "blob.bin")
    assert 0 < len(out.getvalue()) < SIZE


def test_a_chunked_answer_for_other_bytes_than_asked_is_retried(served, tmp_path):
    """Without a Content-Length, only the Content-Range's start says the bytes are not the
    ones asked for: taken, they were written where the asked ones belong."""
    chunked = FileServer(served.directory, chunked=True)
    try:
        chunked.drop_at("blob.bin", 100_000)  # the retry asks for bytes 100,000 on
        chunked.shift_range("blob.bin", 1_000)
        remote, _ = download.probe(chunked.url("blob.bin"))
        with download.open_url(remote, None, 0, "download of blob.bin") as stream:
            assert stream.read(SIZE) == _served_bytes(served)
        assert chunked._shift_of("blob.bin") == 0  # the shifted answer was sent, and refused
    finally:
        chunked.stop()


def _probed(server: FileServer) -> download.RemoteFile:
    """blob.bin probed on the plain server, so that the faults added next are met by the
    stream's ranges alone."""
    remote, response = download.probe(server.url("blob.bin"))
    assert remote.ranges and response is None
    return remote


def _ranges(remote: download.RemoteFile, retries: int) -> download.Stream:
    return download.open_url(remote, None, 0, "download of blob.bin", retries=retries)


def test_a_range_answered_past_its_asked_end_is_asked_again(served, monkeypatch):
    """Bytes past the asked end belong to the next chunk: such an answer is not the range
    asked for, and is not read as it (nor its unread rest taken for a cut connection)."""
    monkeypatch.setattr(download, "CHUNK_BYTES", 16 << 10)
    chunks = -(-SIZE // download.CHUNK_BYTES)
    remote = _probed(served)
    served.answer_bytes("blob.bin", 20_000, times=1)
    stream = _ranges(remote, retries=2)
    with stream:
        assert stream.read(SIZE) == _served_bytes(served)
    assert len(served.requests) == 1 + chunks + 1  # the long answer's range twice


def test_a_range_answered_short_is_completed_by_asking_for_the_rest(served):
    """A server may cap a 206's size: a shorter answer whose Content-Range and
    Content-Length agree is good as far as it goes, and the rest is asked for, with no
    failure counted (retries=0)."""
    remote = _probed(served)
    served.answer_bytes("blob.bin", 100_000)
    stream = _ranges(remote, retries=0)
    with stream:
        assert stream.read(SIZE) == _served_bytes(served)
    assert [r for _, _, r in served.requests[1:]] == [
        "bytes=0-299999",
        "bytes=100000-299999",
        "bytes=200000-299999",
    ]


def test_a_range_of_unknown_total_size_is_taken(served):
    """RFC 9110 lets a 206 say `*` for a total it does not know: the bytes are still the ones
    asked for, and the size probed stands."""
    remote = _probed(served)
    served.unknown_total("blob.bin")
    stream = _ranges(remote, retries=1)
    with stream:
        assert stream.read(SIZE) == _served_bytes(served)


def test_a_range_without_content_length_or_chunks_is_asked_again(served):
    """A 206 is held to a Content-Length that agrees with its Content-Range (or to chunked
    framing); one with neither, ended only by the connection's close, is not read but asked
    for again."""
    remote = _probed(served)
    served.send_length("blob.bin", None, times=1)
    stream = _ranges(remote, retries=2)
    with stream:
        assert stream.read(SIZE) == _served_bytes(served)
    assert [r for _, _, r in served.requests[1:]] == ["bytes=0-299999"] * 2


def test_a_probe_answered_with_an_unknown_total_size_streams_the_whole_file(served):
    """Without a total, chunks cannot be laid out: the file is fetched in one plain GET."""
    served.unknown_total("blob.bin")
    remote, response = download.probe(served.url("blob.bin"))
    assert not remote.ranges and response is not None
    with download.open_url(remote, response, 0, "download of blob.bin", retries=0) as stream:
        assert stream.read(SIZE) == _served_bytes(served)


def test_a_non_numeric_content_length_is_read_as_no_length(tmp_path):
    """A proxy that merges a doubled header sends `300000, 300000`: the size is unknown, and
    the body is read to its end as a chunked one is."""
    data = os.urandom(SIZE)
    (tmp_path / "blob.bin").write_bytes(data)
    server = FileServer(tmp_path, ranges=False)
    server.send_length("blob.bin", f"{SIZE}, {SIZE}")
    out = io.BytesIO()
    try:
        download.fetch_capped(server.url("blob.bin"), out, SIZE, threading.Event(), "blob.bin")
    finally:
        server.stop()
    assert out.getvalue() == data


def test_a_range_cut_at_the_same_byte_every_time_fails_within_its_retries(served):
    """A body that ends before its Content-Range does counts as a failure: a server that
    cuts it at the same byte every time fails the download after the retries, rather than
    being asked again for good."""
    remote = _probed(served)
    served.truncate_after("blob.bin", 100_000)
    stream = _ranges(remote, retries=2)
    outcome: dict[str, BaseException] = {}

    def read() -> None:
        try:
            stream.read(SIZE)
        except BaseException as error:
            outcome["error"] = error

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    stream.close()
    assert not reader.is_alive(), "still asking for the range after 10 s"
    cut = r"failed after 100,000 of 300,000 bytes: connection closed after 0 of .*3 attempts"
    assert isinstance(outcome.get("error"), WeightsError)
    assert re.search(cut, str(outcome["error"]))
