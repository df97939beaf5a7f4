"""Async predictions, webhooks, idempotent PUT, 409, cancel and uploads through the real Cog server.

One text-to-video server for the module, started with `--upload-url` pointing at an upload
server on 127.0.0.1, so every output here arrives as an upload. It generates at 160x240
instead of the tiny model's 48x80: a denoising step then takes long enough (about 0.1 s on
two cores) that "stops within a step" is measurable from outside.
"""

from __future__ import annotations

import gc
import re
import time
import warnings
from pathlib import Path

import cog
import pytest
import requests
import torch

from cogvideox_cog import generator as generator_module
from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.media.mp4 import probe_mp4
from cogvideox_cog.pipeline import build_pipeline
from cogvideox_cog.variants import VARIANTS
from tests.cog_server import TERMINAL, CogServer, WebhookReceiver, fd_count, rss_bytes
from tests.conftest import tiny_server
from tests.http_peers import UploadServer

pytestmark = pytest.mark.e2e

HEIGHT, WIDTH = 160, 240
QUICK = {"prompt": "a panda plays guitar", "num_inference_steps": 2, "num_frames": 9}
LONG = {"prompt": "a panda plays guitar", "num_inference_steps": 500, "num_frames": 49}
MIB = 2**20


@pytest.fixture(scope="module")
def uploads():
    with UploadServer() as server:
        yield server


@pytest.fixture(scope="module")
def hooks():
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def server(weights_server, uploads, tmp_path_factory):
    server = tiny_server(
        "predict_t2v.py",
        "cogvideox-5b",
        weights_server.url("1.0-t2v.tar"),
        tmp_path_factory.mktemp("server-async"),
        args=["--upload-url", uploads.url],
        COGVIDEOX_RESOLUTION=f"{HEIGHT}x{WIDTH}",
    )
    server.start(timeout=300)
    yield server
    server.stop()


def _steps(logs: str | None) -> int:
    return sum(line.startswith("step ") for line in (logs or "").splitlines())


def _start_long(server: CogServer, hooks: WebhookReceiver, prediction_id: str) -> dict:
    """Start a 500-step prediction and return its state once 3 steps are logged."""
    body = {"input": LONG, "webhook": hooks.url}
    started = server.put_async(prediction_id, body, busy_wait=10)
    assert started.status_code == 202, started.text
    assert started.json() == {"id": prediction_id, "status": "starting"}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        # PUT again with the same id: the idempotent create answers the current state.
        state = server.put_async(prediction_id, body).json()
        if _steps(state.get("logs")) >= 3:
            return state
        time.sleep(0.05)
    raise TimeoutError(f"{prediction_id} logged no steps: {server.log_tail()}")


def _cancel_cycle(server: CogServer, hooks: WebhookReceiver, prediction_id: str) -> tuple:
    """Start a long prediction, cancel it mid-run; (steps seen before, final webhook)."""
    before = _steps(_start_long(server, hooks, prediction_id)["logs"])
    assert server.cancel(prediction_id)
    final = hooks.wait_for(prediction_id, timeout=120)
    server.wait_idle()
    return before, final


def _fetch_video(url: str, path: Path) -> dict:
    response = requests.get(url, timeout=30)
    response.raise_for_status()
    path.write_bytes(response.content)
    return probe_mp4(path)


def test_async_prediction_reports_start_logs_output_and_completion(server, hooks, uploads):
    inputs = {**QUICK, "num_inference_steps": 3, "seed": 11}
    accepted = server.predict_async("hooks-1", inputs, webhook=hooks.url)
    assert accepted == {"id": "hooks-1", "status": "starting"}
    final = hooks.wait_for("hooks-1", timeout=300)
    # coglet sends throttled events from the background: one may arrive after the terminal
    # event (seen about once in ten runs), so give stragglers a throttle period and more.
    time.sleep(1.5)
    events = hooks.events_for("hooks-1")

    # Exactly one terminal event, with the uploaded output.
    assert [e for e in events if e["status"] != "processing"] == [final]
    assert final["status"] == "succeeded"
    assert final["output"].startswith(f"{uploads.base}/files/")
    assert _steps(final["logs"]) == 3 and final["metrics"]["seed"] == 11
    # Besides it, only "processing" events: logs as they come, then the output.
    progress = [e for e in events if e is not final]
    assert progress and all(e["status"] == "processing" for e in progress)
    assert any("seed: 11" in (e.get("logs") or "") for e in progress)  # a logs event
    # coglet throttles webhooks (one per 0.5 s) and may fold the output event into the final
    # one, so it cannot be required; when it comes, it carries the uploaded file.
    outputs = [e["output"] for e in progress if e.get("output")]
    assert all(output == [final["output"]] for output in outputs)
    # The start event (empty logs) comes first when it comes: coglet 0.23.1 sends it
    # fire-and-forget and about one in five never arrives, so it cannot be required.
    starts = [i for i, e in enumerate(progress) if not e.get("logs")]
    assert starts in ([], [0])


def test_a_webhook_events_filter_sends_only_the_completed_event(server, hooks):
    # A frame count off the rule: the prediction fails at once, and says why.
    server.predict_async(
        "hooks-filtered", {**QUICK, "num_frames": 20}, hooks.url, events_filter=["completed"]
    )
    final = hooks.wait_for("hooks-filtered", timeout=60)
    assert hooks.events_for("hooks-filtered") == [final]
    assert final["status"] == "failed"
    assert "num_frames=20" in final["error"]


def test_a_put_of_a_finished_id_runs_the_prediction_again(server, hooks):
    """The idempotent create holds only while the id runs: docs/http-api.md tells clients not
    to retry a PUT whose final webhook came. A frame count off the rule fails at once, so each
    run costs no denoising."""
    body = {"input": {**QUICK, "num_frames": 20}, "webhook": hooks.url}
    for run in (1, 2):
        assert server.put_async("idem-finished", body, busy_wait=10).status_code == 202
        hooks.wait_until(lambda run=run: len(_finals(hooks, "idem-finished")) == run, timeout=60)
        server.wait_idle()
    assert [e["status"] for e in _finals(hooks, "idem-finished")] == ["failed", "failed"]
    assert server.log_text().count("Starting prediction prediction_id=idem-finished") == 2


def _finals(hooks: WebhookReceiver, prediction_id: str) -> list[dict]:
    return [e for e in hooks.events_for(prediction_id) if e["status"] in TERMINAL]


def test_a_final_webhook_answered_5xx_comes_again_while_the_server_serves_on(server, hooks):
    hooks.final_answers["hook-5xx"] = [500] * 4
    failing = {**QUICK, "num_frames": 20}  # fails at once, with no denoising
    server.predict_async("hook-5xx", failing, hooks.url, events_filter=["completed"])
    hooks.wait_until(lambda: len(_finals(hooks, "hook-5xx")) >= 1, timeout=60)
    # While the final body is retried, the server is free: the next prediction runs.
    server.wait_idle()
    assert server.predict(failing, prediction_id="during-retries")["status"] == "failed"
    # 4 answers of 500, then a 200: the same final body 5 times (0.2 + 0.4 + 0.8 + 1.6 s).
    hooks.wait_until(lambda: len(_finals(hooks, "hook-5xx")) == 5, timeout=30)
    finals = _finals(hooks, "hook-5xx")
    assert finals == [finals[0]] * 5 and finals[0]["status"] == "failed"
    time.sleep(3.5)  # past the next retry, had there been one
    assert len(hooks.events_for("hook-5xx")) == 5


def test_a_final_webhook_answered_4xx_is_not_sent_again(server, hooks):
    hooks.final_answers["hook-4xx"] = [400]
    server.predict_async(
        "hook-4xx", {**QUICK, "num_frames": 20}, hooks.url, events_filter=["completed"]
    )
    hooks.wait_for("hook-4xx", timeout=60)
    time.sleep(1.5)  # past two retries (0.2 s, then 0.4 s), had there been any
    assert len(hooks.events_for("hook-4xx")) == 1
    server.wait_idle()


def test_the_api_docs_list_every_path_the_server_names(server):
    """`GET /` names the server's paths; each one it answers is a row of the endpoint table
    in docs/http-api.md (coglet's `/docs`, which answers 404, is mentioned in the text)."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "http-api.md").read_text()
    documented = set(re.findall(r"^\| `(?:GET|POST|PUT) ([^`]+)` \|", text, re.MULTILINE))
    named = requests.get(f"{server.url}/", timeout=30).json()
    paths = {value for key, value in named.items() if key.endswith("_url")}
    assert {"/shutdown", "/predictions", "/docs"} <= paths
    answered = {
        path.replace("{prediction_id}", "{id}")
        for path in paths
        if requests.get(f"{server.url}{path}", timeout=30).status_code != 404
    }
    assert answered | {"/"} <= documented, answered - documented
    assert "`/docs`" in text


def test_a_synchronous_request_whose_client_hangs_up_cancels_the_prediction(server, uploads):
    """Cog 0.23.1 cancels a synchronous prediction when its connection closes (docs/http-api.md):
    a client's or a proxy's timeout shorter than the video loses it. 500 steps here take
    about 50 s; the client waits 3."""
    server.wait_idle()
    with pytest.raises(requests.ReadTimeout):
        server.request({"id": "hangup-1", "input": LONG}, timeout=3)
    server.wait_idle(timeout=10)  # free long before the 500 steps could have run
    assert "Prediction cancelled prediction_id=hangup-1" in server.log_text()
    assert uploads.uploads_for("hangup-1") == []


def test_put_with_a_running_id_starts_nothing_and_other_requests_get_409(server, hooks):
    running = _start_long(server, hooks, "idem-1")
    assert running["id"] == "idem-1" and running["status"] == "processing"

    # The same id again, even with another body: the running prediction, nothing new.
    again = server.put_async("idem-1", {"input": {**LONG, "prompt": "a cat"}})
    assert again.status_code == 202 and again.json()["id"] == "idem-1"
    # Anything else while busy: 409, PUT or POST, sync or async.
    assert server.put_async("idem-2", {"input": QUICK}).status_code == 409
    assert server.send(body={"input": QUICK}, busy_wait=0).status_code == 409
    headers = {"Prefer": "respond-async"}
    assert server.send(body={"input": QUICK}, headers=headers, busy_wait=0).status_code == 409
    assert server.status() == "BUSY"

    assert server.cancel("idem-1")
    final = hooks.wait_for("idem-1", timeout=120)
    assert final["status"] == "canceled"
    # One prediction ran under that id: one seed line, one start in the server's log.
    assert final["logs"].count("seed: ") == 1
    assert server.log_text().count("Starting prediction prediction_id=idem-1") == 1
    assert hooks.events_for("idem-2") == []
    server.wait_idle()


def test_cancel_stops_within_a_step_and_the_next_prediction_succeeds(server, hooks, tmp_path):
    before, final = _cancel_cycle(server, hooks, "cancel-1")
    assert final["status"] == "canceled"
    # `before` was read just before the cancel request was sent: at most the step that was
    # running then (and one more, for the time the request took) may be logged after it.
    assert _steps(final["logs"]) - before <= 2
    assert _steps(final["logs"]) < 50
    assert "wrote " not in final["logs"] and not final.get("output")
    assert server.status() == "READY"
    assert not server.cancel("cancel-1")  # no longer running: 404

    after = server.predict({**QUICK, "seed": 3}, prediction_id="after-cancel")
    assert after["status"] == "succeeded", after.get("error")
    info = _fetch_video(after["output"], tmp_path / "after.mp4")
    assert (info["frames"], info["width"], info["height"]) == (9, WIDTH, HEIGHT)


def test_repeated_cancels_do_not_grow_the_workers_memory_or_descriptors(server, hooks):
    """What can be asserted from outside on CPU: the worker's resident memory and open
    descriptors settle after the first cancel instead of growing with each one. A step here
    allocates a few tens of MB (49 frames at 160x240), so the bound catches a cancel that
    keeps a step's buffers; smaller leaks (a tiny model's latents are ~0.1 MB) are caught by
    the in-process test below, which counts live tensors."""
    worker = server.worker_pid()
    _cancel_cycle(server, hooks, "rss-warm-up")
    rss, fds = [rss_bytes(worker)], [fd_count(worker)]
    for cycle in range(5):
        _, final = _cancel_cycle(server, hooks, f"rss-{cycle}")
        assert final["status"] == "canceled"
        rss.append(rss_bytes(worker))
        fds.append(fd_count(worker))
    assert server.worker_pid() == worker
    growth = [(value - rss[0]) / MIB for value in rss]
    assert max(growth) < 64, f"worker RSS growth over 5 cancels, MiB: {growth}"
    assert max(fds) <= fds[0] + 2, fds


def test_outputs_are_uploaded_intact_under_names_unique_to_the_prediction(
    server, uploads, tmp_path
):
    outputs = {}
    for prediction_id in ("upload-1", "upload-2"):  # the same seed twice
        response = server.predict({**QUICK, "seed": 42}, prediction_id=prediction_id)
        assert response["status"] == "succeeded", response.get("error")
        outputs[prediction_id] = response["output"]

    names = set()
    for prediction_id, output in outputs.items():
        (upload,) = uploads.uploads_for(prediction_id)
        # 64 random bits after the seed: uploads of one seed do not collide in one bucket.
        assert re.fullmatch(r"/uploads/cogvideox-5b-42-[0-9a-f]{16}\.mp4", upload.path)
        assert upload.headers["content-type"] == "video/mp4"
        names.add(upload.name)
        # The output is the upload's Location, without its query string (the signature).
        assert output.startswith(f"{uploads.base}/files/") and output.endswith(upload.name)
        assert "?" not in output
        fetched = tmp_path / upload.name
        info = _fetch_video(output, fetched)
        assert fetched.read_bytes() == upload.body
        assert (info["codec"], info["pix_fmt"], info["frames"]) == ("h264", "yuv420p", 9)
        assert (info["width"], info["height"]) == (WIDTH, HEIGHT)
    assert len(names) == 2


def test_a_failed_upload_fails_the_prediction_and_the_server_stays_ready(server, uploads):
    uploads.status = 500
    try:
        response = server.predict(QUICK, prediction_id="upload-refused")
    finally:
        uploads.status = 201
    assert response["status"] == "failed"
    assert "Failed to upload output: upload returned status 500" in response["error"]
    assert not response.get("logs")  # coglet 0.23.1's answer, as docs/http-api.md says
    server.wait_idle()
    assert server.status() == "READY"


def _live_tensors() -> tuple[int, int]:
    """(count, bytes) of the distinct tensor storages reachable in this process."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() pokes deprecated torch module attributes
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                try:
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
                except RuntimeError:  # a fake tensor left by an earlier compile: no memory
                    continue
    return len(storages), sum(storages.values())


def test_a_canceled_generation_leaves_no_tensor_alive(tiny_weights, monkeypatch):
    """In-process: cancel as Cog does (CancelationException raised mid-denoising), then
    count every tensor still reachable. A completed render of the same request first leaves
    what every prediction leaves (the kept negative-prompt embedding, the scheduler's state):
    holding on to the canceled run's latents or activations (or the traceback that
    references them) shows up as more live tensors than that, even if each cancel only
    replaces the one before."""
    cpu = torch.device("cpu")
    variant = VARIANTS["cogvideox-5b"]
    generator = VideoGenerator(
        variant, build_pipeline(variant, tiny_weights["1.0-t2v"], cpu, "none"), cpu
    )

    class CancelAtStep3(generator_module._StepProgress):
        def __call__(self, pipe, step, timestep, callback_kwargs):
            super().__call__(pipe, step, timestep, callback_kwargs)
            if step == 2:
                raise cog.CancelationException()
            return {}

    request = Request("a cat", "", 49, 4, 6.0, None, None, 1)
    generator.render_mp4(request)
    settled = _live_tensors()
    monkeypatch.setattr(generator_module, "_StepProgress", CancelAtStep3)
    live = []
    for _ in range(3):
        with pytest.raises(cog.CancelationException):
            generator.render_mp4(request)
        live.append(_live_tensors())
    assert live == [settled] * 3, (settled, live)
