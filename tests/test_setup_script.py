"""script/setup keeps .venv usable: it rebuilds one that cannot run the pinned requirements.

Each test runs the real script in a copy of the repository whose requirement files pin
nothing, so a rebuild costs a `python -m venv` and no download.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT

# The interpreter this suite's .venv was made from: a 3.11 that script/setup accepts.
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)
EMPTY_REQUIREMENTS = "# nothing pinned: these tests exercise the .venv itself\n"


def _repository(tmp_path: Path) -> Path:
    """A copy of script/setup and requirement files, in a folder whose name has a space."""
    root = tmp_path / "a clone"
    (root / "script").mkdir(parents=True)
    shutil.copy2(PROJECT / "script" / "setup", root / "script" / "setup")
    for name in ("requirements.txt", "requirements-dev.txt"):
        (root / name).write_text(EMPTY_REQUIREMENTS)
    return root


def _mark_installed(root: Path) -> None:
    """Write the stamp a finished install leaves, for the current requirement files."""
    wanted = hashlib.sha256(2 * EMPTY_REQUIREMENTS.encode()).hexdigest()
    (root / ".venv" / ".requirements.sha256").write_text(wanted + "\n")


def _setup(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": BASE_PYTHON, "PIP_NO_INDEX": "1"}
    return subprocess.run(
        ["bash", str(root / "script" / "setup")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_venv_whose_python_no_longer_runs_is_rebuilt(tmp_path):
    """The interpreter it was made from was uninstalled (pyenv uninstall, a distribution
    upgrade): its requirements stamp still matches, but nothing in it runs."""
    root = _repository(tmp_path)
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").symlink_to(tmp_path / "uninstalled" / "python3.11")
    _mark_installed(root)

    result = _setup(root)

    assert result.returncode == 0, result.stderr
    assert "rebuilding" in result.stderr
    version = subprocess.run(
        [str(root / ".venv" / "bin" / "python"), "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.strip() == "(3, 11)"


# The tools script/setup runs, each in macOS's /bin or /usr/bin: macOS has no sha256sum
# (its `shasum -a 256` is a Perl script), nor GNU's options.
MACOS_TOOLS = ("cat", "dirname", "rm")


def test_setup_runs_where_only_the_tools_macos_has_are_on_path(tmp_path):
    """macOS lacks sha256sum: the requirements stamp was computed with it, so script/setup
    (and script/test, demo, serve and lint, which run it first) stopped with `sha256sum:
    command not found` there."""
    root = _repository(tmp_path)
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in MACOS_TOOLS:
        (tools / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "PATH": str(tools), "PYTHON": BASE_PYTHON, "PIP_NO_INDEX": "1"}

    for run in ("install", "nothing changed"):
        result = subprocess.run(
            [shutil.which("bash"), str(root / "script" / "setup")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"{run}: {result.stderr}"

    stamp = (root / ".venv" / ".requirements.sha256").read_text()
    assert stamp == hashlib.sha256(2 * EMPTY_REQUIREMENTS.encode()).hexdigest() + "\n"


# What script/setup tells someone without a usable 3.11, and docs/development.md repeats.
HOW_TO_GET_3_11 = [
    "apt-get install python3.11 python3.11-venv python3.11-dev",  # Debian 12, deadsnakes
    "add-apt-repository ppa:deadsnakes/ppa",  # Ubuntu: 24.04 has no 3.11, 22.04 an rc
    "uv python install 3.11",
    "uv python find 3.11",
    "pyenv install 3.11",
]


def test_a_refused_python_is_told_how_to_get_3_11_on_ubuntu_too(tmp_path):
    """Ubuntu's archive has no 3.11.2 or later: `apt-get install python3.11` alone finds
    nothing on 24.04 and a 3.11.0 release candidate on 22.04, which setup refuses too."""
    root = _repository(tmp_path)
    result = subprocess.run(
        ["bash", str(root / "script" / "setup")],
        env={**os.environ, "PYTHON": shutil.which("false")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "is not a Python that runs" in result.stderr
    missing = [command for command in HOW_TO_GET_3_11 if command not in result.stderr]
    assert not missing, result.stderr
    assert not (root / ".venv").exists()


def test_the_docs_give_the_advice_setup_gives():
    development = (PROJECT / "docs" / "development.md").read_text()
    assert [command for command in HOW_TO_GET_3_11 if command not in development] == []
    assert "deadsnakes" in (PROJECT / "README.md").read_text()


def _fake_python(folder: Path, version: str, ensurepip: bool = True) -> Path:
    """An interpreter that reports `version` (and, with ensurepip=False, has no ensurepip)."""
    fake = folder / f"python-{version}"
    refuse = "" if ensurepip else 'case "$2" in *ensurepip*) exit 1 ;; esac\n'
    fake.write_text(f"#!/bin/sh\n{refuse}echo {version}\n")
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("version", ["3.11.0", "3.11.1", "3.12.3", "3.10.14"])
def test_only_3_11_2_or_a_later_3_11_is_accepted(tmp_path, version):
    """3.11.0 and 3.11.1 (Ubuntu 22.04's release candidate) and other minor versions: the
    pins are for 3.11, and Debian 12's 3.11.2 is the oldest the suite runs on."""
    root = _repository(tmp_path)
    result = subprocess.run(
        ["bash", str(root / "script" / "setup")],
        env={**os.environ, "PYTHON": str(_fake_python(tmp_path, version))},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"3.11.2 or a later 3.11 is required; {tmp_path}/python-{version} is {version}." in (
        result.stderr
    )
    assert not (root / ".venv").exists()


def test_a_python_without_ensurepip_is_refused_with_the_package_to_install(tmp_path):
    """Debian and Ubuntu split venv's ensurepip into python3.11-venv: without it, `python -m
    venv` fails halfway and leaves a .venv without pip."""
    root = _repository(tmp_path)
    fake = _fake_python(tmp_path, "3.11.9", ensurepip=False)
    result = subprocess.run(
        ["bash", str(root / "script" / "setup")],
        env={**os.environ, "PYTHON": str(fake)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot create virtual environments (no ensurepip)" in result.stderr
    assert "apt-get install python3.11-venv" in result.stderr
    assert not (root / ".venv").exists()


def test_a_venv_made_by_another_python_is_rebuilt_though_its_stamp_matches(tmp_path):
    """PYTHON=... picks another 3.11: a .venv of the old one (its compiled wheels built for it)
    is replaced, even when its requirements are installed."""
    root = _repository(tmp_path)
    (root / ".venv" / "bin").mkdir(parents=True)
    shutil.copy2(_fake_python(tmp_path, "3.11.99"), root / ".venv" / "bin" / "python")
    _mark_installed(root)

    result = _setup(root)

    assert result.returncode == 0, result.stderr
    assert ".venv was made with Python 3.11.99; rebuilding it" in result.stderr
    made_by = subprocess.run(
        [str(root / ".venv" / "bin" / "python"), "-c", "import sys; print(sys._base_executable)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(made_by.stdout.strip()).resolve() == Path(BASE_PYTHON).resolve()


def _venv_with(root: Path, requirements: str) -> None:
    """A .venv of BASE_PYTHON (no pip: nothing is installed in it) and requirement files."""
    subprocess.run([BASE_PYTHON, "-m", "venv", "--without-pip", str(root / ".venv")], check=True)
    for name in ("requirements.txt", "requirements-dev.txt"):
        (root / name).write_text(requirements)


# Nothing offline installs it: any run of pip with it fails.
NOT_INSTALLABLE = "not-a-package-anywhere==1.0\n"


def test_unchanged_requirements_install_nothing(tmp_path):
    """Re-running script/setup is cheap, and works offline, when its stamp matches."""
    root = _repository(tmp_path)
    _venv_with(root, NOT_INSTALLABLE)
    wanted = hashlib.sha256(2 * NOT_INSTALLABLE.encode()).hexdigest()
    (root / ".venv" / ".requirements.sha256").write_text(wanted + "\n")

    result = _setup(root)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_a_failed_install_leaves_no_stamp_so_the_next_run_installs_again(tmp_path):
    root = _repository(tmp_path)
    _venv_with(root, NOT_INSTALLABLE)
    (root / "requirements.txt").write_text(EMPTY_REQUIREMENTS)

    for run in ("first", "second"):
        result = _setup(root)
        assert result.returncode != 0, run
        assert not (root / ".venv" / ".requirements.sha256").exists(), run


def test_without_python_set_a_working_venv_is_used_where_no_3_11_is_on_path(tmp_path):
    """A pyenv or uv interpreter the .venv was made from need not be on PATH later."""
    root = _repository(tmp_path)
    _venv_with(root, EMPTY_REQUIREMENTS)
    _mark_installed(root)
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in MACOS_TOOLS:
        (tools / tool).symlink_to(shutil.which(tool))
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"} | {"PATH": str(tools)}

    result = subprocess.run(
        [shutil.which("bash"), str(root / "script" / "setup")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr


def test_a_venv_link_to_a_folder_that_is_gone_is_replaced(tmp_path):
    """.venv as a link to a shared environment that was removed: its Python does not run,
    and `python -m venv` cannot make a venv through the dangling link."""
    root = _repository(tmp_path)
    (root / ".venv").symlink_to(tmp_path / "removed venv")

    result = _setup(root)

    assert result.returncode == 0, result.stderr
    assert "rebuilding" in result.stderr
    assert not (root / ".venv").is_symlink()
    subprocess.run([str(root / ".venv" / "bin" / "python"), "-c", "pass"], check=True)
