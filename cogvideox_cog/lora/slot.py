"""Keeping exactly one LoRA (or none) on the transformer, as requests ask.

Loading goes through diffusers (peft layers beside the frozen base weights, never merged into
them), which also takes offload hooks off and puts them back (after a load that succeeds;
_offload_back does otherwise); unloading restores the plain layers, so a prediction without
a LoRA is the base model's exactly. A LoRA repeated by the next request stays loaded; only
its scale is set again.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from accelerate.hooks import CpuOffload
from peft.tuners.tuners_utils import BaseTunerLayer

from ..errors import LoraError, loses_the_device
from ..gpu_memory import less_offload, out_of_memory
from ..pipeline import is_compiled
from .file import PREFIX, check_fits, linear_layers, read_lora

log = logging.getLogger(__name__)

ADAPTER_NAME = "lora"


class LoraSlot:
    """The pipeline's one LoRA: kept while requests repeat it, replaced or removed otherwise."""

    def __init__(self, pipe, model: str):
        self.pipe, self.model = pipe, model
        self.compiled = is_compiled(pipe.transformer)
        self.layers = linear_layers(pipe.transformer)
        self.loaded: str | None = None  # the digest of the LoRA on the transformer
        self.trained_scale = 1.0  # its alpha / rank (alpha / sqrt(rank) for rsLoRA)
        self.trained_rule = "alpha/rank"
        self.offload = _offload_policy(pipe)  # as configure_pipeline placed the weights

    def use(self, path: Path | None, scale: float) -> None:
        """Put the LoRA in `path` on the transformer at `scale` (None: no LoRA)."""
        self._offload_back()
        if path is None:
            self.clear()
            return
        if path.stem != self.loaded:
            started = time.monotonic()
            lora = read_lora(path)
            check_fits(lora, self.layers, self.model)
            self.clear()
            state_dict = {PREFIX + k: v for k, v in lora.tensors.items()}
            try:
                self.pipe.load_lora_into_transformer(
                    state_dict,
                    transformer=self.pipe.transformer,
                    adapter_name=ADAPTER_NAME,
                    metadata=lora.lora_config(),
                    _pipeline=self.pipe,
                )
            except Exception as error:
                self.clear()
                self._offload_back()
                if isinstance(error, torch.OutOfMemoryError):  # the GPU's fault, not the LoRA's
                    what = f"loading the LoRA (rank {lora.rank}, {len(lora.ranks)} layers)"
                    advice = (
                        f"A LoRA of lower rank needs less. {less_offload(self.offload or 'none')}"
                    )
                    raise out_of_memory(error, what, advice.strip()) from error
                if loses_the_device(error):  # CUDA's, kept from before: the GPU is lost
                    raise
                raise LoraError(f"the LoRA could not be loaded: {error}") from error
            self.loaded = lora.digest
            self.trained_scale = lora.trained_scale
            self.trained_rule = "alpha/sqrt(rank)" if lora.use_rslora else "alpha/rank"
            log.info(
                f"lora: loaded {lora.digest[:12]} ({lora.layout} layout, {len(lora.ranks)} layers, "
                f"rank {lora.rank}, alpha {lora.alpha:g} from {lora.alpha_source}) in "
                f"{time.monotonic() - started:.1f} s"
            )
            if self.compiled:
                log.warning(
                    "lora: the compiled transformer compiles again if this is its first LoRA, "
                    "or the first of this rank and these layers"
                )
        self.pipe.set_adapters([ADAPTER_NAME], [scale])
        log.info(
            f"lora: scale applied = lora_scale {scale:g} x {self.trained_rule} "
            f"{self.trained_scale:.6g} = {scale * self.trained_scale:.6g}"
        )

    def _offload_back(self) -> None:
        """Offload as it was placed. diffusers takes the offload hooks off to load a LoRA and
        puts them back only when the load succeeds: after a failed or canceled one, the next
        prediction ran where the weights lay, on the CPU with model offload (diffusers puts
        model offload back at the end of that prediction, sequential offload never)."""
        modules = [c for c in self.pipe.components.values() if isinstance(c, torch.nn.Module)]
        if self.offload is None or all(hasattr(module, "_hf_hook") for module in modules):
            return
        log.warning(f"lora: {self.offload} offload put back after a LoRA load cut short")
        device = self.pipe._offload_device
        if self.offload == "model":
            self.pipe.enable_model_cpu_offload(device=device)
        else:
            self.pipe.enable_sequential_cpu_offload(device=device)

    def clear(self) -> None:
        """Back to the plain base layers (diffusers removes the peft layers entirely).

        The LoRA is forgotten before its layers go: a cancel can land in the middle of the
        unload, and the next request for the same LoRA must load it again, not rescale the
        layers left. Any peft layer on the transformer is removed, not only those of a
        recorded adapter: a load cut short by a cancel or a failure leaves layers that
        peft_config does not list (peft records it after injecting them, diffusers drops it
        on a failure), and a cancel inside such a layer's next update leaves its random
        initial weights active.
        """
        loaded, self.loaded = self.loaded, None
        transformer = self.pipe.transformer
        if hasattr(transformer, "peft_config") or any(
            isinstance(module, BaseTunerLayer) for module in transformer.modules()
        ):
            self.pipe.unload_lora_weights()
            if loaded is not None:
                log.info(f"lora: unloaded {loaded[:12]}")


def _offload_policy(pipe) -> str | None:
    """The offload policy whose accelerate hooks are on the pipeline: model, sequential or
    None."""
    hook = getattr(pipe.transformer, "_hf_hook", None)
    if hook is None:
        return None
    return "model" if isinstance(hook, CpuOffload) else "sequential"
