"""speed_mode side by side: time, work actually computed, and fidelity against "default".

One pipeline is built (full size with random weights, or the tiny test model) and configured
by the predictor's own code; every mode then renders the same request with the same seed
through `VideoGenerator.render_frames` (the prediction minus the mp4 encode, which does not
depend on the mode), in rotating order, `--repeats` times. Reported per mode:

- seconds (median over repeats) and the ratio to "default", measured in this one run;
- work counted with forward hooks on the pipeline's own modules: the batch rows each block's
  attention computed, and the rows the transformer ran (FasterCache runs the conditional half
  alone on the steps where it reuses the unconditional one); and from those counts a compute
  fraction, weighting attention and feed-forward rows by their FLOPs at the run's token count
  (labelled a projection: it is arithmetic on counts, not a measurement);
- fidelity against the default frames: PSNR per frame (mean and worst) and the largest
  difference, on the frames as floats in [0, 1];
- on a GPU, the peak memory allocated while rendering (the caches hold activations).

Every mode first renders a short warm-up, untimed (`--warm-up-steps`, 10 by default: through
both the computing and the reusing branches of the caches): kernel loading, autotuning and, with
`--compile`, compiling happen there, as they do in a predictor's setup, not in the timed runs.

With `--fp8` (a GPU of compute capability 8.9 or more, torchao) the transformer is quantised
to dynamic fp8 (benchmarks/common.py) before the modes run, after one timed render of the
unquantised model in "default" mode: that render is the fidelity reference of every mode,
so the table shows what fp8 alone and fp8 with each cache cost against the model as trained.

    python3 benchmarks/speed_modes.py --size full --out benchmarks/results/gpu/speed-modes
    python3 benchmarks/speed_modes.py --size tiny --steps 50 \
        --out benchmarks/results/cpu/speed-modes
    python3 benchmarks/speed_modes.py --size medium --repeats 4 \
        --out benchmarks/results/cpu/speed-modes

Random weights make noise, not video: the fidelity figures say how far each cache moves the
output of this network, which on trained weights (smoother between steps) is expected to be
less. Say so wherever they are quoted.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from diffusers import CogVideoXTransformer3DModel

from benchmarks.common import (
    environment,
    fmt,
    free_memory,
    markdown_table,
    quantize_fp8,
    request_fields,
    require_fp8,
    synchronize,
    write_json,
)
from benchmarks.pipeline_speed import (
    PROMPT,
    TRANSFORMER,
    _randomise,
    full_components,
    tiny_components,
)
from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.pipeline import (
    PIPELINES,
    choose_compile,
    compile_transformer,
    configure_pipeline,
    pipeline_dtype,
)
from cogvideox_cog.speed import SPEED_MODES
from cogvideox_cog.variants import VARIANTS

log = logging.getLogger("speed_modes")

# Enough for both branches of both caches at trailing spacing (timesteps 999, 899, ... 99).
WARM_UP_STEPS = 10


class WorkCounter:
    """Batch rows through the blocks' attention (all blocks together) and through the
    transformer, per render.

    A compiled block traces the hooks inside it, and dynamo compiles the block again for
    any Python value a hook reads that differs between blocks: each block's index, or a
    running count. So the attention rows add up in a tensor on the model's device, which the
    compiled block takes as an input like its weights; otherwise each block compiled anew,
    and past dynamo's recompile limit (8; 5B has 42 blocks) the rest ran uncompiled, so
    `--compile` timed something the predictors never run."""

    def __init__(self, transformer):
        self.blocks = len(transformer.transformer_blocks)
        self._attention_rows = torch.zeros((), dtype=torch.int64, device=transformer.device)
        self.transformer_rows = 0
        self.tokens = None
        self.handles = [
            block.attn1.to_q.register_forward_pre_hook(self._attention)
            for block in transformer.transformer_blocks
        ]
        # Inside the transformer's forward, after FasterCache has dropped a reused half.
        self.handles.append(transformer.patch_embed.register_forward_pre_hook(self._transformer))

    @property
    def attention_rows(self) -> int:
        return int(self._attention_rows)

    def _attention(self, module, args):
        self._attention_rows.add_(args[0].shape[0])
        self.tokens = args[0].shape[1]

    def _transformer(self, module, args):
        self.transformer_rows += args[0].shape[0]  # the text embeddings, one row per branch

    def reset(self) -> None:
        self._attention_rows.zero_()
        self.transformer_rows = 0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def compute(self, width: int, tokens: int | None = None) -> float:
        """FLOPs of the blocks' matmuls for the counted rows (attention module: QKV and output
        projections 8nd^2 plus scores and values 4n^2d; feed-forward 16nd^2), at `tokens` a
        row (default: this run's)."""
        n = tokens or self.tokens
        attention = 8 * n * width**2 + 4 * n**2 * width
        feed_forward = 16 * n * width**2
        return self.attention_rows * attention + self.transformer_rows * self.blocks * feed_forward


def medium_components(variant, device: torch.device, dtype: torch.dtype) -> dict:
    """The tiny pipeline with a wider, deeper transformer at 96 x 160: small enough for a CPU,
    big enough that the transformer's matmuls, not Python, take the time (1,006 tokens a row,
    512 wide, 4 blocks)."""
    components = tiny_components(variant, device, dtype)
    config = dict(components["transformer"].config)
    config.update(num_attention_heads=8, attention_head_dim=64, num_layers=4)
    config.update(sample_height=12, sample_width=20, time_embed_dim=64)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = CogVideoXTransformer3DModel(**config).eval().to(device=device, dtype=dtype)
        _randomise(transformer)
    components["transformer"] = transformer.requires_grad_(False)
    return components


def full_size(variant) -> tuple[int, int]:
    """(tokens a row, width) of the real model at its default frames and native size."""
    config = TRANSFORMER[variant.id]
    height, width = variant.native_size or (config["sample_height"] * 8, config["sample_width"] * 8)
    patch_t = config.get("patch_size_t") or 1
    latent_frames = (variant.default_frames - 1) // 4 + 1
    latent_frames += -latent_frames % patch_t
    patches = (latent_frames // patch_t) * (height // 16) * (width // 16)
    text = config["max_text_seq_length"]
    return patches + text, config["num_attention_heads"] * config["attention_head_dim"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="cogvideox-5b")
    parser.add_argument("--size", choices=("full", "medium", "tiny"), default="full")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--modes", default=",".join(SPEED_MODES))
    parser.add_argument(
        "--warm-up-steps",
        type=int,
        default=WARM_UP_STEPS,
        help="steps of each mode's untimed warm-up (fewer do for an uncompiled run)",
    )
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--fp8", action="store_true", help="quantise the transformer to fp8")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def build_generator(args, variant, device: torch.device) -> tuple[VideoGenerator, bool]:
    """The pipeline at --size, configured by the predictor's own code; and whether its
    transformer is compiled (with --fp8, only after quantising: see quantise_after_reference)."""
    build = {"full": full_components, "medium": medium_components, "tiny": tiny_components}
    pipe = PIPELINES["t2v"](**build[args.size](variant, device, pipeline_dtype(variant, device)))
    compiled = choose_compile("1" if args.compile else "0", device)  # the predictors' rule
    pipe = configure_pipeline(pipe, variant, device, "none", compiled=compiled and not args.fp8)
    return VideoGenerator(variant, pipe, device), compiled


class Renderer:
    """Renders the one request of this benchmark in any mode, with the work it computed counted
    and, on a GPU, the peak memory of each mode kept (the largest over its renders)."""

    def __init__(self, generator: VideoGenerator, frames: int, full_size: tuple[int, int]):
        self.generator, self.device, self.frames = generator, generator.device, frames
        self.counter = WorkCounter(generator.pipe.transformer)
        config = generator.pipe.transformer.config
        self.width = config.num_attention_heads * config.attention_head_dim
        self.full_tokens, self.full_width = full_size
        self.peaks: dict[str, float] = {}

    def render(self, mode: str, steps: int):
        """Seconds, the frames, and the work: (attention rows of all blocks, transformer rows,
        FLOPs at this run's size, FLOPs at full size)."""
        request = Request(**request_fields(PROMPT, self.frames, steps, 42, speed_mode=mode))
        self.counter.reset()
        cuda = self.device.type == "cuda"
        if cuda:
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        video = self.generator.render_frames(request)
        if cuda:
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peaks[mode] = max(self.peaks.get(mode, 0.0), peak)
        work = (
            self.counter.attention_rows,
            self.counter.transformer_rows,
            self.counter.compute(self.width),
            self.counter.compute(self.full_width, self.full_tokens),
        )
        return time.perf_counter() - started, video.frames, work


def quantise_after_reference(renderer: Renderer, args, compiled: bool, warm_up_steps: int):
    """With --fp8: one warmed-up render of the unquantised model in "default" mode (the fidelity
    reference of every mode), then the transformer quantised, and compiled after that as
    configure_pipeline would. Returns the reference frames and its seconds."""
    renderer.render("default", warm_up_steps)
    seconds, frames, _ = renderer.render("default", args.steps)
    log.info(f"default, unquantised (the fidelity reference): {seconds:.2f} s")
    transformer = renderer.generator.pipe.transformer
    quantize_fp8(transformer, renderer.device)
    if compiled:
        compile_transformer(transformer)  # what configure_pipeline does, after quantising
    return frames, seconds


def time_modes(
    renderer: Renderer,
    modes: list[str],
    steps: int,
    warm_up_steps: int,
    repeats: int,
    after_each=None,
):
    """Every mode warmed up untimed, then `repeats` timed renders each, the order rotating by
    one mode a repeat so that drift in the machine's speed does not favour one mode. Returns
    the seconds of every render, and the last render's frames and work per mode. after_each:
    called with those three after every timed render (a partial result to write)."""
    for mode in modes:
        renderer.render(mode, warm_up_steps)
    renderer.peaks.clear()
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    outputs, work = {}, {}
    for repeat in range(repeats):
        order = modes[repeat % len(modes) :] + modes[: repeat % len(modes)]
        for mode in order:
            took, frames_out, counted = renderer.render(mode, steps)
            seconds[mode].append(took)
            outputs[mode], work[mode] = frames_out, counted
            log.info(f"{mode}: {took:.2f} s")
            if after_each is not None:
                after_each(seconds, outputs, work)
        free_memory(renderer.device)
    return seconds, outputs, work


def compare_with_default(mode: str, seconds, outputs, work, reference, peaks) -> dict:
    """One mode against "default": speed-up, work fractions and fidelity to the reference."""
    attention_rows, transformer_rows, flops, full_flops = work[mode]
    per_frame = [psnr(a, b) for a, b in zip(outputs[mode], reference, strict=True)]
    return {
        "mode": mode,
        "seconds": seconds[mode],
        "median_s": statistics.median(seconds[mode]),
        "speedup": statistics.median(seconds["default"]) / statistics.median(seconds[mode]),
        "attention_rows": attention_rows,
        "attention_rows_fraction": attention_rows / work["default"][0],
        "transformer_rows": transformer_rows,
        "transformer_rows_fraction": transformer_rows / work["default"][1],
        "projected_compute_fraction": flops / work["default"][2],
        "projected_compute_fraction_full_size": full_flops / work["default"][3],
        "psnr_db_mean": statistics.fmean(per_frame)
        if all(map(math.isfinite, per_frame))
        else math.inf,
        "psnr_db_worst_frame": min(per_frame),
        "max_abs_diff": float(np.abs(outputs[mode] - reference).max()),
        "gpu_peak_allocated_gib": round(peaks[mode] / 2**30, 2) if mode in peaks else None,
    }


def results_table(results: list[dict]) -> str:
    return markdown_table(
        [
            "speed_mode",
            "median s",
            "speed-up (measured)",
            "attention rows",
            "transformer rows",
            "compute (projected), this size",
            "at full size",
            "PSNR vs default, mean / worst frame",
            "max diff",
            "GPU peak allocated",
        ],
        [
            [
                r["mode"],
                fmt(r["median_s"]),
                f"{r['speedup']:.2f}x",
                f"{r['attention_rows_fraction']:.0%}",
                f"{r['transformer_rows_fraction']:.0%}",
                f"{r['projected_compute_fraction']:.0%}",
                f"{r['projected_compute_fraction_full_size']:.0%}",
                f"{fmt(r['psnr_db_mean'], 1)} / {fmt(r['psnr_db_worst_frame'], 1)} dB",
                fmt(r["max_abs_diff"], 4),
                fmt(r["gpu_peak_allocated_gib"])
                + " GiB" * (r["gpu_peak_allocated_gib"] is not None),
            ]
            for r in results
        ],
    )


def report(record: dict) -> str:
    """The Markdown summary of a run, from its record alone."""
    env, variant_id = record["environment"], record["variant"]
    device_name = env.get("gpu") or f"CPU ({env['cpu_count']} cores)"
    text = (
        f"# speed_mode: {variant_id}, {record['size']} size, {record['frames']} frames at "
        f"{record['resolution']}, {record['steps']} steps\n\n"
        f"{device_name}; torch {env['versions']['torch']}, diffusers "
        f"{env['versions']['diffusers']}. Command:\n\n    {env['command']}\n\n"
        f"{results_table(record['results'])}\n\n"
        f"Rows: batch rows computed, as a share of default's (CFG runs 2 rows a step). "
        f"Compute: FLOPs of the blocks for those rows at {record['tokens_per_row']} tokens a row "
        f"(this run) and at {record['full_size_tokens_per_row']} ({variant_id} at its default "
        f"frames and size; the counts depend only on the steps and the schedule), a projection "
        f"from the counts, not a measurement. Random weights: fidelity is of noise, see the "
        f"script.\n"
    )
    if record["compile"]:
        text += "\nThe transformer is compiled (torch.compile), every mode warmed up first.\n"
    if record["fp8"]:
        text += (
            f"\nThe transformer is quantised to dynamic fp8 (torchao) in every row; PSNR and "
            f"max diff are against the unquantised model in default mode, which took "
            f"{record['unquantised_default_s']:.2f} s uncompiled (one render, after a warm-up).\n"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    modes = args.modes.split(",")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variant = VARIANTS[args.variant]
    if args.fp8:
        require_fp8(device, getattr(torch, variant.dtype))  # the model's dtype on a GPU
    env = environment(device)
    generator, compiled = build_generator(args, variant, device)
    frames = args.frames or variant.default_frames
    renderer = Renderer(generator, frames, full_size(variant))
    warm_up_steps = min(args.warm_up_steps, args.steps)
    unquantised, unquantised_s = None, None
    if args.fp8:
        unquantised, unquantised_s = quantise_after_reference(
            renderer, args, compiled, warm_up_steps
        )
    height, width_px = generator.render_size
    name = f"{variant.id}-{args.size}-{args.steps}steps"
    name += "-compiled" * compiled + "-fp8" * args.fp8

    def results_of(seconds, outputs, work) -> list[dict]:
        """Each timed mode against default; before default is timed, each one's seconds."""
        timed = [mode for mode in modes if seconds[mode]]
        if not seconds.get("default"):
            return [
                {"mode": m, "seconds": seconds[m], "median_s": statistics.median(seconds[m])}
                for m in timed
            ]
        reference = outputs["default"] if unquantised is None else unquantised
        return [
            compare_with_default(mode, seconds, outputs, work, reference, renderer.peaks)
            for mode in timed
        ]

    def record_of(results: list[dict]) -> dict:
        return {
            "variant": variant.id,
            "size": args.size,
            "steps": args.steps,
            "frames": frames,
            "resolution": f"{height}x{width_px}",
            "tokens_per_row": renderer.counter.tokens,
            "full_size_tokens_per_row": renderer.full_tokens,
            "repeats": args.repeats,
            "compile": compiled,
            "fp8": args.fp8,
            "warm_up_steps": warm_up_steps,
            # With --fp8: one render of the unquantised model in "default" mode, the reference.
            "unquantised_default_s": unquantised_s,
            "environment": env,
            "results": results,
        }

    def write_partial(seconds, outputs, work) -> None:
        # After every timed render: a run stopped by a time limit keeps the renders it timed.
        partial = record_of(results_of(seconds, outputs, work)) | {"partial": True}
        write_json(args.out / f"{name}.json", partial)

    seconds, outputs, work = time_modes(
        renderer, modes, args.steps, warm_up_steps, args.repeats, write_partial
    )
    renderer.counter.remove()
    record = record_of(results_of(seconds, outputs, work))
    write_json(args.out / f"{name}.json", record)
    text = report(record)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
