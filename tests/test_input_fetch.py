"""Image and clip URLs fetched by the predictors (media/fetch.py) from a real HTTP server on
127.0.0.1: a flaky body is resumed once, a failing URL fails the prediction within seconds."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cogvideox_cog import leftovers
from cogvideox_cog.errors import ConfigError, InputError
from cogvideox_cog.media.fetch import check_settings, fetched
from tests.file_server import FileServer

DATA = bytes(range(256)) * 4096  # 1 MiB
PROJECT = Path(__file__).resolve().parent.parent


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


def test_a_users_download_is_not_logged_as_the_weights(tmp_path, caplog):
    """A prediction's log is the user's: its image's retries and its server without ranges
    were told as the model weights'."""
    (tmp_path / "photo.png").write_bytes(DATA)
    server = FileServer(tmp_path, ranges=False)
    server.drop_at("photo.png", len(DATA) // 2)
    caplog.set_level("INFO", logger="cogvideox_cog")
    try:
        with fetched("image", server.url("photo.png"), "picture") as path:
            assert path.read_bytes() == DATA
    finally:
        server.stop()
    assert "does not support Range requests" in caplog.text and "retry 1/1" in caplog.text
    assert "weights:" not in caplog.text


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://[::1", r"the image URL is not a valid URL \(Invalid IPv6 URL\)"),
        ("http://127.0.0.1:port/x.png", r"the image URL is not a valid URL"),
        ("http://user:secret@127.0.0.1/x.png", r"the image URL holds a user name or password"),
        ("http:///x.png", r"the image URL has no host"),
        ("http://127.0.0.1/a b.png?X-Amz-Signature=secret", r"holds a space.*%20"),
        ("http://127.0.0.1/café.png?X-Amz-Signature=secret", r"a letter outside ASCII.*encode"),
        ("http://images..example/x.png", r"has a host name with an empty part"),
        (f"http://{'a' * 64}.example/x.png", r"or one over 63 characters"),
    ],
    ids=["bracket", "port", "credentials", "no-host", "space", "non-ascii", "dots", "label"],
)
def test_a_url_urllib_cannot_fetch_is_refused_before_any_request(url, problem):
    with pytest.raises(InputError, match=problem) as refused, fetched("image", url, "picture"):
        pass
    assert "secret" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    ["htps://user:secret-key@host.example/photo.png", "s3://AKIA:secret-key@bucket/photo.png"],
)
def test_a_url_of_another_scheme_is_refused_without_its_password(url):
    with (
        pytest.raises(InputError, match=r"is not an http\(s\) URL") as refused,
        fetched("image", url, "picture"),
    ):
        pass
    assert "secret-key" not in str(refused.value)


@pytest.mark.parametrize("mark", ["/", "?", "#"])
def test_a_password_holding_a_slash_question_mark_or_hash_is_refused_unseen(mark):
    """Unencoded, the mark ends the host early: urlsplit read the password's start as a port
    and quoted it in its error ("Port could not be cast to integer value as 'AKIAsecret')."""
    url = f"https://user:AKIAsecret{mark}tail@127.0.0.1/photo.png"
    with (
        pytest.raises(InputError, match=r"the image URL holds a user name or password") as refused,
        fetched("image", url, "picture"),
    ):
        pass
    assert "AKIAsecret" not in str(refused.value) and "tail" not in str(refused.value)


@pytest.mark.parametrize("mark", ["/", "?", "#"])
def test_a_mistyped_schemes_password_holding_a_slash_is_not_echoed(mark):
    url = f"htps://user:AKIAsecret{mark}tail@host.example/photo.png"
    with (
        pytest.raises(
            InputError, match=r"'htps://host.example/photo.png' is not an http"
        ) as refused,
        fetched("image", url, "picture"),
    ):
        pass
    assert "AKIAsecret" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "https//user:secret-key@host.example/photo.png",
        "https:/user:secret-key@host.example/photo.png",
        "user:secret-key@host.example/photo.png",
    ],
)
def test_a_url_with_no_host_after_its_scheme_is_refused_without_its_password(url):
    """A colon or a slash short: no `scheme://host` says where the user info is."""
    with pytest.raises(InputError) as refused, fetched("image", url, "picture"):
        pass
    assert "secret-key" not in str(refused.value)


def test_a_redirect_away_from_http_is_refused_at_once(files):
    files.redirect("photo.png", "ftp://127.0.0.1:9/photo.png")
    started = time.monotonic()
    with (
        pytest.raises(InputError, match=r"a redirect to ftp:, not http\(s\)"),
        fetched("image", files.url("photo.png"), "picture"),
    ):
        pass
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    ("location", "said"),
    [
        ("s3://bucket/photo.png?X-Amz-Signature=SECRETSIG", "a redirect to s3:, not http(s)"),
        ("http://alice:SECRETPW@127.0.0.1:9/photo.png", "a user name or password in it"),
    ],
    ids=["presigned s3", "user and password"],
)
def test_a_redirect_that_is_refused_is_not_quoted(files, location, said):
    """urllib's refusal of s3: quoted the whole target, its signature too, and http.client's
    of a user:password@ host quoted the password."""
    files.redirect("photo.png", location)
    with pytest.raises(InputError) as refused, fetched("image", files.url("photo.png"), "photo"):
        pass
    assert said in str(refused.value)
    assert "SECRET" not in str(refused.value)


def test_an_input_left_by_a_killed_worker_is_removed_by_the_next_setup(tmp_path):
    code = (
        "import sys, time; from cogvideox_cog.media.fetch import fetched\n"
        "with fetched('image', 'data:image/png;base64,' + 'A' * 400, 'picture') as path:\n"
        "    print(path, flush=True); time.sleep(60)\n"
    )
    env = dict(os.environ, TMPDIR=str(tmp_path))
    worker = subprocess.Popen(
        [sys.executable, "-c", code], cwd=PROJECT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        path = Path(worker.stdout.readline().strip())
        assert path.is_file() and path.is_relative_to(tmp_path)
    finally:
        worker.kill()
        worker.wait()
    # What setup does first (VideoGenerator.from_env).
    leftovers.remove_dead(tmp_path, leftovers.TEMP_PREFIX)
    assert list(tmp_path.iterdir()) == []


def test_a_data_uri_in_url_safe_base64_without_padding_is_decoded():
    """base64url (RFC 4648 section 5), as JWT-style encoders write it: - and _, no = at the end."""
    data = bytes(range(256)) * 3 + b"\xfb\xff"  # its encoding holds both - and _
    payload = base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert "-" in payload and "_" in payload and len(payload) % 4
    with fetched("image", f"data:image/png;base64,{payload}", "picture") as path:
        assert path.read_bytes() == data


def test_a_data_uri_marked_base64_in_capitals_is_decoded():
    """Parameter names in a media type are case-insensitive (RFC 2045): ";BASE64" too."""
    data = bytes(range(256))
    encoded = base64.b64encode(data).decode()
    with fetched("image", f"data:image/png;BASE64,{encoded}", "picture") as path:
        assert path.read_bytes() == data


def test_a_data_uri_broken_by_percent_encoded_line_breaks_is_measured_by_its_data(monkeypatch):
    """RFC 2397's URIs percent-encode a line break (%0D%0A): six characters of no data each
    76 were counted as data, so a picture under the cap was refused as over it."""
    monkeypatch.setenv("COGVIDEOX_INPUT_MAX_SIZE", "1M")
    data = bytes(range(256)) * 3900  # 998,400 bytes, under 1 MiB
    encoded = base64.b64encode(data).decode()
    lines = [encoded[at : at + 76] for at in range(0, len(encoded), 76)]
    with fetched("image", "data:image/png;base64," + "%0D%0A".join(lines), "picture") as path:
        assert path.read_bytes() == data


def test_a_data_uri_over_the_cap_is_refused_with_its_decoded_size(monkeypatch):
    monkeypatch.setenv("COGVIDEOX_INPUT_MAX_SIZE", "1M")
    encoded = base64.b64encode(bytes(1_100_000)).decode()
    with (
        pytest.raises(InputError, match=r"image is 1\.1 MB, over the 1\.0 MB limit"),
        fetched("image", f"data:image/png;base64,{encoded}", "picture"),
    ):
        pass


def test_a_url_pasted_with_spaces_or_a_line_break_around_it_is_fetched(files):
    """A URL copied from a page or a terminal often brings a space or a newline along."""
    with fetched("image", f"  {files.url('photo.png')}\n", "picture") as path:
        assert path.read_bytes() == DATA


@pytest.mark.parametrize(
    ("name", "value", "suffix"),
    [
        ("video", "clip.H264", ".h264"),
        ("image", "data:image/png;base64,AAAA", ".png"),
        ("video", "data:Video/MP4;base64,AAAA", ".mp4"),
        ("image", "DATA:image/png;base64,AAAA", ".png"),
        ("image", "data:image/png ;base64,AAAA", ".png"),
    ],
    ids=[
        "url",
        "data-uri",
        "data-uri-type-in-capitals",
        "data-uri-scheme-in-capitals",
        "data-uri-type-followed-by-a-space",
    ],
)
def test_the_fetched_file_is_named_with_the_inputs_extension(files, tmp_path, name, value, suffix):
    """Some formats are recognised by their name, such as a raw H.264 stream's."""
    (tmp_path / "clip.H264").write_bytes(DATA)
    url = value if value.lower().startswith("data:") else files.url(value)
    with fetched(name, url, name) as path:
        assert path.name == f"{name}{suffix}"


def test_a_plain_data_uri_over_the_cap_is_refused_with_its_size(monkeypatch):
    """Not base64: the data is the URI's own characters, percent-decoded."""
    monkeypatch.setenv("COGVIDEOX_INPUT_MAX_SIZE", "1M")
    with (
        pytest.raises(InputError, match=r"image is 1\.1 MB, over the 1\.0 MB limit"),
        fetched("image", "data:image/svg+xml," + "a" * 1_100_000, "picture"),
    ):
        pass


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_of_any_kind_away_from_http_is_refused(files, status):
    files.redirect("photo.png", "ftp://127.0.0.1:9/photo.png", status=status)
    with (
        pytest.raises(InputError, match=rf"HTTP {status}: a redirect to ftp:, not http\(s\)"),
        fetched("image", files.url("photo.png"), "picture"),
    ):
        pass


def test_an_announced_size_over_the_cap_is_refused_before_the_body(files, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_INPUT_MAX_SIZE", "100K")
    with (
        pytest.raises(InputError, match=r"image is 1\.0 MB, over the 102\.4 kB limit"),
        fetched("image", files.url("photo.png"), "picture"),
    ):
        pass
    assert files.bytes_sent <= 1  # the probe's first byte


def test_a_body_without_a_length_over_the_cap_is_refused_as_more_than_it_read(
    tmp_path, monkeypatch
):
    """Chunked, no Range: the size is known only as the bytes arrive, so the error says
    "more than" what was read when the cap was passed."""
    monkeypatch.setenv("COGVIDEOX_INPUT_MAX_SIZE", "100K")
    (tmp_path / "photo.png").write_bytes(DATA)
    server = FileServer(tmp_path, ranges=False, chunked=True)
    try:
        with (
            pytest.raises(InputError, match=r"image is more than [\d.]+ kB, over the 102\.4 kB"),
            fetched("image", server.url("photo.png"), "picture"),
        ):
            pass
    finally:
        server.stop()


def test_an_input_is_deleted_when_the_prediction_is_done_with_it():
    with fetched("image", "data:image/png;base64,AAAA", "picture") as path:
        assert path.is_file()
    assert not path.parent.exists()


def test_an_input_whose_download_failed_leaves_no_folder(files, tmp_path, monkeypatch):
    temporary = tmp_path / "temporary"
    temporary.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temporary))
    files.fail_with("photo.png", 404)
    with pytest.raises(InputError, match="HTTP 404"), fetched("image", files.url("photo.png"), "x"):
        pass
    assert list(temporary.iterdir()) == []


@pytest.mark.parametrize("kind", ["base64", "plain"])
def test_a_data_uri_of_exactly_the_cap_is_taken(monkeypatch, kind):
    monkeypatch.setenv("COGVIDEOX_INPUT_MAX_SIZE", "3000")
    data = b"a" * 3000
    payload = base64.b64encode(data).decode() if kind == "base64" else data.decode()
    header = "image/png;base64" if kind == "base64" else "image/svg+xml"
    with fetched("image", f"data:{header},{payload}", "picture") as path:
        assert path.read_bytes() == data


def test_a_data_uri_with_damaged_base64_is_refused_as_damaged():
    """Five data characters: one left over, which no byte can be decoded from."""
    with (
        pytest.raises(InputError, match="whose base64 data is damaged"),
        fetched("image", "data:image/png;base64,AAAAA", "picture"),
    ):
        pass


def test_a_plain_data_uri_is_percent_decoded():
    """RFC 2397: the data of a URI without ;base64 is percent-encoded text."""
    with fetched("image", "data:image/svg+xml,%3Csvg%20%2F%3E", "picture") as path:
        assert path.read_bytes() == b"<svg />"


@pytest.mark.parametrize("size", ["0", "ten"])
def test_a_size_cap_that_is_not_a_positive_size_fails_setup(monkeypatch, size):
    monkeypatch.setenv("COGVIDEOX_INPUT_MAX_SIZE", size)
    with pytest.raises(ConfigError, match="COGVIDEOX_INPUT_MAX_SIZE"):
        check_settings()


def test_a_download_stalled_past_the_deadline_names_the_setting(files, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_INPUT_TIMEOUT", "1")
    files.stall_at("photo.png", len(DATA) // 2, seconds=30)
    started = time.monotonic()
    with (
        pytest.raises(InputError, match=r"took longer than 1 s \(COGVIDEOX_INPUT_TIMEOUT\)"),
        fetched("image", files.url("photo.png"), "picture"),
    ):
        pass
    assert time.monotonic() - started < 5
