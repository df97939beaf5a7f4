"""CogVideoX attention through diffusers' attention dispatcher.

diffusers' CogVideoXAttnProcessor2_0 calls F.scaled_dot_product_attention itself, so neither
a choice of kernel (diffusers' attention backends) nor context parallelism (Ulysses, which
lives in the dispatcher) reaches it. `DispatchingCogVideoXAttnProcessor` is that processor
with the one call replaced by `dispatch_attention_fn`; with the default backend ("native",
torch's SDPA) and no parallelism the frames are bit-identical (tests/test_reference.py).

It is installed on every pipeline, so one attention code path serves one GPU and many.

COGVIDEOX_ATTENTION_BACKEND picks the kernel (a diffusers backend name). Backends other than
"native" (cuDNN, flash, sage...) are for GPUs and are not measured by this project; an
unknown name, a backend whose package is missing or whose kernel cannot run on the device
and dtype (`check_runs`) fails setup, and so does any but "native" with several GPUs
(`check_splittable`).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _check_attention_backend_requirements,
    dispatch_attention_fn,
)
from diffusers.models.embeddings import apply_rotary_emb

from .errors import ConfigError

ATTENTION_BACKEND_ENV = "COGVIDEOX_ATTENTION_BACKEND"
DEFAULT_BACKEND = AttentionBackendName.NATIVE.value
HEAD_DIM = 64  # every CogVideoX transformer's attention_head_dim


def attention_backend(name: str | None) -> AttentionBackendName:
    """The backend COGVIDEOX_ATTENTION_BACKEND names (None or empty: native SDPA)."""
    name = (name or DEFAULT_BACKEND).strip()
    try:
        backend = AttentionBackendName(name)
    except ValueError:
        known = ", ".join(sorted(b.value for b in AttentionBackendName))
        raise ConfigError(
            f"{ATTENTION_BACKEND_ENV}={name!r} is not a diffusers attention backend; "
            f"one of: {known}"
        ) from None
    try:
        _check_attention_backend_requirements(backend)
    except (RuntimeError, ImportError) as error:
        raise ConfigError(
            f"{ATTENTION_BACKEND_ENV}={name!r} cannot be used here: {error}"
        ) from None
    return backend


def check_runs(
    backend: AttentionBackendName | None, device: torch.device, dtype: torch.dtype
) -> None:
    """Refuse a backend whose kernel cannot run on `device` in `dtype`.

    Its package can be there and the kernel still refuse the device (cuDNN's or the
    memory-efficient SDPA on a CPU, flash attention before Ampere): setup passed, and every
    prediction failed once its prompt was encoded. One tiny attention call tells, before the
    weights are fetched. torch's SDPA ("native") falls back to its math kernel anywhere.
    """
    if backend is None or backend.value == DEFAULT_BACKEND:
        return
    # (batch, tokens, heads, head_dim). 256 tokens: a shape every kernel takes (cuDNN before
    # 9.0 wanted 64 or more, a multiple of 64), so only a kernel that cannot run is refused.
    query = torch.ones(1, 256, 2, HEAD_DIM, device=device, dtype=dtype)  # no RNG draw
    try:
        dispatch_attention_fn(query, query, query, backend=backend)
    except Exception as error:  # whatever the kernel raises where it cannot run
        raise ConfigError(
            f"{ATTENTION_BACKEND_ENV}={backend.value!r} cannot run on {device} in {dtype}: "
            f"{str(error).strip().rstrip('.')}. Leave it unset (torch's SDPA) or pick one that "
            f"runs there"
        ) from None


def check_splittable(backend: AttentionBackendName | None) -> None:
    """Refuse a backend that cannot run the context-parallel engine's attention.

    Over several GPUs the engine runs diffusers' Ulysses attention and, where the tokens do
    not divide evenly, masks padded keys with an additive mask. torch's SDPA ("native", which
    picks cuDNN or flash itself where they apply) does both. Other backends either ignore the
    split, so each rank attends to its own tokens only (wrong frames, no error), or refuse
    the mask, so every padded request fails (diffusers 0.42.1's registry and kernels).
    """
    name = backend.value if backend else DEFAULT_BACKEND
    if name != DEFAULT_BACKEND:
        raise ConfigError(
            f"{ATTENTION_BACKEND_ENV}={name!r} cannot split attention over several GPUs; "
            f"leave it unset (torch's SDPA, which picks cuDNN or flash attention itself) or "
            f"run on one GPU"
        )


class DispatchingCogVideoXAttnProcessor:
    """CogVideoXAttnProcessor2_0 (diffusers 0.42.1), attention computed by the dispatcher.

    `_attention_backend` and `_parallel_config` are the attributes diffusers' own
    dispatching processors carry; the context-parallel engine sets the second, and
    `key_mask` where the sequence shards were padded (an additive mask over this rank's
    keys, -inf at padding, all-gathered by the dispatcher's Ulysses attention).
    """

    def __init__(self, backend: AttentionBackendName | None = None):
        self._attention_backend = backend
        self._parallel_config = None
        self.key_mask: torch.Tensor | None = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(
                attention_mask, sequence_length, batch_size
            )
            attention_mask = attention_mask.view(
                batch_size, attn.heads, -1, attention_mask.shape[-1]
            )
        elif self.key_mask is not None:
            attention_mask = self.key_mask

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        # (batch, heads, tokens, head_dim), as diffusers' processor, so the norms and the
        # rotary embedding run on the same layout and give the same bits.
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            query[:, :, text_seq_length:] = apply_rotary_emb(
                query[:, :, text_seq_length:], image_rotary_emb
            )
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(
                    key[:, :, text_seq_length:], image_rotary_emb
                )

        # The dispatcher takes and returns (batch, tokens, heads, head_dim).
        hidden_states = dispatch_attention_fn(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


def use_dispatching_attention(transformer, backend: AttentionBackendName | None = None) -> None:
    """Give every attention layer of a CogVideoX transformer the dispatching processor."""
    transformer.set_attn_processor(DispatchingCogVideoXAttnProcessor(backend))
