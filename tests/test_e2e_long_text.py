"""Long prompts through the real Cog server: bounded work, bounded memory, short log lines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests

from cogvideox_cog.inputs import MAX_PROMPT_CHARS

pytestmark = pytest.mark.e2e

FAST = {"num_inference_steps": 1, "num_frames": 9}


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("predict_t2v.py", "cogvideox-5b", "1.0-t2v")


def _peak_rss(pid: int) -> int:
    """Highest resident memory the process ever had (VmHWM), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def test_a_prompt_over_the_character_cap_is_refused_before_the_worker_sees_it(server):
    response = server.predict({"prompt": "a" * (MAX_PROMPT_CHARS + 1), **FAST}, expect=422)
    assert "prompt" in str(response["detail"])
    assert server.status() == "READY"


def test_a_50_mb_negative_prompt_leaves_the_worker_memory_bounded(server):
    worker = server.worker_pid()
    before = _peak_rss(worker)
    body = {"prompt": "a cat", "negative_prompt": "blurry " * 7_500_000, **FAST}
    response = requests.post(f"{server.url}/predictions", json={"input": body}, timeout=120)
    assert response.status_code == 422
    assert server.status() == "READY"
    assert server.worker_pid() == worker
    assert _peak_rss(worker) - before < 256 * 2**20


def test_no_log_line_carries_more_than_a_few_hundred_characters_of_the_prompt(server):
    prompt = " ".join(["a panda plays an acoustic guitar in a sunlit bamboo forest"] * 150)
    assert len(prompt) < MAX_PROMPT_CHARS
    response = server.predict({"prompt": prompt, **FAST})
    assert response["status"] == "succeeded", response.get("error")
    assert "this part is ignored" in response["logs"]
    assert max(len(line) for line in response["logs"].splitlines()) < 600
    assert "The following part of your input was truncated" not in server.log_text()
