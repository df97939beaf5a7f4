"""Built-in weights downloader vs `curl | tar -x`, on one synthetic multi-GB tar over loopback.

Writes a tar in the diffusers layout (configs, sharded safetensors with valid headers, random
data) and a manifest with the sha256 of every file, serves it from tests/file_server.py in a
process of its own, and times, alternating round by round:

- `curl -s URL | tar -x -C DEST`: the baseline;
- the same followed by an fsync of every extracted file, which our downloader also does
  before it marks the weights complete (so that a power cut cannot leave a marker over
  data that never reached the disk);
- our downloader through `ensure_weights()` in a fresh process, checking structure only
  (what the built-in manifests allow today: they carry no hashes);
- the same with a manifest of sha256s, hashed while the files are written;
- the structure-checks run with COGVIDEOX_WEIGHTS_FSYNC=0, which separates what the
  downloader and its checks cost from what the disk costs.

Each side writes a fresh folder that is deleted before the next run; the tar itself stays in
the page cache, so every run reads it from memory. The ratio reported is ours / curl|tar by
median wall time, including verification, fsync and publishing on our side.

    python3 benchmarks/weights_download.py --gb 3 --rounds 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import command_line, markdown_table, write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "weights"
READING = """\
Reading the numbers: all sides write the same files to the same disk. Our downloader starts
writing each file out as it arrives (an fdatasync every 128 MiB, in a thread) and fsyncs
everything before it writes the completion marker, so its times include the disk. `curl | tar`
returns as soon as the data is in the page cache: below the kernel's dirty-page limit it never
waits for the disk (a tar of 1 GB or less on this machine finished sooner that way than ours),
above it it is throttled to the disk's speed like everyone else; the "then fsync" row is the
same durability as ours. The verify phase (structure checks: configs, safetensors headers,
shard indexes) reads only headers; with a sha256 manifest the hashing runs while the files are
written. Each run's load average is in the JSON: the spread between rounds is other work on
the machine, not the sides.\
"""
_BLOCK = 64 << 20


class _Data:
    """A file-like source of `size` bytes: a safetensors header, then pseudo-random data."""

    def __init__(self, size: int, seed: int, digest):
        payload = size - 8
        for _ in range(3):  # the header's own length shifts the payload: settle it
            header = json.dumps(
                {"weight": {"dtype": "U8", "shape": [payload], "data_offsets": [0, payload]}}
            ).encode()
            header += b" " * (-len(header) % 8)
            payload = size - 8 - len(header)
        self.head = len(header).to_bytes(8, "little") + header
        self.size, self.position, self.digest = size, 0, digest
        self.block = hashlib.shake_256(seed.to_bytes(4, "little")).digest(_BLOCK)

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.position if n < 0 else min(n, self.size - self.position)
        out = bytearray()
        while len(out) < n:
            at = self.position + len(out)
            if at < len(self.head):
                out += self.head[at : at + n - len(out)]
            else:
                offset = (at - len(self.head)) % _BLOCK
                out += self.block[offset : offset + n - len(out)]
        self.position += n
        self.digest.update(out)
        return bytes(out)


def make_tar(path: Path, total: int) -> dict:
    """A CogVideoX-shaped tar of about `total` bytes; returns the manifest of its files."""
    big = [("transformer", 0.55, 2), ("text_encoder", 0.4, 2), ("vae", 0.05, 1)]
    configs = {
        "model_index.json": {
            "_class_name": "CogVideoXPipeline",
            "scheduler": ["diffusers", "CogVideoXDPMScheduler"],
            "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "T5Tokenizer"],
            "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLCogVideoX"],
        },
        "scheduler/scheduler_config.json": {"_class_name": "CogVideoXDPMScheduler"},
        "tokenizer/tokenizer_config.json": {"model_max_length": 226},
        "text_encoder/config.json": {},
        "transformer/config.json": {},
        "vae/config.json": {},
    }
    files: dict[str, dict] = {}
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        archive.copybufsize = 4 << 20

        def add(name: str, size: int, source) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = size, 0o644, int(time.time())
            archive.addfile(info, source)

        for name, config in configs.items():
            data = json.dumps(config).encode()
            add(name, len(data), _Bytes(data))
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for seed, (component, share, shards) in enumerate(big):
            prefix = "model" if component == "text_encoder" else "diffusion_pytorch_model"
            names = (
                [f"{prefix}-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
                if shards > 1
                else [f"{prefix}.safetensors"]
            )
            for i, name in enumerate(names):
                size = int(total * share / shards)
                digest = hashlib.sha256()
                add(f"{component}/{name}", size, _Data(size, seed * 10 + i, digest))
                files[f"{component}/{name}"] = {"size": size, "sha256": digest.hexdigest()}
            if shards > 1:
                index = json.dumps({"weight_map": {f"w{i}": n for i, n in enumerate(names)}})
                data = index.encode()
                name = f"{component}/{prefix}.safetensors.index.json"
                add(name, len(data), _Bytes(data))
                files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return files


class _Bytes:
    def __init__(self, data: bytes):
        self.data, self.position = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.position + n
        out = self.data[self.position : end]
        self.position += len(out)
        return out


def fsync_tree(folder: Path) -> None:
    for directory, _, names in os.walk(folder):
        for name in [*names, "."]:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def run_curl(url: str, dest: Path, sync: bool) -> dict:
    dest.mkdir(parents=True)
    started = time.monotonic()
    result = subprocess.run(
        f"curl -sf {url} | tar -x -C {dest}", shell=True, check=False, capture_output=True
    )
    if result.returncode:
        raise SystemExit(f"curl | tar failed: {result.stderr.decode()}")
    extracted = time.monotonic() - started
    if sync:
        fsync_tree(dest)
    return {"seconds": time.monotonic() - started, "extract_seconds": extracted}


_PHASE = re.compile(r"(download|verify|sync and publish) ([\d.]+) s")


def run_ours(url: str, cache: Path, manifest: Path | None, fsync: bool = True) -> dict:
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='%(message)s')\n"
        "from cogvideox_cog.variants import VARIANTS\n"
        "from cogvideox_cog.weights import ensure_weights\n"
        "ensure_weights(VARIANTS['cogvideox-5b'])\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "COGVIDEOX_WEIGHTS_DIR": str(cache),
        "COGVIDEOX_WEIGHTS_URL": url,
    }
    if manifest:
        env["COGVIDEOX_WEIGHTS_MANIFEST"] = str(manifest)
    if not fsync:
        env["COGVIDEOX_WEIGHTS_FSYNC"] = "0"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, check=False, capture_output=True, text=True
    )
    seconds = time.monotonic() - started
    if result.returncode:
        raise SystemExit(f"ensure_weights failed:\n{result.stderr}")
    ready = [line for line in result.stderr.splitlines() if " ready in " in line][-1]
    phases = {name: float(value) for name, value in _PHASE.findall(ready)}
    marker = json.loads(next(cache.glob("*/.cogvideox-complete.json")).read_text())
    phases.update(marker["seconds"])  # download and verify, to the millisecond
    return {"seconds": seconds, "phases": phases}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=3.0, help="size of the synthetic tar")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--workdir", type=Path, help="where the tar and outputs go (a temp dir)")
    args = parser.parse_args()
    if shutil.which("pget", path=f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin"):
        raise SystemExit("pget is on PATH: this benchmark measures the built-in downloader")
    return args


def serve_tar(work: Path, gb: float) -> tuple[subprocess.Popen, str, Path, int]:
    """The synthetic tar and its sha256 manifest written, and the tar served over loopback:
    the server, the tar's URL, the manifest and the tar's size."""
    served = work / "served"
    served.mkdir(parents=True, exist_ok=True)
    tar = served / "weights.tar"
    print(f"writing a {gb:g} GB synthetic tar ...", flush=True)
    files = make_tar(tar, int(gb * 1e9))
    manifest = work / "manifest.json"
    manifest.write_text(json.dumps({"variant": "cogvideox-5b", "files": files}))
    size = tar.stat().st_size  # and in the page cache, from writing it
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.file_server", str(served)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    url = server.stdout.readline().strip() + "weights.tar"
    return server, url, manifest, size


def sides_for(url: str, manifest: Path) -> dict:
    """Each side by its name in the results: a function of the folder it extracts into."""
    return {
        "curl | tar -x": lambda out: run_curl(url, out, sync=False),
        "curl | tar -x, then fsync": lambda out: run_curl(url, out, sync=True),
        "built-in, structure checks": lambda out: run_ours(url, out, None),
        "built-in, sha256 manifest": lambda out: run_ours(url, out, manifest),
        "built-in, structure checks, no fsync": lambda out: run_ours(url, out, None, False),
    }


def run_rounds(sides: dict, rounds: int, work: Path) -> list[dict]:
    """Every side once a round, in the same order, each into a fresh folder."""
    runs: list[dict] = []
    for round_ in range(rounds):
        for side, run in sides.items():
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            load = os.getloadavg()[0]
            result = run(out)
            result.update(side=side, round=round_ + 1, load_1min_before=round(load, 2))
            runs.append(result)
            print(f"{side:28s} round {round_ + 1}: {result['seconds']:6.2f} s", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return runs


def medians_by_side(runs: list[dict]) -> dict[str, float]:
    """Median seconds per side, in the order the sides ran."""
    sides = dict.fromkeys(r["side"] for r in runs)
    return {
        side: statistics.median(r["seconds"] for r in runs if r["side"] == side) for side in sides
    }


def summarise(runs: list[dict], size: int) -> dict:
    """Medians per side, their rates and ratios to curl | tar, and what verification costs."""
    medians = medians_by_side(runs)
    base = medians["curl | tar -x"]
    ours = [r for r in runs if r["side"].startswith("built-in") and "no fsync" not in r["side"]]
    verify_s = statistics.median(r["phases"].get("verify", 0.0) for r in ours)
    publish_s = statistics.median(r["phases"].get("sync and publish", 0.0) for r in ours)
    return {
        "tar_bytes": size,
        "median_seconds": {k: round(v, 2) for k, v in medians.items()},
        "median_mb_per_s": {k: round(size / v / 1e6) for k, v in medians.items()},
        "ratio_to_curl_tar": {k: round(v / base, 3) for k, v in medians.items()},
        "verification_overhead_seconds": {
            "verify phase (structure, manifest files)": round(verify_s, 3),
            "sha256 while writing (sha256 manifest - structure checks)": round(
                medians["built-in, sha256 manifest"] - medians["built-in, structure checks"], 2
            ),
            "fsync and publish": round(publish_s, 2),
        },
    }


def _first_line(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True).stdout.splitlines()[0]


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "note": "2 cores shared with other work running at the same time (see the load "
        "average before each run); loopback, so no network latency or bandwidth limit: "
        "this measures the CPU and disk cost of each side, not a real network.",
        "curl": _first_line(["curl", "--version"]),
        "tar": _first_line(["tar", "--version"]),
    }


def report(data: dict, rounds: int) -> tuple[str, str]:
    """The Markdown report of `data` (the JSON written), and its table alone."""
    summary, runs = data["summary"], data["runs"]
    size, medians = summary["tar_bytes"], medians_by_side(runs)
    base = medians["curl | tar -x"]
    rows = [
        [
            side.replace("|", "\\|"),
            f"{medians[side]:.2f}",
            f"{size / medians[side] / 1e6:.0f}",
            f"{medians[side] / base:.2f}x",
            ", ".join(f"{r['seconds']:.2f}" for r in runs if r["side"] == side),
        ]
        for side in medians
    ]
    table = markdown_table(["side", "median s", "MB/s", "vs curl \\| tar", "runs (s)"], rows)
    overhead = "\n".join(
        f"- {k}: {v} s" for k, v in summary["verification_overhead_seconds"].items()
    )
    text = (
        f"# Weights download: built-in downloader vs curl | tar\n\n"
        f"Command (from the repository root): `{data['command']}`\n\n"
        f"{data['date']}, {size / 1e9:.2f} GB synthetic tar over loopback, "
        f"{rounds} rounds alternating the sides. {data['machine']['note']}\n\n"
        f"{table}\n\nVerification overhead (medians of our runs):\n\n{overhead}\n\n"
        f"{READING}\n"
    )
    return text, table


def main() -> None:
    args = parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="weights-bench-"))
    server, url, manifest, size = serve_tar(work, args.gb)
    try:
        runs = run_rounds(sides_for(url, manifest), args.rounds, work)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)

    data = {
        "command": command_line(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "summary": summarise(runs, size),
        "runs": runs,
    }
    write_json(RESULTS / "weights_download.json", data)
    text, table = report(data, args.rounds)
    (RESULTS / "weights_download.md").write_text(text)
    print(table)


if __name__ == "__main__":
    main()
