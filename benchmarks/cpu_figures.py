"""CPU-side costs of a prediction that no GPU changes, measured against the diffusers defaults.

(a) mp4 encoding of frames shaped like CogVideoX output (49 x 480 x 720 at 8 fps, 81 x 768 x 1360
    at 16 fps; moving gradients, a moving disc and mild noise, as float frames in [0, 1] the way
    output_type="np" returns them) by our `cogvideox_cog.media.mp4.encode_mp4` and by diffusers'
    `export_to_video` (imageio + imageio-ffmpeg, its recommended backend), interleaved, median of
    several repetitions; both files are probed with our `probe_mp4` and compared with the source.
(b) the per-prediction overhead of the predictor path, `VideoGenerator.render_mp4` on the tiny
    1.0 text-to-video model, against calling the same diffusers pipeline directly with the same
    arguments (output_type="np") followed by `export_to_video`, with one torch thread.

Needs imageio and imageio-ffmpeg (benchmarks/requirements.txt) besides the project's packages.

    python3 benchmarks/cpu_figures.py --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import av
import numpy as np
import torch
from diffusers import CogVideoXPipeline
from diffusers.utils import export_to_video

from benchmarks.common import environment, markdown_table, request_fields, write_json
from cogvideox_cog.devtools.tiny import build_tiny_pipeline
from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.media.mp4 import DEFAULT_CRF, DEFAULT_PRESET, encode_mp4, probe_mp4
from cogvideox_cog.pipeline import PIPELINES, configure_pipeline
from cogvideox_cog.variants import VARIANTS

log = logging.getLogger("cpu_figures")
CPU = torch.device("cpu")
PROMPT = "a panda in a red jacket plays an acoustic guitar in a sunlit bamboo forest"


def synthetic_frames(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Float32 (F, H, W, 3) in [0, 1]: waves and a diagonal gradient drifting at different speeds,
    a bright disc crossing the frame and grain of 1.5 levels of 255 (standard deviation), so the
    encoder sees motion, edges and texture rather than flat frames that encode for free. More
    noise than that makes every encoder spend its bits (and time) on the noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    out = np.empty((frames, height, width, 3), dtype=np.float32)
    for t in range(frames):
        phase = t / frames
        out[t, ..., 0] = 0.5 + 0.4 * np.sin(2 * np.pi * (2 * x + phase))
        out[t, ..., 1] = 0.5 + 0.4 * np.sin(2 * np.pi * (1.5 * y - 0.7 * phase) + 3 * x)
        out[t, ..., 2] = (0.6 * x + 0.4 * y + phase) % 1.0
        cy, cx, radius = 0.5 + 0.3 * np.sin(2 * np.pi * phase), phase, 0.12
        disc = ((y - cy) * height) ** 2 + ((x - cx) * width) ** 2 < (radius * height) ** 2
        out[t][disc] = (0.95, 0.9, 0.8)
        out[t] += rng.normal(0.0, 1.5 / 255, size=(height, width, 3)).astype(np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


def psnr(path: Path, source: np.ndarray) -> float:
    """PSNR (dB) of the decoded RGB frames against the source rounded to 8 bits."""
    reference = np.rint(source * 255.0).astype(np.uint8)
    squared, count = 0.0, 0
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            rgb = frame.to_ndarray(format="rgb24").astype(np.float32)
            squared += float(((rgb - reference[index]) ** 2).sum())
            count += rgb.size
    return 10 * np.log10(255.0**2 / (squared / count))


@dataclass
class Samples:
    """Wall-clock and CPU seconds (user + system, this process and its waited-for children, so
    the ffmpeg process of export_to_video counts too) of repeated calls. On a shared host the
    wall time includes waiting for other work; CPU time mostly does not."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def call(self, fn, *args, **kwargs):
        before = _cpu_seconds()
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.wall.append(time.perf_counter() - started)
        self.cpu.append(_cpu_seconds() - before)
        return result

    def summary(self) -> dict:
        return {
            "wall_s": self.wall,
            "cpu_s": self.cpu,
            "median_wall_s": statistics.median(self.wall),
            "min_wall_s": min(self.wall),
            "median_cpu_s": statistics.median(self.cpu),
        }


def _cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _ratios(ours: Samples, theirs: Samples) -> dict:
    """Ratios of medians, and the median of the ratios within each (back-to-back) repetition,
    which cancels slow drift of the host better."""
    return {
        "wall_ratio_of_medians": statistics.median(ours.wall) / statistics.median(theirs.wall),
        "wall_median_of_paired_ratios": statistics.median(
            a / b for a, b in zip(ours.wall, theirs.wall, strict=True)
        ),
        "cpu_ratio_of_medians": statistics.median(ours.cpu) / statistics.median(theirs.cpu),
    }


ENCODERS = {
    "ours": f"encode_mp4: libx264 crf {DEFAULT_CRF}, preset {DEFAULT_PRESET} (what we ship)",
    "diffusers": "export_to_video: imageio-ffmpeg, quality 5 (libx264 crf 25, preset medium)",
    "ours_crf25": "encode_mp4 at crf 25: the same rate setting as export_to_video",
}


def encoding(shape: tuple[int, int, int], fps: int, repeats: int, workdir: Path) -> dict:
    frames = synthetic_frames(*shape)
    calls = {
        "ours": lambda path: encode_mp4(frames, path, fps=fps),
        "diffusers": lambda path: export_to_video(frames, str(path), fps=fps),
        "ours_crf25": lambda path: encode_mp4(frames, path, fps=fps, crf=25),
    }
    samples = {name: Samples() for name in calls}
    for _ in range(repeats):  # interleaved, so drift in machine speed hits all alike
        for name, call in calls.items():
            samples[name].call(call, workdir / f"{name}.mp4")
    result = {"frames": shape[0], "height": shape[1], "width": shape[2], "fps": fps}
    for name in calls:
        path = workdir / f"{name}.mp4"
        info = probe_mp4(path)
        result[name] = {
            "settings": ENCODERS[name],
            **samples[name].summary(),
            "bytes": path.stat().st_size,
            "codec": info["codec"],
            "profile": info["profile"],
            "pix_fmt": info["pix_fmt"],
            "frames": info["frames"],
            "duration_s": info["duration"],
            "faststart": info["faststart"],
            "psnr_db": psnr(path, frames),
        }
        if name != "diffusers":
            result[name]["vs_diffusers"] = _ratios(samples[name], samples["diffusers"])
    log.info(
        f"encode {shape}: "
        + ", ".join(f"{name} {result[name]['median_wall_s']:.2f} s" for name in calls)
    )
    return result


def predictor_and_direct(steps: int, frames: int, workdir: Path):
    """Our predictor on the tiny model, and the same modules called as a diffusers user would
    call them (the same scheduler and VAE settings): one function for each path's prediction,
    one for the bare pipeline call; and the predictor, for its size and release_memory."""
    variant = VARIANTS["cogvideox-5b"]
    pipe = configure_pipeline(
        PIPELINES["t2v"](**build_tiny_pipeline("1.0", "t2v").components), variant, CPU, "none"
    )
    generator = VideoGenerator(variant, pipe, CPU)
    height, width = generator.render_size
    direct = CogVideoXPipeline(**pipe.components)
    direct.set_progress_bar_config(disable=True)
    request = Request(**request_fields(PROMPT, frames, steps, 7))

    def call_direct():
        return direct(
            prompt=PROMPT,
            negative_prompt=None,
            num_frames=frames,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=6.0,
            use_dynamic_cfg=variant.dynamic_cfg,
            generator=torch.Generator("cpu").manual_seed(7),
            max_sequence_length=226,
            output_type="np",
        ).frames[0]

    def direct_prediction():
        video = call_direct()
        export_to_video(video, str(workdir / "direct.mp4"), fps=variant.fps)
        return video

    def our_prediction():
        generator.render_mp4(request).unlink()

    return generator, our_prediction, direct_prediction, call_direct


def overhead(steps: int, frames: int, repeats: int, workdir: Path) -> dict:
    """Our prediction against the diffusers one, back to back in every repetition, and the
    pieces (the pipeline call, our encoder, release_memory) that account for the difference."""
    generator, our_prediction, direct_prediction, call_direct = predictor_and_direct(
        steps, frames, workdir
    )
    variant = generator.variant
    # One untimed round of each: first-call costs (oneDNN primitives, lazy imports) are not
    # per-prediction overhead.
    our_prediction()
    direct_prediction()
    ours, theirs, pipe_only, our_encode, release = (Samples() for _ in range(5))
    for _ in range(repeats):
        ours.call(our_prediction)
        video = theirs.call(direct_prediction)
        pipe_only.call(call_direct)
        our_encode.call(encode_mp4, video, workdir / "ours.mp4", fps=variant.fps)
        # render_mp4() ends with release_memory(): gc.collect() (+ empty_cache on a GPU).
        release.call(generator.release_memory)
    median = statistics.median
    height, width = generator.render_size
    return {
        "model": "tiny 1.0 text-to-video (cogvideox_cog.devtools.tiny), float32",
        "variant_rules": variant.id,
        "steps": steps,
        "frames": frames,
        "height": height,
        "width": width,
        "repeats": repeats,
        "ours_generate": ours.summary(),
        "diffusers_pipeline_and_export_to_video": theirs.summary(),
        "diffusers_pipeline_only": pipe_only.summary(),
        "ours_encode_mp4_of_same_frames": our_encode.summary(),
        "release_memory": release.summary(),
        "ours_vs_diffusers": _ratios(ours, theirs),
        # What generate adds around the same pipeline call besides its own encoder: input
        # checks, the prompt-length check (one tokenisation per prompt), per-step logging,
        # gc + cache release.
        "wrapper_overhead_wall_s": median(ours.wall)
        - median(pipe_only.wall)
        - median(our_encode.wall),
        "wrapper_overhead_cpu_s": median(ours.cpu) - median(pipe_only.cpu) - median(our_encode.cpu),
    }


def _times(summary: dict) -> list[str]:
    return [
        f"{summary['median_wall_s']:.3f} ({summary['min_wall_s']:.3f})",
        f"{summary['median_cpu_s']:.3f}",
    ]


def _ratio_cell(ratios: dict) -> str:
    return (
        f"{ratios['wall_ratio_of_medians']:.2f} / {ratios['wall_median_of_paired_ratios']:.2f}"
        f" / {ratios['cpu_ratio_of_medians']:.2f}"
    )


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# CPU figures: mp4 encoding and predictor overhead",
        "",
        f"- Command: `{env['command']}`",
        f"- Host: {env['cpu_count']} CPUs, torch threads {env['torch_threads']}; load average "
        f"{env['load_average'][0]} at the start, {result['load_average_at_end'][0]} at the end "
        "(other work on the host: wall times include waiting for it, CPU times mostly do not)",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
        "- Wall: median (min) seconds of interleaved repetitions. CPU: median user + system",
        "  seconds, child processes included. Ratios: wall ratio of medians / wall median of",
        "  per-repetition ratios / CPU ratio of medians.",
        "",
        "## mp4 encoding",
        "",
        encoding_table(result["encoding"]),
        *overhead_section(result["overhead"]),
    ]
    return "\n".join(lines)


def encoding_table(encodings: list[dict]) -> str:
    rows = []
    for item in encodings:
        for name in ENCODERS:
            e = item[name]
            rows.append(
                [
                    f"{item['frames']}x{item['height']}x{item['width']} @ {item['fps']} fps",
                    e["settings"],
                    *_times(e),
                    f"{e['bytes'] / 1e6:.2f}",
                    f"{e['codec']} {e['profile']} {e['pix_fmt']}",
                    "yes" if e["faststart"] else "no",
                    f"{e['psnr_db']:.1f}",
                    _ratio_cell(e["vs_diffusers"]) if "vs_diffusers" in e else "-",
                ]
            )
    header = ["frames", "encoder", "wall s", "CPU s", "MB", "codec", "faststart", "PSNR dB"]
    return markdown_table([*header, "vs diffusers"], rows)


def overhead_section(o: dict) -> list[str]:
    """The predictor-overhead section's lines: a heading, the table and the ratios."""
    return [
        "",
        f"## Predictor overhead ({o['model']}, {o['steps']} steps, {o['frames']} frames at "
        f"{o['width']}x{o['height']}, {o['repeats']} repetitions)",
        "",
        markdown_table(
            ["path", "wall s", "CPU s"],
            [
                [
                    "`VideoGenerator.render_mp4` (ours, with encode_mp4)",
                    *_times(o["ours_generate"]),
                ],
                [
                    "diffusers pipeline call + `export_to_video`",
                    *_times(o["diffusers_pipeline_and_export_to_video"]),
                ],
                ["  the pipeline call alone", *_times(o["diffusers_pipeline_only"])],
                [
                    "our `encode_mp4` of the same frames",
                    *_times(o["ours_encode_mp4_of_same_frames"]),
                ],
                [
                    "generate minus pipeline call minus encode_mp4 (wrapper overhead)",
                    f"{o['wrapper_overhead_wall_s']:.3f}",
                    f"{o['wrapper_overhead_cpu_s']:.3f}",
                ],
                ["`release_memory()` alone (gc.collect)", *_times(o["release_memory"])],
            ],
        ),
        "",
        f"Ours / diffusers: {_ratio_cell(o['ours_vs_diffusers'])}.",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("cogvideox_cog").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    # One torch thread: the tiny model gains nothing from more, and on a small shared host two
    # OpenMP threads stall whenever other work holds a core (the tiny pipeline call went from
    # 1.2 s to 20 s on a 2-CPU VM with a busy neighbour; with one thread it stayed at 1.2 s).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats-small", type=int, default=7, help="49x480x720 encodes each")
    parser.add_argument("--repeats-large", type=int, default=5, help="81x768x1360 encodes each")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--repeats-overhead", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    result: dict = {"environment": environment(CPU)}
    with tempfile.TemporaryDirectory(prefix="cpu-figures-") as temp:
        workdir = Path(temp)
        result["encoding"] = [
            encoding((49, 480, 720), 8, args.repeats_small, workdir),
            encoding((81, 768, 1360), 16, args.repeats_large, workdir),
        ]
        result["overhead"] = overhead(args.steps, args.frames, args.repeats_overhead, workdir)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.out / "cpu_figures.json", result)
    text = markdown(result)
    (args.out / "results.md").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
