"""A fake Hugging Face Hub on 127.0.0.1: the part of its API that snapshot_download and
hf_hub_download use, for one repository at one commit, over plain HTTP (no Xet).

As on the real Hub, a file's bytes are not served by the Hub itself: HEAD and GET of
/{repo}/resolve/{revision}/{path} answer 302 to a presigned URL on another host, the Hub's
CDN, here a tests.file_server.FileServer (on another port) whose faults a test injects.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tests.file_server import FileServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SIGNATURE = "X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=0123456789abcdef"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def _serve(self) -> None:
        hub: HubServer = self.server.owner
        path = unquote(urlsplit(self.path).path)
        api = f"/api/models/{hub.repo}/"
        resolve = f"/{hub.repo}/resolve/"
        if path.startswith(api + "revision/"):
            siblings = [{"rfilename": name} for name in hub.files()]
            self._json({"id": hub.repo, "sha": COMMIT, "siblings": siblings})
        elif path.startswith(api + "tree/"):
            self._json([hub.entry(name) for name in hub.files()])
        elif path.startswith(resolve):
            name = path[len(resolve) :].partition("/")[2]  # after the revision
            if name not in hub.files():
                self._answer(404, {"X-Error-Code": "EntryNotFound"})
                return
            size = (hub.directory / name).stat().st_size
            self._answer(
                302,
                {
                    "Location": f"{hub.cdn.url(name)}?{SIGNATURE}",
                    "X-Repo-Commit": COMMIT,
                    "X-Linked-Etag": f'"{hub.sha256(name)}"',
                    "X-Linked-Size": str(size),
                },
            )
        else:
            self._answer(404, {"X-Error-Code": "RepoNotFound"})

    def _json(self, value) -> None:
        body = json.dumps(value).encode()
        self._answer(200, {"Content-Type": "application/json"}, body)

    def _answer(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class HubServer:
    """The repository `repo` holding the files under `directory`, at commit COMMIT."""

    def __init__(self, repo: str, directory: Path):
        self.repo, self.directory = repo, Path(directory)
        self.cdn = FileServer(self.directory)
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def files(self) -> list[str]:
        return sorted(
            p.relative_to(self.directory).as_posix()
            for p in self.directory.rglob("*")
            if p.is_file()
        )

    def sha256(self, name: str) -> str:
        return hashlib.sha256((self.directory / name).read_bytes()).hexdigest()

    def entry(self, name: str) -> dict:
        size = (self.directory / name).stat().st_size
        lfs = {"oid": self.sha256(name), "size": size, "pointerSize": 130}
        oid = hashlib.sha1(name.encode()).hexdigest()
        return {"type": "file", "path": name, "size": size, "oid": oid, "lfs": lfs}

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self.cdn.stop()
