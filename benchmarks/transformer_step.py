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

from benchmarks.common import environment, quantize_fp8, require_fp8, synchronize, write_json
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
    # As the pipeline pads 1.5's latents: its patch embedding takes frames in pairs.
    latent_frames += -latent_frames % (config.patch_size_t or 1)
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="cogvideox-5b")
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fp8", action="store_true", help="also torchao dynamic fp8")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the compile candidate (compile_setup.py)"
    )
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def build_step(args, variant, device: torch.device):
    """The transformer at --size on `device`, the inputs of one CFG step at the variant's
    frames and size (the model's sample size at tiny size), and that shape (frames, h, w)."""
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
    return transformer, inputs, (frames, height, width)


class Candidates:
    """Times each candidate on the same step and records it against the baseline's output."""

    def __init__(self, transformer, inputs: dict, repeats: int, device: torch.device, save=None):
        self.transformer, self.inputs = transformer, inputs
        self.repeats, self.device = repeats, device
        self.rows: list[dict] = []
        self.save = save or (lambda rows: None)  # called with the rows after each one
        self.reference = None
        self.best = self.best_backend = None

    def record(self, name: str, seconds: float, out, extra: dict | None = None) -> None:
        reference = self.reference
        error = 0.0 if reference is None else float((out - reference).norm() / reference.norm())
        row = {"candidate": name, "step_s": round(seconds, 4), "rel_l2_vs_default": error}
        if self.device.type == "cuda":  # weights plus what the timed steps held at most
            peak = torch.cuda.max_memory_allocated(self.device)
            row["peak_allocated_gib"] = round(peak / 2**30, 2)
        row.update(extra or {})
        self.rows.append(row)
        self.save(self.rows)
        print(f"{name:32s} {seconds:8.4f} s/step  rel.err {error:.2e}", flush=True)

    def time(self, model, backend, warmup: int = 1):
        return time_steps(model, self.inputs, backend, warmup, self.repeats, self.device)

    def attention_backends(self) -> None:
        """The baseline (the backend torch picks), then each forced backend this device has;
        the fastest is the one every later candidate runs with."""
        baseline_s, out = self.time(self.transformer, None, warmup=2)
        self.record("sdpa default", baseline_s, out)
        self.reference = out
        for name, backend in list(BACKENDS.items())[1:]:
            try:
                seconds, out = self.time(self.transformer, backend)
                self.record(f"sdpa {name}", seconds, out)
            except RuntimeError as error:  # a backend this device or shape does not have
                self.rows.append({"candidate": f"sdpa {name}", "error": str(error)[:300]})
                self.save(self.rows)
                print(f"sdpa {name}: {str(error)[:200]}", flush=True)
        self.best = min((r for r in self.rows if "step_s" in r), key=lambda r: r["step_s"])
        self.best_backend = BACKENDS[self.best["candidate"].split()[-1]]

    def fused_qkv(self) -> None:
        self.transformer.fuse_qkv_projections()
        seconds, out = self.time(self.transformer, self.best_backend)
        self.record(f"fused qkv + {self.best['candidate']}", seconds, out)
        self.transformer.unfuse_qkv_projections()
        # diffusers restores the processors but keeps the fused weights (2.4 GB for 5B):
        # dropped here, so that the later candidates' peak memory does not count them.
        for module in self.transformer.modules():
            if getattr(module, "fused_projections", False):
                del module.to_qkv
                module.fused_projections = False

    def compiled(self, prefix: str = "") -> None:
        """torch.compile from scratch: the first call's seconds as compile_s, then the step."""
        torch._dynamo.reset()  # a fresh compile, timed from scratch
        started = time.perf_counter()
        compiled = torch.compile(self.transformer)
        context = sdpa_kernel(self.best_backend) if self.best_backend else nullcontext()
        with torch.no_grad(), context:
            compiled(**self.inputs)
        synchronize(self.device)
        compile_s = time.perf_counter() - started
        seconds, out = self.time(compiled, self.best_backend)
        extra = {"compile_s": round(compile_s, 1)}
        self.record(f"{prefix}compile + {self.best['candidate']}", seconds, out, extra)

    def fp8(self) -> None:
        """The transformer quantised to fp8 for good, eager then compiled."""
        quantize_fp8(self.transformer, self.device)
        seconds, out = self.time(self.transformer, self.best_backend)
        self.record(f"fp8 + {self.best['candidate']}", seconds, out)
        self.compiled("fp8 + ")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    variant = VARIANTS[args.variant]
    if args.fp8:
        require_fp8(device, getattr(torch, variant.dtype))  # the model's dtype on a GPU
    transformer, inputs, (frames, height, width) = build_step(args, variant, device)
    result = {
        "variant": variant.id,
        "size": args.size,
        "shape": f"{frames}x{height}x{width}, CFG batch 2",
        "environment": environment(device),
    }
    name = f"transformer_step-{variant.id}" + ("" if args.size == "full" else f"-{args.size}")
    path = args.out / f"{name}{'-fp8' if args.fp8 else ''}.json"

    def save(rows: list[dict]) -> None:  # after every candidate: a run stopped by a time
        write_json(path, result | {"rows": rows})  # limit keeps the ones it timed

    candidates = Candidates(transformer, inputs, args.repeats, device, save)
    candidates.attention_backends()
    candidates.fused_qkv()
    if not args.no_compile:
        candidates.compiled()
    if args.fp8:
        candidates.fp8()
    return 0


if __name__ == "__main__":
    sys.exit(main())
