"""HTTP servers on 127.0.0.1 that the Cog server talks to in tests: an upload target, a
sender that never finishes a body, a port where no connection is ever made, and one whose TLS
handshake never ends.

(The webhook receiver lives in tests/cog_server.py; images are served with tests/file_server.py.)
"""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Upload:
    path: str  # the request path, e.g. /uploads/cogvideox-5b-42-1a2b3c4d.mp4
    headers: dict[str, str]  # lower-cased names
    body: bytes

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


class UploadServer:
    """A PUT target for `--upload-url`, shaped like a signed-URL object store.

    Cog's server (coglet 0.23.1) PUTs each output file to `<upload-url>/<file name>` with
    `Content-Type` and `X-Prediction-Id` headers, and makes the prediction's output the URL in
    the response's `Location` header with its query string removed (the request URL when there
    is no `Location`). This server stores the body, answers 201 with
    `Location: <base>/files/<id>/<file name>?signature=...` and serves the stored files back
    on GET, so a test can fetch the output URL the way a client would.
    `status` makes every PUT fail with that HTTP status instead.
    """

    def __init__(self, status: int = 201) -> None:
        self.uploads: list[Upload] = []
        self.status = status
        self._files: dict[str, bytes] = {}
        self._lock = threading.Lock()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                upload = Upload(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with peer._lock:
                    peer.uploads.append(upload)
                    status = peer.status
                    stored = f"/files/{uuid.uuid4().hex[:8]}/{upload.name}"
                    if status < 300:
                        peer._files[stored] = body
                self.send_response(status)
                if status < 300:
                    self.send_header("Location", f"{peer.base}{stored}?signature=secret")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                with peer._lock:
                    body = peer._files.get(self.path.split("?", 1)[0])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.url = f"{self.base}/uploads/"

    def uploads_for(self, prediction_id: str) -> list[Upload]:
        with self._lock:
            return [u for u in self.uploads if u.headers.get("x-prediction-id") == prediction_id]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> UploadServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EndlessSender:
    """GET targets whose body never ends in useful time, for the input download bounds.

    `/endless` streams zeros as fast as the client takes them, with no Content-Length, until it
    hangs up. `/trickle` announces `trickle_size` bytes and sends `rate` bytes a second.
    `sent` counts body bytes per path; `hung_up[path]` is set once a client closed on it.
    """

    def __init__(self, rate: int = 64, trickle_size: int = 1 << 20) -> None:
        self.sent: dict[str, int] = {"/endless": 0, "/trickle": 0}
        self.hung_up = {path: threading.Event() for path in self.sent}
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path not in peer.sent:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                if path == "/trickle":
                    self.send_header("Content-Length", str(trickle_size))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                block, pause = (
                    (b"\0" * (64 << 10), 0.0) if path == "/endless" else (b"\0" * rate, 1.0)
                )
                try:
                    while not peer._stopped.is_set():
                        self.wfile.write(block)
                        self.wfile.flush()
                        with peer._lock:
                            peer.sent[path] += len(block)
                        if pause:
                            peer._stopped.wait(pause)
                except OSError:  # the client hung up
                    peer.hung_up[path].set()
                self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def wait_hung_up(self, path: str, timeout: float) -> bool:
        """Whether the client hung up on `path` within `timeout` s (seen at the next write)."""
        return self.hung_up[path].wait(timeout)

    def close(self) -> None:
        self._stopped.set()
        self._httpd.shutdown()
        self._httpd.server_close()


class NeverAccepts:
    """A port on 127.0.0.1 where a connection is never made: its listener's queue is full
    (a backlog of 0 holds one connection, taken here) and it accepts none, so the kernel
    drops each new SYN and a client's connect waits until its own timeout, as for an
    address behind a firewall that drops packets."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(0)
        self.port = self._listener.getsockname()[1]
        self._queued: list[socket.socket] = []
        while True:  # until a connect times out: the queue is full
            filler = socket.socket()
            filler.settimeout(0.5)
            try:
                filler.connect(("127.0.0.1", self.port))
            except TimeoutError:
                filler.close()
                break
            self._queued.append(filler)

    def close(self) -> None:
        for filler in self._queued:
            filler.close()
        self._listener.close()

    def __enter__(self) -> NeverAccepts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EndlessHandshake:
    """A port on 127.0.0.1 that takes connections and never finishes a TLS handshake: it
    answers with the header of a handshake record, then the record's bytes one every 0.1 s,
    each well within a client's socket timeout, as an overloaded TLS terminator may."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.port = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._trickle, args=(connection,), daemon=True).start()

    def _trickle(self, connection: socket.socket) -> None:
        with connection:
            try:
                connection.sendall(b"\x16\x03\x03\x40\x00")  # a 16 kB handshake record
                while not self._stopped.wait(0.1):
                    connection.sendall(b"\x00")
            except OSError:  # the client gave up
                return

    def close(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):  # wakes the accept, where the kernel allows
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def __enter__(self) -> EndlessHandshake:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
