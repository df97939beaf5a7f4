"""End-to-end times projected from the measured H100 runs, for what no GPU has timed yet.

    python3 benchmarks/projections.py --out benchmarks/results/gpu/projected

Each projection is arithmetic on committed measurements, nothing else:

    total = rest + steps x step x fraction

- rest: the measured eager 5B prediction's time outside the denoise (text encoding, VAE
  decode, mp4), the same work in every mode;
- step: the measured median step, eager or compiled (the first, compiling, step left out);
- fraction: the speed mode's compute at full size relative to `default`, counted by
  speed_modes.py (attention and transformer passes actually run), not timed.

The speed modes are projected from the eager step, and with COGVIDEOX_COMPILE=1 from the
compiled step: a bound, not an estimate, since they run each block's parts compiled, without
the fusion across parts that the compiled step has (cogvideox_cog/speed.py). The records
carry `measured: false` and their basis; summary.py merges them into summary.json.

The basis names how the compiled run compiled (pipeline_speed.py's `compiled_as`): the
committed run predates regional compilation and compiled the whole transformer as one graph,
which COGVIDEOX_COMPILE=1 no longer does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
EAGER = RESULTS / "gpu" / "cogvideox-5b" / "cogvideox-5b-full-none.json"
COMPILED = RESULTS / "gpu" / "cogvideox-5b-compiled" / "cogvideox-5b-full-none.json"
COUNTS = RESULTS / "cpu" / "speed-modes" / "cogvideox-5b-medium-50steps.json"


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def compiled_as(run: dict) -> str:
    """How a compiled pipeline_speed.py run compiled the transformer; a run that does not say
    came before regional compilation, when COGVIDEOX_COMPILE=1 compiled it whole."""
    return run.get("compiled_as", "whole-model")


def projections(eager: dict, compiled: dict, counts: dict) -> list[dict]:
    """One record per (speed_mode, compiled) not measured end to end at 50 steps."""
    steps = eager["steps"]
    rest = eager["phases"]["total_s"] - eager["phases"]["denoise_s"]
    eager_step = eager["steps_s"]["median_after_first"]
    compiled_step = compiled["steps_s"]["median_after_first"]
    measured_compiled = f"measured {compiled_as(compiled)} compiled step"
    gpu = eager["environment"]["gpu"]
    base = {
        "gpu": gpu,
        "variant": eager["variant"],
        "num_frames": eager["frames"],
        "height": eager["height"],
        "width": eager["width"],
        "steps": steps,
        "offload": "none",
        "measured": False,
    }
    records = [
        base
        | {
            "speed_mode": "default",
            "compiled": True,
            "total_seconds": round(rest + steps * compiled_step, 1),
            "basis": f"{rest:.2f} s outside the denoise + {steps} x {compiled_step:.3f} s "
            f"({measured_compiled})",
        }
    ]
    for result in counts["results"]:
        if result["mode"] == "default":
            continue
        fraction = result["projected_compute_fraction_full_size"]
        for compiled_parts, step, which in (
            (False, eager_step, "measured eager step"),
            (True, compiled_step, f"{measured_compiled}; at best, the parts lack its fusion"),
        ):
            records.append(
                base
                | {
                    "speed_mode": result["mode"],
                    "compiled": compiled_parts,
                    "total_seconds": round(rest + steps * step * fraction, 1),
                    "basis": f"{rest:.2f} s outside the denoise + {steps} x {step:.3f} s "
                    f"({which}) x {fraction:.3f} (counted compute)",
                    "psnr_db_cpu_medium": round(result["psnr_db_mean"], 1),
                }
            )
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    records = projections(_load(EAGER), _load(COMPILED), _load(COUNTS))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "cogvideox-5b-projections.json"
    command = "python3 benchmarks/projections.py --out benchmarks/results/gpu/projected"
    path.write_text(json.dumps({"command": command, "projections": records}, indent=1) + "\n")
    for record in records:
        print(f"{record['speed_mode']}, compiled={record['compiled']}: {record['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
