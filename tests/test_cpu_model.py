"""`python -m cogvideox_cog.devtools.cpu_model`, which `script/serve` runs before it starts the
server: its exports must give a predictor that sets up, and a variant the predictor cannot
serve must stop it there, named as the server would."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cogvideox_cog.devtools.cpu_model import main as cpu_model_main
from cogvideox_cog.devtools.cpu_model import use_tiny_model

PROJECT = Path(__file__).resolve().parent.parent


def settings(model: str, weights_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGVIDEOX_")}
    return env | {"COGVIDEOX_MODEL": model, "COGVIDEOX_WEIGHTS_DIR": str(weights_dir)}


def run_python(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def cpu_model(task: str, model: str, weights_dir: Path) -> subprocess.CompletedProcess:
    command = ["-m", "cogvideox_cog.devtools.cpu_model", task]
    return run_python(command, settings(model, weights_dir))


def test_an_image_to_video_variant_for_video_to_video_fails_naming_the_v2v_predictor(tmp_path):
    done = cpu_model("v2v", "cogvideox-5b-i2v", tmp_path)
    assert done.returncode != 0
    assert done.stdout == ""  # no exports for script/serve to run a server with
    assert "predict_v2v.py (cog-v2v.yaml)" in done.stderr
    assert "predict_t2v.py" not in done.stderr
    assert "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())  # no tiny model built for a server that cannot start


@pytest.mark.parametrize(
    ("task", "model"),
    [
        ("t2v", "cogvideox1.5-5b"),
        ("i2v", "cogvideox1.5-5b-i2v"),
        ("v2v", "cogvideox1.5-5b"),
        ("t2v", "cogvideox-2b"),
    ],
)
def test_the_exports_for_a_variant_set_its_predictor_up(task, model, tmp_path):
    """The tiny 1.5 model's rotary grid cannot hold 1.5's own 768x1360, and setup refuses
    weights of another shape than the variant's (2B has no rotary embeddings)."""
    done = cpu_model(task, model, tmp_path)
    assert done.returncode == 0, done.stderr
    exported = dict(shlex.split(line)[1].split("=", 1) for line in done.stdout.splitlines())
    setup = run_python(
        ["-c", f"import predict_{task}; predict_{task}.Predictor().setup()"],
        settings(model, tmp_path) | exported,
    )
    assert setup.returncode == 0, setup.stderr[-3000:]


@pytest.fixture
def in_this_process(monkeypatch, tmp_path) -> Path:
    """cpu_model run here: its weights folder, and the settings it exports restored after."""
    for name in ("COGVIDEOX_MODEL", "COGVIDEOX_WEIGHTS_URL", "COGVIDEOX_RESOLUTION"):
        monkeypatch.setenv(name, "")  # so that undo also removes what cpu_model sets
        monkeypatch.delenv(name)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path))
    return tmp_path


def _exports(printed: str) -> dict[str, str]:
    """What `eval` in script/serve sets from the printed lines."""
    return dict(shlex.split(line)[1].split("=", 1) for line in printed.splitlines())


@pytest.mark.parametrize("args", [[], ["t2v", "i2v"], ["t2i"]])
def test_anything_but_one_task_prints_the_usage_and_exits_2(args, in_this_process, capsys):
    assert cpu_model_main(args) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err.startswith("usage: ")


def test_weights_already_set_are_kept_without_building_a_model(in_this_process, capsys):
    os.environ["COGVIDEOX_WEIGHTS_URL"] = "hf://THUDM/CogVideoX-5b"
    assert cpu_model_main(["t2v"]) == 0
    assert capsys.readouterr().out == ""
    assert not any(in_this_process.iterdir())


def test_the_exports_hold_a_weights_folder_whose_path_has_a_space(
    in_this_process, monkeypatch, capsys
):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(in_this_process / "my weights"))
    assert cpu_model_main(["t2v"]) == 0
    exported = _exports(capsys.readouterr().out)
    assert (Path(exported["COGVIDEOX_WEIGHTS_URL"]) / "model_index.json").is_file()


def test_2b_and_5b_in_one_weights_folder_each_get_their_own_shape(in_this_process):
    os.environ["COGVIDEOX_MODEL"] = "cogvideox-5b"
    five_b = use_tiny_model("t2v")
    os.environ["COGVIDEOX_MODEL"] = "cogvideox-2b"
    two_b = use_tiny_model("t2v")
    rotary = [
        json.loads((folder / "transformer" / "config.json").read_text())[
            "use_rotary_positional_embeddings"
        ]
        for folder in (five_b, two_b)
    ]
    assert rotary == [True, False]


def test_a_second_run_uses_the_model_the_first_built(in_this_process):
    os.environ["COGVIDEOX_MODEL"] = "cogvideox-5b"
    weights = use_tiny_model("t2v") / "transformer" / "diffusion_pytorch_model.safetensors"
    built = weights.stat()
    use_tiny_model("t2v")
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == (built.st_ino, built.st_mtime_ns)


def test_a_model_folder_a_killed_build_left_unfinished_is_built_again(in_this_process):
    os.environ["COGVIDEOX_MODEL"] = "cogvideox-5b"
    unfinished = in_this_process / "tiny-1.0-t2v"
    (unfinished / "transformer").mkdir(parents=True)
    (unfinished / "transformer" / "config.json").write_text("{")
    assert use_tiny_model("t2v") == unfinished
    assert (unfinished / "model_index.json").is_file()
    json.loads((unfinished / "transformer" / "config.json").read_text())


def test_a_1_5_resolution_already_set_is_kept(in_this_process):
    """The operator's size wins over the tiny model's own, as the weights do."""
    os.environ["COGVIDEOX_MODEL"] = "cogvideox1.5-5b"
    os.environ["COGVIDEOX_RESOLUTION"] = "96x64"
    use_tiny_model("t2v")
    assert os.environ["COGVIDEOX_RESOLUTION"] == "96x64"
