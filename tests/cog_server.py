"""Drive Cog's real HTTP server (`python -m cog.server.http`, coglet 0.23) from tests.

Behaviour of the server that this harness relies on (cog 0.23.1, no Docker):

- The worker subprocess is spawned as a bare `python` looked up on PATH, so the interpreter's
  bin directory is put first on PATH. Logs (server, setup and prediction output) go to stderr.
- GET /health-check: `status` is STARTING, then READY (after setup() returns) or
  SETUP_FAILED (the process keeps running; `setup.logs` holds the error). BUSY while running.
- Inputs are validated (422 with `{"detail": [...]}`) only when `.cog/openapi_schema.json`
  exists in the server's cwd; without it every input is passed through unchecked.
- One slot: a second request while one runs gets 409. The slot is freed a few milliseconds
  after a sync response, so back-to-back requests can also see 409; `predict` retries.
- There is no GET /predictions/{id}: async results arrive only through webhooks.
- If the worker process dies mid-prediction the response is failed/"Worker crashed", health
  turns UNHEALTHY and every later request gets 409: the server must be restarted.
- GET /health-check answers HTTP 200 in every state. After the worker dies it says UNHEALTHY
  with `user_healthcheck_error` "Healthcheck error: protocol error: healthcheck channel closed"
  (or "... healthcheck response channel dropped", when the check was in flight as it died).
- SIGTERM (or POST /shutdown) to the server alone: it stops serving at once, sends its worker a
  shutdown message and exits when the worker has; a worker still inside run() is killed after
  10 s. The running prediction never gets a final webhook. SIGTERM to the whole process group
  (what tini does in the image with TINI_KILL_PROCESS_GROUP=1) ends the worker at once: the
  server exits within about 0.3 s. A Python SIGTERM handler in the worker never runs (its main
  thread waits inside coglet): it only swallows the signal.

Inputs, as the schema-validating server sees them:

- A body that is not JSON, or holds NaN, Infinity or a number out of double range
  (`1e999`), is refused with HTTP 400 and a plain-text "Failed to parse the request body as
  JSON: ..." before any validation: NaN or infinity can never reach the predictor.
- Types are strict: "2" or true for an int, "6" for a float, 2.5 for an int all get 422.
  A whole-number float (2.0) passes as an int.
- `null` is refused (422 "null is not of type ...") even for inputs the schema marks
  `nullable` (Optional[...] = None): leave the input out to get its empty default.
- Unknown input names are stripped silently: the prediction runs without them and only
  the server log says so (WARN `Stripped unknown input fields ... fields=["name"]`).
- A `Path` input given as an http(s) URL or a data: URI is downloaded before run() is
  called, with no bound on size or time (requests, 10 s per read); any other string reaches
  run() as it is, a plain str, so a bare path names a file on the server. The predictors
  here take their files as strings and fetch them themselves (cogvideox_cog/media/fetch.py).
- A request body over 100 MiB gets 413 "Failed to buffer the request body: length limit
  exceeded".
- Errors raised in run() come back as failed predictions with
  `error = "Prediction failed: Prediction failed: <ExceptionType>: <message>"` and empty
  `logs`, whatever run() logged first. The server's log has every line the predictor
  logged, tagged `prediction_id=<id>` (`prediction_log`).

Async, uploads and cancel:

- `Prefer: respond-async` answers 202 `{"id", "status": "starting"}`. Webhook POSTs carry
  {id, status, logs, metrics[, output][, error]}: "processing" for the start (empty logs),
  logs (throttled to one per 500 ms) and output events, then one terminal event
  (succeeded / failed / canceled). The start event is sent fire-and-forget and does not
  always arrive (about 1 in 5 in our runs); logs, output and completed ones do.
  `webhook_events_filter` selects among "start", "output", "logs", "completed".
- `PUT /predictions/{id}` while that id runs answers 202 with the running prediction's
  current state (logs so far) and starts nothing, even if the body differs. Any other id,
  POST or PUT, gets 409 while busy. Once the id has completed, a PUT starts a new one.
- The final webhook is sent again while the receiver answers 5xx, times out (about 30 s) or
  cannot be reached: 13 attempts in all, 0.2 s apart and twice as long each time (at most
  102.4 s), about 7 minutes. A 4xx answer ends it. Other events are sent once. The server is
  READY while it retries.
- A synchronous request whose connection closes before the answer (a client timeout)
  cancels its prediction, as a cancel request would.
- `POST /predictions/{id}/cancel` answers 200 `{}`, or 404 `{}` for an id that is not
  running. The worker raises CancelationException at its next bytecode; the health turns
  READY again about 0.3 s later.
- With `--upload-url URL`, each output file is PUT to `URL/<file name>` (the basename of
  the Path run() returned) with `Content-Type` (from the extension) and `X-Prediction-Id`
  headers. The output becomes the response's `Location` header (else the PUT URL) without
  its query string. A non-2xx answer fails the prediction with "Failed to upload output:
  upload returned status ...". Without an upload URL the output is a data URI. A request's
  `output_file_prefix` is ignored.
- For every prediction the server makes `/tmp/coglet/predictions/<id>/{inputs,outputs}`
  (a fixed path) and never removes them: three empty directories per prediction.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

TERMINAL = frozenset({"succeeded", "failed", "canceled"})


class CogServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_uri(data: bytes, mime: str = "application/octet-stream") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def decode_data_uri(uri: str) -> tuple[str, bytes]:
    """Split a `data:<mime>;base64,<payload>` output into (mime, bytes)."""
    header, sep, payload = uri.partition(",")
    if not header.startswith("data:") or not sep:
        raise ValueError(f"not a data URI: {uri[:60]!r}")
    mime, _, encoding = header[5:].partition(";")
    raw = base64.b64decode(payload) if encoding == "base64" else payload.encode()
    return mime, raw


def save_data_uri(uri: str, path: Path) -> Path:
    path = Path(path)
    path.write_bytes(decode_data_uri(uri)[1])
    return path


class WebhookReceiver:
    """Collects the prediction states Cog POSTs to a webhook on 127.0.0.1."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        # Per prediction id: the HTTP statuses to answer its next final bodies with, in
        # order (then 200), for tests of a receiver that fails.
        self.final_answers: dict[str, list[int]] = {}
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                event = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                with receiver._cond:
                    receiver.events.append(event)
                    answers = receiver.final_answers.get(event.get("id"), [])
                    status = answers.pop(0) if answers and event.get("status") in TERMINAL else 200
                    receiver._cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/webhook"

    def events_for(self, prediction_id: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("id") == prediction_id]

    def latest_logs(self, prediction_id: str) -> str:
        events = self.events_for(prediction_id)
        return (events[-1].get("logs") or "") if events else ""

    def wait_until(self, condition, timeout: float = 600) -> None:
        """Block until `condition()` holds, re-checking whenever an event arrives."""
        with self._cond:
            if not self._cond.wait_for(condition, timeout):
                raise TimeoutError(f"condition not met within {timeout}s")

    def wait_for(self, prediction_id: str, timeout: float = 600) -> dict[str, Any]:
        """Block until a terminal state (succeeded/failed/canceled) arrives; return it."""

        def final() -> dict[str, Any] | None:
            done = [e for e in self.events_for(prediction_id) if e.get("status") in TERMINAL]
            return done[-1] if done else None

        with self._cond:
            if not self._cond.wait_for(final, timeout):
                raise TimeoutError(f"no final webhook for {prediction_id} within {timeout}s")
            return final()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise CogServerError(f"no VmRSS for process {pid}")


def fd_count(pid: int) -> int:
    """Open file descriptors of a process (Linux /proc)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


class CogServer:
    """One `python -m cog.server.http` process serving `predictor`, e.g. "predict.py:Predictor"."""

    def __init__(
        self,
        predictor: str,
        cwd: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
        python: str = sys.executable,
        args: list[str] | None = None,
        launcher: list[str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        """`args` go to the server's command line, e.g. ["--upload-url", url]; `launcher` runs
        it, e.g. ["tini", "--"] as the image does (`proc` is then the launcher's process).
        `command`: what starts the server instead, e.g. script/serve, which execs it."""
        self.predictor, self.cwd, self.log_path = predictor, Path(cwd), Path(log_path)
        self.args = list(args or [])
        self.launcher = list(launcher or [])
        self.command = command
        self.python = python
        self.env = {"LOG_FORMAT": "console", "NO_COLOR": "1", **os.environ, **(env or {})}
        self.env["PATH"] = os.pathsep.join([str(Path(python).parent), self.env.get("PATH", "")])
        self.env.update(COG_PREDICT_TYPE_STUB=predictor)
        self.port_given = port is not None
        self._listen_on(port or free_port())
        self.proc: subprocess.Popen | None = None

    def _listen_on(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env["PORT"] = str(port)

    def start(self, timeout: float = 600) -> CogServer:
        """Start the server and wait for READY; raise CogServerError with the log tail if not.
        A port picked here that another process took meanwhile (free_port() lets it go before
        the server binds it) is picked again."""
        for _ in range(4):
            try:
                return self._start(timeout)
            except CogServerError as error:
                taken = "Address already in use" in str(error)
                if not taken or self.port_given or self.command is not None:
                    raise
            self._listen_on(free_port())
        return self._start(timeout)

    def _start(self, timeout: float) -> CogServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = self.command or [
            *[self.python, "-m", "cog.server.http", "--host", "127.0.0.1", *self.args]
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*self.launcher, *command],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CogServerError(
                    f"server exited with {self.proc.returncode}\n{self.log_tail()}"
                )
            try:
                health = self.health()
            except requests.RequestException:
                health = {}
            if health.get("status") == "READY":
                return self
            if health.get("status") == "SETUP_FAILED":
                self.stop()
                raise CogServerError(
                    f"setup failed: {health['setup'].get('logs')}\n{self.log_tail()}"
                )
            time.sleep(0.1)
        self.stop()
        raise CogServerError(f"server not READY within {timeout}s\n{self.log_tail()}")

    def health(self) -> dict[str, Any]:
        return requests.get(f"{self.url}/health-check", timeout=10).json()

    def status(self) -> str:
        """Health status (STARTING, READY, BUSY, SETUP_FAILED, UNHEALTHY, ...) or UNREACHABLE."""
        try:
            return self.health().get("status", "UNKNOWN")
        except requests.RequestException:
            return "UNREACHABLE"

    def request(
        self, body: dict[str, Any], headers: dict[str, str] | None = None, timeout: float = 600
    ) -> requests.Response:
        """Raw POST /predictions (no retries), for tests that look at status codes."""
        return requests.post(f"{self.url}/predictions", json=body, headers=headers, timeout=timeout)

    def send(
        self,
        method: str = "POST",
        path: str = "/predictions",
        body: dict[str, Any] | None = None,
        raw: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 600,
        busy_wait: float = 5.0,
    ) -> requests.Response:
        """Send `body` as JSON (or `raw` as it is), retrying a 409 for `busy_wait` seconds:
        the slot is freed a few milliseconds after the previous response."""
        headers = dict(headers or {})
        if raw is not None:
            headers.setdefault("Content-Type", "application/json")
        deadline = time.monotonic() + busy_wait
        while True:
            resp = requests.request(
                method,
                f"{self.url}{path}",
                json=body if raw is None else None,
                data=raw,
                headers=headers,
                timeout=timeout,
            )
            if resp.status_code != 409 or time.monotonic() >= deadline:
                return resp
            if self.status() not in ("READY", "BUSY"):
                return resp  # after a worker crash the slot stays busy (409) for good
            time.sleep(0.05)

    def put_async(
        self, prediction_id: str, body: dict[str, Any], busy_wait: float = 0
    ) -> requests.Response:
        """PUT /predictions/{id} with `Prefer: respond-async` (the idempotent create)."""
        return self.send(
            "PUT",
            f"/predictions/{prediction_id}",
            body,
            headers={"Prefer": "respond-async"},
            timeout=30,
            busy_wait=busy_wait,
        )

    def _post(
        self,
        body: dict[str, Any],
        headers: dict[str, str] | None,
        timeout: float,
        expect: int,
        busy_wait: float,
    ) -> dict[str, Any]:
        resp = self.send("POST", "/predictions", body, None, headers, timeout, busy_wait)
        if resp.status_code != expect:
            raise CogServerError(
                f"expected HTTP {expect}, got {resp.status_code}: {resp.text}"
                f" (server {self.status()})"
            )
        return resp.json()

    def predict(
        self,
        inputs: dict[str, Any],
        timeout: float = 600,
        prediction_id: str | None = None,
        expect: int = 200,
        busy_wait: float = 5.0,
    ) -> dict[str, Any]:
        """Run a prediction synchronously and return the response JSON.

        200: {"id", "status", "output", "logs", "metrics"[, "error"]}; 422: {"detail": [...]}.
        A 409 (slot still busy) is retried for `busy_wait` seconds.
        """
        body: dict[str, Any] = {"input": inputs}
        if prediction_id:
            body["id"] = prediction_id
        return self._post(body, None, timeout, expect, busy_wait)

    def predict_async(
        self,
        prediction_id: str,
        inputs: dict[str, Any],
        webhook: str | None = None,
        events_filter: list[str] | None = None,
        expect: int = 202,
        busy_wait: float = 5.0,
    ) -> dict[str, Any]:
        """Start a prediction and return at once ({"id", "status": "starting"} on 202)."""
        body: dict[str, Any] = {"id": prediction_id, "input": inputs}
        if webhook:
            body["webhook"] = webhook
        if events_filter:
            body["webhook_events_filter"] = events_filter
        return self._post(body, {"Prefer": "respond-async"}, 30, expect, busy_wait)

    def cancel(self, prediction_id: str) -> bool:
        """Cancel a running prediction; False if the server does not know it (404)."""
        resp = requests.post(f"{self.url}/predictions/{prediction_id}/cancel", timeout=30)
        return resp.status_code == 200

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (status := self.status()) != "READY":
            if time.monotonic() > deadline:
                raise TimeoutError(f"server still {status} after {timeout}s")
            time.sleep(0.05)

    def worker_pid(self) -> int:
        """The worker subprocess (the server's only child), where run() executes."""
        if self.proc is None:
            raise CogServerError("server not started")
        # Each thread lists the children it started; the worker is spawned off the main one.
        tasks = Path(f"/proc/{self.proc.pid}/task")
        pids = [pid for task in tasks.iterdir() for pid in (task / "children").read_text().split()]
        if len(pids) != 1:
            raise CogServerError(f"expected one worker process, found {pids}")
        return int(pids[0])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def prediction_log(self, prediction_id: str) -> str:
        """The server's log lines tagged with `prediction_id`: what the predictor logged for
        it, which a failed synchronous prediction does not answer with."""
        tag = re.compile(rf"\sprediction_id={re.escape(prediction_id)}(\s|$)")
        return "\n".join(line for line in self.log_text().splitlines() if tag.search(line))

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM the server's process group, as tini does in the image: the server, its
        worker and any rank processes exit at once (SIGTERM to the server alone waits about
        2 s for its worker to shut down). SIGKILL the process group if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> CogServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
