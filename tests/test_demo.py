"""The README's first command, `script/demo`, as a newcomer runs it on a machine without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
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


def _run_demo_module(args: list[str], cwd: Path, env: dict[str, str]):
    """The demo as script/demo runs it, from `cwd`, with this checkout importable."""
    return subprocess.run(
        [sys.executable, "-m", "cogvideox_cog.devtools.demo", *args],
        cwd=cwd,
        env=env | {"PYTHONPATH": str(PROJECT)},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Path, Path]:
    """One short demo without --output, run from an empty folder with an empty TMPDIR."""
    root = tmp_path_factory.mktemp("default-run")
    (root / "cwd").mkdir()
    (root / "tmp").mkdir()
    env = _demo_env(root) | {"TMPDIR": str(root / "tmp")}
    done = _run_demo_module(["--frames", "9", "--steps", "1"], root / "cwd", env)
    assert done.returncode == 0, done.stdout + done.stderr
    return root / "cwd", root / "tmp"


def test_without_output_the_video_goes_to_outputs_demo_mp4_where_the_demo_runs(default_run):
    cwd, _ = default_run
    assert probe_mp4(cwd / "outputs" / "demo.mp4")["frames"] == 9
    assert sorted(p.name for p in cwd.rglob("*")) == ["demo.mp4", "outputs"]


def test_the_demo_leaves_nothing_in_the_temporary_folder(default_run):
    _, tmp = default_run
    assert list(tmp.iterdir()) == []


def test_an_abbreviation_of_output_is_refused_so_script_demo_cannot_miss_it(tmp_path):
    """script/demo makes only --output relative to the caller; --out would be the repo's."""
    done = _run_demo_module(["--out", "x.mp4"], tmp_path, _demo_env(tmp_path))
    assert done.returncode == 2
    assert "unrecognized arguments: --out x.mp4" in done.stderr
    assert not (tmp_path / "weights").exists()  # refused before any model is built


def test_output_without_a_path_fails_in_the_demos_own_words(tmp_path):
    done = subprocess.run(
        ["script/demo", "--output"],
        cwd=PROJECT,
        env=_demo_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2
    assert "argument --output: expected one argument" in done.stderr


def test_a_frame_count_the_model_cannot_make_is_refused_in_a_line_before_any_model(tmp_path):
    """On a GPU the model is a 20+ GB download: a wrong --frames must not wait for it."""
    done = _run_demo_module(["--frames", "10"], tmp_path, _demo_env(tmp_path))
    assert done.returncode == 1
    assert done.stderr.startswith("demo: num_frames=10 is not supported by cogvideox-5b")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "weights").exists()


def test_a_step_count_the_predictors_refuse_is_refused_before_any_model(tmp_path):
    done = _run_demo_module(["--steps", "0"], tmp_path, _demo_env(tmp_path))
    assert done.returncode == 2
    assert "--steps 0: from 1 to 500" in done.stderr
    assert not (tmp_path / "weights").exists()
