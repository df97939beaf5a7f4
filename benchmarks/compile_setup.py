"""Setup and step time of one start: uncompiled, compiled from nothing, or compiled with the
compile cache that an earlier start left in the weights folder.

    python3 benchmarks/compile_setup.py --start cold --out DIR      # then warm, then uncompiled

Each start is meant to be its own process with its own empty TORCHINDUCTOR_CACHE_DIR (as a new
container has; gpu_run.sh does this), so "warm" can only find what the compile cache file
holds. A start builds the random-weight models (pipeline_speed's full or tiny components),
configures them as setup does (regional compile where compiled), runs setup's warm-up with the
compile cache (compile_cache.warm_up_with_cache; uncompiled starts skip it, as setup does,
and a cold one saves it without loading what an earlier start left), then renders one
request of --steps steps. Writes DIR/compile-<variant>-<size>-<start>.json: first with the
setup figures alone ("render_s": null), then whole once the render is done.
With --profile-steps N, N more transformer steps at the request's shape run under the profiler
(step_profile.py's classes): DIR/profile-<variant>-<size>-<start>.json and .txt, the profile
of the step exactly as that start runs it (compiled, for cold and warm).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

import torch

from benchmarks.common import environment, request_fields, synchronize, write_json
from benchmarks.pipeline_speed import full_components, tiny_components
from benchmarks.step_profile import profile_steps, write_profile
from benchmarks.transformer_step import step_inputs
from cogvideox_cog import compile_cache
from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.pipeline import (
    PIPELINES,
    compile_transformer,
    configure_pipeline,
    pipeline_dtype,
)
from cogvideox_cog.variants import VARIANTS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", choices=("uncompiled", "cold", "warm"), required=True)
    parser.add_argument("--variant", default="cogvideox-5b")
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--profile-steps", type=int, default=0)
    parser.add_argument(
        "--warm-up-renders",
        type=int,
        default=None,
        help="only the first N of setup's warm-up renders (a CPU run: inductor builds C++ "
        "for every graph); default: all, as setup",
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="the weights folder that holds the compile cache (default: OUT/weights)",
    )
    return parser.parse_args(argv)


def start(args, device: torch.device) -> tuple[VideoGenerator, dict]:
    """Build, configure, compile and warm up as setup does; the seconds of each part."""
    variant = VARIANTS[args.variant]
    started = time.perf_counter()
    build = full_components if args.size == "full" else tiny_components
    pipe = PIPELINES["t2v"](**build(variant, device, pipeline_dtype(variant, device)))
    pipe = configure_pipeline(pipe, variant, device, "none")
    synchronize(device)
    built = time.perf_counter()
    generator = VideoGenerator(variant, pipe, device)
    compiled = 0
    if args.warm_up_renders is not None:
        renders = generator.warm_up_renders()[: args.warm_up_renders]
        generator.warm_up_renders = lambda: renders
    if args.start != "uncompiled":
        compile_transformer(pipe.transformer)  # what configure_pipeline(compiled=True) does
        # Cold compiles from nothing even where an earlier start (a rerun with the same
        # --weights, as gpu_run.sh's SCRATCH is) left a compile cache.
        compiled = compile_cache.warm_up_with_cache(
            generator, args.weights or args.out / "weights", load_saved=args.start == "warm"
        )
    synchronize(device)
    ready = time.perf_counter()
    times = {
        "build_s": built - started,
        "warm_up_s": ready - built,
        "setup_s": ready - started,
        "graphs_compiled_in_setup": compiled,
    }
    return generator, times


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Setup's own progress (each warm-up render's steps, the graphs compiled, the cache saved),
    # timestamped: a start stopped by a time limit still shows how far it got.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator, times = start(args, device)
    frames = args.frames or generator.variant.default_frames
    height, width = generator.render_size
    record = {
        "variant": args.variant,
        "size": args.size,
        "start": args.start,
        "compiled": args.start != "uncompiled",
        "num_frames": frames,
        "height": height,
        "width": width,
        "steps": args.steps,
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in times.items()},
        "render_s": None,  # until the render below is done
    }
    path = args.out / f"compile-{args.variant}-{args.size}-{args.start}.json"
    write_json(path, record | {"environment": environment(device)})
    before = compile_cache.compiled_graphs()
    total, steps = timed_render(generator, frames, args.steps, device)
    record |= {
        "render_s": round(total, 3),
        "step_median_s": round(statistics.median(steps[1:] or steps), 4),
        "graphs_compiled_in_request": compile_cache.compiled_graphs() - before,
        "environment": environment(device),
    }
    write_json(path, record)
    print({k: v for k, v in record.items() if k != "environment"}, flush=True)
    if args.profile_steps:
        profile(generator, args, frames, (height, width), device)
    return 0


def timed_render(
    generator: VideoGenerator, frames: int, steps: int, device: torch.device
) -> tuple[float, list[float]]:
    """Seconds of one render and of each denoising step. The GPU is synchronised before every
    clock read: unsynchronised, a read times the launches queued so far, and the first step's
    start would come before the text encoder's queued work is done."""
    stamps: list[float] = []

    def stamp() -> float:
        synchronize(device)
        return time.perf_counter()

    def step_end(pipe, step, timestep, kwargs):
        stamps.append(stamp())
        return {}

    def loop_start(*_) -> None:  # the first transformer call: the start of step 1
        if not stamps:
            stamps.append(stamp())

    hook = generator.pipe.transformer.register_forward_pre_hook(loop_start)
    try:
        plan = generator.prepare(Request(**request_fields("a cat", frames, steps, 42)))
        started = stamp()
        generator.denoise_and_decode(plan, step_end)
        total = stamp() - started
    finally:
        hook.remove()
    return total, [b - a for a, b in itertools.pairwise(stamps)]


def profile(generator: VideoGenerator, args, frames: int, size: tuple[int, int], device) -> None:
    pipe = generator.pipe
    height, width = size
    inputs = step_inputs(pipe, frames, height, width, device, pipe.transformer.dtype)
    seconds, table = profile_steps(pipe.transformer, inputs, args.profile_steps, device)
    record = {
        "variant": args.variant,
        "size": args.size,
        "compiled": args.start != "uncompiled",
        "shape": f"{frames}x{height}x{width}, CFG batch 2",
        "after": f"compile_setup.py --start {args.start}",
    }
    name = f"profile-{args.variant}-{args.size}-{args.start}"
    write_profile(args.out, name, record, seconds, table, device)


if __name__ == "__main__":
    sys.exit(main())
