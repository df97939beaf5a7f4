"""A real HTTP file server on 127.0.0.1 for weights downloads in tests.

Serves files from one directory and counts the body bytes it sent, so tests can tell a
download that ran from one that reused the cache.
"""

from __future__ import annotations

import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def copyfile(self, source, outputfile) -> None:
        server = self.server
        truncate_at = server.truncate.get(self.path.lstrip("/"))
        sent = 0
        while chunk := source.read(64 << 10):
            if truncate_at is not None and sent + len(chunk) > truncate_at:
                outputfile.write(chunk[: truncate_at - sent])
                server.bytes_sent += truncate_at - sent
                self.close_connection = True
                return
            outputfile.write(chunk)
            sent += len(chunk)
            server.bytes_sent += len(chunk)


class FileServer:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(_Handler, directory=str(self.directory))
        )
        self._httpd.bytes_sent = 0
        self._httpd.truncate = {}
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/{name}"

    @property
    def bytes_sent(self) -> int:
        return self._httpd.bytes_sent

    def truncate_after(self, name: str, size: int) -> None:
        """Close the connection after `size` body bytes of `name` (Content-Length stays full)."""
        self._httpd.truncate[name] = size

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
