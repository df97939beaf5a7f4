"""One denoising step of the full-size transformer under each candidate speed-up, side by side.

A step is one transformer forward on the CFG batch of 2 (what the pipeline runs 50 times), so
the step time decides the prediction time. Each candidate is checked against the baseline
output (relative L2 error) so only output-preserving ones are taken into the default path.

    python3 benchmarks/transformer_step.py --variant cogvideox-5b --out DIR

Needs a CUDA GPU. Candidates: SDPA with the backend torch picks, then forced to flash,
cuDNN and memory-efficient attention; fused QKV projections; torch.compile of the transformer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import environment
from benchmarks.pipeline_speed import full_components
from cogvideox_cog.pipeline import TextToVideoPipeline, pipeline_dtype
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


def time_steps(transformer, inputs: dict, backend, warmup: int, repeats: int):
    context = sdpa_kernel(backend) if backend is not None else nullcontext()
    with torch.no_grad(), context:
        for _ in range(warmup):
            out = transformer(**inputs)[0]
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = transformer(**inputs)[0]
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times), out.float()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default="cogvideox-5b")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    device = torch.device("cuda")
    variant = VARIANTS[args.variant]
    dtype = pipeline_dtype(variant, device)
    components = full_components(variant, device, dtype)
    pipe = TextToVideoPipeline(**components)
    transformer = pipe.transformer
    height, width = (
        transformer.config.sample_height * 8,
        transformer.config.sample_width * 8,
    )
    if variant.native_size:
        height, width = variant.native_size
    inputs = step_inputs(pipe, args.frames, height, width, device, dtype)
    rows = []

    def record(name, seconds, out, reference, extra=None):
        error = 0.0 if reference is None else float((out - reference).norm() / reference.norm())
        row = {"candidate": name, "step_s": round(seconds, 4), "rel_l2_vs_default": error}
        row.update(extra or {})
        rows.append(row)
        print(f"{name:32s} {seconds:8.4f} s/step  rel.err {error:.2e}", flush=True)

    baseline_s, reference = time_steps(transformer, inputs, None, 2, args.repeats)
    record("sdpa default", baseline_s, reference, None)
    for name, backend in list(BACKENDS.items())[1:]:
        try:
            seconds, out = time_steps(transformer, inputs, backend, 1, args.repeats)
            record(f"sdpa {name}", seconds, out, reference)
        except RuntimeError as error:
            rows.append({"candidate": f"sdpa {name}", "error": str(error)[:300]})
            print(f"sdpa {name}: {str(error)[:200]}", flush=True)

    best = min((r for r in rows if "step_s" in r), key=lambda r: r["step_s"])
    best_backend = BACKENDS[best["candidate"].split()[-1]]

    transformer.fuse_qkv_projections()
    seconds, out = time_steps(transformer, inputs, best_backend, 1, args.repeats)
    record(f"fused qkv + {best['candidate']}", seconds, out, reference)
    transformer.unfuse_qkv_projections()

    started = time.perf_counter()
    compiled = torch.compile(transformer)
    with torch.no_grad(), sdpa_kernel(best_backend) if best_backend else nullcontext():
        compiled(**inputs)
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - started
    seconds, out = time_steps(compiled, inputs, best_backend, 1, args.repeats)
    record(
        f"compile + {best['candidate']}",
        seconds,
        out,
        reference,
        {"compile_s": round(compile_s, 1)},
    )

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "variant": variant.id,
        "shape": f"{args.frames}x{height}x{width}, CFG batch 2",
        "environment": environment(device),
        "rows": rows,
    }
    (args.out / f"transformer_step-{variant.id}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
