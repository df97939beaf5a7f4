"""script/demo, lint, serve and test: what each does around the Python it runs. Each runs
script/setup first, and stops there when setup does."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PROJECT


def _env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGVIDEOX_")}
    env.pop("PYTHON", None)  # script/setup then keeps the .venv running this suite
    return env | more


@pytest.mark.parametrize(
    "command",
    [
        ["script/demo", "--help"],
        ["script/lint"],
        ["script/test", "--collect-only", "-q", "tests/test_docs.py"],
        ["script/serve", "t2v", "--port", "0"],
    ],
    ids=lambda command: command[0],
)
def test_a_script_stops_where_script_setup_does(command):
    """A .venv that setup could not make ready is not used: the script stops with setup's
    reason, before anything else runs (a server started, a lint or a test run)."""
    done = subprocess.run(
        command,
        cwd=PROJECT,
        env=_env(PYTHON=shutil.which("false")),
        capture_output=True,
        text=True,
        timeout=120,  # a server that started would hold it here
    )
    assert done.returncode == 1
    assert "is not a Python that runs" in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("arguments", [[], ["t2x"], ["t2v", "--bogus"], ["i2v", "--port=1"]])
def test_serve_refuses_what_it_does_not_know_with_its_usage(arguments):
    done = subprocess.run(
        ["script/serve", *arguments],
        cwd=PROJECT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,  # a server that started would hold it here
    )
    assert done.returncode == 2
    assert done.stderr.startswith("usage: script/serve t2v|i2v|v2v")
    assert done.stdout == ""


def test_demo_leaves_a_missing_output_path_to_the_demo_to_report():
    done = subprocess.run(
        ["script/demo", "--output"],
        cwd=PROJECT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "argument --output: expected one argument" in done.stderr


def _checkout(tmp_path: Path, script: str, code: str) -> Path:
    """A repository with `script`, setup, the project's ruff settings and requirement files,
    this suite's .venv (ready: setup installs nothing) and one module, code.py."""
    installed = (PROJECT / ".venv" / ".requirements.sha256").read_text().strip()
    wanted = (PROJECT / "requirements.txt").read_bytes()
    wanted += (PROJECT / "requirements-dev.txt").read_bytes()
    if installed != hashlib.sha256(wanted).hexdigest():
        pytest.skip("the requirement files changed since script/setup last ran")
    root = tmp_path / "a checkout"
    (root / "script").mkdir(parents=True)
    for name in ("script/setup", script, "requirements.txt", "requirements-dev.txt"):
        shutil.copy2(PROJECT / name, root / name)
    shutil.copy2(PROJECT / "pyproject.toml", root / "pyproject.toml")
    (root / ".venv").symlink_to((PROJECT / ".venv").resolve())
    (root / "tests").mkdir()
    (root / "tests" / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    (root / "code.py").write_text(code)
    return root


@pytest.mark.parametrize(
    ("code", "reported"),
    [("import os\n", "F401"), ("name = 'single quotes'\n", "1 file would be reformatted")],
    ids=["lint error", "unformatted"],
)
def test_script_test_fails_on_lint_and_format_before_running_pytest(tmp_path, code, reported):
    root = _checkout(tmp_path, "script/test", code)
    done = subprocess.run(
        ["script/test", "--collect-only", "-q"],
        cwd=root,
        env=_env(PYTEST_WORKERS="0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert reported in done.stdout + done.stderr
    assert "test_nothing" not in done.stdout


def test_script_lint_fixes_and_formats_the_code(tmp_path):
    root = _checkout(tmp_path, "script/lint", "import os\nname = 'single quotes'\n")
    done = subprocess.run(
        ["script/lint"], cwd=root, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (root / "code.py").read_text() == 'name = "single quotes"\n'


CI_PYTHON = Path("/usr/bin/python3.11")


def _ci_has_what_it_installs() -> bool:
    """.ci/run installs its Debian packages when one is missing: never from a test."""
    with_venv = subprocess.run([CI_PYTHON, "-c", "import ensurepip, venv"], capture_output=True)
    tools = all(shutil.which(tool) for tool in ("tini", "g++"))
    headers = Path("/usr/include/python3.11/Python.h").is_file()
    return with_venv.returncode == 0 and tools and headers


@pytest.mark.skipif(
    not CI_PYTHON.is_file() or not _ci_has_what_it_installs(),
    reason=".ci/run would apt-get install Debian's python3.11, g++ or tini here",
)
def test_ci_runs_the_readmes_test_command_on_debians_python(tmp_path):
    """The README's `script/test` (lint, then the whole suite), run with PYTHON set to the
    oldest Python the README names. script/test here records how it was called."""
    root = tmp_path / "a checkout"
    (root / ".ci").mkdir(parents=True)
    (root / "script").mkdir()
    shutil.copy2(PROJECT / ".ci" / "run", root / ".ci" / "run")
    recorder = root / "script" / "test"
    recorder.write_text('#!/bin/sh\necho "PYTHON=$PYTHON $0 $*" >"$(dirname "$0")/../called"\n')
    recorder.chmod(0o755)

    done = subprocess.run(
        [str(root / ".ci" / "run")], env=_env(), capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr
    assert (root / "called").read_text() == f"PYTHON={CI_PYTHON} script/test -q\n"
    assert re.search(r"^script/test\s", (PROJECT / "README.md").read_text(), re.M)
