"""Rewrite with a small instruct model loaded in setup from the weights cache.

Greedy decoding, with a generation config of our own (the checkpoint's may ask for
sampling), so the same prompt always gives the same rewrite on the same machine. Where the
video model shares the GPU under offload, the language model waits in CPU memory and visits
the GPU only for its rewrite.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from jinja2 import TemplateError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)

from ..errors import ConfigError, EnhanceError
from ..gpu_memory import out_of_memory
from ..weights.download import waiting_check
from .instruction import messages
from .rewriter import Reply

log = logging.getLogger(__name__)

WEIGHTS_ENV = "COGVIDEOX_ENHANCE_WEIGHTS_URL"  # where the checkpoint is (read in enhance.py)
# What a rewrite needs on the GPU beyond the weights: the KV cache and activations of the
# longest chat (the instruction and a 10,000-character prompt, about 3,000 tokens, and 226
# new ones) take a few hundred MB on a 7-9B model; the rest is the allocator's rounding.
REWRITE_MARGIN_BYTES = 2**30
# For templates with a thinking mode (Qwen3's: the reply opens with an empty <think> block).
# Others never read it. Left on, the model reasons past the token cap and writes no caption.
NO_THINKING = {"enable_thinking": False}


class LocalRewriter:
    """A transformers causal LM with a chat template.

    resident: stays on `device` between rewrites (the GPU has room beside the video model);
    otherwise it is kept on the CPU and moved to `device` for each rewrite.
    """

    def __init__(
        self, model, tokenizer, name: str, device: torch.device, *, resident: bool, timeout: float
    ):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.device, self.resident, self.timeout = device, resident, timeout

    @classmethod
    def load(
        cls,
        directory: Path,
        name: str,
        device: torch.device,
        *,
        video_peak_gib: float | None,
        timeout: float,
    ) -> LocalRewriter:
        """Load from `directory`. On a GPU it stays resident when the video model runs
        without offload (`video_peak_gib`: its measured peak, pipeline.no_offload_peak_gib)
        and the GPU still has that peak's room beside it."""
        started = time.monotonic()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(directory)
        _check_chat_template(tokenizer, name)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
        # Greedy, in place of the checkpoint's sampling settings (which generate() would
        # otherwise merge in, and warn about, on every call).
        model.generation_config = GenerationConfig(
            do_sample=False,
            eos_token_id=_ends(model.generation_config.eos_token_id, tokenizer.eos_token_id),
            pad_token_id=tokenizer.pad_token_id,
        )
        resident = device.type == "cpu" or (
            video_peak_gib is not None and _fits_beside(model, device, video_peak_gib)
        )
        if resident:
            model.to(device)
        else:
            _check_room_to_visit(model, name, device, offload=video_peak_gib is None)
        where = f"on {device.type}" if resident else f"in CPU memory, moved to {device.type} to run"
        log.info(
            f"setup: prompt enhancer {name} loaded in {time.monotonic() - started:.1f} s, {where}"
        )
        return cls(model, tokenizer, name, device, resident=resident, timeout=timeout)

    def rewrite(
        self, chat: list[dict[str, str]], *, seed: int, max_tokens: int, api_key: str | None
    ) -> Reply:
        """Greedy: `seed` changes nothing here, and `api_key` is for endpoints."""
        inputs = self.tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, return_tensors="pt", return_dict=True, **NO_THINKING
        )
        check = waiting_check()
        deadline = _Deadline(self.timeout)
        criteria = StoppingCriteriaList([deadline, *([_Checked(check)] if check else [])])
        try:
            with self._on_device(), torch.inference_mode():
                if deadline.passed():  # the move to the GPU took all of it
                    raise EnhanceError(self._late())
                output = self.model.generate(
                    **{k: v.to(self.model.device) for k, v in inputs.items()},
                    max_new_tokens=max_tokens,
                    stopping_criteria=criteria,
                )
        except torch.OutOfMemoryError as error:  # after the model went back to the CPU
            advice = (
                "Nothing was generated: send enhance_prompt=false, or a shorter prompt. The "
                "deployment's operator can use a smaller prompt model, or "
                "COGVIDEOX_ENHANCE_PROMPT=openai."
            )
            raise out_of_memory(error, f"{self.name} was rewriting the prompt", advice) from error
        if deadline.reached:  # generation stopped there, or its last token came after it
            raise EnhanceError(self._late())
        new = output[0, inputs["input_ids"].shape[1] :].tolist()
        finished = bool(new) and new[-1] in _ids(self.model.generation_config.eos_token_id)
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Reply(text, cut=not finished and len(new) >= max_tokens)

    def _late(self) -> str:
        return f"{self.name} did not finish within {self.timeout:g} s"

    @contextmanager
    def _on_device(self) -> Iterator[None]:
        if self.resident or self.device.type == "cpu":
            yield
            return
        # What the video model cached from its last run counts as room: the rewrite runs
        # before its denoising, and the move back empties the cache anyway.
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(self.device)[0]
        weights = _weights_bytes(self.model)
        if not visit_fits(free, weights):
            raise EnhanceError(
                f"{self.name} cannot rewrite the prompt now: it needs "
                f"{_gib(weights + REWRITE_MARGIN_BYTES)} GiB of GPU memory and the GPU has "
                f"{_gib(free)} GiB free. Nothing was generated: try again later, or send "
                f"enhance_prompt=false."
            )
        try:  # a cancel or out-of-memory error can cut the move short: move back what went
            self.model.to(self.device)
            yield
        finally:
            _back_to_cpu(self.model)


class _Deadline(StoppingCriteria):
    """COGVIDEOX_ENHANCE_TIMEOUT as one deadline for the whole rewrite, from before the move
    to the GPU: transformers' `max_time` counts from generate's start, so a slow move came on
    top of it. Checked after each token; `reached` once a token came after the deadline."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds
        self.reached = False

    def passed(self) -> bool:
        self.reached = self.reached or time.monotonic() >= self.at
        return self.reached

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.passed(), dtype=torch.bool, device=input_ids.device
        )


class _Checked(StoppingCriteria):
    """A rank's cancel check after each token: its cancel is a flag that no exception carries,
    so without this the rewrite would run on to its cap or timeout while the other ranks, and
    the worker waiting for them to stop, wait."""

    def __init__(self, check):
        self.check = check

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.check()  # raises to stop
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _back_to_cpu(model) -> None:
    """All of the model moved back to the CPU, also when a cancel cuts the move short (Cog
    raises it at any bytecode, this move's loop included): the rest is moved, then the cancel
    raised. Left there, the part on the GPU would take the video model's room."""
    cut = None
    while True:
        try:
            model.to("cpu")
            break
        except BaseException as error:
            if isinstance(error, Exception):  # the move itself failed: trying again won't do
                raise
            cut = cut or error
    torch.cuda.empty_cache()
    if cut is not None:
        raise cut


def _check_chat_template(tokenizer, name: str) -> None:
    """ConfigError, in setup, when the checkpoint's chat template cannot render the chat every
    rewrite sends (a system message first): some refuse a system role (Gemma's), some
    checkpoints have no template; either would fail every request instead."""
    try:
        tokenizer.apply_chat_template(
            messages("a cat playing piano", "t2v"),
            add_generation_prompt=True,
            tokenize=False,
            **NO_THINKING,
        )
    except (TemplateError, ValueError) as error:
        raise ConfigError(
            f"{WEIGHTS_ENV}: {name} cannot be asked for a rewrite: its chat template fails on "
            f"a chat that starts with a system message ({error}). Use a chat model whose "
            f"template takes a system message, such as the default."
        ) from None


def _fits_beside(model, device: torch.device, video_peak_gib: float) -> bool:
    """Whether the model can stay on the GPU and leave the loaded video model the rest of
    its denoising peak (the peak, minus what it has reserved already)."""
    weights = _weights_bytes(model)
    free = torch.cuda.mem_get_info(device)[0]
    still_needed = video_peak_gib * 2**30 - torch.cuda.memory_reserved(device)
    return free - weights >= still_needed


def _check_room_to_visit(model, name: str, device: torch.device, *, offload: bool) -> None:
    """ConfigError, in setup, when the GPU has no room for a rewrite now: the model and the
    video model have just been placed, so no later rewrite would find more."""
    weights = _weights_bytes(model)
    free = torch.cuda.mem_get_info(device)[0]
    if visit_fits(free, weights):
        return
    offload_hint = (
        "" if offload else ", COGVIDEOX_OFFLOAD=model (the video model then waits in CPU memory)"
    )
    raise ConfigError(
        f"{WEIGHTS_ENV}: {name} needs {_gib(weights + REWRITE_MARGIN_BYTES)} GiB of GPU memory "
        f"to rewrite a prompt (its weights and 1 GiB for the rewrite), and the GPU has "
        f"{_gib(free)} GiB free beside the video model: every enhance_prompt would fail. Use a "
        f"smaller model{offload_hint}, or COGVIDEOX_ENHANCE_PROMPT=openai."
    )


def visit_fits(free_bytes: int, weights_bytes: int) -> bool:
    """Whether a model kept in CPU memory can visit a GPU with `free_bytes` free for a
    rewrite: a move that runs out of memory part way fails in the middle of a prediction."""
    return free_bytes >= weights_bytes + REWRITE_MARGIN_BYTES


def _weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f}"


def _ends(configured: int | list[int] | None, tokenizer_eos: int | None) -> list[int] | None:
    """The tokens a rewrite ends at: the generation config's, and the tokenizer's end of
    sequence. A checkpoint whose generation config names none (or not its tokenizer's) would
    otherwise run on past the end of its answer to the cap, keeping what it wrote after."""
    ends = [configured] if isinstance(configured, int) else list(configured or [])
    if tokenizer_eos is not None and tokenizer_eos not in ends:
        ends.append(tokenizer_eos)
    return ends or None


def _ids(eos: int | list[int] | None) -> set[int]:
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)
