"""What a LoRA file holds, and whether it fits the transformer.

Upstream's fine-tuning tools write one layout (safetensors, peft `lora_A`/`lora_B`, keys
prefixed `transformer.`): diffusers' training scripts through the pipeline's
save_lora_weights, and SAT runs through `tools/export_sat_lora_weight.py`, which strips SAT's
`model.diffusion_model.` and keeps `transformer.` (SAT's blocks are `transformer.layers.N`).
Keys without the prefix are a transformer's own save_lora_adapter or a peft state dict.

The training scale is alpha / rank. diffusers stores alpha in the file's
`lora_adapter_metadata` only when the trainer passed it, and otherwise takes alpha = rank
(scale 1.0), whichever the layout; so do we, and so lora_scale 1.0 applies a LoRA as
upstream's `cli_demo.py` does (`fuse_lora(lora_scale=1.0)`). The file cannot tell a SAT export
(trained with alpha 1) from a diffusers-trained LoRA: docs/lora.md says what scale to pass.

A LoRA is checked against the transformer's linear layers before anything is changed, so one
for another variant fails with the mismatch named and the model untouched (slot.py puts it on).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open

from ..errors import LoraError

log = logging.getLogger(__name__)

PREFIX = "transformer."
METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights keeps LoraConfig
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<side>[AB])\.weight")
_LAYER_NAME = re.compile(r"\^?[\w.]+", re.ASCII)  # an alpha_pattern key peft matches in linear time
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")


@dataclass
class LoraWeights:
    digest: str
    layout: Literal["pipeline", "transformer"]  # keys with `transformer.`, or without
    tensors: dict[str, torch.Tensor]  # module.lora_A.weight -> tensor, without the prefix
    ranks: dict[str, int]  # module -> rank
    rank: int  # the most common rank
    alpha: float
    alpha_pattern: dict[str, float]
    alpha_source: str
    use_rslora: bool = False  # rank-stabilised: alpha / sqrt(rank) (peft's use_rslora)

    @property
    def trained_scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def lora_config(self) -> dict:
        """peft LoraConfig arguments, keyed as diffusers' loader expects its metadata."""
        config = {
            "r": self.rank,
            "lora_alpha": self.alpha,
            "rank_pattern": {f"^{m}": r for m, r in self.ranks.items() if r != self.rank},
            "alpha_pattern": self.alpha_pattern,
            "target_modules": sorted(self.ranks),
            "use_rslora": self.use_rslora,
        }
        return {PREFIX + key: value for key, value in config.items()}


def read_lora(path: Path) -> LoraWeights:
    """Parse a verified LoRA file (named by its sha256) and settle its layout and alpha."""
    with _opened(path) as file:
        metadata = file.metadata() or {}
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    if not tensors:
        raise LoraError("the LoRA file holds no tensors.")
    text_encoder = [k for k in tensors if k.startswith("text_encoder.")]
    if text_encoder:
        raise LoraError(
            f"the LoRA has text-encoder layers ({text_encoder[0]}, ...); CogVideoX LoRAs train "
            f"the transformer only, and only those are supported."
        )
    prefixed = [k for k in tensors if k.startswith(PREFIX)]
    if prefixed and len(prefixed) != len(tensors):
        bare = next(k for k in tensors if not k.startswith(PREFIX))
        raise LoraError(f"the LoRA mixes keys with and without '{PREFIX}' (e.g. {bare!r}).")
    layout = "pipeline" if prefixed else "transformer"
    tensors = {k.removeprefix(PREFIX): v for k, v in tensors.items()}

    unexpected = [k for k in tensors if not _KEY.fullmatch(k)]
    if unexpected:
        raise LoraError(
            f"the LoRA has {len(unexpected)} keys that are not peft LoRA weights "
            f"(<layer>.lora_A.weight / <layer>.lora_B.weight), e.g. {unexpected[:3]}. Kohya "
            f"(lora_down/lora_up), LyCORIS and DoRA files are not supported."
        )
    ranks = _ranks(tensors)
    rank = Counter(ranks.values()).most_common(1)[0][0]
    config = _adapter_metadata(metadata)
    if config is not None and "lora_alpha" in config:
        alpha, alpha_pattern = float(config["lora_alpha"]), config.get("alpha_pattern") or {}
        source = "the file's metadata"
    else:
        alpha = float(rank)
        alpha_pattern = {f"^{m}": float(r) for m, r in ranks.items() if r != rank}
        source = "the diffusers convention, alpha = rank"
    rslora = bool(config and config.get("use_rslora"))
    return LoraWeights(
        path.stem, layout, tensors, ranks, rank, alpha, alpha_pattern, source, rslora
    )


def adapted_layers(path: Path) -> set[str]:
    """The layers a LoRA file adapts, read from its safetensors header alone: what can be
    refused before the tensors are read or any model is changed."""
    with _opened(path) as file:
        keys = list(file.keys())
    return {match["module"] for key in keys if (match := _KEY.fullmatch(key.removeprefix(PREFIX)))}


@contextmanager
def _opened(path: Path) -> Iterator:
    """safe_open, its refusal of a header (overlapping offsets, an unknown dtype) or of a
    tensor's bytes a LoraError: check_safetensors passes some files safetensors refuses."""
    try:
        with safe_open(path, framework="pt") as file:
            yield file
    except SafetensorError as error:
        raise LoraError(f"the LoRA file cannot be read as safetensors: {error}") from None


def _adapter_metadata(metadata: dict[str, str]) -> dict | None:
    """The LoraConfig diffusers stored in the file, without the `transformer.` prefix."""
    if METADATA_KEY not in metadata:
        return None
    try:
        stored = json.loads(metadata[METADATA_KEY])
    except ValueError as error:
        raise LoraError(f"the LoRA's {METADATA_KEY} metadata is not JSON ({error}).") from None
    if not isinstance(stored, dict):
        raise LoraError(f"the LoRA's {METADATA_KEY} metadata is not a JSON object.")
    config = {k.removeprefix(PREFIX): v for k, v in stored.items()}
    alpha = config.get("lora_alpha")
    if "lora_alpha" in config and not _finite(alpha):  # null too: read_lora takes it as given
        raise LoraError(f"the LoRA's metadata has lora_alpha={str(alpha)[:100]}, not a number.")
    pattern = config.get("alpha_pattern") or {}
    if not isinstance(pattern, dict) or not all(_finite(v) for v in pattern.values()):
        raise LoraError(
            f"the LoRA's metadata has alpha_pattern={str(pattern)[:200]}: expected a JSON "
            f"object of layer patterns to numbers."
        )
    # peft matches each key as a regular expression against every adapted layer's name: a
    # key like (\w|\w|\w)*! takes 35 s a layer, holding the GIL so a cancel cannot stop it.
    # diffusers and peft write layer names, `^` in front at most.
    pattern_key = next((key for key in pattern if not _LAYER_NAME.fullmatch(key)), None)
    if pattern_key is not None:
        raise LoraError(
            f"the LoRA's metadata has alpha_pattern key {pattern_key[:100]!r}, which is not a "
            f"layer name (e.g. transformer_blocks.0.attn1.to_q); only layer names are taken."
        )
    if not isinstance(config.get("use_rslora", False), bool):
        raise LoraError(f"the LoRA's metadata has use_rslora={config['use_rslora']!r}.")
    return config


def _finite(value) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # a JSON integer past float's range
        return False


def _ranks(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    sides: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        sides.setdefault(match["module"], {})[match["side"]] = tensor
    ranks = {}
    for module, pair in sides.items():
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise LoraError(f"the LoRA has no lora_{missing} weight for {module}.")
        a, b = pair["A"], pair["B"]
        if a.ndim > 2 and b.ndim > 2:
            raise LoraError(
                f"the LoRA's {module} is a convolution's LoRA (lora_A {tuple(a.shape)}, lora_B "
                f"{tuple(b.shape)}); only LoRAs of the transformer's linear layers are supported."
            )
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(
                f"the LoRA's {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}: "
                f"expected (rank, in) and (out, rank)."
            )
        for side, tensor in pair.items():
            if tensor.dtype not in _FLOATS:  # float8 too: peft adds it in the model's dtype
                raise LoraError(
                    f"the LoRA's {module}.lora_{side} is {tensor.dtype}; store it in float32, "
                    f"bfloat16 or float16."
                )
            if not torch.isfinite(tensor).all():
                raise LoraError(f"the LoRA's {module}.lora_{side} holds NaN or infinite values.")
        ranks[module] = a.shape[0]
    return ranks


def linear_layers(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of every plain linear layer."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def check_fits(lora: LoraWeights, layers: dict[str, tuple[int, int]], model: str) -> None:
    """Raise, naming the mismatch, unless every LoRA layer matches one of the model's."""
    missing = [m for m in lora.ranks if m not in layers]
    wrong = []
    for module in lora.ranks:
        if module in layers:
            lora_in = lora.tensors[f"{module}.lora_A.weight"].shape[1]
            lora_out = lora.tensors[f"{module}.lora_B.weight"].shape[0]
            if (lora_in, lora_out) != layers[module]:
                wrong.append((module, (lora_in, lora_out), layers[module]))
    if not missing and not wrong:
        return
    wrapper = _wrapper_prefix(lora.ranks, layers)
    if wrapper:
        raise LoraError(
            f"the LoRA's layer names start with {wrapper!r} (e.g. {next(iter(lora.ranks))}), "
            f"which the model's do not: a layout written by another tool (PEFT's save_pretrained "
            f"writes 'base_model.model.', ComfyUI 'diffusion_model.'). Save it as the fine-tuning "
            f"scripts do, with diffusers' save_lora_weights (keys 'transformer.<layer>.lora_A"
            f".weight'). The base model is unchanged."
        )
    problem = f"the LoRA ({lora.layout} layout) does not fit {model}'s transformer: "
    if missing:
        problem += f"{len(missing)} of its {len(lora.ranks)} layers are not in the model, e.g. "
        problem += ", ".join(missing[:3])
        lora_blocks, model_blocks = _block_count(lora.ranks), _block_count(layers)
        if lora_blocks > model_blocks:
            problem += f" (the LoRA has {lora_blocks} transformer blocks, the model {model_blocks})"
        problem += ". "
    if wrong:
        module, (lora_in, lora_out), (model_in, model_out) = wrong[0]
        problem += (
            f"{len(wrong)} layers have other sizes, e.g. {module}: {lora_in} -> {lora_out} "
            f"features in the LoRA, {model_in} -> {model_out} in the model. "
        )
    raise LoraError(
        problem + "It was trained for another model (CogVideoX-2B is 1920 wide with 30 blocks, "
        "5B 3072 wide with 42). The base model is unchanged."
    )


def _wrapper_prefix(modules, layers) -> str | None:
    """The prefix that every LoRA layer name has before a layer of the model, if there is one
    (names wrapped by another tool); None when the names are the model's or fit no layer."""
    first = next(iter(modules))
    parts = first.split(".")
    for cut in range(1, len(parts)):
        if ".".join(parts[cut:]) in layers:
            prefix = ".".join(parts[:cut]) + "."
            if all(m.startswith(prefix) and m.removeprefix(prefix) in layers for m in modules):
                return prefix
            return None
    return None


def _block_count(names) -> int:
    return 1 + max((int(m[1]) for n in names if (m := _BLOCK.match(n))), default=-1)
