"""The dispatching attention processor: diffusers' CogVideoX attention, kernel by name.

Whole pipelines with it are compared with diffusers in tests/test_reference.py; here, one
transformer forward, and the COGVIDEOX_ATTENTION_BACKEND rules.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

from cogvideox_cog.attention import (
    ATTENTION_BACKEND_ENV,
    AttentionBackendName,
    DispatchingCogVideoXAttnProcessor,
    attention_backend,
    check_runs,
    check_splittable,
    use_dispatching_attention,
)
from cogvideox_cog.devtools.tiny import build_tiny_pipeline
from cogvideox_cog.errors import ConfigError
from cogvideox_cog.generator import VideoGenerator
from cogvideox_cog.pipeline import build_pipeline, check_compiled_if_flex
from cogvideox_cog.variants import VARIANTS
from cogvideox_cog.weights import WEIGHTS_URL_ENV

CPU = torch.device("cpu")


@pytest.mark.parametrize("family", ["1.0", "1.5"])
def test_the_dispatching_processor_computes_diffusers_bits(family):
    transformer = build_tiny_pipeline(family, "t2v").transformer
    generator = torch.Generator().manual_seed(0)
    frames = 2 if family == "1.5" else 1  # 1.5 patches 2 frames at a time: 15 tokens either way
    inputs = dict(
        hidden_states=torch.randn(2, frames, 4, 6, 10, generator=generator),
        encoder_hidden_states=torch.randn(2, 226, 32, generator=generator),
        timestep=torch.tensor([999, 999]),
        image_rotary_emb=tuple(torch.randn(15, 16, generator=generator) for _ in range(2)),
        return_dict=False,
    )
    with torch.no_grad():
        transformer.set_attn_processor(CogVideoXAttnProcessor2_0())
        theirs = transformer(**inputs)[0]
        use_dispatching_attention(transformer)
        ours = transformer(**inputs)[0]
    processors = transformer.attn_processors.values()
    assert all(isinstance(p, DispatchingCogVideoXAttnProcessor) for p in processors)
    assert torch.equal(ours, theirs)


def test_the_default_backend_is_torchs_sdpa():
    assert attention_backend(None) == attention_backend("") == AttentionBackendName.NATIVE


def test_an_unknown_backend_fails_setup_naming_the_variable_and_the_choices():
    with pytest.raises(ConfigError, match=r"COGVIDEOX_ATTENTION_BACKEND='flashy' .* native"):
        attention_backend("flashy")


@pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here"
)
def test_a_backend_without_its_package_fails_setup_saying_what_to_install():
    with pytest.raises(ConfigError, match=r"COGVIDEOX_ATTENTION_BACKEND='flash' .*flash-attn"):
        attention_backend("flash")


@pytest.mark.parametrize("name", ["_native_cudnn", "_native_efficient"])
def test_a_backend_whose_kernel_cannot_run_on_the_device_is_refused_naming_it(name):
    """Their packages are torch itself, so only running them tells."""
    expected = f"{ATTENTION_BACKEND_ENV}='{name}' cannot run on cpu in torch.float32: "
    with pytest.raises(ConfigError, match=re.escape(expected)):
        check_runs(attention_backend(name), CPU, torch.float32)


@pytest.mark.parametrize("name", [None, "native", "_native_math", "_native_flash"])
def test_a_backend_whose_kernel_runs_on_the_device_is_taken(name):
    check_runs(attention_backend(name), CPU, torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="cuDNN attention may run on this GPU")
def test_a_backend_that_cannot_run_here_fails_setup_before_the_weights(monkeypatch):
    """Setup passed, and every prediction then failed once its prompt was encoded."""
    monkeypatch.setenv(WEIGHTS_URL_ENV, "http://127.0.0.1:9/cogvideox-5b.tar")  # unreachable
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "_native_cudnn")
    with pytest.raises(ConfigError, match="'_native_cudnn' cannot run on cpu"):
        VideoGenerator.from_env("t2v")


def test_flex_attention_uncompiled_fails_setup_before_the_weights(monkeypatch):
    """Eager, flex attention holds the whole matrix of scores: a tiny call runs, and every
    real request would run out of memory."""
    monkeypatch.setenv(WEIGHTS_URL_ENV, "http://127.0.0.1:9/cogvideox-5b.tar")  # unreachable
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "flex")
    with pytest.raises(ConfigError, match="'flex' runs only compiled: set COGVIDEOX_COMPILE=1"):
        VideoGenerator.from_env("t2v")


def test_flex_attention_compiled_is_taken():
    check_compiled_if_flex(attention_backend("flex"), compiled=True)


@pytest.mark.parametrize("name", [None, "native"])
def test_torchs_sdpa_can_split_attention_over_several_gpus(name):
    check_splittable(attention_backend(name))


@pytest.mark.parametrize("name", ["_native_math", "_native_efficient", "flex"])
def test_a_backend_that_ignores_ulysses_or_refuses_masks_cannot_split_attention(name):
    with pytest.raises(ConfigError, match=rf"COGVIDEOX_ATTENTION_BACKEND='{name}' cannot split"):
        check_splittable(attention_backend(name))


def _transformer_inputs() -> dict:
    """One forward's inputs for the tiny 1.0 transformer (15 video tokens)."""
    generator = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(2, 1, 4, 6, 10, generator=generator),
        encoder_hidden_states=torch.randn(2, 226, 32, generator=generator),
        timestep=torch.tensor([999, 999]),
        image_rotary_emb=tuple(torch.randn(15, 16, generator=generator) for _ in range(2)),
        return_dict=False,
    )


def test_keys_take_the_key_norm_and_queries_the_query_norm():
    """Fresh norms are all alike; trained ones are not, so each is made distinct here."""
    transformer = build_tiny_pipeline("1.0", "t2v").transformer
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if ".norm_q." in name or ".norm_k." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        transformer.set_attn_processor(CogVideoXAttnProcessor2_0())
        theirs = transformer(**_transformer_inputs())[0]
        use_dispatching_attention(transformer)
        ours = transformer(**_transformer_inputs())[0]
    assert torch.equal(ours, theirs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="cuDNN attention may run on this GPU")
def test_the_backend_chosen_is_the_one_each_attention_layer_calls():
    transformer = build_tiny_pipeline("1.0", "t2v").transformer
    use_dispatching_attention(transformer, attention_backend("_native_cudnn"))
    with torch.no_grad(), pytest.raises(RuntimeError, match="No viable backend"):
        transformer(**_transformer_inputs())


@pytest.mark.skipif(torch.cuda.is_available(), reason="cuDNN attention may run on this GPU")
def test_a_pipeline_built_with_a_backend_calls_it_in_each_attention_layer(tiny_weights):
    """COGVIDEOX_ATTENTION_BACKEND reaches the pipeline setup builds, not only the processor."""
    variant = VARIANTS["cogvideox-5b"]
    cudnn = attention_backend("_native_cudnn")
    pipe = build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none", attention=cudnn)
    with torch.no_grad(), pytest.raises(RuntimeError, match="No viable backend"):
        pipe.transformer(**_transformer_inputs())


def test_checking_a_backend_draws_no_random_numbers():
    """Setup must leave torch's generator where a seeded caller left it."""
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    check_runs(attention_backend("_native_math"), CPU, torch.float32)
    assert torch.equal(torch.random.get_rng_state(), state)
