"""Every end-to-end time in result folders as one list of records, merged into summary.json.

    python3 benchmarks/summary.py --summary benchmarks/results/gpu/summary.json \
        benchmarks/results/gpu/*/ $OUT

A record: {gpu, variant, num_frames, height, width, steps, speed_mode, compiled,
total_seconds, measured} plus offload and the file it came from; `measured` is false for a
projection (pipeline_speed's 50-step total from fewer steps). A compiled pipeline_speed.py
record says whether its total includes the compile (`compile_in_total`: a run without setup's
warm-up compiled in its first step, so its total is not a warm compiled prediction's), and a
speed_modes.py record whether the transformer was quantised (`fp8`) and whether the run was
cut short (`partial`). Records already in the summary
stay unless a new one has the same key, so earlier GPU runs are never lost. The file's name
is part of the key: each harness names its files apart, so a speed_modes.py render (no mp4
encode) never replaces pipeline_speed.py's end-to-end total of the same request. So is
`compile_in_total`: a warm compiled prediction, written under the same file name, never
replaces the total of one that compiled in its first step. Reads
pipeline_speed.py, compile_setup.py, speed_modes.py and projections.py JSON files; other
files are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEY = (
    "gpu",
    "variant",
    "num_frames",
    "height",
    "width",
    "steps",
    "speed_mode",
    "compiled",
    "offload",
    "measured",
)


def _gpu(record: dict) -> str:
    return (record.get("environment") or {}).get("gpu") or "cpu"


def records_of(data: dict, source: str) -> list[dict]:
    """The summary records one result file holds (none for a file of another kind)."""
    base = {"gpu": _gpu(data), "variant": data.get("variant"), "source": source}
    if "phases" in data:  # pipeline_speed.py
        one = base | {
            "num_frames": data["frames"],
            "height": data["height"],
            "width": data["width"],
            "speed_mode": "default",
            "compiled": bool(data.get("compile")),
            "offload": data["offload"],
        }
        if one["compiled"]:
            # Setup's warm-up compiles before the measured prediction; a run without one (the
            # script before it had it) compiled in its first step: a cold total, not a warm one.
            one["compile_in_total"] = "warm_up_seconds" not in data
        found = [one | {"steps": data["steps"], "total_seconds": data["phases"]["total_s"]}]
        projection = data.get("projection")
        if projection and projection["steps"] != data["steps"]:
            found.append(
                one | {"steps": projection["steps"], "total_seconds": projection["total_s"]}
            )
            found[-1]["measured"] = False
        return [{"measured": True} | r for r in found]
    if "start" in data:  # compile_setup.py: the render after setup, denoise and decode
        if data.get("render_s") is None:  # a start stopped before its render: no total
            return []
        return [
            base
            | {k: data[k] for k in ("num_frames", "height", "width", "steps", "compiled")}
            | {"speed_mode": "default", "offload": "none", "measured": True}
            | {"total_seconds": data["render_s"], "setup_seconds": data["setup_s"]}
            | {"start": data["start"]}
        ]
    if "projections" in data:  # projections.py: already records
        return [r | {"source": source} for r in data["projections"]]
    if "results" in data and "resolution" in data:  # speed_modes.py: median render per mode
        height, width = map(int, data["resolution"].split("x"))
        return [
            base
            | {"num_frames": data["frames"], "height": height, "width": width}
            | {"steps": data["steps"], "speed_mode": r["mode"], "compiled": data["compile"]}
            | {"offload": "none", "measured": True, "total_seconds": r["median_s"]}
            | {"fp8": bool(data.get("fp8"))}
            | ({"partial": True} if data.get("partial") else {})
            for r in data["results"]
        ]
    return []


def key_of(record: dict) -> tuple:
    extra = ("start", "source", "compile_in_total")
    return (*tuple(record.get(k) for k in KEY), *tuple(record.get(k) for k in extra))


def merge(summary: Path, folders: list[Path]) -> list[dict]:
    """summary.json's records, replaced or added to by those in `folders`; written back."""
    merged = {}
    if summary.exists():
        merged = {key_of(r): r for r in json.loads(summary.read_text())}
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            if path.resolve() == summary.resolve():
                continue
            try:
                data = json.loads(path.read_text())
            except ValueError:
                continue
            if isinstance(data, dict):
                for record in records_of(data, path.name):
                    merged[key_of(record)] = record
    records = sorted(merged.values(), key=lambda r: tuple(str(v) for v in key_of(r)))
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(records, indent=1) + "\n")
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summary", type=Path, required=True)
    parser.add_argument("folders", type=Path, nargs="+")
    args = parser.parse_args(argv)
    records = merge(args.summary, args.folders)
    print(f"{args.summary}: {len(records)} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
