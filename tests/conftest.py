"""Session fixtures: tiny random CogVideoX weights, served as tars from a loopback HTTP server,
and a factory for real Cog servers running our predictors on them."""

from __future__ import annotations

import os

# One CPU thread for torch, here and in every process the tests start (Cog servers, the demo,
# benchmark scripts): the tiny models run no faster on two, and two pytest workers with two
# OpenMP threads each on a two-core machine wait on each other's spinning threads, which makes
# the suite about twice as slow. Set before torch is imported; a given OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cogvideox_cog.devtools.openapi import SCHEMA_PATH, write_schema
from cogvideox_cog.devtools.tiny import TINY, save_tiny_weights
from cogvideox_cog.devtools.tiny_postprocess import save_tiny_realesrgan, save_tiny_rife
from tests.chat_server import ChatServer
from tests.cog_server import CogServer
from tests.file_server import FileServer

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def temporary_files_under_pytest(tmp_path_factory) -> Iterator[Path]:
    """What the code under test writes to the temporary directory (each prediction's output
    folder, the servers' spooled inputs) goes under pytest's own folder, which pytest prunes,
    not into /tmp for good."""
    folder = tmp_path_factory.mktemp("tmp")
    patch = pytest.MonkeyPatch()
    patch.setenv("TMPDIR", str(folder))  # for the Cog servers, started as child processes
    patch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def weights_under_pytest(tmp_path_factory) -> Iterator[Path]:
    """A test that sets no weights folder (one meant to fail before any download, say) writes
    its locks and downloads under pytest's folder, never into the project's weights/."""
    folder = tmp_path_factory.mktemp("weights")
    patch = pytest.MonkeyPatch()
    patch.setenv("COGVIDEOX_WEIGHTS_DIR", str(folder))
    yield folder
    patch.undo()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny pipeline per (family, task), keyed "1.0-t2v", "1.5-i2v", ..., and
    CogVideoX-2b's shape, "1.0-t2v-2b"."""
    root = tmp_path_factory.mktemp("tiny")
    weights = {
        f"{family}-{task}": save_tiny_weights(root / f"{family}-{task}", family, task)
        for family, task in TINY
    }
    weights["1.0-t2v-2b"] = save_tiny_weights(root / "1.0-t2v-2b", "1.0", "t2v", size="2b")
    return weights


@pytest.fixture(scope="session")
def weights_server(tiny_weights, tmp_path_factory) -> Iterator[FileServer]:
    """The tiny pipelines as tars (model_index.json at the top, as the real tars), and tiny
    RIFE (rife.pkl) and Real-ESRGAN (realesrgan.pth) files, over HTTP."""
    served = tmp_path_factory.mktemp("served")
    save_tiny_rife(served / "rife.pkl")
    save_tiny_realesrgan(served / "realesrgan.pth")
    for name, directory in tiny_weights.items():
        with tarfile.open(served / f"{name}.tar", "w") as archive:
            for path in sorted(directory.rglob("*")):
                archive.add(path, arcname=str(path.relative_to(directory)), recursive=False)
    server = FileServer(served)
    yield server
    server.stop()


def tiny_server(
    predictor: str,
    variant: str,
    weights_url: str,
    workdir: Path,
    args: list[str] | None = None,
    launcher: list[str] | None = None,
    **env: str,
) -> CogServer:
    """A Cog server (not started) for `predictor` on `variant`, its weights from
    `weights_url`, with an empty weights cache of its own in `workdir`, so setup's download
    runs for real. Inputs are validated as a built image does: the schema `cog build` would
    write is put where Cog reads it."""
    write_schema(f"{PROJECT / predictor}:Predictor", workdir / SCHEMA_PATH)
    return CogServer(
        f"{PROJECT / predictor}:Predictor",
        cwd=workdir,
        log_path=workdir / "server.log",
        args=args,
        launcher=launcher,
        env={
            "PYTHONPATH": str(PROJECT),
            "COGVIDEOX_MODEL": variant,
            "COGVIDEOX_WEIGHTS_URL": weights_url,
            "COGVIDEOX_WEIGHTS_DIR": str(workdir / "weights"),
            **env,
        },
    )


@pytest.fixture(scope="module")
def start_server(weights_server, tmp_path_factory) -> Iterator[Callable[..., CogServer]]:
    """Start a Cog server for `predictor` on `variant` with tiny weights `tiny` (e.g. "1.0-t2v")."""
    servers: list[CogServer] = []

    def start(predictor: str, variant: str, tiny: str, **env: str) -> CogServer:
        workdir = tmp_path_factory.mktemp(f"server-{variant}")
        server = tiny_server(predictor, variant, weights_server.url(f"{tiny}.tar"), workdir, **env)
        servers.append(server)
        return server.start(timeout=300)

    yield start
    for server in servers:
        server.stop()


def optional_steps(
    weights_server: FileServer,
    *,
    upscale: bool = False,
    interpolate: bool = False,
    endpoint: ChatServer | None = None,
) -> dict[str, str]:
    """The environment that enables a deployment's optional steps: upscale and interpolate
    with the tiny models from `weights_server`, prompt rewriting by `endpoint`."""
    env = {}
    if upscale:
        env |= {"COGVIDEOX_UPSCALE": "1"}
        env |= {"COGVIDEOX_UPSCALE_URL": weights_server.url("realesrgan.pth")}
    if interpolate:
        env |= {"COGVIDEOX_INTERPOLATE": "1"}
        env |= {"COGVIDEOX_INTERPOLATE_URL": weights_server.url("rife.pkl")}
    if endpoint is not None:
        env |= {"COGVIDEOX_ENHANCE_PROMPT": "openai"}
        env |= {"COGVIDEOX_ENHANCE_BASE_URL": endpoint.base_url}
    return env


@pytest.fixture(scope="module")
def chat_endpoint() -> Iterator[ChatServer]:
    """A chat-completions endpoint on 127.0.0.1 for one test module's server."""
    with ChatServer() as endpoint:
        yield endpoint


@pytest.fixture
def chat(chat_endpoint) -> ChatServer:
    """The endpoint, with no request received yet."""
    chat_endpoint.requests.clear()
    return chat_endpoint
