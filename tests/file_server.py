"""A real HTTP file server on 127.0.0.1 for weights downloads in tests and benchmarks.

Serves the files of one directory over HTTP/1.1 with keep-alive and byte ranges (206 with
Content-Range, as CDNs do), counts the body bytes it sent, logs each request, and injects the
faults a download meets in the wild: a connection dropped mid-body, 5xx answers, a lying,
missing or non-numeric Content-Length, a flipped byte, a stalled transfer, a range other than
the one asked for, a range cut short or run on past its asked end, a total size of `*`
(unknown), no Range support, no validators (neither ETag nor Last-Modified, as some hosts),
or Last-Modified alone; bodies can be sent chunked, without a Content-Length (as some
proxies send them). A test changes a served file by replacing it in the directory, or
mid-download with `replace_after`.

A fault is keyed by file name and applies to the next `times` responses for that file
(None: to all of them). Offsets are offsets in the file, not in one response's body, so a
fault stays put whichever range a client asks for.

`python -m tests.file_server DIR` serves DIR in a process of its own and prints its base URL
(the benchmark uses this, so the server does not share the downloader's interpreter).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_BLOCK = 256 << 10


@dataclass
class _Fault:
    # "drop", "status", "length", "flip", "stall", "redirect", "shift", "resize", "star",
    # "header"
    kind: str
    offset: int = 0
    location: str = ""
    status: int = 0
    delta: int = 0
    value: str | None = None
    seconds: float = 0.0
    times: int | None = None  # responses left to spoil; None: every one


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Several ranged connections at once from one client: the default backlog of 5 drops
    # some under load, which shows up as resets that are not a fault under test.
    request_queue_size = 64

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up: fine
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a CDN
    server: _Server

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        owner: FileServer = self.server.owner
        name = unquote(urlsplit(self.path).path).lstrip("/")
        path = owner.directory / name
        owner._log(self.command, name, self.headers.get("Range"), urlsplit(self.path).query)
        if not name or ".." in Path(name).parts or not path.is_file():
            self._error(404)
            return
        status = owner._take(name, "status")
        if status is not None:
            self._error(status.status)
            return
        redirect = owner._take(name, "redirect")
        if redirect is not None:
            self.send_response(redirect.status)
            self.send_header("Location", redirect.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        ranged = owner.ranges and self.headers.get("Range")
        if ranged:
            match = _RANGE.match(ranged.strip())
            if not match or (not match[1] and not match[2]):
                self._error(416, size)
                return
            if match[1]:
                start = int(match[1])
                end = min(int(match[2]), size - 1) if match[2] else size - 1
            else:  # a suffix range: the last N bytes
                start = max(size - int(match[2]), 0)
            if start >= size or start > end:
                self._error(416, size)
                return
            shift = owner._take(name, "shift") if start >= owner._shift_of(name) > 0 else None
            if shift:  # other bytes than asked, their Content-Range saying which
                start, end = start - shift.delta, end - shift.delta
            resize = owner._take(name, "resize", lambda f: min(start + f.delta, size) - 1 != end)
            if resize:  # fewer or more bytes than asked, their Content-Range saying which
                end = min(start + resize.delta, size) - 1
        length = end - start + 1
        lie = owner._take(name, "length")
        header = owner._take(name, "header")
        unknown_total = ranged and owner._take(name, "star")
        self.send_response(206 if ranged else 200)
        if owner.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif header:
            if header.value is not None:
                self.send_header("Content-Length", header.value)
        else:
            self.send_header("Content-Length", str(length + (lie.delta if lie else 0)))
        if ranged:
            self.send_header(
                "Content-Range", f"bytes {start}-{end}/{'*' if unknown_total else size}"
            )
        if owner.ranges:
            self.send_header("Accept-Ranges", "bytes")
        stat = path.stat()
        if owner._replaced_now(name):  # after this response's own headers are known
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        if owner.etag:
            self.send_header("ETag", f'"{stat.st_mtime_ns:x}-{size:x}"')
        if owner.last_modified:
            self.send_header("Last-Modified", formatdate(stat.st_mtime, usegmt=True))
        self.send_header("Content-Type", "application/x-tar")
        self.end_headers()
        if not body:
            return
        if lie or header:
            self.close_connection = True  # the body does not match the header: no reuse
        with path.open("rb") as source:
            self._send_body(owner, name, source, start, end + 1)

    def _send_body(self, owner: FileServer, name: str, source, start: int, stop: int) -> None:
        drop = owner._peek(name, "drop", start, stop)
        stall = owner._peek(name, "stall", start, stop)
        flip = owner._peek(name, "flip", start, stop)
        cut = min(f.offset for f in (drop, stall) if f) if (drop or stall) else stop
        if drop and drop.offset == cut:
            owner._spend(name, drop)
        if stall and stall.offset == cut:
            owner._spend(name, stall)
        if flip:
            owner._spend(name, flip)
        position = start
        if not flip and cut == stop and not owner.chunked:
            # Fast path, as a real file server: the kernel copies the file to the socket.
            while position < stop:
                sent = self.connection.sendfile(source, position, stop - position)
                if not sent:
                    break
                position += sent
                owner._count(sent)
            return
        source.seek(start)
        while position < cut:
            data = bytearray(source.read(min(_BLOCK, cut - position)))
            if flip and position <= flip.offset < position + len(data):
                data[flip.offset - position] ^= 0xFF
            if owner.chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                self.wfile.write(data)
            position += len(data)
            owner._count(len(data))
        if owner.chunked and cut == stop:
            self.wfile.write(b"0\r\n\r\n")
        if cut < stop:
            self.wfile.flush()
            if stall and stall.offset == cut:
                owner._stopped.wait(stall.seconds)
            self.close_connection = True  # cut short: the client sees the body end early

    def _error(self, code: int, size: int | None = None) -> None:
        self.send_response(code)
        if size is not None:
            self.send_header("Content-Range", f"bytes */{size}")
        self.send_header("Content-Length", "0")
        self.end_headers()


class FileServer:
    def __init__(
        self,
        directory: Path,
        port: int = 0,
        ranges: bool = True,
        etag: bool = True,
        last_modified: bool = False,
        chunked: bool = False,
    ):
        self.directory = Path(directory)
        self.ranges, self.etag, self.last_modified = ranges, etag, last_modified
        self.chunked = chunked
        self.requests: list[tuple[str, str, str | None]] = []  # (method, name, Range header)
        self.queries: list[str] = []  # each request's query string, in the same order
        self._bytes_sent = 0
        self._faults: dict[str, list[_Fault]] = {}
        self._replace_after: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def url(self, name: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/{name}"

    @property
    def bytes_sent(self) -> int:
        """Body bytes sent so far, over all files and responses."""
        return self._bytes_sent

    # Faults. Each applies to the next `times` responses for `name` (None: all of them).

    def truncate_after(self, name: str, size: int) -> None:
        """Close every connection before file offset `size` of `name` (Content-Length stays
        full). A size past the end of the file lifts it."""
        self.clear(name, "drop")
        self.drop_at(name, size, times=None)

    def drop_at(self, name: str, offset: int, times: int | None = 1) -> None:
        """Close the connection instead of sending the byte at `offset`."""
        self._add(name, _Fault("drop", offset=offset, times=times))

    def fail_with(self, name: str, status: int, times: int | None = 1) -> None:
        """Answer `status` (e.g. 503) with an empty body."""
        self._add(name, _Fault("status", status=status, times=times))

    def redirect(
        self, name: str, location: str, times: int | None = None, status: int = 302
    ) -> None:
        """Answer `status` (302, or 301, 303, 307, 308) to `location`."""
        self._add(name, _Fault("redirect", location=location, status=status, times=times))

    def lie_about_length(self, name: str, delta: int, times: int | None = None) -> None:
        """Send Content-Length off by `delta` with the true body, then close the connection."""
        self._add(name, _Fault("length", delta=delta, times=times))

    def flip_byte(self, name: str, offset: int, times: int | None = None) -> None:
        """Send the byte at `offset` with all its bits flipped."""
        self._add(name, _Fault("flip", offset=offset, times=times))

    def stall_at(self, name: str, offset: int, seconds: float, times: int | None = 1) -> None:
        """Stop sending before `offset` for `seconds` (or until stop()), then close."""
        self._add(name, _Fault("stall", offset=offset, seconds=seconds, times=times))

    def shift_range(self, name: str, delta: int, times: int | None = 1) -> None:
        """Answer a range that starts at or past `delta` with the bytes `delta` before it (of
        the same length), and a Content-Range that says so."""
        self._add(name, _Fault("shift", delta=delta, times=times))

    def answer_bytes(self, name: str, length: int, times: int | None = None) -> None:
        """Answer a range with `length` bytes from its start whatever end it asked for (up to
        the end of the file), Content-Range and Content-Length saying so: a server that caps
        a 206's size, or runs on past the asked end. Only answers it changes count to
        `times`."""
        self._add(name, _Fault("resize", delta=length, times=times))

    def unknown_total(self, name: str, times: int | None = None) -> None:
        """Give a range's total size as `*` in its Content-Range (`bytes 0-99/*`): a server
        that does not know the file's length (RFC 9110 14.4). Whole-file answers keep theirs."""
        self._add(name, _Fault("star", times=times))

    def send_length(self, name: str, value: str | None, times: int | None = None) -> None:
        """Send `value` as the Content-Length header whatever the body (None: no header), the
        true body ended by closing the connection: a proxy that dropped the header, or one
        that merged two (`"300000, 300000"`)."""
        self._add(name, _Fault("header", value=value, times=times))

    def replace_after(self, name: str, responses: int) -> None:
        """Re-upload `name` (same bytes, a new modification time: a new ETag and Last-Modified)
        while its `responses`-th response is sent; that response still describes the old one."""
        with self._lock:
            self._replace_after[name] = responses

    def clear(self, name: str | None = None, kind: str | None = None) -> None:
        with self._lock:
            for key in [name] if name else list(self._faults):
                self._faults[key] = [
                    f for f in self._faults.get(key, []) if kind and f.kind != kind
                ]

    def stop(self) -> None:
        self._stopped.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    # Bookkeeping for the handler.

    def _add(self, name: str, fault: _Fault) -> None:
        with self._lock:
            self._faults.setdefault(name, []).append(fault)

    def _take(
        self, name: str, kind: str, applies: Callable[[_Fault], bool] = lambda fault: True
    ) -> _Fault | None:
        """The first live fault of `kind` that `applies` to this answer, spent."""
        with self._lock:
            for fault in self._faults.get(name, []):
                if fault.kind == kind and fault.times != 0 and applies(fault):
                    self._spend_locked(fault)
                    return fault
        return None

    def _shift_of(self, name: str) -> int:
        with self._lock:
            shifts = [f for f in self._faults.get(name, []) if f.kind == "shift" and f.times != 0]
        return shifts[0].delta if shifts else 0

    def _peek(self, name: str, kind: str, start: int, stop: int) -> _Fault | None:
        with self._lock:
            hits = [
                f
                for f in self._faults.get(name, [])
                if f.kind == kind and f.times != 0 and start <= f.offset < stop
            ]
        return min(hits, key=lambda f: f.offset) if hits else None

    def _spend(self, name: str, fault: _Fault) -> None:
        with self._lock:
            self._spend_locked(fault)

    @staticmethod
    def _spend_locked(fault: _Fault) -> None:
        if fault.times is not None:
            fault.times -= 1

    def _replaced_now(self, name: str) -> bool:
        with self._lock:
            left = self._replace_after.pop(name, 0) - 1
            if left > 0:
                self._replace_after[name] = left
            return left == 0

    def _count(self, sent: int) -> None:
        with self._lock:
            self._bytes_sent += sent

    def _log(self, method: str, name: str, byte_range: str | None, query: str) -> None:
        with self._lock:
            self.requests.append((method, name, byte_range))
            self.queries.append(query)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = FileServer(args.directory, port=args.port)
    print(server.url(""), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    os._exit(0)


if __name__ == "__main__":
    main()
