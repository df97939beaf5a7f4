"""The context-parallel engine: one pipeline call computed by several ranks.

Built on diffusers 0.42.1's context parallelism: `ContextParallelConfig` and its device
mesh, `dispatch_attention_fn`'s Ulysses attention, and its hook classes (`ModelHook`,
`HookRegistry`). What diffusers lacks for CogVideoX is supplied here:

- A sequence plan. CogVideoX has no `_cp_plan`, and diffusers' sharders either need token
  counts divisible by the ranks (17,550 video and 226 text tokens over 4 are not) or gather
  unequal shards, which gloo refuses. So the split is ours, as hooks at the places a
  `_cp_plan` would name: the rotary tables at the transformer's input, `hidden_states` and
  `encoder_hidden_states` at the first block, the video tokens gathered at `proj_out`.
  Each rank gets part of the text and part of the video, sized so that every rank holds
  the same number of tokens in all (attention concatenates text and video, and Ulysses'
  all-to-all needs equal shards). Where the total does not divide, the video is padded at
  its end and the padding masked out of attention as keys; its outputs are dropped.
- A CFG split (not in diffusers). The two halves of the guidance batch (negative, positive
  prompt) go to the two rows of a (replica, cfg, ring, ulysses) mesh; the noise prediction
  is gathered along the batch at the transformer's output.

Ring attention is not offered: it needs flash or cuDNN attention, which CPUs lack, so it
could not be tested here. `enable_parallelism` is not called: it computes
`rank % torch.accelerator.device_count()`, a division by zero with torch's CPU build.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.faster_cache import _FASTER_CACHE_DENOISER_HOOK
from diffusers.models._modeling_parallel import ParallelConfig
from torch.distributed.device_mesh import DeviceMesh

from ..attention import (
    DispatchingCogVideoXAttnProcessor,
    check_splittable,
    use_dispatching_attention,
)
from ..errors import InputError
from .layout import Layout, choose_layout, replica_warnings

log = logging.getLogger(__name__)

_HOOK = "cogvideox_cog.parallel"  # the name of every hook this engine registers
PROJ_OUT_REFUSAL = (
    "this LoRA adapts proj_out, the layer where the GPUs' shares of the video are put "
    "together, so it cannot run split across GPUs: use a LoRA that leaves proj_out alone, "
    "or serve it with COGVIDEOX_GPUS=1"
)


@dataclass(frozen=True)
class SequenceShards:
    """Which text and video tokens one rank of a Ulysses group holds.

    The video may be padded at its end (`padding` tokens) so that every rank holds the same
    total; text is split as evenly as it goes and the video fills each rank up to that total.
    """

    text: list[int]  # text tokens per rank
    video: list[int]  # video tokens per rank, padding included
    padding: int

    @classmethod
    def plan(cls, text_tokens: int, video_tokens: int, ranks: int) -> SequenceShards:
        padding = -(text_tokens + video_tokens) % ranks
        per_rank = (text_tokens + video_tokens + padding) // ranks
        text = [len(part) for part in torch.arange(text_tokens).tensor_split(ranks)]
        video = [per_rank - count for count in text]
        if min(video) < 1:
            raise ValueError(
                f"{video_tokens} video tokens cannot be shared by {ranks} ranks beside "
                f"{text_tokens} text tokens"
            )
        return cls(text=text, video=video, padding=padding)

    def text_slice(self, rank: int) -> slice:
        start = sum(self.text[:rank])
        return slice(start, start + self.text[rank])

    def video_slice(self, rank: int) -> slice:
        start = sum(self.video[:rank])
        return slice(start, start + self.video[rank])

    def split_video(self, tensor: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
        """This rank's video tokens of `tensor` (all video tokens along `dim`), padded."""
        if self.padding:
            pad_shape = list(tensor.shape)
            pad_shape[dim] = self.padding
            tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
        index = [slice(None)] * tensor.dim()
        index[dim] = self.video_slice(rank)
        return tensor[tuple(index)]

    def key_mask(self, rank: int, like: torch.Tensor) -> torch.Tensor | None:
        """An additive mask over this rank's keys (text, then video): -inf at padding."""
        if not self.padding:
            return None
        video = self.video_slice(rank)
        real_video = sum(self.video) - self.padding
        mask = like.new_zeros(1, 1, 1, self.text[rank] + self.video[rank])
        first_padding = max(real_video - video.start, 0)
        mask[..., self.text[rank] + first_padding :] = float("-inf")
        return mask


class _Armed:
    """What the hooks do during one pipeline call; `layout` None: nothing (one process)."""

    def __init__(self):
        self.layout: Layout | None = None
        self.mesh: DeviceMesh | None = None
        self.shards: SequenceShards | None = None

    @property
    def cfg_rank(self) -> int:
        return self.mesh.get_local_rank("cfg")

    @property
    def ulysses_rank(self) -> int:
        return self.mesh.get_local_rank("ulysses")


class ContextParallel:
    """Made once per rank after torch.distributed is initialised (gloo on CPU, nccl on CUDA),
    and installed on the pipeline before its weights are placed; every rank then calls
    pipe(...) with identical arguments.

    Installing is collective (it builds the process groups): every rank installs, in the
    same order relative to other collectives. Where the layout is smaller than the world (it
    always divides it), the other ranks are replicas: groups of their own running the same
    layout, so they return the same video, bit for bit, and never wait.

    Before placing, because of CPU offload: diffusers takes accelerate's offload hooks off
    and puts them back after every pipeline call and around every LoRA load, and accelerate
    then restores the forward it had wrapped, which drops any hook registered over it. The
    engine's hooks, registered first, are that forward, so they stay.
    """

    def __init__(self, world_size: int):
        if not dist.is_initialized():
            raise RuntimeError("ContextParallel needs torch.distributed initialised first")
        if dist.get_world_size() != world_size:
            raise ValueError(
                f"world_size {world_size} is not torch.distributed's {dist.get_world_size()}"
            )
        self.world_size, self.rank = world_size, dist.get_rank()
        self.pipe = None

    def install(self, pipe) -> None:
        """Layouts, process groups and hooks for this pipeline (configure_pipeline's
        `before_placing`)."""
        if self.pipe is not None:
            raise RuntimeError("this engine is installed already")
        self.pipe, transformer = pipe, pipe.transformer
        heads = transformer.config.num_attention_heads
        self.layouts = {
            guidance: choose_layout(self.world_size, guidance, heads) for guidance in (True, False)
        }
        if self.rank == 0:  # every rank chose the same layouts: one warning for the group
            for warning in replica_warnings(self.world_size, self.layouts.values()):
                log.warning(warning)
        nccl = dist.get_backend() == "nccl"
        device_type = "cuda" if nccl else "cpu"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        # DeviceMesh and ContextParallelConfig.setup create process groups: every rank
        # builds every layout's mesh, in the same order.
        self._meshes: dict[Layout, DeviceMesh] = {}
        self._configs: dict[Layout, ParallelConfig | None] = {}
        for layout in dict.fromkeys(self.layouts.values()):
            mesh = _replicated_mesh(layout, self.world_size, device_type)
            self._meshes[layout] = mesh
            self._configs[layout] = self._sequence_config(layout, mesh, device)
        self._armed = _Armed()
        self._processor = self._ensure_dispatching_attention(transformer)
        check_splittable(self._processor._attention_backend)
        self._register_hooks(transformer)

    def _sequence_config(self, layout: Layout, mesh: DeviceMesh, device) -> ParallelConfig | None:
        if layout.ulysses == 1:
            return None
        config = ContextParallelConfig(ulysses_degree=layout.ulysses)
        config.setup(self.rank, self.world_size, device, mesh)
        return ParallelConfig(context_parallel_config=config)

    @staticmethod
    def _ensure_dispatching_attention(transformer) -> DispatchingCogVideoXAttnProcessor:
        processors = set(map(id, transformer.attn_processors.values()))
        processor = next(iter(transformer.attn_processors.values()))
        if len(processors) != 1 or not isinstance(processor, DispatchingCogVideoXAttnProcessor):
            use_dispatching_attention(transformer)
            processor = next(iter(transformer.attn_processors.values()))
        return processor

    def _register_hooks(self, transformer) -> None:
        # The last hook registered runs first: the sequence plan, then the batch split.
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(
            _SequenceInput(self._armed, self._processor), f"{_HOOK}.sequence"
        )
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(
            _GuidanceBatch(self._armed), f"{_HOOK}.cfg"
        )
        HookRegistry.check_if_exists_or_initialize(transformer.transformer_blocks[0]).register_hook(
            _SequenceSplit(self._armed), f"{_HOOK}.split"
        )
        HookRegistry.check_if_exists_or_initialize(transformer.proj_out).register_hook(
            _SequenceGather(self._armed), f"{_HOOK}.gather"
        )

    def check_lora(self, layers: set[str], classifier_free_guidance: bool, speed_mode: str) -> None:
        """InputError for a LoRA of these layers that the request's layout cannot run: one
        on proj_out where the sequence is split (run() refuses it too, from the model). Read
        from the file, so that it is refused before any rank puts it on its model."""
        layout = self._layout(classifier_free_guidance, skips_guidance=speed_mode == "faster")
        if layout.ulysses > 1 and "proj_out" in layers:
            raise InputError(PROJ_OUT_REFUSAL)

    def _layout(self, classifier_free_guidance: bool, skips_guidance: bool) -> Layout:
        """The request's layout. FasterCache computes the negative prompt's half only every
        few steps (`skips_guidance`): guidance rows would idle then, so the sequence takes
        all the ranks instead."""
        return self.layouts[classifier_free_guidance and not skips_guidance]

    @contextmanager
    def run(self, classifier_free_guidance: bool) -> Iterator[Layout]:
        """Arms the layout for one pipe(...) call; every rank's pipe returns the full, identical
        result (latents gathered), so rank 0 alone may decode."""
        skips = _skips_unconditional_batches(self.pipe.transformer)
        layout = self._layout(classifier_free_guidance, skips)
        if layout != self.layouts[classifier_free_guidance]:
            log.info(f"speed_mode faster skips guidance halves: layout {layout} instead")
        if layout.ulysses > 1 and hasattr(self.pipe.transformer.proj_out, "base_layer"):
            # peft wraps proj_out: its LoRA branch would see this rank's tokens while the
            # gather hook, on the wrapped layer, has already made the output whole.
            raise InputError(PROJ_OUT_REFUSAL)
        if layout.world_size > 1:
            self._armed.layout, self._armed.mesh = layout, self._meshes[layout]
            self._processor._parallel_config = self._configs[layout]
        try:
            yield layout
        finally:
            self._armed.layout = self._armed.mesh = self._armed.shards = None
            self._processor._parallel_config = None
            self._processor.key_mask = None


def _replicated_mesh(layout: Layout, world_size: int, device_type: str) -> DeviceMesh:
    """The (replica, cfg, ring, ulysses) mesh of all ranks: ranks beyond the layout's size form
    further replicas, each computing the same video with the same layout."""
    ranks = torch.arange(world_size).view(-1, layout.cfg, 1, layout.ulysses)
    return DeviceMesh(device_type, ranks, mesh_dim_names=("replica", "cfg", "ring", "ulysses"))


def _skips_unconditional_batches(transformer) -> bool:
    hook = HookRegistry.check_if_exists_or_initialize(transformer).get_hook(
        _FASTER_CACHE_DENOISER_HOOK
    )
    return hook is not None and not hook.is_guidance_distilled


class _ArgumentsHook(ModelHook):
    """A hook that reads and replaces its module's forward arguments by name.

    The names are read from the signature once, when the hook is registered: inspect is not
    traceable, so reading them per call would break the graph of a compiled block."""

    def initialize_hook(self, module):
        self.parameters = list(inspect.signature(type(module).forward).parameters)[1:]  # no self
        return module

    def argument(self, args: list, kwargs: dict, name: str):
        """A forward argument by name (None if not passed), and a setter for its place."""
        index = self.parameters.index(name)
        positional = name not in kwargs and index < len(args)
        value = args[index] if positional else kwargs.get(name)

        def replace(new):
            if positional:
                args[index] = new
            else:
                kwargs[name] = new

        return value, replace


def _all_gather(tensor: torch.Tensor, dim: int, group) -> list[torch.Tensor]:
    """Every rank's `tensor` (equal shapes), in group rank order."""
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor, group=group)
    return parts


class _GuidanceBatch(_ArgumentsHook):
    """On the transformer: each CFG row computes its half of the guidance batch; the noise
    prediction is gathered along the batch."""

    _BATCHED = ("hidden_states", "encoder_hidden_states", "timestep", "timestep_cond", "ofs")

    def __init__(self, armed: _Armed):
        super().__init__()
        self.armed = armed

    def pre_forward(self, module, *args, **kwargs):
        layout = self.armed.layout
        if layout is None or layout.cfg == 1:
            return args, kwargs
        args = list(args)
        batch = self.argument(args, kwargs, "hidden_states")[0].shape[0]
        if batch % 2:
            raise RuntimeError(
                f"the CFG split got a batch of {batch}, not the guidance batch (negative and "
                "positive prompt): enter speed_mode's step_cache before ContextParallel.run, "
                "so that run() sees FasterCache and splits the sequence instead"
            )
        rank = self.armed.cfg_rank
        for name in self._BATCHED:
            value, replace = self.argument(args, kwargs, name)
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
                replace(value.chunk(2)[rank])
        return tuple(args), kwargs

    def post_forward(self, module, output):
        layout = self.armed.layout
        if layout is None or layout.cfg == 1:
            return output
        group = self.armed.mesh.get_group("cfg")
        sample = output[0] if isinstance(output, tuple) else output.sample
        gathered = torch.cat(_all_gather(sample, 0, group), dim=0)
        if isinstance(output, tuple):
            return (gathered, *output[1:])
        output.sample = gathered
        return output


class _SequenceInput(_ArgumentsHook):
    """On the transformer: plans the shards for this call's shapes, splits the rotary tables
    (each block receives them from the transformer's forward) and sets the key mask."""

    def __init__(self, armed: _Armed, processor: DispatchingCogVideoXAttnProcessor):
        super().__init__()
        self.armed, self.processor = armed, processor

    def pre_forward(self, module, *args, **kwargs):
        layout = self.armed.layout
        if layout is None or layout.ulysses == 1:
            return args, kwargs
        args = list(args)
        latents = self.argument(args, kwargs, "hidden_states")[0]
        text = self.argument(args, kwargs, "encoder_hidden_states")[0]
        shards = SequenceShards.plan(text.shape[1], _video_tokens(module, latents), layout.ulysses)
        self.armed.shards = shards
        rank = self.armed.ulysses_rank
        self.processor.key_mask = shards.key_mask(rank, text)
        rotary, replace = self.argument(args, kwargs, "image_rotary_emb")
        if rotary is not None:
            replace(tuple(shards.split_video(table, 0, rank) for table in rotary))
        return tuple(args), kwargs


def _video_tokens(transformer, latents: torch.Tensor) -> int:
    """How many tokens CogVideoXPatchEmbed makes of `latents` (batch, frames, C, H, W)."""
    config = transformer.config
    frames, height, width = latents.shape[1], latents.shape[3], latents.shape[4]
    if config.patch_size_t is not None:
        frames = -(-frames // config.patch_size_t)
    return frames * (height // config.patch_size) * (width // config.patch_size)


class _SequenceSplit(_ArgumentsHook):
    """On the first block: this rank's text and video tokens."""

    def __init__(self, armed: _Armed):
        super().__init__()
        self.armed = armed

    def pre_forward(self, module, *args, **kwargs):
        shards = self.armed.shards
        if self.armed.layout is None or shards is None:
            return args, kwargs
        args = list(args)
        rank = self.armed.ulysses_rank
        video, replace_video = self.argument(args, kwargs, "hidden_states")
        text, replace_text = self.argument(args, kwargs, "encoder_hidden_states")
        expected = sum(shards.video) - shards.padding
        if video.shape[1] != expected or text.shape[1] != sum(shards.text):
            raise RuntimeError(
                f"sequence plan for {expected} video and {sum(shards.text)} text tokens, "
                f"but the first block got {video.shape[1]} and {text.shape[1]}"
            )
        replace_video(shards.split_video(video, 1, rank))
        replace_text(text[:, shards.text_slice(rank)])
        return tuple(args), kwargs


class _SequenceGather(ModelHook):
    """On proj_out: every rank's video tokens, in order, padding dropped."""

    def __init__(self, armed: _Armed):
        super().__init__()
        self.armed = armed

    def post_forward(self, module, output):
        shards = self.armed.shards
        if self.armed.layout is None or shards is None:
            return output
        longest = max(shards.video)
        local = output
        if local.shape[1] < longest:
            pad = local.new_zeros(local.shape[0], longest - local.shape[1], *local.shape[2:])
            local = torch.cat([local, pad], dim=1)
        parts = _all_gather(local, 1, self.armed.mesh.get_group("ulysses"))
        kept = [part[:, :count] for part, count in zip(parts, shards.video, strict=True)]
        video = torch.cat(kept, dim=1)
        return video[:, : video.shape[1] - shards.padding]
