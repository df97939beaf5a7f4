"""Bad inputs through the real Cog server, as Replicate sends them: one table, both predictors.

Every row is refused before any heavy work, either by the schema (HTTP 422, or 400 for a
body that is not JSON) or by a failed prediction whose error says what to change; a few
rows are not errors and must run (an over-long prompt is truncated and logged, an unknown
input name is dropped, a blank image-to-video prompt is allowed). After each row the server
is READY with the same worker process.
"""

from __future__ import annotations

import io
import json
import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cogvideox_cog.devtools.tiny import TINY
from cogvideox_cog.errors import InputError
from cogvideox_cog.media.image import MAX_ASPECT_RATIO, open_image
from cogvideox_cog.media.mp4 import probe_mp4
from tests.cog_server import data_uri, fd_count, free_port, save_data_uri
from tests.file_server import FileServer
from tests.http_peers import EndlessSender

pytestmark = pytest.mark.e2e

TINY_H, TINY_W = TINY[("1.0", "i2v")].height, TINY[("1.0", "i2v")].width
# The input download bounds of the servers here: small, so the tests of them are quick.
INPUT_MAX_SIZE, INPUT_TIMEOUT = "8M", "5"
DROP = object()  # leave this input out of the request
LONG_PROMPT = " ".join(["a panda plays an acoustic guitar in a sunlit bamboo forest"] * 30)
TRUNCATED = "is longer than the text encoder's 226 tokens; this part is ignored:"
BASE = {
    "t2v": {"prompt": "a panda plays guitar", "num_inference_steps": 1, "num_frames": 9},
    "i2v": {
        "image": "file:photo.jpg",
        "prompt": "the waves roll in",
        "num_inference_steps": 1,
        "num_frames": 9,
    },
}


@dataclass(frozen=True)
class Row:
    id: str
    predictor: str  # "t2v" or "i2v"
    outcome: int | str  # 400, 422, "failed" or "succeeded"
    says: str  # in the 422 detail, the 400 body, the error, or (succeeded) the logs
    inputs: dict[str, Any] = field(default_factory=dict)  # merged over BASE[predictor]
    raw: str | None = None  # a request body sent as it is instead
    where: str = ""  # "server log": `says` is in the server's own log, not the prediction's


def raw_t2v(value: str, name: str = "guidance_scale") -> str:
    body = json.dumps({"input": BASE["t2v"]})
    return body[:-2] + f', "{name}": {value}}}}}'


ROWS = [
    # Wrong types: the schema refuses them, naming the input.
    Row("steps-string", "t2v", 422, 'not of type "integer"', {"num_inference_steps": "two"}),
    Row("steps-fraction", "t2v", 422, 'not of type "integer"', {"num_inference_steps": 2.5}),
    Row("steps-bool", "t2v", 422, 'not of type "integer"', {"num_inference_steps": True}),
    Row("guidance-string", "t2v", 422, 'not of type "number"', {"guidance_scale": "6"}),
    Row("dynamic-cfg-string", "t2v", 422, 'not of type "boolean"', {"use_dynamic_cfg": "yes"}),
    Row("prompt-number", "t2v", 422, 'not of type "string"', {"prompt": 123}),
    Row("prompt-null", "t2v", 422, 'not of type "string"', {"prompt": None}),
    Row("negative-prompt-list", "t2v", 422, 'not of type "string"', {"negative_prompt": ["x"]}),
    # null is refused even where the schema says nullable: leave the input out instead.
    Row("seed-null", "t2v", 422, 'null is not of type "integer"', {"seed": None}),
    Row("prompt-missing", "t2v", 422, "Field required", {"prompt": DROP}),
    Row("image-number", "i2v", 422, 'not of type "string"', {"image": 5}),
    Row("image-missing", "i2v", 422, "Field required", {"image": DROP}),
    # Out of range.
    Row("steps-zero", "t2v", 422, "less than the minimum of 1", {"num_inference_steps": 0}),
    Row("steps-501", "t2v", 422, "greater than the maximum of 500", {"num_inference_steps": 501}),
    Row("guidance-low", "t2v", 422, "less than the minimum of 1", {"guidance_scale": 0.5}),
    Row("guidance-high", "t2v", 422, "greater than the maximum of 20", {"guidance_scale": 50.0}),
    Row("fps-zero", "t2v", 422, "less than the minimum of 1", {"fps": 0}),
    Row("fps-61", "t2v", 422, "greater than the maximum of 60", {"fps": 61}),
    Row("seed-negative", "t2v", 422, "less than the minimum of 0", {"seed": -1}),
    Row("seed-2-32", "t2v", 422, "greater than the maximum of 4294967295", {"seed": 2**32}),
    Row("frames-8", "t2v", 422, "less than the minimum of 9", {"num_frames": 8}),
    Row("frames-162", "i2v", 422, "greater than the maximum of 161", {"num_frames": 162}),
    Row("lora-scale-high", "t2v", 422, "greater than the maximum of 3", {"lora_scale": 3.5}),
    Row("lora-scale-low", "i2v", 422, "less than the minimum of -1", {"lora_scale": -2.0}),
    Row("speed-mode-unknown", "t2v", 422, '"turbo" is not one of', {"speed_mode": "turbo"}),
    # NaN and infinity are not JSON: the server refuses the body before looking at it.
    Row("guidance-nan", "t2v", 400, "Failed to parse the request body as JSON", raw=raw_t2v("NaN")),
    Row("guidance-inf", "t2v", 400, "Failed to parse", raw=raw_t2v("Infinity")),
    Row("guidance-1e999", "t2v", 400, "number out of range", raw=raw_t2v("1e999")),
    Row("guidance-nan-string", "t2v", 422, 'not of type "number"', {"guidance_scale": "NaN"}),
    Row("not-json", "t2v", 400, "Failed to parse the request body as JSON", raw="prompt=a cat"),
    # Frame counts inside the schema's range but off the variant's rule.
    Row("frames-20", "t2v", "failed", "one of 9, 17, 25, 33, 41, 49", {"num_frames": 20}),
    Row("frames-57", "t2v", "failed", "num_frames=57 is not supported", {"num_frames": 57}),
    Row("frames-81-on-1.0", "t2v", "failed", "8*N+1 frames", {"num_frames": 81}),
    Row("frames-i2v", "i2v", "failed", "one of 9, 17, 25, 33, 41, 49", {"num_frames": 10}),
    # Blank prompts: text-to-video has nothing to go on; image-to-video has the image.
    Row("prompt-empty", "t2v", "failed", "prompt is empty: describe the video", {"prompt": ""}),
    Row("prompt-blank", "t2v", "failed", "prompt is empty", {"prompt": " \t\n "}),
    Row("i2v-prompt-blank", "i2v", "succeeded", "generating 9 frames", {"prompt": "  "}),
    # enhance_prompt where the deployment has no language model (the default).
    Row("enhance-string", "t2v", 422, 'not of type "boolean"', {"enhance_prompt": "yes"}),
    Row(
        "enhance-no-backend",
        "i2v",
        "failed",
        "enhance_prompt is not available on this deployment",
        {"enhance_prompt": True},
    ),
    # Over the token limit: not an error; it runs and the log says what was dropped.
    Row("prompt-too-long", "t2v", "succeeded", f"prompt {TRUNCATED}", {"prompt": LONG_PROMPT}),
    Row(
        "negative-too-long",
        "i2v",
        "succeeded",
        f"negative_prompt {TRUNCATED}",
        {"negative_prompt": LONG_PROMPT},
    ),
    # Unknown names are dropped by the server: a misspelt input silently takes its default.
    Row(
        "unknown-input",
        "t2v",
        "succeeded",
        'Stripped unknown input fields prediction_id={id} fields=["num_frame"]',
        {"num_frame": 17},
        where="server log",
    ),
    # LoRAs refused before any download.
    Row(
        "lora-s3", "t2v", "failed", "use an http(s) URL of a .safetensors", {"lora_url": "s3://b/x"}
    ),
    Row(
        "lora-pickle", "i2v", "failed", "names a PyTorch pickle file", {"lora_url": "http://h/a.pt"}
    ),
    Row("lora-hf-org-only", "t2v", "failed", "use hf://org/repo", {"lora_url": "hf://org"}),
    # Images that cannot be used.
    Row("image-404", "i2v", "failed", "HTTP 404 Not Found", {"image": "file:missing.png"}),
    Row("image-refused", "i2v", "failed", "Connection refused", {"image": "closed-port:a.png"}),
    Row(
        "image-not-a-url", "i2v", "failed", "not an http(s) URL or a data: URI", {"image": "hello"}
    ),
    # A picture on the server's own disk is not an input: only URLs and data URIs are.
    Row("image-local-path", "i2v", "failed", "is not an http(s) URL", {"image": "local:photo.jpg"}),
    Row(
        "image-file-url", "i2v", "failed", "is not an http(s) URL", {"image": "file-url:photo.jpg"}
    ),
    Row("image-data-no-comma", "i2v", "failed", "without a comma", {"image": "data:image/png"}),
    Row("image-s3", "i2v", "failed", "is not an http(s) URL", {"image": "s3://bucket/photo.jpg"}),
    Row("image-zero-bytes", "i2v", "failed", "send a JPEG, PNG", {"image": "file:zero.png"}),
    Row(
        "image-empty-data-uri",
        "i2v",
        "failed",
        "send a JPEG, PNG",
        {"image": "data:image/png;base64,"},
    ),
    Row("image-truncated-png", "i2v", "failed", "damaged or truncated", {"image": "file:cut.png"}),
    Row("image-truncated-jpeg", "i2v", "failed", "damaged or truncated", {"image": "data:cut.jpg"}),
    Row("image-text-file", "i2v", "failed", "send a JPEG, PNG", {"image": "file:notes.txt"}),
    Row("image-bomb", "i2v", "failed", "too large to decode safely", {"image": "file:bomb.png"}),
    Row("image-72mp", "i2v", "failed", "the limit is 64 MP. Downscale", {"image": "file:72mp.png"}),
    Row("image-panorama", "i2v", "failed", "100.0:1; the longer side", {"image": "file:pano.png"}),
    Row("image-tower", "i2v", "failed", "may be at most 4 times", {"image": "file:tower.png"}),
    Row(
        "image-just-over-4-1", "i2v", "failed", "crop the part you want", {"image": "file:401.png"}
    ),
    Row("image-4-1", "i2v", "succeeded", f"cover {TINY_W}x{TINY_H}", {"image": "file:400.png"}),
]


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height, with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _picture(width: int, height: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((width, height)).convert("RGB").save(buffer, fmt)
    return buffer.getvalue()


def _write_images(folder: Path) -> Path:
    png, jpeg = _picture(120, 90, "PNG"), _picture(120, 90, "JPEG")
    files = {
        "photo.jpg": jpeg,
        "zero.png": b"",
        "cut.png": png[: len(png) // 2],
        "cut.jpg": jpeg[: len(jpeg) // 2],
        "notes.txt": b"a text file, not a picture\n",
        "bomb.png": _png_header_only(100_000, 100_000),
        "72mp.png": _png_header_only(9000, 8000),
        "pano.png": _picture(2000, 20, "PNG"),
        "tower.png": _picture(20, 2000, "PNG"),
        "401.png": _picture(401, 100, "PNG"),
        "400.png": _picture(400, 100, "PNG"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    server = FileServer(_write_images(tmp_path_factory.mktemp("images")))
    yield server
    server.stop()


def _start(start_server, tmp_path_factory, predictor: str, variant: str, tiny: str):
    # A temp folder of its own, to see what the worker leaves behind.
    tmp = tmp_path_factory.mktemp(f"tmp-{predictor}")
    bounds = {"COGVIDEOX_INPUT_MAX_SIZE": INPUT_MAX_SIZE, "COGVIDEOX_INPUT_TIMEOUT": INPUT_TIMEOUT}
    server = start_server(f"predict_{predictor}.py", variant, tiny, TMPDIR=str(tmp), **bounds)
    server.tmp = tmp
    server.worker = server.worker_pid()
    return server


@pytest.fixture(scope="module")
def t2v(start_server, tmp_path_factory):
    return _start(start_server, tmp_path_factory, "t2v", "cogvideox-5b", "1.0-t2v")


@pytest.fixture(scope="module")
def i2v(start_server, tmp_path_factory, images):
    server = _start(start_server, tmp_path_factory, "i2v", "cogvideox-5b-i2v", "1.0-i2v")
    # One prediction first, so the descriptors counted after it are the steady state.
    response = server.predict({**BASE["i2v"], "image": images.url("photo.jpg")})
    assert response["status"] == "succeeded", response.get("error")
    server.fds = fd_count(server.worker)
    return server


def _body(row: Row, images: FileServer) -> dict[str, Any]:
    inputs = {**BASE[row.predictor], **row.inputs}
    inputs = {name: value for name, value in inputs.items() if value is not DROP}
    image = inputs.get("image")
    if isinstance(image, str) and image.startswith("file:"):
        inputs["image"] = images.url(image.removeprefix("file:"))
    elif isinstance(image, str) and image.startswith("local:"):
        inputs["image"] = str(images.directory / image.removeprefix("local:"))
    elif isinstance(image, str) and image.startswith("file-url:"):
        inputs["image"] = (images.directory / image.removeprefix("file-url:")).as_uri()
    elif isinstance(image, str) and image.startswith("closed-port:"):
        inputs["image"] = f"http://127.0.0.1:{free_port()}/{image.removeprefix('closed-port:')}"
    elif isinstance(image, str) and image.startswith("data:cut"):
        data = (images.directory / image.removeprefix("data:")).read_bytes()
        inputs["image"] = data_uri(data, "image/jpeg")
    return {"id": f"bad-{row.id}-{uuid.uuid4().hex[:6]}", "input": inputs}


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input(row, request, images):
    server = request.getfixturevalue(row.predictor)
    body = _body(row, images)
    response = server.send(body=body, raw=row.raw)  # raw, when given, is sent instead

    if row.outcome == 400:
        assert response.status_code == 400
        assert row.says in response.text
    elif row.outcome == 422:
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert row.says in " ".join(item["msg"] for item in detail)
        named = {item["loc"][-1] for item in detail}
        assert named == {next(iter(row.inputs))}, detail  # it names the input to change
    else:
        assert response.status_code == 200, response.text
        result = response.json()
        logs = result.get("logs") or ""
        assert result["status"] == row.outcome, result.get("error")
        if row.outcome == "failed":
            assert row.says in result["error"]
            # Refused before heavy work: no denoising step ran, nothing was generated. A failed
            # prediction answers with empty logs: the server's log has what it logged.
            logged = server.prediction_log(body["id"])
            assert "generating " not in logged and "step 1/" not in logged
            assert "seed" not in (result.get("metrics") or {})  # recorded as the denoise starts
        elif row.where == "server log":
            assert row.says.format(id=body["id"]) in server.log_text()
        else:
            assert row.says in logs
            assert "step 1/1" in logs
    server.wait_idle(timeout=30)
    assert server.status() == "READY"
    assert server.worker_pid() == server.worker  # the same worker: nothing crashed


def test_the_table_covers_both_predictors_and_every_outcome():
    assert len(ROWS) >= 30
    assert {row.predictor for row in ROWS} == {"t2v", "i2v"}
    assert {row.outcome for row in ROWS} == {400, 422, "failed", "succeeded"}
    assert len({row.id for row in ROWS}) == len(ROWS)


def test_a_misspelt_input_is_dropped_and_its_default_used(t2v, tmp_path):
    inputs = {name: value for name, value in BASE["t2v"].items() if name != "num_frames"}
    response = t2v.predict({**inputs, "num_frame": 17})
    video = save_data_uri(response["output"], tmp_path / "video.mp4")
    assert probe_mp4(video)["frames"] == 49  # the default: num_frame=17 never arrived


@pytest.fixture(scope="module")
def sender():
    peer = EndlessSender(rate=64)
    yield peer
    peer.close()


def _refused_in_time(i2v, url: str, says: str, within: float) -> dict[str, Any]:
    started = time.monotonic()
    result = i2v.predict({**BASE["i2v"], "image": url})
    elapsed = time.monotonic() - started
    assert result["status"] == "failed" and says in result["error"], result.get("error")
    assert "generating " not in i2v.prediction_log(result["id"])
    assert elapsed < within, elapsed
    i2v.wait_idle(timeout=30)
    assert i2v.worker_pid() == i2v.worker
    return result


def test_an_endless_image_url_is_cut_at_the_size_cap(i2v, sender):
    """Cog's own download of a Path input read such a URL to 4 GiB before run() was called."""
    _refused_in_time(i2v, sender.url("/endless"), "over the 8.4 MB limit", 30)
    assert sender.wait_hung_up("/endless", timeout=10)  # the connection was closed
    # What was sent: the cap plus what the sockets' buffers took, not gigabytes.
    assert sender.sent["/endless"] < 8.4e6 + (32 << 20)


def test_a_trickling_image_url_is_cut_at_the_deadline(i2v, sender):
    """64 bytes a second: Cog's download of a Path input waited for as long as it lasted."""
    started = time.monotonic()
    _refused_in_time(i2v, sender.url("/trickle"), f"took longer than {INPUT_TIMEOUT} s", 20)
    assert time.monotonic() - started >= float(INPUT_TIMEOUT)
    assert sender.wait_hung_up("/trickle", timeout=10)


def test_a_large_data_uri_is_refused_at_the_size_cap(i2v):
    uri = data_uri(b"\0" * (9 << 20), "image/png")
    _refused_in_time(i2v, uri, "over the 8.4 MB limit (COGVIDEOX_INPUT_MAX_SIZE)", 30)


def test_refused_images_leave_no_descriptors_or_files_behind(i2v):
    """Runs after the table (file order): about twenty images went through this worker."""
    assert fd_count(i2v.worker) <= i2v.fds + 2
    left = sorted(i2v.tmp.iterdir())
    outputs = [path for path in left if path.name.startswith("cogvideox-")]
    assert len(outputs) <= 1  # only the latest prediction's output folder is kept
    # Every downloaded image is deleted with its prediction, refused or not.
    assert [path for path in left if path not in outputs] == []


def test_text_to_video_keeps_one_output_folder(t2v):
    for _ in range(3):
        assert t2v.predict(BASE["t2v"])["status"] == "succeeded"
    assert [path.name.startswith("cogvideox-") for path in t2v.tmp.iterdir()] == [True]


@pytest.mark.parametrize(
    ("size", "allowed"),
    [((400, 100), True), ((100, 400), True), ((401, 100), False), ((100, 401), False)],
)
def test_aspect_ratio_limit_is_4_to_1_either_way(tmp_path, size, allowed):
    path = tmp_path / "image.png"
    Image.new("RGB", size, (10, 20, 30)).save(path)
    assert MAX_ASPECT_RATIO == 4.0
    if allowed:
        assert open_image(path).size == size
    else:
        with pytest.raises(InputError, match=r"4\.0:1|4 times the shorter"):
            open_image(path)
