"""What the health probe says of answers that are not Cog's: whatever listens on the port,
the probe prints a verdict and fails, never a traceback."""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cogvideox_cog import health


@contextmanager
def _answering(reply: bytes) -> Iterator[str]:
    """A loopback port that sends `reply` to every connection and hangs up; its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)  # to see `stop` soon: closing does not wake accept()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with connection:
                connection.settimeout(5)
                connection.recv(65536)
                connection.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/health-check"
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)


def _json(body: bytes) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    return head.encode() + b"\r\nConnection: close\r\n\r\n" + body


def test_a_ready_answer_passes_both_checks():
    with _answering(_json(b'{"status": "READY"}')) as url:
        assert health.server_status(url, timeout=5) == "READY"
        assert [health.main([check, "--url", url]) for check in ("live", "ready")] == [0, 0]


@pytest.mark.parametrize(
    "reply",
    [_json(b'["READY"]'), _json(b'"READY"'), _json(b"null")],
    ids=["a list", "a string", "null"],
)
def test_json_that_is_not_an_object_is_unreachable(reply):
    with _answering(reply) as url:
        assert health.server_status(url, timeout=5) == "UNREACHABLE"


def test_a_service_that_does_not_speak_http_is_unreachable(capsys):
    with _answering(b"SSH-2.0-OpenSSH_9.2\r\n") as url:
        assert health.main(["live", "--url", url]) == 1
    assert capsys.readouterr().out == "live: UNREACHABLE -> failing\n"


@pytest.mark.parametrize(
    ("status", "live", "ready"),
    [
        ("STARTING", 0, 1),  # setup downloads the weights: alive, not yet serving
        ("READY", 0, 0),
        ("BUSY", 0, 1),  # alive, but the next prediction would get a 409
        ("UNHEALTHY", 1, 1),
        ("SETUP_FAILED", 1, 1),
        ("DEFUNCT", 1, 1),
    ],
)
def test_each_cog_status_passes_the_checks_operations_md_gives(status, live, ready):
    with _answering(_json(f'{{"status": "{status}"}}'.encode())) as url:
        assert [health.main([check, "--url", url]) for check in ("live", "ready")] == [
            live,
            ready,
        ]


def test_the_default_url_drops_blanks_around_port_as_cog_does(monkeypatch):
    monkeypatch.setenv("PORT", " 5001\r")
    assert health.default_url() == "http://127.0.0.1:5001/health-check"


def test_a_deployments_http_proxy_is_not_asked_for_the_loopback(monkeypatch):
    """A proxy that answers every request UNHEALTHY: a probe through it would fail the
    server it cannot reach. urlopen() keeps the opener its first call built, from the
    environment of then: a fresh one reads this test's."""
    urllib.request.install_opener(None)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with _answering(_json(b'{"status": "UNHEALTHY"}')) as proxy:
        monkeypatch.setenv("http_proxy", proxy.removesuffix("/health-check"))
        monkeypatch.setenv("HTTP_PROXY", proxy.removesuffix("/health-check"))
        with _answering(_json(b'{"status": "READY"}')) as url:
            assert health.server_status(url, timeout=5) == "READY"


def test_the_probe_waits_as_long_as_operations_md_says():
    """The wait operations.md gives, longer than the 10 s Cog gives its worker to answer."""
    page = Path(__file__).resolve().parent.parent / "docs/operations.md"
    docs = " ".join(page.read_text().split())
    assert (
        f"waits up to {health.TIMEOUT_S:g} s for the answer, since Cog gives its worker 10 s"
        in docs
    )
