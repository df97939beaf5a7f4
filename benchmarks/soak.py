"""Soak: many sequential predictions through the real Cog HTTP server on the tiny model.

Starts `python -m cog.server.http` on a tiny random CogVideoX-5B (1.0) with the schema a built
image has, then sends a fixed, seeded mix of requests one after the other. After every
request it checks the response, the server's health, the worker process (same pid, resident
memory, open descriptors, threads, child processes) and what is left on disk: the worker runs
with a TMPDIR of its own, so every file our predictor or cog writes there is accounted for,
and coglet's fixed `/tmp/coglet/predictions/<id>` folders are counted for this run's ids.

`--mix basic` (the default) is the original mix on text-to-video: valid requests with varied
inputs (frames, steps, guidance, dynamic CFG, fps, seeds, negative and over-long prompts),
invalid ones (422 from the schema, failed predictions from the frame and prompt rules) and
async ones that are canceled mid-run.

`--mix full` adds the newer features on a deployment that enables all of them: LoRAs from a
loopback file server (four, switched between requests, at several scales, in a cache bounded
to about two of them so they are evicted and fetched again; a 404, a damaged file and a
pickle among the failures), `speed_mode` fast and faster, `upscale` and `interpolate` (tiny
random Real-ESRGAN and RIFE fetched at setup), `enhance_prompt` against a chat-completions
server on 127.0.0.1 (which also fails on purpose: HTTP 500, a body that is not JSON), more
invalid inputs, cancels during denoising with a LoRA and during post-processing, and every
20th request a fixed seeded probe (alternately the base model and a LoRA at speed_mode fast)
whose frames must equal the first probe's of its kind. It also checks after every request
that the LoRA cache stays within its bound with no download left in it, and that no
`cogvideox-input-*` folder remains.

`--task i2v` and `--task v2v` soak the image-to-video and video-to-video predictors: every
request carries its image or clip, as a data URI or as a URL on the loopback file server, and
the invalid ones include inputs that are not an image or a video, a URL that answers 404 and
damaged data.

Not part of the test suite (a few minutes to a quarter of an hour on two cores):

    .venv/bin/python benchmarks/soak.py --out benchmarks/results/soak
    .venv/bin/python benchmarks/soak.py --mix full --out benchmarks/results/soak --label full
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import versions  # noqa: E402
from cogvideox_cog.devtools.openapi import SCHEMA_PATH, write_schema  # noqa: E402
from cogvideox_cog.devtools.tiny import TINY, save_tiny_weights  # noqa: E402
from cogvideox_cog.media.mp4 import probe_mp4  # noqa: E402
from tests.cog_server import (  # noqa: E402
    CogServer,
    WebhookReceiver,
    data_uri,
    decode_data_uri,
    fd_count,
    rss_bytes,
)

MIB = 2**20
COGLET_PREDICTIONS = Path("/tmp/coglet/predictions")
# The worker's RSS moves up and down by ~100-200 MiB from one request to the next: glibc keeps
# freed blocks of the video-sized buffers, which differ with the frame count. A leak shows as
# a trend, so the bound is on the median of the last WINDOW requests against the median of
# the WINDOW after the warm-up, with a looser ceiling on any single sample. A run too short for
# two windows of WINDOW compares two halves of what follows the warm-up: windows that overlap
# compare samples with themselves (70 requests: both are the same 50, the trend always 0).
WARM_UP = 20  # requests before the memory baseline: pools grow for each new shape
WINDOW = 50
TREND_BOUND_MIB = 64
CEILING_MIB = 256
FD_SLACK = 2
# Threads the worker has after the warm-up, give or take. The bound is on the late window's
# median, not on every sample: a request refused in milliseconds can be answered while the
# threads it started (a video decoder's pool) are still exiting, 34-50 of them in one sample
# and gone by the next. A leak raises the floor.
THREAD_SLACK = 2
PROMPTS = [
    "a panda plays an acoustic guitar in a sunlit bamboo forest",
    "a red boat on a calm lake at sunrise, mountains behind",
    "a small robot walks through a quiet city street at night",
    "waves roll onto a golden beach under white clouds",
]
LONG_PROMPT = " ".join(PROMPTS * 12)  # far over 226 tokens
OUTPUT_PREFIX = "cogvideox-output-"  # generator.OUTPUT_PREFIX
INPUT_PREFIX = "cogvideox-input-"  # media/fetch.INPUT_PREFIX
LORAS = ("a", "b", "sat", "run")  # the LoRAs served in the full mix (see Peers)
LORA_SCALES = (0.25, 0.5, 1.0, 1.5)
CLIP_FRAMES, CLIP_FPS = 50, 8  # the v2v clip: 6.2 s, long enough for 49 frames


@dataclass(frozen=True)
class Task:
    predictor: str
    variant: str
    tiny: tuple[str, str]  # the tiny weights: (family, task)
    media: str | None  # the image or video input's name


TASKS = {
    "t2v": Task("predict_t2v.py", "cogvideox-5b", ("1.0", "t2v"), None),
    "i2v": Task("predict_i2v.py", "cogvideox-5b-i2v", ("1.0", "i2v"), "image"),
    "v2v": Task("predict_v2v.py", "cogvideox-5b", ("1.0", "t2v"), "video"),
}


def command_line() -> str:
    return shlex.join([".venv/bin/python", "benchmarks/soak.py", *sys.argv[1:]])


# The requests -------------------------------------------------------------------------------


def plan(count: int, rng: random.Random) -> list[dict]:
    """The basic mix, in order: mostly valid, every 13th invalid, every 17th canceled."""
    invalid = [
        ({"num_inference_steps": 0}, 422, "less than the minimum of 1"),
        ({"guidance_scale": 50.0}, 422, "greater than the maximum of 20"),
        ({"prompt": 123}, 422, 'not of type "string"'),
        ({"num_frames": 20}, "failed", "one of 9, 17, 25, 33, 41, 49"),
        ({"prompt": "   "}, "failed", "prompt is empty"),
        ({"num_frames": 57}, "failed", "num_frames=57 is not supported"),
    ]
    steps = []
    for index in range(count):
        if index % 17 == 16:
            steps.append({"kind": "cancel"})
            continue
        inputs = base_inputs(rng)
        if index % 13 == 12:
            change, outcome, says = invalid[(index // 13) % len(invalid)]
            steps.append(
                {
                    "kind": "invalid",
                    "inputs": {**inputs, **change},
                    "outcome": outcome,
                    "says": says,
                }
            )
        else:
            steps.append({"kind": "valid", "inputs": inputs})
    return steps


def base_inputs(rng: random.Random) -> dict:
    """The basic mix's varied inputs for one request."""
    inputs = {
        "prompt": rng.choice(PROMPTS),
        "num_frames": rng.choice([9, 17, 25]),
        "num_inference_steps": rng.choice([1, 2, 3]),
        "guidance_scale": round(rng.uniform(1.0, 10.0), 2),
    }
    if rng.random() < 0.5:
        inputs["seed"] = rng.randrange(2**32)
    if rng.random() < 0.3:
        inputs["use_dynamic_cfg"] = rng.choice([True, False])
    if rng.random() < 0.3:
        inputs["fps"] = rng.choice([8, 12, 24])
    if rng.random() < 0.2:
        inputs["negative_prompt"] = "blurry, low quality"
    if rng.random() < 0.05:
        inputs["prompt"] = LONG_PROMPT
    return inputs


# Probes: the same seeded request again and again; its frames must not change over the run.
PROBE = {"prompt": PROMPTS[0], "num_frames": 9, "num_inference_steps": 2, "seed": 1234}
PROBE_LORA = {"lora_url": "a", "lora_scale": 0.8, "speed_mode": "fast"}


def invalid_full(task: str) -> list[tuple[dict, int | str, str, str | None]]:
    """(change, 422 or "failed", what the answer says, the chat server's fault) for the full
    mix; "lora:NAME" and "media:NAME" values name a served file (see Peers.resolve). The
    image and video tasks take fewer of the common cases (text-to-video has them all), their
    own first and in turn with the others, so a run of 70 requests sends every one."""
    common = [
        ({"num_inference_steps": 0}, 422, "less than the minimum of 1", None),
        ({"guidance_scale": 50.0}, 422, "greater than the maximum of 20", None),
        ({"prompt": 123}, 422, 'not of type "string"', None),
        ({"num_frames": 20}, "failed", "one of 9, 17, 25, 33, 41, 49", None),
        ({"num_frames": 57}, "failed", "num_frames=57 is not supported", None),
        ({"lora_url": "lora:missing"}, "failed", "404", None),
        ({"lora_url": "lora:damaged"}, "failed", "is not a valid safetensors file", None),
        ({"lora_url": "lora:pickle"}, "failed", "PyTorch pickle", None),
        ({"lora_scale": 5.0}, 422, "greater than the maximum of 3", None),
        ({"speed_mode": "fastest"}, 422, "fastest", None),
        ({"upscale": "3x"}, 422, "3x", None),
        ({"enhance_prompt": True}, "failed", "answered HTTP 500", "500"),
        ({"enhance_prompt": True}, "failed", "something other than JSON", "garbage"),
        ({"prompt": "   "}, "failed", "prompt is empty", None),
    ]
    if task == "t2v":
        return common
    bare = "is not an http(s) URL or a data: URI"
    if task == "i2v":
        own = [
            ({"image": "media:text"}, "failed", "JPEG, PNG", None),
            ({"image": "media:missing.png"}, "failed", "404", None),
            ({"image": "media:damaged-base64"}, "failed", "base64 data is damaged", None),
            ({"image": "media:bare-path"}, "failed", bare, None),
        ]
    else:
        own = [
            ({"video": "media:text"}, "failed", "mp4, webm, mov or gif", None),
            ({"video": "media:missing.mp4"}, "failed", "404", None),
            ({"video": "media:short"}, "failed", "too short", None),
            ({"video": "media:bare-path"}, "failed", bare, None),
        ]
    # Not the empty prompt (image-to-video takes one); the other cases run in the t2v mix.
    others = [common[i] for i in (5, 6, 11, 3, 0)]
    return [case for pair in zip(own, others, strict=False) for case in pair] + others[len(own) :]


def plan_full(count: int, rng: random.Random, task: str) -> list[dict]:
    """The full mix, in order: every 17th canceled (three ways in turn), every 20th a probe
    (base and LoRA in turn), every 7th invalid (the cases in turn), the rest valid with
    features drawn at random."""
    invalid = invalid_full(task)
    steps: list[dict] = []
    cancels = probes = invalids = 0
    for index in range(count):
        if index % 17 == 16:
            steps.append(
                {"kind": "cancel", "variant": ("plain", "lora", "postprocess")[cancels % 3]}
            )
            cancels += 1
            continue
        if index % 20 == 5:
            kind = ("probe-base", "probe-lora")[probes % 2]
            inputs = {**PROBE, **(PROBE_LORA if kind == "probe-lora" else {})}
            steps.append(
                {"kind": "probe", "probe": kind, "inputs": with_media(inputs, task, "data")}
            )
            probes += 1
            continue
        inputs = with_media(base_inputs(rng), task, rng.choice(["data", "url"]), rng)
        if index % 7 == 6:
            change, outcome, says, fault = invalid[invalids % len(invalid)]
            invalids += 1
            step = {"kind": "invalid", "inputs": {**inputs, **change}, "outcome": outcome}
            steps.append({**step, "says": says, "fault": fault})
            continue
        if rng.random() < 0.4:
            inputs["lora_url"] = rng.choice(LORAS)
            inputs["lora_scale"] = rng.choice(LORA_SCALES)
        if rng.random() < 0.3:
            inputs["speed_mode"] = rng.choice(["fast", "faster"])
        if rng.random() < 0.2:
            inputs["upscale"] = rng.choice(["2x", "4x"])
        if rng.random() < 0.2:
            inputs["interpolate"] = rng.choice(["2x", "4x"])
        if rng.random() < 0.15 and inputs["prompt"] != LONG_PROMPT:
            inputs["enhance_prompt"] = True
        if "upscale" in inputs or "interpolate" in inputs:
            inputs["num_frames"] = 9  # post-processing 25 frames 4x takes half a minute here
        steps.append({"kind": "valid", "inputs": inputs})
    return steps


def with_media(inputs: dict, task: str, how: str, rng: random.Random | None = None) -> dict:
    """`inputs` with the task's image or clip (a served file, as a data URI or a URL)."""
    media = TASKS[task].media
    if media is None:
        return inputs
    inputs = {**inputs, media: f"media:{how}"}
    if task == "v2v":
        # At least one denoising step: int(steps * strength) >= 1.
        strength = rng.choice([0.5, 0.7, 1.0]) if rng else 1.0
        inputs["strength"] = 1.0 if inputs["num_inference_steps"] * strength < 1 else strength
    return inputs


# The peers: a file server for LoRAs, inputs and post-processing weights, a chat server -------


class Peers:
    """What the full mix and the image or video tasks need besides the Cog server: the files
    on a loopback HTTP server, and a chat-completions endpoint that answers or fails."""

    def __init__(self, root: Path, task: str, transformer: Path):
        from cogvideox_cog.devtools.tiny_postprocess import save_tiny_realesrgan, save_tiny_rife
        from tests.chat_server import ChatServer
        from tests.file_server import FileServer
        from tests.lora_files import lora_tensors, save_diffusers_lora, save_sat_lora

        self.task, self.root = task, root
        save_tiny_rife(root / "rife.pkl")
        save_tiny_realesrgan(root / "realesrgan.pth")
        loras = root / "loras"
        save_diffusers_lora(lora_tensors(transformer, 4, seed=1), loras / "a")
        save_diffusers_lora(lora_tensors(transformer, 4, seed=2), loras / "b", alpha=8)
        save_sat_lora(lora_tensors(transformer, 4, seed=3), loras / "sat")
        run = root / "run" / "output"
        save_diffusers_lora(lora_tensors(transformer, 4, seed=4), run)
        with tarfile.open(loras / "run.tar", "w") as archive:
            archive.add(run, arcname="output")
        shutil.rmtree(root / "run")
        good = (loras / "a" / "pytorch_lora_weights.safetensors").read_bytes()
        (loras / "damaged").mkdir()
        (loras / "damaged" / "pytorch_lora_weights.safetensors").write_bytes(good[: len(good) // 2])
        self.lora_bytes = len(good)  # all four are rank 4 of the same layers
        self.files = FileServer(root)
        self.media = self._media(root / "media")
        self.chat = ChatServer(delay=3.0)

    def _media(self, folder: Path) -> dict[str, str]:
        """The task's image or video inputs by name, as sent: "data" and "url" are the good
        one; a name not here is a file name on the file server (missing: 404)."""
        folder.mkdir()
        if self.task == "i2v":
            (folder / "photo.jpg").write_bytes(_photo(120, 90, "JPEG"))
            return {
                "data": data_uri(_photo(90, 60, "PNG"), "image/png"),
                "url": self.files.url("media/photo.jpg"),
                "text": data_uri(b"just some text", "text/plain"),
                "damaged-base64": "data:image/png;base64,A",
                "bare-path": str(folder / "photo.jpg"),
            }
        if self.task == "v2v":
            from cogvideox_cog.media.mp4 import encode_mp4

            clip = encode_mp4(_moving(CLIP_FRAMES), folder / "clip.mp4", fps=CLIP_FPS)
            short = encode_mp4(_moving(10), folder / "short.mp4", fps=CLIP_FPS)
            return {
                "data": data_uri(clip.read_bytes(), "video/mp4"),
                "url": self.files.url("media/clip.mp4"),
                "short": data_uri(short.read_bytes(), "video/mp4"),
                "text": data_uri(b"just some text", "text/plain"),
                "bare-path": str(clip),
            }
        return {}

    def resolve(self, inputs: dict) -> dict:
        """The planned inputs with served files' names replaced by their URLs or data."""
        out = dict(inputs)
        for key, value in inputs.items():
            if not isinstance(value, str):
                continue
            if key == "lora_url":
                name = value.removeprefix("lora:")
                path = {
                    "run": "run.tar",
                    "pickle": "output/adapter_model.bin",
                }.get(name, f"{name}/pytorch_lora_weights.safetensors")
                out[key] = self.files.url(f"loras/{path}")
            elif value.startswith("media:"):
                name = value.removeprefix("media:")
                out[key] = self.media.get(name) or self.files.url(f"media/{name}")
        return out

    def env(self, lora_dir: Path, lora_cache_bytes: int) -> dict[str, str]:
        """The deployment: every optional step enabled, LoRAs in a small cache."""
        return {
            "COGVIDEOX_UPSCALE": "1",
            "COGVIDEOX_UPSCALE_URL": self.files.url("realesrgan.pth"),
            "COGVIDEOX_INTERPOLATE": "1",
            "COGVIDEOX_INTERPOLATE_URL": self.files.url("rife.pkl"),
            "COGVIDEOX_ENHANCE_PROMPT": "openai",
            "COGVIDEOX_ENHANCE_BASE_URL": self.chat.base_url,
            "COGVIDEOX_ENHANCE_MODEL": "writer-1",
            "COGVIDEOX_ENHANCE_TIMEOUT": "5",
            "COGVIDEOX_LORA_DIR": str(lora_dir),
            "COGVIDEOX_LORA_CACHE_SIZE": str(lora_cache_bytes),
        }

    def close(self) -> None:
        self.files.stop()
        self.chat.close()


def _photo(width: int, height: int, fmt: str) -> bytes:
    from PIL import Image

    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _moving(frames: int):
    """A 96x64 clip (not the model's shape) of a gradient that moves: small as an mp4."""
    import numpy as np

    x = np.arange(96)[None, :, None]
    y = np.arange(64)[:, None, None]
    channels = np.array([1, 2, 3])[None, None, :]
    return np.stack(
        [((x * 3 + y * 2 + t * 9) * channels % 256).astype(np.uint8) for t in range(frames)]
    )


# Checking the answers -----------------------------------------------------------------------


def frames_of(data: bytes):
    """The decoded RGB frames of an mp4."""
    import av
    import numpy as np

    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def check_valid(response, inputs: dict, spec=TINY[("1.0", "t2v")]) -> str | None:
    """None if the response is a correct video for `inputs`, else what is wrong."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    result = response.json()
    if result.get("status") != "succeeded":
        return f"status {result.get('status')}: {result.get('error')}"
    mime, data = decode_data_uri(result["output"])
    with tempfile.NamedTemporaryFile(suffix=".mp4") as video:
        video.write(data)
        video.flush()
        info = probe_mp4(video.name)
    times = {"none": 1, "2x": 2, "4x": 4}
    up, between = times[inputs.get("upscale", "none")], times[inputs.get("interpolate", "none")]
    expected = {
        "mime": "video/mp4",
        "codec": "h264",
        "frames": (inputs["num_frames"] - 1) * between + 1,
        "fps": inputs.get("fps", 8) * between,
        "size": (spec.width * up, spec.height * up),
    }
    got = {
        "mime": mime,
        "codec": info["codec"],
        "frames": info["frames"],
        "fps": info["fps"],
        "size": (info["width"], info["height"]),
    }
    if got != expected:
        return f"video {got} != {expected}"
    if "seed" in inputs and result["metrics"].get("seed") != inputs["seed"]:
        return f"seed {result['metrics'].get('seed')} != {inputs['seed']}"
    logs = result.get("logs") or ""
    if inputs["prompt"] == LONG_PROMPT and "this part is ignored" not in logs:
        return "over-long prompt without a truncation log line"
    return check_features(result, inputs, logs)


def check_features(result: dict, inputs: dict, logs: str) -> str | None:
    """The newer inputs' marks on a succeeded prediction: the LoRA and its scale, the speed
    mode, the rewritten prompt, each post-processing step, the strength."""
    if inputs.get("lora_url"):
        applied = f"lora: scale applied = lora_scale {inputs.get('lora_scale', 1.0):g} x"
        if applied not in logs:
            return f"no {applied!r} in the logs"
    elif "lora: scale applied" in logs:
        return "a LoRA applied to a request without one"
    mode = inputs.get("speed_mode", "default")
    if (f"speed_mode {mode}:" in logs) != (mode != "default"):
        return f"speed_mode {mode} not logged as asked"
    if inputs.get("enhance_prompt"):
        from tests.chat_server import rewrite_of

        if result["metrics"].get("enhanced_prompt") != rewrite_of(inputs["prompt"]):
            return f"enhanced_prompt {result['metrics'].get('enhanced_prompt')!r}"
    elif "enhanced_prompt" in result["metrics"]:
        return "a prompt rewritten without enhance_prompt"
    for step in ("upscale", "interpolate"):
        wanted = inputs.get(step, "none") != "none"
        if wanted != (f"{step}_seconds" in result["metrics"]):
            return f"{step}={inputs.get(step, 'none')} but metrics {sorted(result['metrics'])}"
    if "strength" in inputs and f"strength {inputs['strength']:g}: denoised" not in logs:
        return f"no 'strength {inputs['strength']:g}' in the logs"
    return None


def check_invalid(response, step: dict) -> str | None:
    outcome, says = step["outcome"], step["says"]
    if outcome == 422:
        messages = response.json().get("detail", []) if response.status_code == 422 else []
        if says not in " ".join(item.get("msg", "") for item in messages):
            return f"expected 422 with {says!r}, got {response.status_code}: {response.text[:200]}"
        return None
    result = response.json() if response.status_code == 200 else {}
    if result.get("status") != "failed" or says not in (result.get("error") or ""):
        return f"expected failed with {says!r}, got {response.status_code}: {response.text[:200]}"
    if "step 1/" in (result.get("logs") or ""):
        return "refused only after denoising started"
    return None


CANCELS = {
    # what is sent (beside the prompt and frames), and the log line to cancel after
    "plain": ({"num_inference_steps": 500}, "step 2/500"),
    "lora": (
        {"num_inference_steps": 500, "lora_url": "lora:b", "speed_mode": "faster"},
        "step 2/500",
    ),
    "postprocess": (
        {"num_inference_steps": 2, "upscale": "4x", "interpolate": "4x"},
        "interpolate 4x:",
    ),
}


def run_cancel(
    server: CogServer, hooks: WebhookReceiver, prediction_id: str, inputs: dict, after: str
) -> str | None:
    body = {"input": inputs, "webhook": hooks.url}
    started = server.put_async(prediction_id, body, busy_wait=10)
    if started.status_code != 202:
        return f"async start: HTTP {started.status_code}: {started.text[:200]}"
    hooks.wait_until(lambda: after in hooks.latest_logs(prediction_id), timeout=120)
    if not server.cancel(prediction_id):
        return "cancel answered 404"
    final = hooks.wait_for(prediction_id, timeout=120)
    if final["status"] != "canceled":
        return f"status {final['status']} after cancel"
    if "step 500/500" in final["logs"]:
        return "ran to the end"
    return None


# What is left behind ------------------------------------------------------------------------


def disk_state(tmpdir: Path, prefix: str, lora_dir: Path | None = None) -> dict:
    entries = list(tmpdir.iterdir())
    outputs = [p for p in entries if p.name.startswith(OUTPUT_PREFIX)]
    inputs = [p for p in entries if p.name.startswith(INPUT_PREFIX)]
    others = [p for p in entries if p not in outputs and p not in inputs]
    ours = [p for p in COGLET_PREDICTIONS.glob(f"{prefix}*")] if COGLET_PREDICTIONS.exists() else []
    coglet_files = [f for p in ours for f in p.rglob("*") if f.is_file()]
    state = {
        "output_dirs": len(outputs),
        "output_bytes": sum(f.stat().st_size for p in outputs for f in p.rglob("*") if f.is_file()),
        "input_dirs": len(inputs),
        "other_tmp_entries": sorted(p.name for p in others),
        "coglet_prediction_dirs": len(ours),
        "coglet_files": len(coglet_files),
        "coglet_bytes": sum(f.stat().st_size for f in coglet_files),
    }
    if lora_dir is not None:
        blobs = list((lora_dir / "blobs").glob("*")) if (lora_dir / "blobs").exists() else []
        partial = list((lora_dir / "partial").glob("*")) if (lora_dir / "partial").exists() else []
        state |= {
            "lora_blobs": len(blobs),
            "lora_cache_bytes": sum(p.stat().st_size for p in blobs)
            + sum(f.stat().st_size for p in partial for f in p.rglob("*") if f.is_file()),
            "lora_partial_entries": len(partial),
        }
    return state


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 2**20, 1),
        "gpu": None,
        "platform": platform.platform(),
        "versions": versions(("cog", "coglet", "torch", "diffusers", "transformers", "av")),
    }


# coglet's Rust runtime in the worker: tokio grows its pool of these under load, so their
# count rises over the first requests with the request rate. Counted apart from the others.
RUNTIME_THREAD = "tokio-rt-worker"


def thread_names(pid: int) -> list[str]:
    """The names of a process's threads (Linux /proc)."""
    names = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return names


def thread_count(pid: int) -> int:
    """Threads of a process, not counting coglet's runtime's (Linux /proc)."""
    return sum(name != RUNTIME_THREAD for name in thread_names(pid))


def runtime_thread_count(pid: int) -> int:
    return sum(name == RUNTIME_THREAD for name in thread_names(pid))


def child_count(pid: int) -> int:
    """Child processes of a process, alive or not yet reaped (Linux /proc: each thread lists
    the children it started)."""
    tasks = Path(f"/proc/{pid}/task")
    return sum(len((task / "children").read_text().split()) for task in tasks.iterdir())


def slope_mib_per_100(values: list[float]) -> float:
    """Least-squares slope of RSS (MiB) per 100 predictions."""
    xs = list(range(len(values)))
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(values)
    num = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, values, strict=True))
    den = sum((x - mean_x) ** 2 for x in xs)
    return 100 * num / den if den else 0.0


# The run ------------------------------------------------------------------------------------


@dataclass
class Soak:
    """One run's server, its peers and what it keeps between requests."""

    args: argparse.Namespace
    task: Task
    server: CogServer
    hooks: WebhookReceiver
    tmpdir: Path
    prefix: str
    peers: Peers | None = None
    lora_dir: Path | None = None
    lora_bound: int = 0

    probes: dict = field(default_factory=dict)  # the first frames of each probe kind
    probe_log: list[dict] = field(default_factory=list)

    def resolve(self, inputs: dict) -> dict:
        return self.peers.resolve(inputs) if self.peers else inputs


def soak(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    prefix = f"soak-{uuid.uuid4().hex[:8]}-"
    task = TASKS[args.task]
    peers = None
    try:
        weights = save_tiny_weights(work / "weights-src", *task.tiny)
        tmpdir = work / "tmp"
        tmpdir.mkdir()
        env = {}
        lora_dir, lora_bound = None, 0
        if args.mix == "full":
            served = work / "served"
            served.mkdir()
            peers = Peers(served, args.task, weights / "transformer")
        if args.mix == "full":
            lora_dir = work / "loras"
            # Room for two of the four LoRAs and a half: switching between them evicts.
            lora_bound = int(peers.lora_bytes * 2.5)
            env = peers.env(lora_dir, lora_bound)
        predictor = f"{ROOT / task.predictor}:Predictor"
        write_schema(predictor, work / SCHEMA_PATH)
        server = CogServer(
            predictor,
            cwd=work,
            log_path=work / "server.log",
            env={
                "PYTHONPATH": str(ROOT),
                "COGVIDEOX_MODEL": task.variant,
                "COGVIDEOX_WEIGHTS_URL": str(weights),
                "COGVIDEOX_WEIGHTS_DIR": str(work / "cache"),
                "TMPDIR": str(tmpdir),
                **env,
                **dict(item.split("=", 1) for item in args.worker_env),
            },
        )
        with WebhookReceiver() as hooks, server:
            run = Soak(args, task, server, hooks, tmpdir, prefix, peers, lora_dir, lora_bound)
            try:
                return drive(run)
            finally:
                if args.keep_log:
                    shutil.copy(work / "server.log", args.keep_log)
    finally:
        if peers is not None:
            peers.close()
        shutil.rmtree(work, ignore_errors=True)
        for path in COGLET_PREDICTIONS.glob(f"{prefix}*"):
            shutil.rmtree(path, ignore_errors=True)


def drive(run: Soak) -> dict:
    """The planned requests one after the other, each followed by a look at the worker."""
    args, server = run.args, run.server
    worker = server.worker_pid()
    rng = random.Random(args.seed)
    if args.mix == "full":
        steps = plan_full(args.predictions, rng, args.task)
    else:
        steps = plan(args.predictions, rng)
    samples, errors = [], []
    counts = {"valid": 0, "invalid": 0, "cancel": 0, "probe": 0}
    started = time.monotonic()
    stopped = None
    for index, step in enumerate(steps):
        prediction_id = f"{run.prefix}{index:03d}"
        began = time.monotonic()
        try:
            problem = send(run, step, prediction_id)
        except Exception as error:  # a timeout, a broken connection: recorded, not fatal
            problem = f"{type(error).__name__}: {error}"
        counts[step["kind"]] += 1
        try:
            server.wait_idle(timeout=60)
            afterwards, disk = check_after(run, worker)
            sample = {
                "index": index,
                "kind": step["kind"],
                "seconds": round(time.monotonic() - began, 3),
                "rss_mib": round(rss_bytes(worker) / MIB, 1),
                "fds": fd_count(worker),
                "threads": thread_count(worker),
                "runtime_threads": runtime_thread_count(worker),
                "children": child_count(worker),
                "output_dirs": disk["output_dirs"],
            }
        except (OSError, RuntimeError) as error:  # the worker died, or is stuck: the run ends
            stopped = f"after request {index}: {type(error).__name__}: {error}"
            errors.append({"index": index, "kind": step["kind"], "problem": problem or stopped})
            print(json.dumps({"index": index, "stopped": stopped, "problem": problem}), flush=True)
            break
        problem = problem or afterwards
        if args.mix == "full":
            sample["input_dirs"] = disk["input_dirs"]
        if run.lora_dir is not None:
            sample |= {
                "lora_cache_bytes": disk["lora_cache_bytes"],
                "lora_blobs": disk["lora_blobs"],
            }
        if args.mix == "full":
            sample["features"] = features_of(step)
        samples.append(sample)
        if problem:
            errors.append({"index": index, "kind": step["kind"], "problem": problem})
        if args.verbose or problem:
            print(json.dumps({**sample, "problem": problem}), flush=True)
        elif index % 20 == 19:
            print(f"{index + 1}/{len(steps)}: rss {sample['rss_mib']} MiB, fds {sample['fds']}")
    elapsed = time.monotonic() - started
    final = disk_state(run.tmpdir, run.prefix, run.lora_dir)
    return summarise(run, samples, errors, counts, elapsed, final, stopped)


def features_of(step: dict) -> list[str]:
    """Short names of what a request exercised, for the samples."""
    if step["kind"] == "cancel":
        return [f"cancel:{step.get('variant', 'plain')}"]
    inputs, names = step["inputs"], []
    if step["kind"] == "probe":
        names.append(step["probe"])
    for key in ("lora_url", "speed_mode", "upscale", "interpolate", "image", "video"):
        value = inputs.get(key)
        if isinstance(value, str) and value not in ("default", "none"):
            short = value.split(":", 1)[-1]
            scale = f"@{inputs.get('lora_scale', 1.0):g}" if key == "lora_url" else ""
            names.append(f"{key.removesuffix('_url')}={short}{scale}")
    if inputs.get("enhance_prompt"):
        names.append("enhance" + (f"!{step['fault']}" if step.get("fault") else ""))
    if step["kind"] == "invalid" and not names:
        names.append("rule")
    return names


def send(run: Soak, step: dict, prediction_id: str) -> str | None:
    """One planned request sent and its answer checked: None if it is right, else what is wrong."""
    server, spec = run.server, TINY[run.task.tiny]
    if step["kind"] == "cancel":
        change, after = CANCELS[step.get("variant", "plain")]
        inputs = with_media(
            {"prompt": PROMPTS[0], "num_frames": 49, **change}, run.args.task, "data"
        )
        return run_cancel(server, run.hooks, prediction_id, run.resolve(inputs), after)
    inputs = run.resolve(step["inputs"])
    if step.get("fault"):
        run.peers.chat.fault = step["fault"]
    try:
        response = server.send(body={"id": prediction_id, "input": inputs})
    finally:
        if run.peers is not None:
            run.peers.chat.fault = None
    if step["kind"] == "invalid":
        return check_invalid(response, step)
    problem = check_valid(response, inputs, spec)
    if problem or step["kind"] != "probe":
        return problem
    return check_probe(run, step["probe"], response, prediction_id)


def check_probe(run: Soak, kind: str, response, prediction_id: str) -> str | None:
    """The probe's frames against the first probe of its kind: they must be equal."""
    import numpy as np

    frames = frames_of(decode_data_uri(response.json()["output"])[1])
    first = run.probes.setdefault(kind, frames)
    same = first.shape == frames.shape and bool(np.array_equal(first, frames))
    diff = (
        float(np.abs(first.astype(np.int16) - frames.astype(np.int16)).max())
        if first.shape == frames.shape
        else None
    )
    run.probe_log.append({"id": prediction_id, "probe": kind, "identical": same, "max_diff": diff})
    if not same:
        return f"{kind}: frames differ from the first {kind} (max difference {diff})"
    return None


def check_after(run: Soak, worker: int):
    """After a request: the first thing wrong with the server, its worker process or what is
    left on disk (None if nothing), and the disk state."""
    problem = None
    health = run.server.status()
    if health != "READY":
        problem = f"server {health}"
    if run.server.worker_pid() != worker:
        problem = problem or "the worker process changed"
    disk = disk_state(run.tmpdir, run.prefix, run.lora_dir)
    if disk["output_dirs"] > 1 or disk["input_dirs"] or disk["other_tmp_entries"]:
        problem = problem or f"left on disk: {disk}"
    if run.lora_dir is not None and (
        disk["lora_cache_bytes"] > run.lora_bound or disk["lora_partial_entries"]
    ):
        problem = problem or f"LoRA cache over {run.lora_bound} bytes or not settled: {disk}"
    return problem, disk


def memory_figures(rss: list[float]) -> dict:
    """The worker's RSS: the trend after the warm-up (late window's median against the early
    one's), the ceiling any sample reached, and the least-squares slope."""
    settled = rss[WARM_UP:]
    window = min(WINDOW, len(settled) // 2)  # the two windows never overlap
    early = statistics.median(settled[:window])
    late = statistics.median(settled[-window:])
    return {
        "first_mib": rss[0],
        "warm_up_requests": WARM_UP,
        "window": window,
        "early_median_mib": early,
        "late_median_mib": late,
        "trend_mib": round(late - early, 1),
        "trend_bound_mib": TREND_BOUND_MIB,
        "min_after_warm_up_mib": min(settled),
        "max_after_warm_up_mib": max(settled),
        "ceiling_mib": round(max(settled) - early, 1),
        "ceiling_bound_mib": CEILING_MIB,
        "final_mib": rss[-1],
        "slope_mib_per_100_after_warm_up": round(slope_mib_per_100(settled), 2),
    }


def summarise(
    run: Soak, samples: list[dict], errors: list[dict], counts, elapsed, disk, stopped=None
) -> dict:
    """The result: memory, descriptors and disk over the run, and each check passed or not.
    `stopped`: why the run ended early (the worker died or stayed busy), if it did; the
    figures are then left out when too few requests ran for them."""
    args = run.args
    if stopped is not None and len(samples) < WARM_UP + 2:
        return {
            **_about(run, samples, counts, elapsed),
            "stopped": stopped,
            "disk_at_end": disk,
            **({"lora_cache": {"bound_bytes": run.lora_bound}} if run.lora_dir else {}),
            "checks": {"ran_every_request": False, "every_response_correct": not errors},
            "passed": False,
            "errors": errors,
            "samples": samples,
        }
    fds = [s["fds"] for s in samples]
    memory = memory_figures([s["rss_mib"] for s in samples])
    descriptors = {
        "first": fds[0],
        "after_warm_up": fds[WARM_UP],
        "min": min(fds),
        "max": max(fds),
        "final": fds[-1],
    }
    threads = [s["threads"] for s in samples]
    children = [s["children"] for s in samples]
    processes = {
        "threads_first": threads[0],
        "threads_after_warm_up": threads[WARM_UP],
        "threads_max": max(threads),
        "threads_late_median": statistics.median(threads[-memory["window"] :]),
        "threads_final": threads[-1],
        "children_max": max(children),
        "children_final": children[-1],
    }
    runtime = [s["runtime_threads"] for s in samples if "runtime_threads" in s]
    if runtime:
        processes |= {"runtime_threads_max": max(runtime), "runtime_threads_final": runtime[-1]}
    checks = {
        "every_response_correct": not errors,
        "rss_no_upward_trend": memory["trend_mib"] <= TREND_BOUND_MIB,
        "rss_under_ceiling": memory["ceiling_mib"] <= CEILING_MIB,
        "no_fd_leak": max(fds[WARM_UP:]) <= descriptors["after_warm_up"] + FD_SLACK,
        "no_thread_leak": processes["threads_late_median"] <= threads[WARM_UP] + THREAD_SLACK,
        # A process the worker started for one request (and a zombie it never reaped) is gone
        # once the request is: the worker starts none that outlives its request.
        "no_child_process_left_after_any_request": max(children) == 0,
        "at_most_one_output_dir_at_any_time": max(s["output_dirs"] for s in samples) <= 1,
        "no_other_temp_files": not disk["other_tmp_entries"],
        "no_files_in_coglet_prediction_dirs": disk["coglet_files"] == 0,
    }
    extra: dict = {}
    if args.mix == "full":
        checks["no_input_dirs_left_after_any_request"] = max(s["input_dirs"] for s in samples) == 0
    if run.lora_dir is not None:
        cache_max = max(s["lora_cache_bytes"] for s in samples)
        checks["lora_cache_within_bound"] = cache_max <= run.lora_bound
        loras = run.peers.files.requests
        extra["lora_cache"] = {
            "bound_bytes": run.lora_bound,
            "largest_lora_bytes": run.peers.lora_bytes,
            "max_bytes": cache_max,
            "max_blobs": max(s["lora_blobs"] for s in samples),
            "final_bytes": disk["lora_cache_bytes"],
            "lora_downloads": sum(1 for m, name, _ in loras if m == "GET" and "loras/" in name),
        }
        extra["chat_requests"] = len(run.peers.chat.requests)
    if run.probe_log:
        checks["probes_identical_all_run"] = all(p["identical"] for p in run.probe_log)
        if {"probe-base", "probe-lora"} <= set(run.probes):
            import numpy as np

            checks["lora_probe_differs_from_base"] = not np.array_equal(
                run.probes["probe-base"], run.probes["probe-lora"]
            )
        extra["probes"] = run.probe_log
    if args.mix == "full":
        extra["feature_counts"] = feature_counts(samples)
    if stopped is not None:
        checks["ran_every_request"] = False
        extra["stopped"] = stopped
    return {
        **_about(run, samples, counts, elapsed),
        "memory": memory,
        "descriptors": descriptors,
        "processes": processes,
        "disk_at_end": disk,
        **extra,
        "checks": checks,
        "passed": all(checks.values()),
        "errors": errors,
        "samples": samples,
    }


def _about(run: Soak, samples: list[dict], counts, elapsed) -> dict:
    """What ran, where and how long: the result's opening fields."""
    spec, seconds = TINY[run.task.tiny], [s["seconds"] for s in samples]
    return {
        "command": command_line(),
        "machine": machine(),
        "model": f"tiny random CogVideoX-5B ({' '.join(run.task.tiny)}), "
        f"{spec.height}x{spec.width}, float32 on CPU",
        "task": run.args.task,
        "mix": run.args.mix,
        "worker_env": run.args.worker_env,
        "predictions": len(samples),
        "counts": {k: v for k, v in counts.items() if v or k != "probe"},
        "seconds": round(elapsed, 1),
        "seconds_per_request_median": round(statistics.median(seconds), 3) if seconds else None,
    }


def feature_counts(samples: list[dict]) -> dict[str, int]:
    """How many requests exercised each feature (LoRA names and scales merged by name)."""
    counts: dict[str, int] = {}
    for sample in samples:
        for name in sample.get("features", []):
            key = name.split("@")[0]
            key = f"{sample['kind']}:{key}" if sample["kind"] == "invalid" else key
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


# The report ---------------------------------------------------------------------------------


def worker_table(result: dict) -> str:
    """The worker's memory, descriptors and leftovers, as the rows of a Markdown table."""
    m, d, disk = result["memory"], result["descriptors"], result["disk_at_end"]
    rows = [
        ("RSS after the 1st request", f"{m['first_mib']} MiB"),
        (
            f"RSS median, requests {m['warm_up_requests'] + 1}-"
            f"{m['warm_up_requests'] + m['window']} / last {m['window']}",
            f"{m['early_median_mib']:.1f} / {m['late_median_mib']:.1f} MiB",
        ),
        (
            f"trend: late minus early median (bound {m['trend_bound_mib']} MiB)",
            f"{m['trend_mib']} MiB",
        ),
        (
            f"RSS min / max after the warm-up (max bound: early + {m['ceiling_bound_mib']} MiB)",
            f"{m['min_after_warm_up_mib']} / {m['max_after_warm_up_mib']} MiB",
        ),
        ("RSS final", f"{m['final_mib']} MiB"),
        (
            "least-squares slope after the warm-up",
            f"{m['slope_mib_per_100_after_warm_up']} MiB per 100",
        ),
        (
            "open descriptors first / after warm-up / max / final",
            f"{d['first']} / {d['after_warm_up']} / {d['max']} / {d['final']}",
        ),
    ]
    if "processes" in result:
        t = result["processes"]
        rows += [
            (
                "threads first / after warm-up / max / late median / final",
                f"{t['threads_first']} / {t['threads_after_warm_up']} / {t['threads_max']} / "
                f"{t['threads_late_median']} / {t['threads_final']}",
            ),
            (
                "child processes: most after any request / final",
                f"{t['children_max']} / {t['children_final']}",
            ),
        ]
        if "runtime_threads_max" in t:
            rows.append(
                (
                    "coglet's runtime threads (tokio's pool, not counted above): max / final",
                    f"{t['runtime_threads_max']} / {t['runtime_threads_final']}",
                )
            )
    rows += [
        (
            "output folders left (cogvideox-output-*)",
            f"{disk['output_dirs']} ({disk['output_bytes']} bytes: the last video)",
        ),
        ("other files left in the worker's TMPDIR", str(len(disk["other_tmp_entries"]))),
        (
            "coglet's /tmp/coglet/predictions/<id> folders",
            f"{disk['coglet_prediction_dirs']} (files in them: {disk['coglet_files']})",
        ),
    ]
    if result["mix"] == "full":
        rows.append(("input folders left (cogvideox-input-*)", str(disk["input_dirs"])))
    if "lora_cache" in result:
        cache = result["lora_cache"]
        rows += [
            (
                "LoRA cache: bound / largest at any time / final",
                f"{cache['bound_bytes']} / {cache['max_bytes']} / {cache['final_bytes']} bytes "
                f"(at most {cache['max_blobs']} LoRAs; each up to {cache['largest_lora_bytes']})",
            ),
            ("LoRA downloads (GETs to the file server)", str(cache["lora_downloads"])),
            ("requests to the chat endpoint", str(result["chat_requests"])),
        ]
    return "\n".join(f"| {name} | {value} |" for name, value in rows)


INVALID = {  # what invalid_full sends, in words
    "t2v": "the schema's 422s, the frame and prompt rules, a LoRA URL that answers 404, a "
    "damaged LoRA, a pickle LoRA, the chat endpoint answering 500 or not JSON",
    "i2v": "an image that is not one, an image URL that answers 404, damaged base64, a path on "
    "the server's disk, a LoRA URL that answers 404, a damaged LoRA, the chat endpoint "
    "answering 500, the frame rule and a 422 from the schema",
    "v2v": "a clip that is not a video, a clip URL that answers 404, a clip too short for the "
    "frames asked, a path on the server's disk, a LoRA URL that answers 404, a damaged LoRA, "
    "the chat endpoint answering 500, the frame rule and a 422 from the schema",
}


def what_ran(result: dict) -> str:
    """The Markdown report's opening: the command, the machine, the model and the requests."""
    env, counts = result["machine"], result["counts"]
    versions = env["versions"]
    opening = f"""# Soak: {result["predictions"]} sequential predictions through the Cog server

Command (from the repository root):

```bash
{result["command"]}
```

Worker environment added: {", ".join(result["worker_env"]) or "none"}.

Machine: {env["cpu"]}, **{env["cores"]} cores**, {env["memory_gib"]} GiB RAM, no GPU
({env["platform"]}; cog {versions["cog"]}, coglet {versions["coglet"]},
torch {versions["torch"]}, diffusers {versions["diffusers"]}).
Shared with other work while it ran, so the times are indicative only.
"""
    if result["mix"] == "basic":
        return (
            opening
            + f"""
Model: {result["model"]}. Requests, in a fixed seeded order: {counts["valid"]} valid
(9/17/25 frames, 1-3 steps, random guidance, dynamic CFG on/off, fps 8/12/24, fixed or random
seeds, negative prompts, a few prompts over the token limit), {counts["invalid"]} invalid
(422 from the schema, or failed by the frame and prompt rules) and {counts["cancel"]} async
ones (49 frames, 500 steps) canceled once their second step was logged. Every valid output
was decoded and checked (H.264, frame count, fps, size, seed); after every request the server
had to be READY with the same worker process."""
        )
    media = {"t2v": "", "i2v": "an image", "v2v": "a clip"}[result["task"]]
    carrying = (
        f" Every request carries {media}, as a data URI or as a URL on a loopback file server."
        if media
        else ""
    )
    features = ", ".join(f"{k} {v}" for k, v in result.get("feature_counts", {}).items())
    return (
        opening
        + f"""
Model: {result["model"]}, predictor `{result["task"]}`, on a deployment with upscale,
interpolate (tiny random Real-ESRGAN and RIFE fetched at setup), enhance_prompt (a
chat-completions server on 127.0.0.1) and a LoRA cache bounded to
{result["lora_cache"]["bound_bytes"]} bytes (two and a half of the four LoRAs served).{carrying}

Requests, in a fixed seeded order: {counts["valid"]} valid (the basic mix's inputs, plus at
random: one of four LoRAs at scale 0.25/0.5/1/1.5, speed_mode fast or faster, upscale 2x/4x,
interpolate 2x/4x, enhance_prompt), {counts["invalid"]} invalid ({INVALID[result["task"]]}),
{counts["cancel"]} canceled (in turn:
during denoising, during denoising with a LoRA at speed_mode faster, during interpolation
after a 4x upscale) and {counts.get("probe", 0)} probes: one fixed seeded request, alternately
on the base model and with a LoRA at speed_mode fast, whose frames must equal the first
probe's of the same kind. Every valid output was decoded and checked (H.264, frame count, fps
and size after upscale and interpolate, seed, the LoRA scale applied, the speed mode, the
rewritten prompt); after every request the server had to be READY with the same worker
process, no input folder left, and the LoRA cache within its bound with no download left in
it.

Requests by feature: {features}."""
    )


def markdown(result: dict) -> str:
    checks = "\n".join(
        f"| {name} | {'yes' if ok else '**NO**'} |" for name, ok in result["checks"].items()
    )
    errors = "\n".join(f"- #{e['index']} ({e['kind']}): {e['problem']}" for e in result["errors"])
    stopped = f"\n\n**The run stopped {result['stopped']}.**" if "stopped" in result else ""
    if "memory" not in result:
        return f"""{what_ran(result)}{stopped}

Too few requests ran for the worker's memory, descriptor and thread figures.

| check | passed |
|---|---|
{checks}

Errors:
{errors}
"""
    m = result["memory"]
    probes = ""
    if result.get("probes"):
        ids = ", ".join(
            f"{p['id'].rsplit('-', 1)[-1]} ({p['probe'].removeprefix('probe-')})"
            for p in result["probes"]
        )
        probes = f"\nProbes (request number and kind), every one identical to the first: {ids}.\n"
        if not result["checks"]["probes_identical_all_run"]:
            probes = f"\nProbes: {ids}; see the errors.\n"
    if m["window"] < WINDOW:
        probes += (
            f"\nWith {result['predictions']} requests there is no room for two windows of "
            f"{WINDOW} after the warm-up: the trend compares two halves of {m['window']}.\n"
        )
    return f"""{what_ran(result)}{stopped}

| check | passed |
|---|---|
{checks}

| worker | value |
|---|---|
{worker_table(result)}

Total {result["seconds"]} s; median {result["seconds_per_request_median"]:.2f} s a request.
{probes}
Notes:
- After the warm-up the worker's RSS stayed between {m["min_after_warm_up_mib"]} and
  {m["max_after_warm_up_mib"]} MiB. It can move by a hundred MiB or more from one request to
  the next without leaking (glibc keeps freed blocks of the video-sized buffers, whose size
  changes with the frame count), so the bound is on the trend: the median of the last
  {m["window"]} requests against the median of the {m["window"]} after the first
  {m["warm_up_requests"]} (the warm-up, while pools grow for each new shape), with a looser
  ceiling on any single sample. The in-process test
  `tests/test_async.py::test_a_canceled_generation_leaves_no_tensor_alive` counts live tensors
  after a cancel, which is where a leak of our own would be.
- Our predictor keeps one output folder at a time (`VideoGenerator.predict` deletes the
  previous prediction's folder when the next starts; Cog has read and sent the file by then).
- coglet 0.23.1 creates `/tmp/coglet/predictions/<id>/{{inputs,outputs}}` for every prediction
  and never removes them: empty folders, three inodes a prediction, at a fixed path outside
  anything the predictor knows of. A long-running deployment should prune it (or run with a
  tmpfs /tmp and restart now and then). This script removes the ones it made.
{("Errors:" + chr(10) + errors) if errors else ""}"""


def main() -> None:
    # A SIGTERM ends the run as Ctrl-C does: the Cog server, its folders and coglet's go too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument(
        "--mix",
        choices=["basic", "full"],
        default="basic",
        help="basic: the original mix; full: also LoRAs, speed modes, upscale, interpolate, "
        "enhance_prompt, their failures and probes for state leaks",
    )
    parser.add_argument("--task", choices=sorted(TASKS), default="t2v", help="the predictor")
    parser.add_argument("--out", type=Path, help="write soak[-LABEL].json and .md here")
    parser.add_argument("--label", help="suffix of the result files, for a variant run")
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server and its worker, e.g. MALLOC_MMAP_THRESHOLD_=131072",
    )
    parser.add_argument("--keep-log", type=Path, help="copy the server's log here at the end")
    parser.add_argument("--verbose", action="store_true", help="one line per request")
    args = parser.parse_args()
    if args.task != "t2v" and args.mix != "full":
        parser.error("--task i2v and v2v run with --mix full")
    if args.predictions < WARM_UP + WINDOW:
        parser.error(f"--predictions must be at least {WARM_UP + WINDOW}")
    if any("=" not in item for item in args.worker_env):
        parser.error("--worker-env takes NAME=VALUE")
    result = soak(args)
    text = markdown(result)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"soak-{args.label}" if args.label else "soak"
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(text)
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
