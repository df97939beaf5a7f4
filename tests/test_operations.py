"""What an operator relies on, through the real Cog server: how fast a stopped server exits,
and what the health probes (cogvideox_cog.health) say in each state.

In a Cog image the process tree is tini (PID 1) -> `python -m cog.server.http` -> the worker,
all in one process group. `docker stop` and Kubernetes send SIGTERM to PID 1 only. Every
server here runs a 500-step prediction at 160x240 when it is stopped, as in test_async.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.cog_server import TERMINAL, CogServer, WebhookReceiver, free_port
from tests.conftest import PROJECT, tiny_server

pytestmark = pytest.mark.e2e

LONG = {"prompt": "a panda plays guitar", "num_inference_steps": 500, "num_frames": 49}
# Measured on a loaded 2-core box: 0.3 s with the SIGTERM reaching the worker. The bound is
# far from Cog's own 10 s wait for a busy worker, which is what it guards against.
EXIT_BOUND_S = 5.0


@pytest.fixture(scope="module")
def hooks():
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
def server_factory(weights_server, tmp_path_factory):
    """Start a text-to-video server (optionally under `launcher`); stop whatever is left."""
    servers: list[CogServer] = []

    def start(launcher: list[str] | None = None, **env: str) -> CogServer:
        server = tiny_server(
            "predict_t2v.py",
            "cogvideox-5b",
            weights_server.url("1.0-t2v.tar"),
            tmp_path_factory.mktemp("server-ops"),
            launcher=launcher,
            **{"COGVIDEOX_RESOLUTION": "160x240", **env},
        )
        servers.append(server)
        return server.start(timeout=300)

    yield start
    for server in servers:
        if server.proc and server.proc.poll() is None:
            for pid in [*_descendants(server.proc.pid), server.proc.pid]:
                os.kill(pid, signal.SIGKILL)
            server.proc.wait()


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, children first (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _start_long(server: CogServer, hooks: WebhookReceiver, prediction_id: str) -> None:
    """Start a 500-step prediction and return once its third step is logged."""
    body = {"input": LONG, "webhook": hooks.url}
    assert server.put_async(prediction_id, body, busy_wait=10).status_code == 202
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        logs = server.put_async(prediction_id, body).json().get("logs") or ""
        if sum(line.startswith("step ") for line in logs.splitlines()) >= 3:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{prediction_id} logged no steps: {server.log_tail()}")


def _stop_and_time(server: CogServer, pids: list[int], send) -> float:
    """Call `send()` (the SIGTERM) and return the seconds until every pid in `pids` is gone."""
    started = time.monotonic()
    send()
    server.proc.wait(timeout=60)
    while any(_running(pid) for pid in pids):
        assert time.monotonic() - started < 60, f"still running: {pids}"
        time.sleep(0.01)
    return time.monotonic() - started


def _image_environment() -> dict[str, str]:
    """The `environment:` that cog.yaml bakes into the image."""
    config = yaml.safe_load((PROJECT / "cog.yaml").read_text())
    return dict(item.split("=", 1) for item in config.get("environment", []))


def test_every_cog_yaml_has_tini_signal_the_whole_process_group():
    for name in ("cog.yaml", "cog-i2v.yaml", "cog-v2v.yaml"):
        config = yaml.safe_load((PROJECT / name).read_text())
        assert "TINI_KILL_PROCESS_GROUP=1" in config.get("environment", []), name


def test_sigterm_to_the_process_group_mid_prediction_exits_within_the_bound(server_factory, hooks):
    """What tini does with TINI_KILL_PROCESS_GROUP=1: the worker gets the SIGTERM too, dies at
    once (nothing in the predictor catches it), and the server exits right after."""
    server = server_factory()
    worker = server.worker_pid()
    _start_long(server, hooks, "group-stop")
    seconds = _stop_and_time(
        server, [server.proc.pid, worker], lambda: os.killpg(server.proc.pid, signal.SIGTERM)
    )
    assert seconds < EXIT_BOUND_S, f"exit took {seconds:.1f} s\n{server.log_tail()}"
    print(f"SIGTERM to the process group: all exited in {seconds:.2f} s")


@pytest.mark.skipif(
    shutil.which("tini") is None,
    reason="tini is not installed (apt-get install tini): the process-group test above covers "
    "the same signal path without it",
)
def test_sigterm_to_tini_as_in_the_image_exits_within_the_bound(server_factory, hooks):
    """The image's own path: SIGTERM to tini alone, with the environment cog.yaml sets."""
    server = server_factory(launcher=[shutil.which("tini"), "-s", "--"], **_image_environment())
    cog, worker = _descendants(server.proc.pid)
    _start_long(server, hooks, "tini-stop")
    seconds = _stop_and_time(
        server, [server.proc.pid, cog, worker], lambda: server.proc.send_signal(signal.SIGTERM)
    )
    assert server.proc.returncode == 0
    assert seconds < EXIT_BOUND_S, f"exit took {seconds:.1f} s\n{server.log_tail()}"
    print(f"SIGTERM to tini: all exited in {seconds:.2f} s")


def test_sigterm_to_the_server_alone_waits_ten_seconds_and_drops_the_final_webhook(
    server_factory, hooks
):
    """Cog's own part, which no predictor can shorten: the server stops its event loop, asks
    the worker to shut down, and kills it only after 10 s when run() has not returned. The
    prediction's final webhook is never sent. Should a Cog upgrade change this, this test
    fails and docs/operations.md needs the new numbers."""
    server = server_factory()
    worker = server.worker_pid()
    _start_long(server, hooks, "server-stop")
    seconds = _stop_and_time(
        server, [server.proc.pid, worker], lambda: server.proc.send_signal(signal.SIGTERM)
    )
    assert 9.5 < seconds < 9.5 + EXIT_BOUND_S, f"exit took {seconds:.1f} s"
    time.sleep(1)
    statuses = [event["status"] for event in hooks.events_for("server-stop")]
    assert statuses and not TERMINAL & set(statuses), statuses
    print(f"SIGTERM to the server alone: all exited in {seconds:.2f} s")


def _probe(check: str, server: CogServer, env: dict[str, str] | None = None) -> int:
    """Run the probe as Docker and Kubernetes do: a command, judged by its exit code."""
    url = f"{server.url}/health-check"
    return subprocess.run(
        [sys.executable, "-m", "cogvideox_cog.health", check, "--url", url],
        cwd=PROJECT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        timeout=60,
    ).returncode


def test_health_probes_pass_ready_and_busy_and_fail_once_the_worker_is_killed(
    server_factory, hooks
):
    server = server_factory()
    assert (_probe("live", server), _probe("ready", server)) == (0, 0)

    _start_long(server, hooks, "probe-busy")
    assert server.status() == "BUSY"
    assert (_probe("live", server), _probe("ready", server)) == (0, 1)

    # What the OOM killer does: SIGKILL to the worker. The server stays up, says UNHEALTHY
    # with HTTP 200, and refuses every prediction from then on.
    os.kill(server.worker_pid(), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server.status() != "UNHEALTHY":
        assert time.monotonic() < deadline, server.status()
        time.sleep(0.1)
    response = requests.get(f"{server.url}/health-check", timeout=30)
    assert response.status_code == 200
    # Coglet words it by where its health check was when the worker died (a race).
    error = response.json()["user_healthcheck_error"]
    assert error.startswith("Healthcheck error: protocol error: healthcheck"), error
    assert error.endswith(("channel closed", "response channel dropped")), error
    assert server.proc.poll() is None
    assert server.send(body={"input": LONG}, busy_wait=0).status_code == 409
    assert (_probe("live", server), _probe("ready", server)) == (1, 1)

    server.stop()
    assert (_probe("live", server), _probe("ready", server)) == (1, 1)  # no answer at all


def test_health_probes_ask_the_server_directly_when_a_download_proxy_is_set(server_factory):
    """A deployment behind an egress proxy sets HTTP_PROXY for its downloads; without
    NO_PROXY, urllib sent the probe to the proxy, which cannot reach the container's
    loopback: the probe failed a healthy server, and Kubernetes would restart it again and
    again."""
    server = server_factory()
    unreachable = f"http://127.0.0.1:{free_port()}"  # a proxy that refuses every connection
    proxies = {"HTTP_PROXY": unreachable, "http_proxy": unreachable}
    proxies |= {"NO_PROXY": "", "no_proxy": ""}
    assert (_probe("live", server, proxies), _probe("ready", server, proxies)) == (0, 0)


def test_health_probes_ask_the_port_cog_serves_on_when_port_ends_in_a_carriage_return(
    server_factory,
):
    """An env file with Windows line ends can end PORT in a carriage return. Cog 0.23.1 reads
    it with int() and serves on the port; the probe put the carriage return in its URL and
    failed a healthy server, which Kubernetes would restart again and again."""
    server = server_factory()
    port = f"{server.port}\r"
    assert int(port) == server.port  # how Cog's server reads PORT
    probes = [
        subprocess.run(
            [sys.executable, "-m", "cogvideox_cog.health", check],
            cwd=PROJECT,
            env={**os.environ, "PORT": port},
            capture_output=True,
            timeout=60,
        ).returncode
        for check in ("live", "ready")
    ]
    assert probes == [0, 0]


def test_an_id_is_a_path_and_one_naming_a_file_wedges_the_server(server_factory, tmp_path):
    """Cog 0.23.1 makes a folder per prediction id in its predictions folder, joining the id
    in unchecked: `..` in an id climbs out of it, and an id that names a file leaves the slot
    taken for good (docs/http-api.md: choose ids with care). Enough `..` reach `/` from any
    depth, so the ids below name `tmp_path` wherever Cog's folder is."""
    server = server_factory()
    up = "/".join([".."] * 32)
    failing = {"prompt": "a panda", "num_frames": 20}  # fails at once, with no denoising

    escaped = tmp_path / "escaped"
    response = server.predict(failing, prediction_id=f"{up}{escaped}")
    assert response["status"] == "failed" and "num_frames=20" in response["error"]
    assert sorted(p.name for p in escaped.iterdir()) == ["inputs", "outputs"]
    server.wait_idle()

    existing = tmp_path / "a-file"
    existing.write_text("not a folder")
    response = server.predict(failing, prediction_id=f"{up}{existing}")
    assert response["status"] == "failed"
    assert response["error"].startswith("Failed to create output dir: Not a directory")
    time.sleep(2)
    assert server.status() == "BUSY"
    assert server.send(body={"input": failing}, busy_wait=0).status_code == 409
    assert (_probe("live", server), _probe("ready", server)) == (0, 1)
