"""Several GPUs, one video, through the real Cog server: COGVIDEOX_GPUS=2 on a CPU-only
machine runs two rank processes over gloo, exactly as two GPUs run over NCCL.

One text-to-video server for the module, on the tiny model at its own 48x80: 500 steps of 49
frames last long enough to cancel, or kill a rank, in the middle of a prediction. The last
test that uses it kills one of its ranks: the server is of no use after it, by design.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from cogvideox_cog.devtools.tiny import TINY
from cogvideox_cog.devtools.tiny_postprocess import tiny_ifnet, tiny_rrdbnet
from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.media.mp4 import probe_mp4
from cogvideox_cog.pipeline import build_pipeline
from cogvideox_cog.postprocess import Postprocessor
from cogvideox_cog.variants import VARIANTS
from tests.chat_server import ChatServer, rewrite_of
from tests.cog_server import CogServer, CogServerError, WebhookReceiver, save_data_uri
from tests.conftest import PROJECT, optional_steps, tiny_server
from tests.file_server import FileServer

pytestmark = pytest.mark.e2e

HEIGHT, WIDTH = TINY[("1.0", "t2v")].height, TINY[("1.0", "t2v")].width
SEED = 5
QUICK = {"prompt": "a panda plays guitar", "num_inference_steps": 2, "num_frames": 9}
LONG = {"prompt": "a panda plays guitar", "num_inference_steps": 500, "num_frames": 49}
TWO_RANKS = {"COGVIDEOX_GPUS": "2"}
# Two ranks split the guidance batch (CFG-2) or, without guidance, the tokens (Ulysses-2).
LAYOUTS = {6.0: "CFG-2", 1.0: "Ulysses-2"}
# "Within a second or two" of the cancel, on a loaded 2-core machine.
READY_AFTER_CANCEL_S = 3.0
# A dead rank fails the prediction as soon as it is seen, not at a timeout.
FAILED_AFTER_KILL_S = 3.0
# The split sums in another order: float frames within 1e-5 of one process's
# (tests/test_parallel_engine.py), but a pixel may round the other way, and H.264 then codes
# its block differently. Through the mp4 the same video is above this; another seed's, about
# 15 dB, is far below (tested).
SAME_VIDEO_PSNR_DB = 40.0
IDLE_TICKS = 5  # of CPU time in half a second (100 ticks a second on Linux)


@pytest.fixture(scope="module")
def hooks():
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def chat():
    with ChatServer(delay=3.0) as server:
        yield server


@pytest.fixture(scope="module")
def server(weights_server, chat, tmp_path_factory):
    """Two ranks, with every optional step a deployment can enable: prompt rewriting by an
    endpoint, upscale and interpolate (none changes a request that does not ask for it)."""
    server = tiny_server(
        "predict_t2v.py",
        "cogvideox-5b",
        weights_server.url("1.0-t2v.tar"),
        tmp_path_factory.mktemp("server-two-ranks"),
        **TWO_RANKS,
        **optional_steps(weights_server, upscale=True, interpolate=True, endpoint=chat),
        COGVIDEOX_ENHANCE_TIMEOUT="5",
    )
    server.start(timeout=300)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def quick_predictions(server) -> dict[float, dict]:
    """One short prediction per layout two ranks have: by guidance scale."""
    responses = {}
    for guidance in LAYOUTS:
        inputs = {**QUICK, "seed": SEED, "guidance_scale": guidance}
        responses[guidance] = server.predict(inputs, prediction_id=f"two-ranks-{guidance:g}")
        assert responses[guidance]["status"] == "succeeded", responses[guidance].get("error")
    return responses


@pytest.fixture(scope="module")
def quick_prediction(quick_predictions) -> dict:
    return quick_predictions[6.0]


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _psnr_db(frames: np.ndarray, expected: np.ndarray) -> float:
    mean_square = np.mean((frames.astype(float) - expected.astype(float)) ** 2)
    return math.inf if mean_square == 0 else 10 * math.log10(255**2 / mean_square)


def _one_process_frames(
    weights: Path, guidance: float, speed_mode="default", seed=SEED, postprocess="none"
) -> np.ndarray:
    """The same request rendered by today's path: one VideoGenerator, in this process, with
    the tiny models the server's upscale and interpolate load; `postprocess` asks for both."""
    cpu = torch.device("cpu")
    variant = VARIANTS["cogvideox-5b"]
    pipe = build_pipeline(variant, weights, cpu, "none")
    postprocessor = Postprocessor(tiny_ifnet(), tiny_rrdbnet(), cpu)
    generator = VideoGenerator(variant, pipe, cpu, postprocessor=postprocessor)
    generator.record_metric = lambda name, value: None
    request = Request(
        QUICK["prompt"],
        "",
        QUICK["num_frames"],
        2,
        guidance,
        None,
        None,
        seed,
        speed_mode=speed_mode,
        interpolate=postprocess,
        upscale=postprocess,
    )
    return _frames(generator.render_mp4(request))


def _steps(logs: str | None) -> int:
    return sum(line.startswith("step ") for line in (logs or "").splitlines())


def _rank_pids(server: CogServer) -> list[int]:
    """The rank processes' pids, in rank order, as setup logged them."""
    found = re.search(r"ranks ready in [\d.]+ s \(pids ([\d, ]+)\)", server.log_text())
    assert found, server.log_tail()
    return [int(pid) for pid in found.group(1).split(", ")]


def _cpu_ticks(pid: int) -> int:
    """User and system time a process has used so far (Linux /proc), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _running(pid: int) -> bool:
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
        if _steps(server.put_async(prediction_id, body).json().get("logs")) >= 3:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{prediction_id} logged no steps: {server.log_tail()}")


@pytest.mark.parametrize("guidance", LAYOUTS)
def test_two_ranks_give_the_frames_of_one_process_in_each_layout(
    quick_predictions, guidance, tiny_weights, tmp_path
):
    response = quick_predictions[guidance]
    assert f"layout: {LAYOUTS[guidance]}" in response["logs"]
    served = _frames(save_data_uri(response["output"], tmp_path / "two-ranks.mp4"))
    expected = _one_process_frames(tiny_weights["1.0-t2v"], guidance)
    assert served.shape == expected.shape == (QUICK["num_frames"], HEIGHT, WIDTH, 3)
    assert _psnr_db(served, expected) >= SAME_VIDEO_PSNR_DB


def test_the_same_video_bound_tells_another_seed_apart(tiny_weights):
    """What the layout tests' PSNR bound lets through: not another video of the request."""
    frames = _one_process_frames(tiny_weights["1.0-t2v"], 1.0)
    other = _one_process_frames(tiny_weights["1.0-t2v"], 1.0, seed=SEED + 1)
    assert _psnr_db(other, frames) < SAME_VIDEO_PSNR_DB - 10


def test_the_prediction_logs_each_step_once_with_the_metrics_of_one_process(quick_prediction):
    logs = quick_prediction["logs"]
    # Another rank's lines come prefixed with "rank N: ": any line naming a step counts.
    step_lines = [line for line in logs.splitlines() if re.search(r"\bstep \d+/\d+", line)]
    assert len(step_lines) == 2, step_lines
    for number, line in enumerate(step_lines, start=1):
        assert re.fullmatch(rf"step {number}/2, [\d.]+ s elapsed", line), step_lines
    assert f"seed: {SEED}" in logs and "wrote " in logs
    metrics = quick_prediction["metrics"]
    assert metrics["seed"] == SEED
    timings = ("prepare", "denoise", "decode", "encode", "total")
    assert all(metrics[f"{phase}_seconds"] >= 0 for phase in timings), metrics


def test_two_ranks_ask_the_endpoint_once_and_render_its_rewrite(server, chat, tmp_path):
    chat.requests.clear()
    enhanced = server.predict({**QUICK, "seed": SEED, "enhance_prompt": True})
    assert enhanced["status"] == "succeeded", enhanced.get("error")
    assert len(chat.requests) == 1  # rank 0 asked; rank 1 received its text
    assert enhanced["metrics"]["enhanced_prompt"] == rewrite_of(QUICK["prompt"])
    written = server.predict({**QUICK, "seed": SEED, "prompt": rewrite_of(QUICK["prompt"])})
    assert written["status"] == "succeeded", written.get("error")
    assert np.array_equal(
        _frames(save_data_uri(enhanced["output"], tmp_path / "enhanced.mp4")),
        _frames(save_data_uri(written["output"], tmp_path / "written.mp4")),
    )


@pytest.fixture(scope="module")
def postprocessed(server, tmp_path_factory) -> tuple[dict, Path]:
    """A short prediction upscaled and interpolated 2x: the response and its mp4."""
    response = server.predict({**QUICK, "seed": SEED, "upscale": "2x", "interpolate": "2x"})
    assert response["status"] == "succeeded", response.get("error")
    return response, save_data_uri(response["output"], tmp_path_factory.mktemp("post") / "a.mp4")


def test_rank_0_upscales_and_interpolates_and_reports_their_seconds(postprocessed):
    response, path = postprocessed
    video = probe_mp4(path)
    assert (video["frames"], video["width"], video["height"]) == (17, 2 * WIDTH, 2 * HEIGHT)
    assert {"upscale_seconds", "interpolate_seconds"} <= set(response["metrics"])


def test_two_ranks_upscale_and_interpolate_the_video_of_one_process(postprocessed, tiny_weights):
    """Rank 0 alone holds the models; the other rank, checking the request with what rank 0
    offers, takes its part in the steps, and the video is the one process's."""
    expected = _one_process_frames(tiny_weights["1.0-t2v"], 6.0, postprocess="2x")
    assert _psnr_db(_frames(postprocessed[1]), expected) >= SAME_VIDEO_PSNR_DB


def test_faster_with_guidance_runs_on_two_ranks_as_on_one_process(server, tiny_weights, tmp_path):
    """FasterCache skips the negative half of guidance: the ranks split tokens instead."""
    response = server.predict({**QUICK, "seed": SEED, "speed_mode": "faster"})
    assert response["status"] == "succeeded", response.get("error")
    assert "layout: Ulysses-2" in response["logs"]
    frames = _frames(save_data_uri(response["output"], tmp_path / "faster.mp4"))
    expected = _one_process_frames(tiny_weights["1.0-t2v"], 6.0, speed_mode="faster")
    assert _psnr_db(frames, expected) >= SAME_VIDEO_PSNR_DB


def test_a_bad_input_fails_with_the_input_error_of_one_process(server):
    response = server.predict({**QUICK, "num_frames": 20})
    assert response["status"] == "failed"
    assert "InputError: num_frames=20" in response["error"]
    server.wait_idle()


def test_cancel_stops_every_rank_after_the_same_step_and_the_server_is_ready_again(server, hooks):
    ranks = _rank_pids(server)
    _start_long(server, hooks, "two-ranks-cancel")
    canceled = time.monotonic()
    assert server.cancel("two-ranks-cancel")
    server.wait_idle(timeout=30)
    ready_after = time.monotonic() - canceled
    final = hooks.wait_for("two-ranks-cancel", timeout=30)
    assert final["status"] == "canceled"
    assert ready_after < READY_AFTER_CANCEL_S, f"READY {ready_after:.1f} s after the cancel"
    # Each rank reported the step it stopped after: one step for all of them.
    stopped = re.search(r"canceled: 2 ranks stopped, after step \[(\d+)\]", server.log_text())
    assert stopped, server.log_tail()
    assert 3 <= int(stopped.group(1)) < 50
    # And they are idle: no rank keeps computing the canceled video (a computing rank uses
    # about 50 ticks in half a second; an idle one, its background threads, 0 or 1).
    before = [_cpu_ticks(pid) for pid in ranks]
    time.sleep(0.5)
    used = [ticks - start for ticks, start in zip(map(_cpu_ticks, ranks), before, strict=True)]
    assert max(used) < IDLE_TICKS, used


def test_cancel_during_rank_0s_prompt_rewrite_stops_every_rank_at_once(server, hooks, chat):
    """The other ranks wait at rank 0's broadcast while it asks the endpoint: no step comes
    to stop them, so rank 0 stops its wait for the answer (COGVIDEOX_ENHANCE_TIMEOUT, 5 s)."""
    chat.fault, chat.delay = "slow", 30.0
    try:
        chat.requests.clear()
        body = {"input": {**QUICK, "enhance_prompt": True}, "webhook": hooks.url}
        assert server.put_async("two-ranks-cancel-rewrite", body, busy_wait=10).status_code == 202
        deadline = time.monotonic() + 30
        while not chat.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert chat.requests, server.log_tail()
        canceled = time.monotonic()
        assert server.cancel("two-ranks-cancel-rewrite")
        server.wait_idle(timeout=30)
        ready_after = time.monotonic() - canceled
    finally:
        chat.fault, chat.delay = None, 3.0
    assert hooks.wait_for("two-ranks-cancel-rewrite", timeout=30)["status"] == "canceled"
    assert ready_after < READY_AFTER_CANCEL_S, f"READY {ready_after:.1f} s after the cancel"
    assert "canceled: 2 ranks stopped, before the first step" in server.log_text()


def test_a_killed_rank_fails_the_prediction_at_once_and_the_server_turns_unhealthy(server, hooks):
    ranks = _rank_pids(server)
    _start_long(server, hooks, "two-ranks-kill")
    killed = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    final = hooks.wait_for("two-ranks-kill", timeout=60)
    failed_after = time.monotonic() - killed
    assert final["status"] == "failed"
    assert "rank 1 was killed by SIGKILL during a prediction" in final["error"]
    assert failed_after < FAILED_AFTER_KILL_S, f"failed {failed_after:.1f} s after the kill"
    assert not _running(ranks[0])  # the other rank is stopped too

    health = server.health()
    assert health["status"] == "UNHEALTHY", health
    assert "rank 1 was killed by SIGKILL" in health["user_healthcheck_error"]
    probe = [sys.executable, "-m", "cogvideox_cog.health", "ready", "--url"]
    assert subprocess.run([*probe, f"{server.url}/health-check"], cwd=PROJECT).returncode == 1

    started = time.monotonic()
    after = server.predict(QUICK)
    assert after["status"] == "failed"
    assert "cannot predict: rank 1 was killed by SIGKILL" in after["error"]
    assert time.monotonic() - started < 2.0


def _weights_a_rank_cannot_load(tiny: Path, folder: Path) -> Path:
    """The tiny weights as a tar whose transformer config asks for twice the attention heads
    its tensors hold: every file is complete and well formed, so the Cog process's download
    and checks pass, and only loading the model, which the ranks alone do, fails."""
    config_path = "transformer/config.json"
    config = json.loads((tiny / config_path).read_text())
    config["num_attention_heads"] *= 2
    archive_path = folder / "mismatched.tar"
    with tarfile.open(archive_path, "w") as archive:
        for path in sorted(tiny.rglob("*")):
            name = str(path.relative_to(tiny))
            if name != config_path:
                archive.add(path, arcname=name, recursive=False)
        changed = folder / "config.json"
        changed.write_text(json.dumps(config))
        archive.add(changed, arcname=config_path)
    return archive_path


def test_a_rank_failing_in_setup_fails_setup_with_that_ranks_error(tiny_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server-bad-rank")
    weights = _weights_a_rank_cannot_load(tiny_weights["1.0-t2v"], folder)
    server = tiny_server("predict_t2v.py", "cogvideox-5b", str(weights), folder, **TWO_RANKS)
    with pytest.raises(CogServerError) as failed:
        server.start(timeout=300)
    message = str(failed.value)
    assert message.startswith("setup failed: ")
    assert re.search(r"rank [01] failed in setup: WeightsError: .*failed to load", message)


# Image-to-video: rank 0 checks the inputs before the Cog process fetches the image.


@pytest.fixture(scope="module")
def i2v_server(weights_server, tmp_path_factory):
    server = tiny_server(
        "predict_i2v.py",
        "cogvideox-5b-i2v",
        weights_server.url("1.0-i2v.tar"),
        tmp_path_factory.mktemp("server-two-ranks-i2v"),
        **TWO_RANKS,
    )
    server.start(timeout=300)
    yield server
    server.stop()


@pytest.fixture
def photo_server(tmp_path):
    Image.linear_gradient("L").resize((120, 90)).convert("RGB").save(tmp_path / "photo.png")
    files = FileServer(tmp_path)
    yield files
    files.stop()


def test_two_ranks_refuse_a_bad_input_before_the_image_is_fetched(i2v_server, photo_server):
    response = i2v_server.predict(
        {**QUICK, "num_frames": 20, "image": photo_server.url("photo.png")}
    )
    assert response["status"] == "failed"
    assert "InputError: num_frames=20" in response["error"]
    assert photo_server.requests == []
    i2v_server.wait_idle()


def test_two_ranks_refuse_a_step_the_deployment_did_not_enable_before_the_fetch(
    i2v_server, photo_server
):
    response = i2v_server.predict(
        {**QUICK, "upscale": "2x", "image": photo_server.url("photo.png")}
    )
    assert response["status"] == "failed"
    assert "InputError: upscale='2x': this deployment does not offer upscale" in response["error"]
    assert "COGVIDEOX_UPSCALE=1" in response["error"]
    assert photo_server.requests == []
    i2v_server.wait_idle()


def test_two_ranks_render_an_image_to_video_after_its_check(i2v_server, photo_server, tmp_path):
    response = i2v_server.predict({**QUICK, "image": photo_server.url("photo.png")})
    assert response["status"] == "succeeded", response.get("error")
    assert probe_mp4(save_data_uri(response["output"], tmp_path / "i2v.mp4"))["frames"] == 9
    assert photo_server.requests  # fetched once the check passed
