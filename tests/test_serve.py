"""`script/serve`, as the README offers it to a newcomer on a machine without a GPU: the real
Cog server, on a tiny random model, with the shell's COGVIDEOX_* paths taken from the
repository although the server runs in a folder of its own."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cogvideox_cog.media.mp4 import probe_mp4
from tests.cog_server import CogServer, free_port, save_data_uri

pytestmark = pytest.mark.e2e

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def weights_dir() -> Iterator[Path]:
    """A weights folder given relative to the repository, in its ignored .cog folder."""
    relative = Path(".cog") / f"test-serve-{uuid.uuid4().hex[:8]}" / "weights"
    yield relative
    shutil.rmtree(PROJECT / relative.parent, ignore_errors=True)


def _listening(pid: int) -> set[tuple[str, int]]:
    """The (IPv4 address, port) pairs that process `pid` listens on, from its own network
    namespace's /proc/<pid>/net/tcp (IPv6 sockets are listed with address "v6")."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed since it was listed
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            if table == "tcp":
                ip = ".".join(str(b) for b in reversed(bytes.fromhex(address)))
            else:
                ip = "v6"
            found.add((ip, int(port, 16)))
    return found


def _can_unshare_the_network() -> bool:
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def lora_dir() -> Iterator[Path]:
    """A LoRA folder given relative to the repository, in its ignored .cog folder."""
    relative = Path(".cog") / f"test-serve-{uuid.uuid4().hex[:8]}" / "loras"
    yield relative
    shutil.rmtree(PROJECT / relative.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def served(weights_dir, lora_dir, tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGVIDEOX_")}
    env.pop("PYTHON", None)  # script/setup then keeps the .venv running this suite
    env["COGVIDEOX_WEIGHTS_DIR"] = str(weights_dir)
    env["COGVIDEOX_LORA_DIR"] = f"  {lora_dir}"  # as `-e X=" path"` or a yaml file may give it
    port = free_port()
    server = CogServer(
        "predict_t2v.py:Predictor",
        cwd=PROJECT,
        log_path=tmp_path_factory.mktemp("serve") / "server.log",
        port=port,
        command=["script/serve", "t2v", "--port", str(port)],
    )
    server.env = env | {"LOG_FORMAT": "console", "NO_COLOR": "1"}
    with server:
        yield server


def test_without_a_gpu_or_weights_url_it_serves_a_tiny_model_and_says_the_video_is_noise(
    served, tmp_path
):
    response = served.predict({"prompt": "a panda", "num_inference_steps": 2, "num_frames": 9})
    assert response["status"] == "succeeded", response.get("error")
    info = probe_mp4(save_data_uri(response["output"], tmp_path / "served.mp4"))
    assert (info["frames"], info["codec"]) == (9, "h264")
    assert "the video is NOISE" in served.log_text()


def test_a_relative_weights_dir_is_taken_from_the_repository_not_the_server_folder(
    served, weights_dir
):
    assert (PROJECT / weights_dir / "tiny-1.0-t2v" / "model_index.json").is_file()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc/net")
def test_the_server_listens_on_the_loopback_only(served):
    assert _listening(served.proc.pid) == {("127.0.0.1", served.port)}


def test_a_relative_path_with_a_leading_space_is_taken_from_the_repository(served, lora_dir):
    """The settings drop surrounding spaces, so the script does too before it looks at the
    path: else " .cog/x" would become "<repository>/ .cog/x", another folder."""
    environ = Path(f"/proc/{served.proc.pid}/environ").read_bytes().split(b"\0")
    assert f"COGVIDEOX_LORA_DIR={PROJECT / lora_dir}".encode() in environ


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _can_unshare_the_network(),
    reason="needs a network namespace of its own (unshare -rn), so that port 5000 is free",
)
def test_without_a_port_it_listens_on_5000(tmp_path):
    """In a network namespace of its own: port 5000 is then free whatever this machine
    runs, and nothing outside sees the server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGVIDEOX_")}
    env.pop("PYTHON", None)
    env["COGVIDEOX_WEIGHTS_DIR"] = str(tmp_path)
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen(
            ["unshare", "-rn", "script/serve", "t2v"],
            cwd=PROJECT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while server.poll() is None and not (listening := _listening(server.pid)):
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        assert server.poll() is None, (tmp_path / "server.log").read_text()
        assert listening == {("127.0.0.1", 5000)}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_a_variant_the_predictor_cannot_serve_stops_it_before_a_server_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGVIDEOX_")}
    env.pop("PYTHON", None)
    env |= {"COGVIDEOX_MODEL": "cogvideox-5b-i2v", "COGVIDEOX_WEIGHTS_DIR": str(tmp_path)}
    done = subprocess.run(
        ["script/serve", "v2v", "--port", str(free_port())],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # a server that started would hold it here
    )
    assert done.returncode != 0
    assert "predict_v2v.py (cog-v2v.yaml)" in done.stderr
    assert "serving" not in done.stdout
