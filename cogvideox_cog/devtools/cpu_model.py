"""The tiny random model that script/demo and script/serve fall back to without a CUDA GPU.

Real weights are 20+ GB and a CPU would take hours a video; the tiny model runs the predictors'
own code path in seconds, and its videos are noise. It is built once into the weights folder.

    python -m cogvideox_cog.devtools.cpu_model t2v|i2v|v2v

prints the shell exports that point a server at it, or nothing where a CUDA GPU is present or
COGVIDEOX_WEIGHTS_URL is already set (the operator's weights win). A COGVIDEOX_MODEL that the
predictor refuses is its error and exit status 1, GPU or not, so script/serve stops there.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import torch

from ..errors import ConfigError
from ..inputs import RESOLUTION_ENV
from ..settings import setting
from ..variants import MODEL_ENV, PREDICTOR_FILES, variant_from_env
from ..weights import WEIGHTS_URL_ENV, weights_root

NOTICE = (
    "No CUDA GPU: using a tiny random CogVideoX model built on the spot. The code path is the "
    "real one; the video is NOISE."
)


def use_tiny_model(task: str) -> Path:
    """Point this process's COGVIDEOX_WEIGHTS_URL at tiny weights of COGVIDEOX_MODEL's release
    family and task (video-to-video takes the text-to-video ones), building them if needed."""
    from .tiny import TINY, save_tiny_weights

    variant = variant_from_env("i2v" if task == "i2v" else "t2v", PREDICTOR_FILES[task])
    shape = f"{variant.family}-{variant.task}" + ("-2b" if variant.size == "2b" else "")
    tiny = weights_root() / f"tiny-{shape}"
    if not (tiny / "model_index.json").is_file():
        staging = tiny.with_name(f".{tiny.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        save_tiny_weights(staging, variant.family, variant.task, size=variant.size)
        shutil.rmtree(tiny, ignore_errors=True)
        staging.rename(tiny)
    os.environ[MODEL_ENV] = variant.id
    os.environ[WEIGHTS_URL_ENV] = str(tiny)
    if variant.family == "1.5" and not setting(RESOLUTION_ENV):
        # 1.5 renders at 768x1360 unless told; the tiny model's rotary grid is far smaller.
        spec = TINY[(variant.family, variant.task)]
        os.environ[RESOLUTION_ENV] = f"{spec.height}x{spec.width}"
    return tiny


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in ("t2v", "i2v", "v2v"):
        print("usage: python -m cogvideox_cog.devtools.cpu_model t2v|i2v|v2v", file=sys.stderr)
        return 2
    task = args[0]
    try:
        # First, GPU or not: the server would fail setup with this error, after starting.
        variant_from_env("i2v" if task == "i2v" else "t2v", PREDICTOR_FILES[task])
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    if torch.cuda.is_available() or setting(WEIGHTS_URL_ENV):
        return 0
    print(NOTICE, file=sys.stderr)
    use_tiny_model(task)
    for name in (MODEL_ENV, WEIGHTS_URL_ENV, RESOLUTION_ENV):
        if name in os.environ:
            print(f"export {name}={shlex.quote(os.environ[name])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
