"""torch.compile's output kept beside the weights, so a start on the same volume loads the
compiled kernels instead of compiling them again.

Why: compiling the transformer costs minutes on a GPU (140 s a graph for 5B on an H100,
benchmarks/results/gpu/cogvideox-5b-compiled/), and a worker pays it on every start. torch can
serialise what it compiled (its "mega-cache": inductor's FX graph cache with the GPU kernels,
AOTAutograd's cache, autotuning results, `torch.compiler.save_cache_artifacts`) and put it
into a fresh process's caches (`load_cache_artifacts`). Dynamo still traces the Python on the
next start; inductor then finds every graph in its cache and compiles none.

The file is named by a digest of what the kernels depend on: the GPU (or "cpu") and its
index, torch and diffusers versions, variant, mode, attention backend, offload policy, the
number of GPUs a video is split over and the warm-up shapes; its second line (after a
format line) holds that key in full, and a file whose key differs (copied, renamed) is not
loaded. A file that fails to load is logged and ignored: setup then compiles as if it were
not there, and writes it again. A file no start has used for 30 days is removed, after the
warm-up (which loads this start's own).

The index gives each rank of a multi-GPU group a file of its own: torch's graph keys name the
inputs' device with its index, so a rank finds only the graphs it compiled itself (on
cuda:1, rank 1's), and one file shared by the group would keep only its last writer's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import diffusers
import torch
from torch._dynamo.utils import counters

from .attention import DEFAULT_BACKEND
from .files import remove_untouched, replace_atomically

log = logging.getLogger(__name__)

FOLDER = "compile-cache"  # under the weights cache folder
MAGIC = b"cogvideox-compile-cache 1\n"
ABANDONED_AFTER_S = 3600  # a temporary file no write touched for this long: its writer died
# A file no start loaded or wrote for this long is another torch's, diffusers' or setting's:
# each change of the key leaves its file behind on a volume that outlives upgrades.
UNUSED_AFTER_S = 30 * 24 * 3600


def cache_key(
    device: torch.device,
    variant_id: str,
    mode: str,
    warm_up: list,
    ranks: int = 1,
    attention: str = DEFAULT_BACKEND,
    offload: str = "none",
) -> dict:
    """What the compiled kernels depend on, beyond the model code torch checks itself.
    warm_up: the warm-up renders (VideoGenerator.warm_up_key). ranks: the GPUs a video is
    split over (parallel/); each rank's device index is in the key too, since torch's graph
    keys name it. offload: where the weights wait between uses (pipeline.py), which changes
    what the compiled blocks are handed. Deployments (or ranks) that differ in any of these
    compile other graphs, and a file holds only the graphs its writer used: sharing one, each
    start would overwrite the other's and compile again."""
    cuda = device.type == "cuda"
    return {
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
        "gpu_index": _gpu_index(device) if cuda else None,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "variant": variant_id,
        "mode": mode,
        "ranks": ranks,
        "attention": attention,
        "offload": offload,
        "warm_up": [list(render) for render in warm_up],
    }


def _gpu_index(device: torch.device) -> int:
    """The CUDA device's index; torch.device("cuda") is the current one."""
    return device.index if device.index is not None else torch.cuda.current_device()


def attention_of(transformer) -> str:
    """The attention backend setup gave every attention layer (attention.py's processor;
    None there, or another processor, is torch's SDPA), read from the model itself."""
    processor = next(iter(transformer.attn_processors.values()))
    backend = getattr(processor, "_attention_backend", None)
    return backend.value if backend is not None else DEFAULT_BACKEND


def artifact_path(folder: Path, key: dict) -> Path:
    text = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return folder / FOLDER / f"{key['variant']}-{key['mode']}-{digest}.bin"


def load(path: Path, key: dict) -> bool:
    """Put the file's artifacts into torch's caches; False (and a log line) if there are none
    to use. Never raises: a bad file only costs the compile it would have saved."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        log.info(f"compile cache: none yet for this GPU and torch ({path.name}): compiling")
        return False
    except OSError as error:
        log.warning(f"compile cache: cannot read {path}: {error}; compiling")
        return False
    header, _, rest = data.partition(b"\n")
    stored, _, payload = rest.partition(b"\n")
    try:
        foreign = header + b"\n" != MAGIC or json.loads(stored) != key
    except ValueError:
        foreign = True
    if foreign:
        log.warning(f"compile cache: {path} is not a compile cache for this key; ignored")
        return False
    started = time.monotonic()
    try:
        info = torch.compiler.load_cache_artifacts(payload)
    except Exception as error:  # a torn or corrupt file: whatever torch raises on it
        log.warning(f"compile cache: {path} did not load ({error!r}); ignored")
        return False
    if info is None:
        log.warning(f"compile cache: {path} holds nothing torch can load; ignored")
        return False
    with contextlib.suppress(OSError):  # in use: tidy() keeps it (a read-only volume keeps all)
        os.utime(path)
    log.info(
        f"compile cache: loaded {len(info.inductor_artifacts)} compiled graphs from "
        f"{path.name} in {time.monotonic() - started:.1f} s"
    )
    return True


def save(path: Path, key: dict) -> bool:
    """Write what torch compiled (or found) in this process; False if nothing or no write."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        log.info("compile cache: nothing compiled to save")
        return False
    payload, info = saved
    data = MAGIC + json.dumps(key, sort_keys=True).encode() + b"\n" + payload
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, data)
    except OSError as error:  # a read-only or full volume: the next start compiles again
        log.warning(f"compile cache: cannot write {path}: {error}")
        return False
    log.info(
        f"compile cache: saved {len(info.inductor_artifacts)} compiled graphs to {path} "
        f"({len(data) / 2**20:.1f} MiB)"
    )
    return True


def tidy(weights_root: Path) -> None:
    """Remove what no start will load, on every start (one that loads its file never saves),
    after its warm-up: the files killed starts left half-written, and the files no start used
    for 30 days."""
    folder = weights_root / FOLDER
    if removed := remove_untouched(folder, "*.tmp", ABANDONED_AFTER_S):
        log.info(f"compile cache: removed {removed} files killed starts left half-written")
    if removed := remove_untouched(folder, "*.bin", UNUSED_AFTER_S):
        log.info(f"compile cache: removed {removed} files no start used for 30 days")


def compiled_graphs() -> int:
    """Graphs inductor compiled in this process so far (its FX graph cache misses)."""
    return counters["inductor"]["fxgraph_cache_miss"]


def warm_up_with_cache(generator, weights_root: Path, load_saved: bool = True) -> int:
    """generator.warm_up() with the compile cache: load it first; save it if the warm-up had
    to compile anything. Returns the number of graphs compiled (0: all were loaded).
    load_saved: False compiles whatever the folder holds, and saves (a benchmark's cold
    start, which a file left by an earlier start would make a warm one)."""
    key = cache_key(
        generator.device,
        generator.variant.id,
        generator.mode,
        generator.warm_up_key(),
        ranks=generator.engine.world_size if generator.engine is not None else 1,
        attention=attention_of(generator.pipe.transformer),
        offload=generator.offload,
    )
    path = artifact_path(weights_root, key)
    if load_saved:
        loaded = load(path, key)
    else:
        log.info(f"compile cache: compiling from nothing; {path.name} is not loaded")
        loaded = False
    before = compiled_graphs()
    try:
        generator.warm_up()
    finally:
        # Not before: this start's file, a month unused, would go just before its load, and
        # so would the other ranks' of a group, which load theirs before their warm-up (whose
        # steps wait for every rank). By now each has loaded its own, marking it used.
        tidy(weights_root)
    compiled = compiled_graphs() - before
    log.info(f"compile cache: warm-up compiled {compiled} graphs")
    if compiled or not loaded:
        save(path, key)
    return compiled
