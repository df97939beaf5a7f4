"""Image and clip URLs fetched by the predictors (media/fetch.py) from a real HTTP server on
127.0.0.1: a flaky body is resumed once, a failing URL fails the prediction within seconds."""

from __future__ import annotations

import time

import pytest

from cogvideox_cog.errors import InputError
from cogvideox_cog.media.fetch import fetched
from tests.file_server import FileServer

DATA = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def files(tmp_path):
    (tmp_path / "photo.png").write_bytes(DATA)
    server = FileServer(tmp_path)
    yield server
    server.stop()


def test_a_body_cut_short_once_is_resumed_where_it_stopped(files):
    files.drop_at("photo.png", len(DATA) // 2)
    with fetched("image", files.url("photo.png"), "picture") as path:
        assert path.read_bytes() == DATA


@pytest.mark.parametrize("where", ["first request", "body"])
def test_a_url_that_keeps_failing_fails_after_one_retry(files, where):
    """Five retries with backoff, as for the weights, would hold the only slot for 30 s."""
    if where == "first request":
        files.fail_with("photo.png", 503, times=None)
    else:
        files.truncate_after("photo.png", len(DATA) // 2)
    started = time.monotonic()
    with (
        pytest.raises(InputError, match=r"\(2 attempts\)"),
        fetched("image", files.url("photo.png"), "picture"),
    ):
        pass
    assert time.monotonic() - started < 5
