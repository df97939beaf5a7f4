"""Render a sample video through the predictors' own code path.

On a CUDA machine this loads the real variant (COGVIDEOX_MODEL, weights as in setup()). Without
one it builds a tiny random CogVideoX model: the code path is the same, the video is noise.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from ..errors import ConfigError, GpuMemoryError, InputError, WeightsError
from ..generator import Request, VideoGenerator
from ..inputs import check_num_frames
from ..logs import setup_logging
from ..media.mp4 import probe_mp4
from ..variants import PREDICTOR_FILES, variant_from_env
from .cpu_model import NOTICE, use_tiny_model

PROMPT = (
    "A panda in a small red jacket plays an acoustic guitar on a wooden stool in a sunlit "
    "bamboo forest, other pandas watching and clapping along."
)


def main(argv: list[str] | None = None) -> int:
    # No abbreviations: script/demo rewrites a relative --output, which it must recognise.
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--output", type=Path, default=Path("outputs/demo.mp4"))
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--steps", type=int, help="default: 50 on a GPU, 4 on the tiny model")
    parser.add_argument("--frames", type=int, help="default: the variant's")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if args.steps is not None and not 1 <= args.steps <= 500:
        parser.error(f"--steps {args.steps}: from 1 to 500, as the predictors take")
    setup_logging()

    on_gpu = torch.cuda.is_available()
    try:
        # Before any weights: on a GPU a wrong --frames would fail after a 20+ GB download.
        check_num_frames(variant_from_env("t2v", PREDICTOR_FILES["t2v"]), args.frames)
        if not on_gpu:
            print(NOTICE)
            use_tiny_model("t2v")
        generator = VideoGenerator.from_env("t2v")
        video = generator.render_mp4(
            Request(
                prompt=args.prompt,
                negative_prompt="",
                num_frames=args.frames,
                num_inference_steps=args.steps or (50 if on_gpu else 4),
                guidance_scale=6.0,
                use_dynamic_cfg=None,
                fps=None,
                seed=args.seed,
            )
        )
    except (InputError, ConfigError, WeightsError, GpuMemoryError) as error:
        # Each says what to change; a traceback would bury it.
        print(f"demo: {error}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(video, args.output)
    shutil.rmtree(video.parent, ignore_errors=True)
    info = probe_mp4(args.output)
    print(
        f"wrote {args.output}: {info['frames']} frames, {info['width']}x{info['height']}, "
        f"{info['fps']:g} fps, {info['codec']} {info['pix_fmt']}"
        + ("" if on_gpu else " (noise from a tiny random model)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
