"""Soak: many sequential predictions through the real Cog HTTP server on the tiny model.

Starts `python -m cog.server.http` on the tiny random CogVideoX-5B (1.0 text-to-video)
with the schema a built image has, then sends a fixed, seeded mix of requests one after
the other: valid ones with varied inputs (frames, steps, guidance, dynamic CFG, fps, seeds,
negative and over-long prompts), invalid ones (422 from the schema, failed predictions
from the frame and prompt rules) and async ones that are canceled mid-run. After every
request it checks the response, the server's health, the worker process (same pid,
resident memory, open descriptors) and what is left on disk: the worker runs with a
TMPDIR of its own, so every file our predictor or cog writes there is accounted for, and
coglet's fixed `/tmp/coglet/predictions/<id>` folders are counted for this run's ids.

Not part of the test suite (a few minutes on two cores):

    .venv/bin/python benchmarks/soak.py --out benchmarks/results/soak
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import uuid
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
    decode_data_uri,
    fd_count,
    rss_bytes,
)

MIB = 2**20
COGLET_PREDICTIONS = Path("/tmp/coglet/predictions")
# The worker's RSS moves up and down by ~100-200 MiB from one request to the next: glibc keeps
# freed blocks of the video-sized buffers, which differ with the frame count. A leak shows as
# a trend, so the bound is on the median of the last WINDOW requests against the median of
# the WINDOW after the warm-up, with a looser ceiling on any single sample.
WARM_UP = 20  # requests before the memory baseline: pools grow for each new shape
WINDOW = 50
TREND_BOUND_MIB = 64
CEILING_MIB = 256
FD_SLACK = 2
SPEC = TINY[("1.0", "t2v")]
PROMPTS = [
    "a panda plays an acoustic guitar in a sunlit bamboo forest",
    "a red boat on a calm lake at sunrise, mountains behind",
    "a small robot walks through a quiet city street at night",
    "waves roll onto a golden beach under white clouds",
]
LONG_PROMPT = " ".join(PROMPTS * 12)  # far over 226 tokens


def command_line() -> str:
    return shlex.join([".venv/bin/python", "benchmarks/soak.py", *sys.argv[1:]])


def plan(count: int, rng: random.Random) -> list[dict]:
    """The requests, in order: mostly valid, every 13th invalid, every 17th canceled."""
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


def check_valid(response, inputs: dict) -> str | None:
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
    expected = {
        "mime": "video/mp4",
        "codec": "h264",
        "frames": inputs["num_frames"],
        "fps": inputs.get("fps", 8),
        "size": (SPEC.width, SPEC.height),
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
    if inputs["prompt"] == LONG_PROMPT and "this part is ignored" not in result["logs"]:
        return "over-long prompt without a truncation log line"
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


def run_cancel(server: CogServer, hooks: WebhookReceiver, prediction_id: str) -> str | None:
    body = {
        "input": {"prompt": PROMPTS[0], "num_frames": 49, "num_inference_steps": 500},
        "webhook": hooks.url,
    }
    started = server.put_async(prediction_id, body, busy_wait=10)
    if started.status_code != 202:
        return f"async start: HTTP {started.status_code}: {started.text[:200]}"
    hooks.wait_until(lambda: "step 2/500" in hooks.latest_logs(prediction_id), timeout=120)
    if not server.cancel(prediction_id):
        return "cancel answered 404"
    final = hooks.wait_for(prediction_id, timeout=120)
    if final["status"] != "canceled":
        return f"status {final['status']} after cancel"
    if "step 500/500" in final["logs"]:
        return "ran to the end"
    return None


def disk_state(tmpdir: Path, prefix: str) -> dict:
    entries = list(tmpdir.iterdir())
    outputs = [p for p in entries if p.name.startswith("cogvideox-")]
    others = [p for p in entries if p not in outputs]
    ours = [p for p in COGLET_PREDICTIONS.glob(f"{prefix}*")] if COGLET_PREDICTIONS.exists() else []
    coglet_files = [f for p in ours for f in p.rglob("*") if f.is_file()]
    return {
        "output_dirs": len(outputs),
        "output_bytes": sum(f.stat().st_size for p in outputs for f in p.rglob("*") if f.is_file()),
        "other_tmp_entries": sorted(p.name for p in others),
        "coglet_prediction_dirs": len(ours),
        "coglet_files": len(coglet_files),
        "coglet_bytes": sum(f.stat().st_size for f in coglet_files),
    }


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


def slope_mib_per_100(values: list[float]) -> float:
    """Least-squares slope of RSS (MiB) per 100 predictions."""
    xs = list(range(len(values)))
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(values)
    num = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, values, strict=True))
    den = sum((x - mean_x) ** 2 for x in xs)
    return 100 * num / den if den else 0.0


def soak(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    prefix = f"soak-{uuid.uuid4().hex[:8]}-"
    try:
        weights = save_tiny_weights(work / "weights-src", "1.0", "t2v")
        tmpdir = work / "tmp"
        tmpdir.mkdir()
        predictor = f"{ROOT / 'predict_t2v.py'}:Predictor"
        write_schema(predictor, work / SCHEMA_PATH)
        server = CogServer(
            predictor,
            cwd=work,
            log_path=work / "server.log",
            env={
                "PYTHONPATH": str(ROOT),
                "COGVIDEOX_MODEL": "cogvideox-5b",
                "COGVIDEOX_WEIGHTS_URL": str(weights),
                "COGVIDEOX_WEIGHTS_DIR": str(work / "cache"),
                "TMPDIR": str(tmpdir),
                **dict(item.split("=", 1) for item in args.worker_env),
            },
        )
        with WebhookReceiver() as hooks, server:
            return drive(args, server, hooks, tmpdir, prefix)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for path in COGLET_PREDICTIONS.glob(f"{prefix}*"):
            shutil.rmtree(path, ignore_errors=True)


def drive(args, server: CogServer, hooks: WebhookReceiver, tmpdir: Path, prefix: str) -> dict:
    """The planned requests one after the other, each followed by a look at the worker."""
    worker = server.worker_pid()
    steps = plan(args.predictions, random.Random(args.seed))
    samples, errors = [], []
    counts = {"valid": 0, "invalid": 0, "cancel": 0}
    started = time.monotonic()
    for index, step in enumerate(steps):
        prediction_id = f"{prefix}{index:03d}"
        began = time.monotonic()
        problem = send(server, hooks, step, prediction_id)
        server.wait_idle(timeout=60)
        counts[step["kind"]] += 1
        afterwards, disk = check_after(server, worker, tmpdir, prefix)
        problem = problem or afterwards
        sample = {
            "index": index,
            "kind": step["kind"],
            "seconds": round(time.monotonic() - began, 3),
            "rss_mib": round(rss_bytes(worker) / MIB, 1),
            "fds": fd_count(worker),
            "output_dirs": disk["output_dirs"],
        }
        samples.append(sample)
        if problem:
            errors.append({"index": index, "kind": step["kind"], "problem": problem})
        if args.verbose or problem:
            print(json.dumps({**sample, "problem": problem}), flush=True)
        elif index % 20 == 19:
            print(f"{index + 1}/{len(steps)}: rss {sample['rss_mib']} MiB, fds {sample['fds']}")
    elapsed = time.monotonic() - started
    return summarise(args, samples, errors, counts, elapsed, disk_state(tmpdir, prefix))


def send(server: CogServer, hooks: WebhookReceiver, step: dict, prediction_id: str) -> str | None:
    """One planned request sent and its answer checked: None if it is right, else what is wrong."""
    if step["kind"] == "cancel":
        return run_cancel(server, hooks, prediction_id)
    response = server.send(body={"id": prediction_id, "input": step["inputs"]})
    if step["kind"] == "valid":
        return check_valid(response, step["inputs"])
    return check_invalid(response, step)


def check_after(server: CogServer, worker: int, tmpdir: Path, prefix: str):
    """After a request: the first thing wrong with the server, its worker process or what is
    left on disk (None if nothing), and the disk state."""
    problem = None
    health = server.status()
    if health != "READY":
        problem = f"server {health}"
    if server.worker_pid() != worker:
        problem = problem or "the worker process changed"
    disk = disk_state(tmpdir, prefix)
    if disk["output_dirs"] > 1 or disk["other_tmp_entries"]:
        problem = problem or f"left on disk: {disk}"
    return problem, disk


def memory_figures(rss: list[float]) -> dict:
    """The worker's RSS: the trend after the warm-up (late window's median against the early
    one's), the ceiling any sample reached, and the least-squares slope."""
    settled = rss[WARM_UP:]
    early = statistics.median(settled[:WINDOW])
    late = statistics.median(settled[-WINDOW:])
    return {
        "first_mib": rss[0],
        "warm_up_requests": WARM_UP,
        "window": WINDOW,
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


def summarise(args, samples: list[dict], errors: list[dict], counts, elapsed, disk) -> dict:
    """The result: memory, descriptors and disk over the run, and each check passed or not."""
    fds = [s["fds"] for s in samples]
    memory = memory_figures([s["rss_mib"] for s in samples])
    descriptors = {
        "first": fds[0],
        "after_warm_up": fds[WARM_UP],
        "min": min(fds),
        "max": max(fds),
        "final": fds[-1],
    }
    checks = {
        "every_response_correct": not errors,
        "rss_no_upward_trend": memory["trend_mib"] <= TREND_BOUND_MIB,
        "rss_under_ceiling": memory["ceiling_mib"] <= CEILING_MIB,
        "no_fd_leak": max(fds[WARM_UP:]) <= descriptors["after_warm_up"] + FD_SLACK,
        "at_most_one_output_dir_at_any_time": max(s["output_dirs"] for s in samples) <= 1,
        "no_other_temp_files": not disk["other_tmp_entries"],
        "no_files_in_coglet_prediction_dirs": disk["coglet_files"] == 0,
    }
    return {
        "command": command_line(),
        "machine": machine(),
        "model": "tiny random CogVideoX-5B (1.0 t2v), 48x80, float32 on CPU",
        "worker_env": args.worker_env,
        "predictions": len(samples),
        "counts": counts,
        "seconds": round(elapsed, 1),
        "seconds_per_request_median": round(statistics.median(s["seconds"] for s in samples), 3),
        "memory": memory,
        "descriptors": descriptors,
        "disk_at_end": disk,
        "checks": checks,
        "passed": all(checks.values()),
        "errors": errors,
        "samples": samples,
    }


def worker_table(result: dict) -> str:
    """The worker's memory, descriptors and leftovers, as the rows of a Markdown table."""
    m, d, disk = result["memory"], result["descriptors"], result["disk_at_end"]
    rows = [
        ("RSS after the 1st request", f"{m['first_mib']} MiB"),
        (
            f"RSS median, requests {m['warm_up_requests'] + 1}-"
            f"{m['warm_up_requests'] + m['window']} / last {m['window']}",
            f"{m['early_median_mib']} / {m['late_median_mib']} MiB",
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
        (
            "output folders left (cogvideox-*)",
            f"{disk['output_dirs']} ({disk['output_bytes']} bytes: the last video)",
        ),
        ("other files left in the worker's TMPDIR", str(len(disk["other_tmp_entries"]))),
        (
            "coglet's /tmp/coglet/predictions/<id> folders",
            f"{disk['coglet_prediction_dirs']} (files in them: {disk['coglet_files']})",
        ),
    ]
    return "\n".join(f"| {name} | {value} |" for name, value in rows)


def what_ran(result: dict) -> str:
    """The Markdown report's opening: the command, the machine, the model and the requests."""
    env, counts = result["machine"], result["counts"]
    versions = env["versions"]
    return f"""# Soak: {result["predictions"]} sequential predictions through the Cog server

Command (from the repository root):

```bash
{result["command"]}
```

Worker environment added: {", ".join(result["worker_env"]) or "none"}.

Machine: {env["cpu"]}, **{env["cores"]} cores**, {env["memory_gib"]} GiB RAM, no GPU
({env["platform"]}; cog {versions["cog"]}, coglet {versions["coglet"]},
torch {versions["torch"]}, diffusers {versions["diffusers"]}).
Shared with other work while it ran, so the times are indicative only.

Model: {result["model"]}. Requests, in a fixed seeded order: {counts["valid"]} valid
(9/17/25 frames, 1-3 steps, random guidance, dynamic CFG on/off, fps 8/12/24, fixed or random
seeds, negative prompts, a few prompts over the token limit), {counts["invalid"]} invalid
(422 from the schema, or failed by the frame and prompt rules) and {counts["cancel"]} async
ones (49 frames, 500 steps) canceled once their second step was logged. Every valid output
was decoded and checked (H.264, frame count, fps, size, seed); after every request the server
had to be READY with the same worker process."""


def markdown(result: dict) -> str:
    m = result["memory"]
    checks = "\n".join(
        f"| {name} | {'yes' if ok else '**NO**'} |" for name, ok in result["checks"].items()
    )
    errors = "\n".join(f"- #{e['index']} ({e['kind']}): {e['problem']}" for e in result["errors"])
    return f"""{what_ran(result)}

| check | passed |
|---|---|
{checks}

| worker | value |
|---|---|
{worker_table(result)}

Total {result["seconds"]} s; median {result["seconds_per_request_median"]:.2f} s a request.

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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument("--out", type=Path, help="write soak[-LABEL].json and .md here")
    parser.add_argument("--label", help="suffix of the result files, for a variant run")
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server and its worker, e.g. MALLOC_MMAP_THRESHOLD_=131072",
    )
    parser.add_argument("--verbose", action="store_true", help="one line per request")
    args = parser.parse_args()
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
