"""One denoising step of the full-size transformer under each candidate speed-up, side by side.

A step is one transformer forward on the CFG batch of 2 (what the pipeline runs 50 times), so
the step time decides the prediction time. Each candidate is checked against the baseline
output (relative L2 error) so only output-preserving ones are taken into the default path.

    python3 benchmarks/transformer_step.py --variant cogvideox-5b --out DIR

Measures on a CUDA GPU (`--size tiny --device cpu` only checks that it runs). Candidates:
SDPA with the backend torch picks, then forced to flash, cuDNN and memory-efficient attention;
fused QKV projections; torch.compile of the transformer; then, with `--fp8` (torchao, a GPU
of compute capability 8.9 or more), the transformer quantised to dynamic fp8, eager and
compiled. fp8 does not preserve the output: its error
against the bf16 baseline is in the same column, for the fast path to weigh.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import environment, quantize_fp8, require_fp8, write_json
from benchmarks.pipeline_speed import full_components, tiny_components
from cogvideox_cog.pipeline import PIPELINES, pipeline_dtype
from cogvideox_cog.variants import VARIANTS

BACKENDS = {
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def step_inputs(pipe, frames: int, height: int, width: int, device, dtype) -> dict:
    config = pipe.transformer.config
    latent_frames = (frames - 1) // 4 + 1
    latents = torch.randn(2, latent_frames, config.in_channels, height // 8, width // 8)
    text = torch.randn(2, config.max_text_seq_length, config.text_embed_dim)
    rotary = (
        pipe._prepare_rotary_positional_embeddings(height, width, latent_frames, device)
        if config.use_rotary_positional_embeddings
        else None
    )
    return {
        "hidden_states": latents.to(device, dtype),
        "encoder_hidden_states": text.to(device, dtype),
        "timestep": torch.tensor([500, 500], device=device),
        "image_rotary_emb": rotary,
        "return_dict": False,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(transformer, inputs: dict, backend, warmup: int, repeats: int, device):
    """Median seconds of `repeats` steps after `warmup` untimed ones, and the last output."""
    context = sdpa_kernel(backend) if backend is not None else nullcontext()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), context:
        for _ in range(warmup):
            out = transformer(**inputs)[0]
        synchronize(device)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            out = transformer(**inputs)[0]
            synchronize(device)
            times.append(time.perf_counter() - started)
    return statistics.median(times), out.float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="cogvideox-5b")
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fp8", action="store_true", help="also torchao dynamic fp8")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.fp8:
        require_fp8(device)
    variant = VARIANTS[args.variant]
    dtype = pipeline_dtype(variant, device)
    build = full_components if args.size == "full" else tiny_components
    pipe = PIPELINES["t2v"](**build(variant, device, dtype))
    transformer = pipe.transformer.to(device)
    config = transformer.config
    height, width = config.sample_height * 8, config.sample_width * 8
    if variant.native_size and args.size == "full":
        height, width = variant.native_size
    frames = args.frames or variant.default_frames
    inputs = step_inputs(pipe, frames, height, width, device, dtype)
    rows = []

    def record(name, seconds, out, reference, extra=None):
        error = 0.0 if reference is None else float((out - reference).norm() / reference.norm())
        row = {"candidate": name, "step_s": round(seconds, 4), "rel_l2_vs_default": error}
        if device.type == "cuda":  # weights plus what the timed steps held at most
            row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        row.update(extra or {})
        rows.append(row)
        print(f"{name:32s} {seconds:8.4f} s/step  rel.err {error:.2e}", flush=True)

    baseline_s, reference = time_steps(transformer, inputs, None, 2, args.repeats, device)
    record("sdpa default", baseline_s, reference, None)
    for name, backend in list(BACKENDS.items())[1:]:
        try:
            seconds, out = time_steps(transformer, inputs, backend, 1, args.repeats, device)
            record(f"sdpa {name}", seconds, out, reference)
        except RuntimeError as error:  # a backend this device or shape does not have
            rows.append({"candidate": f"sdpa {name}", "error": str(error)[:300]})
            print(f"sdpa {name}: {str(error)[:200]}", flush=True)

    best = min((r for r in rows if "step_s" in r), key=lambda r: r["step_s"])
    best_backend = BACKENDS[best["candidate"].split()[-1]]

    transformer.fuse_qkv_projections()
    seconds, out = time_steps(transformer, inputs, best_backend, 1, args.repeats, device)
    record(f"fused qkv + {best['candidate']}", seconds, out, reference)
    transformer.unfuse_qkv_projections()

    def record_compiled(name: str) -> None:
        torch._dynamo.reset()  # a fresh compile, timed from scratch
        started = time.perf_counter()
        compiled = torch.compile(transformer)
        with torch.no_grad(), sdpa_kernel(best_backend) if best_backend else nullcontext():
            compiled(**inputs)
        synchronize(device)
        compile_s = time.perf_counter() - started
        seconds, out = time_steps(compiled, inputs, best_backend, 1, args.repeats, device)
        extra = {"compile_s": round(compile_s, 1)}
        record(f"{name}compile + {best['candidate']}", seconds, out, reference, extra)

    record_compiled("")
    if args.fp8:
        quantize_fp8(transformer, device)
        seconds, out = time_steps(transformer, inputs, best_backend, 1, args.repeats, device)
        record(f"fp8 + {best['candidate']}", seconds, out, reference)
        record_compiled("fp8 + ")

    result = {
        "variant": variant.id,
        "size": args.size,
        "shape": f"{frames}x{height}x{width}, CFG batch 2",
        "environment": environment(device),
        "rows": rows,
    }
    name = f"transformer_step-{variant.id}" + ("" if args.size == "full" else f"-{args.size}")
    write_json(args.out / f"{name}{'-fp8' if args.fp8 else ''}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
