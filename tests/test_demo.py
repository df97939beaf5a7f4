"""The README's first command, `script/demo`, as a newcomer runs it on a machine without a GPU."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cogvideox_cog.media.mp4 import probe_mp4

PROJECT = Path(__file__).resolve().parent.parent


def _demo_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGVIDEOX_")}
    env.pop("PYTHON", None)  # script/setup then keeps the .venv running this suite
    env["COGVIDEOX_WEIGHTS_DIR"] = str(tmp_path / "weights")  # the tiny model is saved there
    return env


def test_demo_renders_a_playable_mp4_and_says_it_is_noise(tmp_path):
    env = _demo_env(tmp_path)
    output = tmp_path / "demo.mp4"
    done = subprocess.run(
        ["script/demo", "--output", str(output)],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the video is NOISE" in done.stdout
    assert "(noise from a tiny random model)" in done.stdout
    info = probe_mp4(output)
    assert (info["frames"], info["codec"], info["pix_fmt"]) == (49, "h264", "yuv420p")


@pytest.mark.parametrize("joined", [False, True], ids=["--output NAME", "--output=NAME"])
def test_a_relative_output_is_written_where_the_demo_was_run_from(tmp_path, joined):
    """script/demo works from the repository, but the path it is given is the caller's."""
    name = f"demo-{tmp_path.name}.mp4"
    caller = tmp_path / "somewhere else"
    caller.mkdir()
    output = [f"--output={name}"] if joined else ["--output", name]
    try:
        done = subprocess.run(
            [str(PROJECT / "script" / "demo"), *output, "--frames", "9", "--steps", "1"],
            cwd=caller,
            env=_demo_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert probe_mp4(caller / name)["frames"] == 9
        assert not (PROJECT / name).exists()
    finally:
        (PROJECT / name).unlink(missing_ok=True)
