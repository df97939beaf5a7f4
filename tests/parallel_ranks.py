"""Rank processes for the parallel engine tests: the same tiny pipelines on N gloo processes.

`run_ranks` spawns N processes (torch.multiprocessing, gloo on 127.0.0.1); each builds every
case's pipeline from the same saved tiny weights, installs ContextParallel and renders the
case as the process model will: every rank runs the pipeline, rank 0 alone decodes. `render`
is the same rendering on one process without the engine: the reference.

Besides the frames, each rank reports the last step's latents (to show that all ranks agree)
and the shapes its first attention layer was given (to show that the work was split). Rank 0
has its Progress hooks on the blocks, as in the rank processes, and counts what they sent.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft.tuners.tuners_utils import BaseTunerLayer
from torch._dynamo.utils import counters

from cogvideox_cog.errors import InputError
from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.lora.slot import LoraSlot
from cogvideox_cog.parallel.engine import ContextParallel
from cogvideox_cog.parallel.ranks import (
    LoraFetchedOnce,
    ReportedProgress,
    agree_on_vae_tiling,
    rendezvous_store,
)
from cogvideox_cog.pipeline import build_pipeline, compile_transformer
from cogvideox_cog.speed import step_cache
from cogvideox_cog.variants import VARIANTS
from tests.markers import GUARDS_BACKEND

CPU = torch.device("cpu")
SEED = 7


@dataclass(frozen=True)
class Case:
    """One rendering: a variant's tiny weights, a mode and the pipeline's arguments."""

    variant: str  # a VARIANTS id, e.g. "cogvideox-5b"
    weights: Path
    mode: str = "t2v"  # t2v, i2v or v2v
    call: dict = field(default_factory=dict)  # num_frames, image, video, height, width...
    guidance_scale: float = 6.0
    steps: int = 2
    speed_mode: str = "default"
    lora: Path | None = None
    compiled: bool = False  # the blocks compiled (aot_eager), as setup does
    offload: str = "none"  # "model": accelerate's hooks, on the CPU as on a GPU
    renders: int = 1  # the pipeline renders this many times; the last one is returned
    # Where set, the pipeline first renders at this guidance scale: an earlier request,
    # maybe in another layout, on the ranks that then render this one.
    earlier_guidance_scale: float | None = None
    # Ranks whose VAE does not tile, as COGVIDEOX_VAE_TILING=auto leaves a GPU with more free
    # memory than the others; one process tiles.
    untiled_ranks: tuple[int, ...] = ()


@dataclass
class Rendered:
    frames: np.ndarray | None  # None where the rank did not decode
    latents: np.ndarray  # after the last step
    layout: str
    attention_inputs: list[tuple[int, int, int]]  # (batch, video tokens, text tokens)
    refusal: str | None = None  # an InputError's message, where the case was refused
    graph_breaks: int = 0  # dynamo's, this process so far (compiled cases)
    graphs: int = 0  # dynamo's graphs, this process so far (compiled cases)
    progress: int = 0  # Progress messages rank 0's hooks sent during this case


class _Sent(list):
    """Rank 0's messages, kept here instead of going down a pipe."""

    def send(self, message) -> None:
        self.append(message)


def render(case: Case, world_size: int | None = None, decode: bool = True) -> Rendered:
    """The case on this process; with `world_size`, as one rank of the engine."""
    variant = VARIANTS[case.variant]
    # Set up in setup's order: the engine before the weights are placed, then compiling.
    engine = ContextParallel(world_size) if world_size else None
    installing = engine.install if engine else None
    tiled = not world_size or dist.get_rank() not in case.untiled_ranks
    pipe = build_pipeline(
        variant,
        case.weights,
        CPU,
        case.offload,
        mode=case.mode,
        vae_tiling=tiled,
        before_placing=installing,
    )
    if world_size:
        agree_on_vae_tiling(pipe, CPU)
    if case.compiled:
        compile_transformer(pipe.transformer, GUARDS_BACKEND)
    sent = _Sent()
    if world_size and decode:  # rank 0
        ReportedProgress(sent).install(pipe.transformer)
    if case.lora is not None:
        LoraSlot(pipe, variant.id).use(case.lora, 0.8)
    seen = []
    pipe.transformer.transformer_blocks[0].attn1.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(_token_counts(kwargs)), with_kwargs=True
    )
    last = {}
    earlier = [] if case.earlier_guidance_scale is None else [case.earlier_guidance_scale]
    for scale in [*earlier, *[case.guidance_scale] * case.renders]:
        guidance = scale > 1
        seen.clear()
        running = engine.run(guidance) if engine else nullcontext("single process")
        with step_cache(pipe, case.speed_mode, guidance), running as layout:
            output = pipe(
                prompt="a panda plays guitar in a bamboo forest",
                negative_prompt="blurry",
                num_inference_steps=case.steps,
                guidance_scale=scale,
                use_dynamic_cfg=variant.dynamic_cfg,
                generator=torch.Generator("cpu").manual_seed(SEED),
                output_type="np" if decode else "latent",
                callback_on_step_end=lambda _p, _s, _t, tensors: last.update(tensors) or {},
                **case.call,
            )
    frames = output.frames[0] if decode else None
    breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
    return Rendered(
        frames,
        last["latents"].numpy(),
        str(layout),
        seen,
        graph_breaks=breaks,
        graphs=graphs,
        progress=len(sent),
    )


def _token_counts(kwargs: dict) -> tuple[int, int, int]:
    video, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
    return video.shape[0], video.shape[1], text.shape[1]


def run_ranks(world_size: int, cases: dict[str, Case], out: Path) -> dict[str, list[Rendered]]:
    """Render every case on `world_size` rank processes: {name: [Rendered per rank]}."""
    spawn_ranks(_rank_main, world_size, world_size, cases, out)
    return {name: [_read(out / f"{name}-{rank}") for rank in range(world_size)] for name in cases}


def _rank_main(rank: int, port: int, world_size: int, cases: dict[str, Case], out: Path):
    torch.set_num_threads(1)  # the ranks share the machine's cores
    join_ranks(rank, port, world_size)
    try:
        for name, case in cases.items():
            try:
                rendered = render(case, world_size, decode=rank == 0)
            except InputError as error:
                rendered = Rendered(None, np.zeros(0), "refused", [], refusal=str(error))
            _write(out / f"{name}-{rank}", rendered)
    finally:
        dist.destroy_process_group()


def _write(stem: Path, rendered: Rendered) -> None:
    np.save(_beside(stem, ".latents.npy"), rendered.latents)
    if rendered.frames is not None:
        np.save(_beside(stem, ".frames.npy"), rendered.frames)
    facts = {
        "layout": rendered.layout,
        "attention_inputs": rendered.attention_inputs,
        "refusal": rendered.refusal,
        "graph_breaks": rendered.graph_breaks,
        "graphs": rendered.graphs,
        "progress": rendered.progress,
    }
    _beside(stem, ".json").write_text(json.dumps(facts))


def _read(stem: Path) -> Rendered:
    frames = _beside(stem, ".frames.npy")
    facts = json.loads(_beside(stem, ".json").read_text())
    return Rendered(
        frames=np.load(frames) if frames.exists() else None,
        latents=np.load(_beside(stem, ".latents.npy")),
        layout=facts["layout"],
        attention_inputs=[tuple(shape) for shape in facts["attention_inputs"]],
        refusal=facts["refusal"],
        graph_breaks=facts["graph_breaks"],
        graphs=facts["graphs"],
        progress=facts["progress"],
    )


def _beside(stem: Path, suffix: str) -> Path:
    return stem.parent / (stem.name + suffix)  # case names may hold dots ("1.5-i2v")


def spawn_ranks(main, world_size: int, *args) -> None:
    """mp.spawn of main(rank, port, *args) on `world_size` processes, which meet on a store
    this process serves (ranks.rendezvous_store, as the Cog process does): a port picked free
    and released could be taken by another test's process before rank 0 bound it."""
    store = rendezvous_store()
    mp.spawn(main, args=(store.port, *args), nprocs=world_size)


def join_ranks(rank: int, port: int, world_size: int, minutes: float = 2) -> None:
    """In a process spawn_ranks started: the gloo group, met on its parent's store."""
    timeout = timedelta(minutes=minutes)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)


# A request with a LoRA through VideoGenerator, as a rank process serves it: rank 0 gives the
# file (LoraFetchedOnce), every rank denoises. By guidance scale, since that picks the layout.
LORA_URL = "https://loras.example/style.safetensors"


class _CachedLora:
    """A LoRA cache that holds the file already: what rank 0 finds or fetches."""

    def __init__(self, path: Path):
        self.path = path

    def get(self, url: str) -> Path:
        return self.path


def lora_requests(weights: Path, lora: Path, guidances: tuple[float, ...], out: Path) -> dict:
    """Each rank's outcome of one request per guidance scale, in order, with `lora` as its
    LoRA: {rank: {guidance: {"refusal": message or None, "peft": whether the transformer
    had peft layers after it}}}."""
    spawn_ranks(_lora_rank_main, 2, weights, lora, guidances, out)
    return {rank: json.loads((out / f"lora-{rank}.json").read_text()) for rank in range(2)}


def _lora_rank_main(rank, port, weights, lora, guidances, out) -> None:
    torch.set_num_threads(1)
    join_ranks(rank, port, 2)
    try:
        engine = ContextParallel(2)
        variant = VARIANTS["cogvideox-5b"]
        pipe = build_pipeline(variant, weights, CPU, "none", before_placing=engine.install)
        cache = LoraFetchedOnce(_CachedLora(lora), rank, CPU)
        generator = VideoGenerator(variant, pipe, CPU, lora_cache=cache)
        generator.engine = engine
        outcomes = {}
        for guidance in guidances:
            request = Request("a panda", "", 9, 2, guidance, None, None, SEED, lora_url=LORA_URL)
            refusal = None
            try:
                generator.denoise_only(request)
            except InputError as error:
                refusal = str(error)
            peft = any(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())
            outcomes[str(guidance)] = {"refusal": refusal, "peft": peft}
        (out / f"lora-{rank}.json").write_text(json.dumps(outcomes))
    finally:
        dist.destroy_process_group()
