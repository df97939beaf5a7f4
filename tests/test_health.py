"""What the health probe says of answers that are not Cog's: whatever listens on the port,
the probe prints a verdict and fails, never a traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cogvideox_cog import health

PROJECT = Path(__file__).resolve().parent.parent


@contextmanager
def _answering(reply: bytes, delay: float = 0.0) -> Iterator[str]:
    """A loopback port that sends `reply` to every connection `delay` seconds after its
    request (sooner when the block ends) and hangs up; its URL."""
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
                stop.wait(delay)
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


def test_the_default_url_is_cogs_default_port_when_port_is_unset(monkeypatch):
    monkeypatch.delenv("PORT", raising=False)
    assert health.default_url() == "http://127.0.0.1:5000/health-check"


def test_a_port_nothing_listens_on_is_unreachable(capsys):
    """A stopped server: the probe prints its verdict rather than a traceback."""
    with socket.create_server(("127.0.0.1", 0)) as closed:
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/health-check"
    assert health.main(["live", "--url", url]) == 1
    assert capsys.readouterr().out == "live: UNREACHABLE -> failing\n"


def test_an_http_answer_that_is_not_json_is_unreachable():
    """Another web service on the port: an HTML page with 200."""
    html = b"<html><body>It works!</body></html>"
    head = f"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {len(html)}"
    with _answering(head.encode() + b"\r\nConnection: close\r\n\r\n" + html) as url:
        assert health.server_status(url, timeout=5) == "UNREACHABLE"


def test_an_object_without_a_status_is_unreachable():
    with _answering(_json(b'{"detail": "Not Found"}')) as url:
        assert [health.main([check, "--url", url]) for check in ("live", "ready")] == [1, 1]


def test_a_status_that_is_not_a_string_fails_with_a_verdict(capsys):
    with _answering(_json(json.dumps({"status": ["READY"]}).encode())) as url:
        assert health.main(["ready", "--url", url]) == 1
    assert capsys.readouterr().out == "ready: ['READY'] -> failing\n"


def test_a_server_that_never_answers_is_unreachable_after_the_timeout():
    """A wedged server: the probe ends by itself, not when Kubernetes kills it."""
    with _answering(_json(b'{"status": "READY"}'), delay=60) as url:
        started = time.monotonic()
        assert health.server_status(url, timeout=1) == "UNREACHABLE"
        assert time.monotonic() - started < 5


def test_an_answer_after_cogs_own_10_s_health_check_limit_still_passes():
    """Cog waits up to 10 s for its worker's health check before it answers; a probe that
    gave up sooner would fail a server that is only slow to say READY."""
    with _answering(_json(b'{"status": "READY"}'), delay=10.5) as url:
        assert health.main(["ready", "--url", url]) == 0


def test_an_unknown_check_is_refused_with_usage():
    with pytest.raises(SystemExit) as refused:
        health.main(["alive", "--url", "http://127.0.0.1:9/health-check"])
    assert refused.value.code == 2


def test_the_probe_run_as_docker_runs_it_exits_1_through_a_proxy_that_says_unhealthy():
    """A fresh process, as Docker and Kubernetes start it, with the deployment's HTTP_PROXY
    set before the module loads: the probe asks the loopback directly and exits by its
    verdict."""
    with (
        _answering(_json(b'{"status": "UNHEALTHY"}')) as url,
        _answering(_json(b'{"status": "READY"}')) as proxy,
    ):
        base = proxy.removesuffix("/health-check")
        env = {**os.environ, "http_proxy": base, "HTTP_PROXY": base}
        env = {k: v for k, v in env.items() if k.lower() != "no_proxy"}
        probe = subprocess.run(
            [sys.executable, "-m", "cogvideox_cog.health", "live", "--url", url],
            cwd=PROJECT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert (probe.returncode, probe.stdout) == (1, "live: UNHEALTHY -> failing\n")
