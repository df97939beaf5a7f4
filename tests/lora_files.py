"""Tiny LoRA files as the upstream fine-tuning tools write them.

A LoRA is trained (here: initialised at random by peft) on a copy of the tiny transformer and
saved with the pipeline's own LoRA saver, keys prefixed `transformer.`; a SAT export is the
same keys without alpha, written as export_sat_lora_weight.py does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
from diffusers.loaders.lora_base import LoraBaseMixin
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from tests.file_server import FileServer

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # what the upstream scripts train


def lora_tensors(
    transformer_dir: Path, rank: int, seed: int, targets: list[str] = ATTENTION, **config
) -> dict[str, torch.Tensor]:
    """peft LoRA weights for the transformer saved in `transformer_dir`, without prefix."""
    transformer = CogVideoXTransformer3DModel.from_pretrained(transformer_dir)
    if config:  # another shape of transformer: a LoRA for another variant
        transformer = CogVideoXTransformer3DModel.from_config({**transformer.config, **config})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # init_lora_weights=False: random A and B, so the LoRA changes the output (a fresh
        # LoRA has B = 0, training is what makes it non-zero).
        transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
        )
    return {k: v.clone() for k, v in get_peft_model_state_dict(transformer).items()}


def save_diffusers_lora(
    tensors: dict[str, torch.Tensor],
    folder: Path,
    alpha: float | None = None,
    use_rslora: bool = False,
) -> Path:
    """pytorch_lora_weights.safetensors as diffusers' training scripts save it; with `alpha`,
    the LoraConfig metadata that save_lora_weights records when it is given one."""
    rank = next(v.shape[0] for k, v in tensors.items() if "lora_A" in k)
    metadata = None
    if alpha is not None:
        modules = sorted({k.split(".lora_")[0] for k in tensors})
        metadata = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=modules, use_rslora=use_rslora
        ).to_dict()
        metadata = json.loads(json.dumps(metadata, default=list))  # sets -> lists
    CogVideoXPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=tensors,
        transformer_lora_adapter_metadata=metadata,
    )
    return folder / "pytorch_lora_weights.safetensors"


def save_sat_lora(tensors: dict[str, torch.Tensor], folder: Path) -> Path:
    """A SAT run's LoRA as export_sat_lora_weight.py writes it. SAT names block N's query LoRA
    `model.diffusion_model.transformer.layers.N.attention.query_key_value.matrix_A.0`; the
    exporter cuts `model.diffusion_model.`, renames the LoRA's own part to diffusers' and
    `layers` to `transformer_blocks`: `transformer.transformer_blocks.N.attn1.to_q.lora_A
    .weight`. It stores no alpha (SAT's is 1)."""
    LoraBaseMixin.write_lora_layers(
        state_dict={f"transformer.{key}": tensor for key, tensor in tensors.items()},
        save_directory=folder,
        is_main_process=True,
        weight_name=None,
        save_function=None,
        safe_serialization=True,
    )
    return folder / "pytorch_lora_weights.safetensors"


def save_renamed(tensors: dict[str, torch.Tensor], path: Path, rename) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({rename(k): v.contiguous() for k, v in tensors.items()}, path)
    return path


@contextmanager
def served_lora(transformer: Path, folder: Path, seed: int) -> Iterator[str]:
    """The URL of a rank-4 LoRA for `transformer` (diffusers' layout), served over HTTP."""
    path = save_diffusers_lora(lora_tensors(transformer, 4, seed=seed), folder)
    files = FileServer(folder)
    try:
        yield files.url(path.name)
    finally:
        files.stop()
