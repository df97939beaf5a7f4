"""LoRAs on the tiny 1.0 text-to-video model, fetched from a loopback server through the
generator's own request path: scales, both upstream layouts, switching, and refusals."""

from __future__ import annotations

import gc
import json
import logging
import pickle
import re
from dataclasses import replace
from pathlib import Path

import cog
import diffusers
import numpy as np
import peft
import pytest
import torch
from diffusers.loaders import lora_base
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from cogvideox_cog.errors import GpuMemoryError, LoraError
from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.lora.file import METADATA_KEY, adapted_layers, check_fits, read_lora
from cogvideox_cog.lora.store import LoraCache
from cogvideox_cog.pipeline import build_pipeline, compile_transformer
from cogvideox_cog.variants import VARIANTS
from tests.file_server import FileServer
from tests.lora_files import (
    lora_tensors,
    save_diffusers_lora,
    save_renamed,
    save_sat_lora,
)
from tests.markers import GUARDS_BACKEND

CPU = torch.device("cpu")
RANK = 4
LORA = "pytorch_lora_weights.safetensors"


class _RunsCode:
    """Unpickling this creates a file: proof that a pickle was (not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def loras(tiny_weights, tmp_path_factory) -> FileServer:
    """Every LoRA file the tests use, served over loopback HTTP."""
    root = tmp_path_factory.mktemp("loras")
    transformer = tiny_weights["1.0-t2v"] / "transformer"
    a = lora_tensors(transformer, RANK, seed=1)
    b = lora_tensors(transformer, RANK, seed=2)
    save_diffusers_lora(a, root / "a")
    save_diffusers_lora(b, root / "b")
    save_diffusers_lora(a, root / "a-alpha8", alpha=2 * RANK)
    save_diffusers_lora(a, root / "a-rslora", alpha=2 * RANK, use_rslora=True)
    save_diffusers_lora(a, root / "a-alpha1", alpha=1)  # SAT's alpha, stored
    save_sat_lora(a, root / "a-sat")
    save_renamed(a, root / "a-bare" / LORA, lambda k: k)  # a peft state dict, saved as is
    float64 = {k: v.double() for k, v in a.items()}
    save_renamed(float64, root / "a-float64" / LORA, lambda k: f"transformer.{k}")
    wider = lora_tensors(transformer, RANK, seed=3, attention_head_dim=24)  # 48 wide, not 32
    save_diffusers_lora(wider, root / "wider")
    deeper = lora_tensors(transformer, RANK, seed=3, num_layers=3)
    save_diffusers_lora(deeper, root / "deeper")
    skewed = dict(a)  # lora_B of another rank than its lora_A
    skewed["transformer_blocks.0.attn1.to_q.lora_B.weight"] = torch.ones(32, RANK + 1)
    save_renamed(skewed, root / "skewed" / LORA, lambda k: f"transformer.{k}")
    # PEFT's save_pretrained names: the model's layers under its wrapper's prefix
    save_renamed(a, root / "peft-prefixed" / LORA, lambda k: f"base_model.model.{k}")
    conv = lora_tensors(transformer, RANK, seed=4, targets=["patch_embed.proj"])  # a Conv2d
    save_diffusers_lora(conv, root / "conv")
    kohya = {k.replace("lora_A", "lora_down"): v for k, v in a.items()}
    save_renamed(kohya, root / "kohya" / LORA, lambda k: f"transformer.{k}")
    huge = {k: v * 1e30 for k, v in a.items()}  # finite, but its products overflow
    save_renamed(huge, root / "huge" / LORA, lambda k: f"transformer.{k}")
    nan = {k: v.clone() for k, v in a.items()}
    next(iter(nan.values()))[0, 0] = float("nan")
    save_renamed(nan, root / "nan" / LORA, lambda k: f"transformer.{k}")
    rank0 = dict(a)  # the last layer's pair holds no rank: peft refuses it mid-load
    last = sorted(k for k in a if "lora_A" in k)[-1]
    rank0[last] = torch.zeros(0, a[last].shape[1])
    up = last.replace("lora_A", "lora_B")
    rank0[up] = torch.zeros(a[up].shape[0], 0)
    save_renamed(rank0, root / "rank0" / LORA, lambda k: f"transformer.{k}")
    (root / "pickle").mkdir()
    (root / "pickle" / LORA).write_bytes(pickle.dumps(_RunsCode(root / "UNPICKLED")))
    torch.save(a, root / "pickle" / "torch-zip.safetensors")
    server = FileServer(root)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def generator(tiny_weights, tmp_path_factory) -> VideoGenerator:
    variant = VARIANTS["cogvideox-5b"]
    pipe = build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none")
    generator = VideoGenerator(variant, pipe, CPU)
    generator.lora_cache = LoraCache(tmp_path_factory.mktemp("lora-cache"), 1 << 30, 1 << 30, 60)
    return generator


def _frames(generator: VideoGenerator, url: str | None = None, scale: float = 1.0):
    request = Request("a cat walks", "", 9, 2, 6.0, None, None, 5, lora_url=url, lora_scale=scale)
    return generator.render_frames(request).frames


def _url(loras: FileServer, folder: str, name: str = LORA) -> str:
    return loras.url(f"{folder}/{name}")


@pytest.fixture(scope="module")
def base(generator) -> np.ndarray:
    return _frames(generator)


def _peft_layers(transformer) -> int:
    return sum(isinstance(m, BaseTunerLayer) for m in transformer.modules())


def _weights(transformer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in transformer.state_dict().items()}


def _raise_at_call(monkeypatch, owner, name: str, error: BaseException, call: int) -> None:
    """owner.name raises `error` on its `call`-th call (and runs as before on the others): a
    cancel, which Cog raises at whatever bytecode the worker is on, landing there."""
    original = getattr(owner, name)
    calls = 0

    def cut_short(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, cut_short)


def test_lora_at_scale_zero_gives_the_base_output_exactly(generator, loras, base):
    np.testing.assert_array_equal(_frames(generator, _url(loras, "a"), 0.0), base)


def test_lora_changes_the_output(generator, loras, base):
    assert np.abs(_frames(generator, _url(loras, "a"), 1.0) - base).max() > 1e-3


def test_prediction_without_lora_after_one_with_it_is_the_base_output_exactly(
    generator, loras, base
):
    _frames(generator, _url(loras, "a"), 1.0)
    np.testing.assert_array_equal(_frames(generator), base)
    assert _peft_layers(generator.pipe.transformer) == 0


def test_blank_lora_url_means_the_base_model(generator, loras, base):
    _frames(generator, _url(loras, "a"), 1.0)
    np.testing.assert_array_equal(_frames(generator, "  "), base)


def test_a_then_b_then_a_reproduces_a_exactly(generator, loras):
    first = _frames(generator, _url(loras, "a"))
    other = _frames(generator, _url(loras, "b"))
    again = _frames(generator, _url(loras, "a"))
    np.testing.assert_array_equal(again, first)
    assert np.abs(other - first).max() > 1e-3


def test_a_sat_export_at_one_over_rank_gets_the_strength_sat_trained_it_with(generator, loras):
    """The export stores no alpha, so it is taken as rank (what cli_demo.py applies at 1.0);
    SAT trained with alpha 1, which lora_scale 1/rank gives back, as docs/lora.md says."""
    sat = _frames(generator, _url(loras, "a-sat"), 1 / RANK)
    np.testing.assert_array_equal(sat, _frames(generator, _url(loras, "a-alpha1"), 1.0))


def _merged_by_hand(weights: Path, tensors: dict[str, torch.Tensor], factor: float):
    """The tiny model's frames with `factor` x B A added to each layer the LoRA trained: what
    a LoRA at that strength does, worked out without peft or diffusers' loader."""
    variant = VARIANTS["cogvideox-5b"]
    pipe = build_pipeline(variant, weights, CPU, "none")
    with torch.no_grad():
        for key, down in tensors.items():
            if ".lora_A." in key:
                up = tensors[key.replace(".lora_A.", ".lora_B.")]
                layer = pipe.transformer.get_submodule(key.split(".lora_A.")[0])
                layer.weight += factor * (up @ down)
    return _frames(VideoGenerator(variant, pipe, CPU))


@pytest.mark.parametrize("scale", [0.5, 1 / RANK])
def test_a_sat_export_at_a_scale_adds_that_scale_times_its_weights(
    generator, loras, tiny_weights, scale
):
    """No alpha in a SAT export: alpha is taken as rank, so lora_scale s adds s x B A to each
    layer, as a diffusers LoRA without alpha at s does (cli_demo.py's fuse_lora). Against
    the weights merged by hand, so a wrong factor (SAT's alpha 1 / rank, s twice) fails."""
    weights = tiny_weights["1.0-t2v"]
    a = lora_tensors(weights / "transformer", RANK, seed=1)  # the tensors of a-sat
    sat = _frames(generator, _url(loras, "a-sat"), scale)
    np.testing.assert_allclose(sat, _merged_by_hand(weights, a, scale), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(sat, _frames(generator, _url(loras, "a"), scale))


def test_a_file_without_the_prefix_or_an_alpha_takes_alpha_equal_to_rank(generator, loras):
    """As diffusers' load_lora_adapter takes a transformer's own save or a peft state dict."""
    bare = _frames(generator, _url(loras, "a-bare"), 1.0)
    np.testing.assert_array_equal(bare, _frames(generator, _url(loras, "a"), 1.0))


def test_alpha_in_the_files_metadata_sets_the_trained_scale(generator, loras):
    """alpha = 2 x rank in the metadata: scale 1.0 is twice the alpha = rank default."""
    with_alpha = _frames(generator, _url(loras, "a-alpha8"), 1.0)
    np.testing.assert_array_equal(with_alpha, _frames(generator, _url(loras, "a"), 2.0))


def test_a_rank_stabilised_lora_is_scaled_by_alpha_over_the_root_of_its_rank(generator, loras):
    """peft's use_rslora, as diffusers applies it: alpha 8 at rank 4 is 8 / 2, not 8 / 4."""
    rslora = _frames(generator, _url(loras, "a-rslora"), 1.0)
    np.testing.assert_array_equal(rslora, _frames(generator, _url(loras, "a"), 4.0))


def test_an_alpha_pattern_in_the_files_metadata_sets_its_layers_scale(generator, loras, tmp_path):
    """A trainer's alpha for one layer, recorded by save_lora_weights, is the one peft applies."""
    tensors = load_file(generator.lora_cache.get(_url(loras, "a")))
    layer = "transformer_blocks.0.attn1.to_q"
    config = {"lora_alpha": RANK, "alpha_pattern": {f"^{layer}": 2 * RANK}}
    path = tmp_path / "alpha-pattern.safetensors"
    save_file(tensors, path, metadata={METADATA_KEY: json.dumps(config)})
    transformer = generator.pipe.transformer
    try:
        generator.lora.use(path, 1.0)
        assert transformer.get_submodule(layer).scaling["lora"] == 2.0
        assert transformer.get_submodule("transformer_blocks.0.attn1.to_k").scaling["lora"] == 1.0
    finally:
        generator.lora.use(None, 1.0)


def test_a_lora_in_float64_gives_the_frames_of_its_float32_values(generator, loras):
    float64 = _frames(generator, _url(loras, "a-float64"))
    np.testing.assert_array_equal(float64, _frames(generator, _url(loras, "a")))


def test_fifty_switches_leave_adapters_and_parameters_unchanged(generator, loras):
    transformer = generator.pipe.transformer
    urls = [_url(loras, "a"), _url(loras, "b")]
    generator.lora.use(generator.lora_cache.get(urls[0]), 1.0)
    parameters = sum(p.numel() for p in transformer.parameters())
    layers = _peft_layers(transformer)
    for switch in range(50):
        generator.lora.use(generator.lora_cache.get(urls[switch % 2]), 1.0)
        assert list(transformer.peft_config) == ["lora"]
    assert sum(p.numel() for p in transformer.parameters()) == parameters
    assert _peft_layers(transformer) == layers
    generator.lora.use(None, 1.0)
    assert not getattr(transformer, "peft_config", None) and _peft_layers(transformer) == 0


def test_a_lora_asked_for_again_stays_loaded_and_only_takes_the_new_scale(generator, loras):
    """Loading costs seconds on the real model; the repeated request keeps the peft layers."""
    transformer = generator.pipe.transformer
    path = generator.lora_cache.get(_url(loras, "a"))
    generator.lora.use(path, 1.0)
    layer = transformer.get_submodule("transformer_blocks.0.attn1.to_q")
    generator.lora.use(path, 0.5)
    assert transformer.get_submodule("transformer_blocks.0.attn1.to_q") is layer
    assert layer.scaling["lora"] == 0.5


def test_the_log_gives_the_scale_applied_as_lora_scale_times_the_trained_scale(
    generator, loras, caplog
):
    """Again for the LoRA already on, whose trained scale is not read again."""
    path = generator.lora_cache.get(_url(loras, "a-rslora"))
    with caplog.at_level(logging.INFO, logger="cogvideox_cog.lora.slot"):
        generator.lora.use(path, 0.5)
        generator.lora.use(path, 1.0)
    applied = [r.getMessage() for r in caplog.records if "scale applied" in r.getMessage()]
    assert applied == [
        "lora: scale applied = lora_scale 0.5 x alpha/sqrt(rank) 4 = 2",
        "lora: scale applied = lora_scale 1 x alpha/sqrt(rank) 4 = 4",
    ]


def test_a_lora_whose_unload_was_canceled_is_loaded_again_in_full(generator, loras, monkeypatch):
    """The cancel lands after diffusers put back 2 of the LoRA's base layers: asked for the
    same LoRA next, the slot loads it again instead of rescaling the layers left."""
    full = _frames(generator, _url(loras, "a"))
    with monkeypatch.context() as patch:
        _raise_at_call(patch, BaseTunerLayer, "get_base_layer", cog.CancelationException(), 3)
        with pytest.raises(cog.CancelationException):
            _frames(generator)
    np.testing.assert_array_equal(_frames(generator, _url(loras, "a")), full)


def test_a_lora_whose_unload_was_canceled_after_its_layers_went_loads_again(
    generator, loras, monkeypatch
):
    """The cancel lands after diffusers removed the peft layers, before it drops peft_config:
    the next load must not find the adapter name taken."""
    full = _frames(generator, _url(loras, "a"))
    remove = diffusers.utils.recurse_remove_peft_layers

    def remove_then_cancel(model):
        remove(model)
        raise cog.CancelationException()

    with monkeypatch.context() as patch:
        patch.setattr(diffusers.utils, "recurse_remove_peft_layers", remove_then_cancel)
        with pytest.raises(cog.CancelationException):
            _frames(generator)
    np.testing.assert_array_equal(_frames(generator, _url(loras, "a")), full)


# Where a cancel or a failure can cut a LoRA's load short: (owner, method, call).
_LOAD_CUTS = {
    "injecting": (LoraModel, "_replace_module", 3),  # 2 layers wrapped, none recorded
    "injected": (LoraModel, "_post_injection_hook", 1),  # all wrapped, none recorded
    "loading-weights": (peft, "set_peft_model_state_dict", 1),  # recorded, weights unset
}


def _raised_for(error: BaseException) -> type[BaseException]:
    """A cancel goes through as it is; a failure comes out as the LoRA's error."""
    return LoraError if isinstance(error, Exception) else type(error)


@pytest.mark.parametrize("cut", list(_LOAD_CUTS))
@pytest.mark.parametrize(
    "error", [cog.CancelationException(), RuntimeError("CUDA out of memory")], ids=repr
)
def test_a_lora_load_cut_short_leaves_no_peft_layer_after_the_next_prediction(
    generator, loras, base, monkeypatch, cut, error
):
    _frames(generator)
    with monkeypatch.context() as patch:
        owner, name, call = _LOAD_CUTS[cut]
        _raise_at_call(patch, owner, name, error, call)
        with pytest.raises(_raised_for(error)):
            _frames(generator, _url(loras, "b"))
    np.testing.assert_array_equal(_frames(generator), base)
    assert _peft_layers(generator.pipe.transformer) == 0


@pytest.mark.parametrize(
    "error", [cog.CancelationException(), RuntimeError("CUDA out of memory")], ids=repr
)
def test_prediction_without_lora_after_two_loads_cut_short_is_the_base_output_exactly(
    generator, loras, base, monkeypatch, error
):
    """The first load stops after wrapping 2 layers; the second is canceled in the first
    of them, after peft gave it fresh random lora_A and lora_B, before it zeroes lora_B."""
    _frames(generator)
    with monkeypatch.context() as patch:
        _raise_at_call(patch, LoraModel, "_replace_module", error, call=3)
        with pytest.raises(_raised_for(error)):
            _frames(generator, _url(loras, "b"))
    with monkeypatch.context() as patch:
        cancel = cog.CancelationException()
        _raise_at_call(patch, LoraLayer, "reset_lora_parameters", cancel, 1)
        with pytest.raises(cog.CancelationException):
            _frames(generator, _url(loras, "b"))
    np.testing.assert_array_equal(_frames(generator), base)


def test_a_lora_load_out_of_gpu_memory_blames_the_gpu_not_the_lora(
    generator, loras, base, monkeypatch
):
    """Not a LoraError, which tells the user the file is at fault; the base model serves on."""
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with monkeypatch.context() as patch:
        _raise_at_call(patch, LoraModel, "_replace_module", oom, call=3)
        with pytest.raises(GpuMemoryError) as raised:
            _frames(generator, _url(loras, "b"))
    assert re.fullmatch(
        r"The GPU ran out of memory while loading the LoRA \(rank \d+, \d+ layers\)\. A LoRA "
        r"of lower rank needs less\. The deployment's operator can set COGVIDEOX_OFFLOAD=model "
        r"\(it runs with none\), which keeps less of the model on the GPU\.",
        str(raised.value),
    )
    np.testing.assert_array_equal(_frames(generator), base)


def test_a_lora_that_fails_while_loading_leaves_the_base_model(generator, loras, base):
    """A layer of rank 0 passes the file's checks; peft refuses it after wrapping others."""
    _frames(generator)
    with pytest.raises(LoraError, match=r"could not be loaded: .*positive integer"):
        _frames(generator, _url(loras, "rank0"))
    assert _peft_layers(generator.pipe.transformer) == 0
    np.testing.assert_array_equal(_frames(generator), base)


def _offload_hooks(pipe) -> dict[str, str | None]:
    return {
        name: type(getattr(component, "_hf_hook", None)).__name__
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
    }


@pytest.mark.parametrize(
    "error", [cog.CancelationException(), RuntimeError("CUDA out of memory")], ids=repr
)
def test_the_prediction_after_a_lora_load_cut_short_runs_offloaded_as_placed(
    tiny_weights, loras, tmp_path, monkeypatch, error
):
    """diffusers takes the offload hooks off to load a LoRA and puts them back only after a
    load that succeeds. Without them the next prediction ran where the weights lay: on the
    CPU, with model offload on a GPU machine. (Sequential offload cannot run on a CPU.)"""
    variant = VARIANTS["cogvideox-5b"]
    pipe = build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "model")
    generator = VideoGenerator(variant, pipe, CPU)
    generator.lora_cache = LoraCache(tmp_path, 1 << 30, 1 << 30, 60)
    placed = _offload_hooks(pipe)
    base = _frames(generator)
    with monkeypatch.context() as patch:
        _raise_at_call(patch, LoraModel, "_replace_module", error, call=3)
        with pytest.raises(_raised_for(error)):
            _frames(generator, _url(loras, "a"))
    during_steps = []
    generator.on_step = lambda step, seconds: during_steps.append(_offload_hooks(pipe))
    np.testing.assert_array_equal(_frames(generator), base)
    assert during_steps == [placed, placed]


def test_the_prediction_after_a_cancel_while_the_offload_hooks_came_off_runs_as_placed(
    tiny_weights, loras, tmp_path, monkeypatch
):
    """diffusers takes the hooks off one component at a time: canceled after the first, the
    others keep theirs, and the first must get its hook back too."""
    variant = VARIANTS["cogvideox-5b"]
    pipe = build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "model")
    generator = VideoGenerator(variant, pipe, CPU)
    generator.lora_cache = LoraCache(tmp_path, 1 << 30, 1 << 30, 60)
    placed = _offload_hooks(pipe)
    with monkeypatch.context() as patch:
        cancel = cog.CancelationException()
        _raise_at_call(patch, lora_base, "remove_hook_from_module", cancel, call=2)
        with pytest.raises(cog.CancelationException):
            _frames(generator, _url(loras, "a"))
    assert _offload_hooks(pipe) != placed
    during_steps = []
    generator.on_step = lambda step, seconds: during_steps.append(_offload_hooks(pipe))
    _frames(generator)
    assert during_steps == [placed, placed]


@pytest.mark.parametrize(
    ("folder", "message"),
    [
        ("wider", r"does not fit cogvideox-5b.*48 -> 48 features in the LoRA, 32 -> 32"),
        ("deeper", r"transformer_blocks\.2\..*the LoRA has 3 transformer blocks, the model 2"),
        ("skewed", r"lora_A \(4, 32\) and lora_B \(32, 5\): expected \(rank, in\)"),
        ("kohya", r"not peft LoRA weights.*lora_down"),
        ("peft-prefixed", r"names start with 'base_model\.model\.' .*save_lora_weights"),
        ("conv", r"patch_embed\.proj is a convolution's LoRA.*only LoRAs of the .* linear"),
        ("nan", r"NaN or infinite"),
    ],
)
def test_mismatched_lora_names_the_mismatch_and_leaves_the_model_untouched(
    generator, loras, base, folder, message
):
    _frames(generator)  # start from the base model
    before = _weights(generator.pipe.transformer)
    with pytest.raises(LoraError, match=message):
        _frames(generator, _url(loras, folder))
    after = generator.pipe.transformer.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert _peft_layers(generator.pipe.transformer) == 0
    np.testing.assert_array_equal(_frames(generator), base)


def test_lora_mismatch_error_says_the_base_model_is_unchanged(generator, loras):
    with pytest.raises(LoraError, match=r"another model.*The base model is unchanged"):
        _frames(generator, _url(loras, "wider"))


def test_a_lora_of_layers_whose_inputs_and_outputs_differ_in_size_fits(
    generator, tiny_weights, tmp_path
):
    transformer = tiny_weights["1.0-t2v"] / "transformer"
    # 32 -> 16 and 32 -> 128 features in the tiny model
    tensors = lora_tensors(transformer, RANK, seed=5, targets=["proj_out", "ff.net.0.proj"])
    path = save_diffusers_lora(tensors, tmp_path)
    try:
        generator.lora.use(path, 1.0)
    finally:
        generator.lora.use(None, 1.0)


def test_a_lora_that_does_not_fit_leaves_the_lora_on_the_model_in_place(generator, loras):
    """Refused before anything is changed: the LoRA already on stays on, as it was."""
    transformer = generator.pipe.transformer
    _frames(generator, _url(loras, "a"))
    before = _weights(transformer)
    with pytest.raises(LoraError, match="does not fit"):
        _frames(generator, _url(loras, "wider"))
    after = transformer.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


class _CountedRewrites:
    """A language model that rewrites every prompt the same way, and counts its calls."""

    def __init__(self):
        self.calls = 0

    def enhance(self, prompt: str, **_) -> str:
        self.calls += 1
        return f"{prompt}, in soft morning light"


@pytest.mark.parametrize(("folder", "problem"), [("wider", "another model"), ("nope", "404")])
def test_a_lora_that_cannot_be_used_fails_before_the_prompt_is_rewritten(
    generator, loras, monkeypatch, folder, problem
):
    """The rewrite is a language model's call, on the user's own key where they give one, and
    takes seconds: a LoRA that cannot be used (another model's, a URL that fails) is refused
    without it."""
    rewrites = _CountedRewrites()
    monkeypatch.setattr(generator, "enhancer", rewrites)
    rewritten = Request("a cat walks", "", 9, 2, 6.0, None, None, 5, enhance_prompt=True)
    with pytest.raises(LoraError, match=problem):
        generator.render_frames(replace(rewritten, lora_url=_url(loras, folder)))
    assert rewrites.calls == 0
    generator.render_frames(rewritten)  # the base model, its prompt rewritten
    assert rewrites.calls == 1


@pytest.mark.parametrize("name", [LORA, "torch-zip.safetensors"])
def test_pickle_file_is_refused_without_being_unpickled(generator, loras, name):
    with pytest.raises(LoraError, match=r"PyTorch pickle checkpoint.*refused"):
        _frames(generator, _url(loras, "pickle", name))
    assert not (loras.directory / "UNPICKLED").exists()


def test_pickle_file_name_is_refused_before_any_download(generator, loras):
    requests = len(loras.requests)
    with pytest.raises(LoraError, match=r"names a PyTorch pickle file"):
        _frames(generator, _url(loras, "a", "adapter_model.bin"))
    assert len(loras.requests) == requests


def test_a_lora_that_overflows_fails_instead_of_giving_a_black_video(generator, loras, base):
    with pytest.raises(LoraError, match=r"came out as NaN: .* at lora_scale 1"):
        _frames(generator, _url(loras, "huge"))
    np.testing.assert_array_equal(_frames(generator), base)


def test_a_lora_that_overflows_even_at_scale_0_says_to_check_the_lora(generator, loras, base):
    """peft multiplies by the scale after the LoRA's own product: at 0 that is 0 x inf."""
    with pytest.raises(LoraError, match=r"overflow whatever the lora_scale") as refused:
        _frames(generator, _url(loras, "huge"), scale=0.0)
    assert "smaller lora_scale" not in str(refused.value)
    np.testing.assert_array_equal(_frames(generator), base)


def test_a_request_renders_the_same_frames_whatever_ran_before_it(generator, loras, base):
    """The riskiest predictions one worker can run before it: a LoRA under speed_mode faster
    canceled between steps, guidance 1, dynamic CFG, another seed and negative prompt. Then
    the base request again: the same frames, bit for bit. (After a LoRA that overflows:
    test_a_lora_that_overflows_fails_instead_of_giving_a_black_video.)"""

    def cancel_at_step_2(step: int, seconds: float) -> None:
        if step == 2:
            raise cog.CancelationException()

    lora = {"lora_url": _url(loras, "a"), "lora_scale": 2.0}
    canceled = Request("a dog runs", "", 9, 6, 6.0, None, None, 7, **lora, speed_mode="faster")
    generator.on_step = cancel_at_step_2
    try:
        with pytest.raises(cog.CancelationException):
            generator.render_frames(canceled)
    finally:
        generator.on_step = None
    generator.render_frames(Request("a dog runs", "", 9, 2, 1.0, False, None, 9))
    generator.render_frames(Request("a dog runs", "blurry", 9, 2, 6.0, True, None, 9))
    np.testing.assert_array_equal(_frames(generator), base)


@pytest.mark.parametrize(
    "config",
    [
        {"lora_alpha": 4, "alpha_pattern": [1, 2]},
        {"lora_alpha": 4, "alpha_pattern": {"^transformer_blocks.0": "NaN"}},
        {"lora_alpha": 4, "alpha_pattern": {"(\\w|\\w|\\w)*!": 1.0}},
        {"lora_alpha": 4, "alpha_pattern": {"transformer_blocks.0.(\\w|\\w|\\w)*!": 1.0}},
        {"lora_alpha": 4, "use_rslora": "yes"},
        {"lora_alpha": float("inf")},
        {"lora_alpha": True},
    ],
    ids=[
        "pattern-a-list",
        "pattern-not-a-number",
        "pattern-a-regex-of-exponential-time",
        "pattern-a-layer-name-then-a-regex",
        "rslora-not-a-bool",
        "alpha-infinite",
        "alpha-a-bool",
    ],
)
def test_lora_metadata_of_the_wrong_shape_is_refused(generator, loras, tmp_path, config):
    tensors = load_file(generator.lora_cache.get(_url(loras, "a")))
    path = tmp_path / LORA
    save_file(tensors, path, metadata={METADATA_KEY: json.dumps(config)})
    with pytest.raises(LoraError, match=r"the LoRA's metadata has "):
        read_lora(path)


def test_a_lora_in_float8_is_refused_naming_the_types_taken(generator, loras, tmp_path):
    tensors = load_file(generator.lora_cache.get(_url(loras, "a")))
    tensors = {key: value.to(torch.float8_e4m3fn) for key, value in tensors.items()}
    save_file(tensors, tmp_path / LORA)
    with pytest.raises(LoraError, match="float8_e4m3fn; store it in float32, bfloat16"):
        read_lora(tmp_path / LORA)


def _pair(layer: str) -> dict[str, torch.Tensor]:
    return {
        f"{layer}.lora_A.weight": torch.ones(RANK, 32),
        f"{layer}.lora_B.weight": torch.ones(32, RANK),
    }


def test_a_lora_file_without_tensors_is_refused_as_empty(tmp_path):
    save_file({}, tmp_path / LORA)
    with pytest.raises(LoraError, match="the LoRA file holds no tensors"):
        read_lora(tmp_path / LORA)


@pytest.mark.parametrize(("text", "problem"), [("{", "not JSON"), ("[1, 2]", "not a JSON object")])
def test_lora_metadata_that_is_not_a_json_object_is_refused(tmp_path, text, problem):
    save_file(_pair("transformer.proj_out"), tmp_path / LORA, metadata={METADATA_KEY: text})
    with pytest.raises(LoraError, match=f"the LoRA's {METADATA_KEY} metadata is {problem}"):
        read_lora(tmp_path / LORA)


def test_lora_metadata_with_a_null_lora_alpha_is_refused_as_not_a_number(tmp_path):
    metadata = {METADATA_KEY: json.dumps({"transformer.lora_alpha": None})}
    save_file(_pair("transformer.proj_out"), tmp_path / LORA, metadata=metadata)
    with pytest.raises(LoraError, match="the LoRA's metadata has lora_alpha=None, not a number"):
        read_lora(tmp_path / LORA)


@pytest.mark.parametrize(
    "config",
    [{"lora_alpha": 10**400}, {"lora_alpha": 4, "alpha_pattern": {"proj_out": 10**400}}],
    ids=["alpha", "pattern"],
)
def test_lora_metadata_with_an_integer_past_the_range_of_floats_is_refused(tmp_path, config):
    save_file(_pair("proj_out"), tmp_path / LORA, metadata={METADATA_KEY: json.dumps(config)})
    with pytest.raises(LoraError, match="the LoRA's metadata has "):
        read_lora(tmp_path / LORA)


def test_a_lora_mixing_keys_with_and_without_the_transformer_prefix_is_refused(tmp_path):
    """Its alpha would follow one layout's convention for layers saved in the other."""
    tensors = {
        **_pair("transformer.transformer_blocks.0.attn1.to_q"),
        **_pair("transformer_blocks.0.attn1.to_k"),
    }
    save_file(tensors, tmp_path / LORA)
    with pytest.raises(LoraError, match=r"mixes keys with and without 'transformer\.'"):
        read_lora(tmp_path / LORA)


def test_a_lora_with_text_encoder_layers_is_refused_naming_one(tmp_path):
    tensors = {
        **_pair("transformer.transformer_blocks.0.attn1.to_q"),
        **_pair("text_encoder.encoder.block.0.layer.0.SelfAttention.q"),
    }
    save_file(tensors, tmp_path / LORA)
    with pytest.raises(LoraError, match=r"text-encoder layers \(text_encoder\.encoder\.block"):
        read_lora(tmp_path / LORA)


def test_a_lora_of_integer_tensors_is_refused_naming_the_dtype(tmp_path):
    tensors = {k: v.to(torch.int8) for k, v in _pair("transformer.proj_out").items()}
    save_file(tensors, tmp_path / LORA)
    with pytest.raises(LoraError, match=r"proj_out\.lora_A is torch\.int8; store it in float32"):
        read_lora(tmp_path / LORA)


def test_a_lora_of_the_models_depth_with_unknown_layers_is_not_told_its_depth_differs(tmp_path):
    save_file(_pair("transformer.transformer_blocks.1.attn1.to_x"), tmp_path / LORA)
    layers = {f"transformer_blocks.{i}.attn1.to_q": (32, 32) for i in range(2)}
    with pytest.raises(LoraError, match=r"1 of its 1 layers are not in the model") as refused:
        check_fits(read_lora(tmp_path / LORA), layers, "cogvideox-5b")
    assert "transformer blocks" not in str(refused.value)


def test_a_lora_key_that_only_begins_as_a_peft_weight_is_refused_as_not_one(tmp_path):
    """A quantizer's `lora_A.weight_scale` beside the weights is not a peft LoRA weight."""
    tensors = {
        **_pair("transformer.proj_out"),
        "transformer.proj_out.lora_A.weight_scale": torch.ones(1),
    }
    save_file(tensors, tmp_path / LORA)
    with pytest.raises(LoraError, match=r"1 keys that are not peft LoRA weights .*weight_scale"):
        read_lora(tmp_path / LORA)


def test_a_lora_layer_without_its_lora_b_is_refused_naming_it(tmp_path):
    tensors = _pair("transformer.proj_out")
    del tensors["transformer.proj_out.lora_B.weight"]
    save_file(tensors, tmp_path / LORA)
    with pytest.raises(LoraError, match=r"the LoRA has no lora_B weight for proj_out\."):
        read_lora(tmp_path / LORA)


def test_lora_metadata_without_lora_alpha_takes_alpha_equal_to_rank(tmp_path):
    metadata = {METADATA_KEY: json.dumps({"transformer.r": RANK, "transformer.use_rslora": False})}
    save_file(_pair("transformer.proj_out"), tmp_path / LORA, metadata=metadata)
    lora = read_lora(tmp_path / LORA)
    assert (lora.alpha, lora.alpha_source) == (RANK, "the diffusers convention, alpha = rank")


def test_the_trained_scale_of_a_lora_of_mixed_ranks_is_alpha_over_its_most_common_rank(tmp_path):
    """What the log gives as the scale applied at lora_scale 1 (docs/lora.md)."""
    tensors = {
        **_pair("transformer.transformer_blocks.0.attn1.to_q"),
        **_pair("transformer.transformer_blocks.0.attn1.to_k"),
        "transformer.proj_out.lora_A.weight": torch.ones(2 * RANK, 32),
        "transformer.proj_out.lora_B.weight": torch.ones(32, 2 * RANK),
    }
    metadata = {METADATA_KEY: json.dumps({"transformer.lora_alpha": 2 * RANK})}
    save_file(tensors, tmp_path / LORA, metadata=metadata)
    lora = read_lora(tmp_path / LORA)
    assert (lora.rank, lora.trained_scale) == (RANK, 2.0)


def test_a_lora_whose_layers_fit_under_a_prefix_only_in_part_is_not_told_to_drop_it(tmp_path):
    tensors = {
        **_pair("base_model.model.transformer_blocks.0.attn1.to_q"),
        **_pair("base_model.model.transformer_blocks.0.attn1.to_x"),
    }
    save_file(tensors, tmp_path / LORA)
    layers = {"transformer_blocks.0.attn1.to_q": (32, 32)}
    with pytest.raises(LoraError, match=r"2 of its 2 layers are not in the model"):
        check_fits(read_lora(tmp_path / LORA), layers, "cogvideox-5b")


@pytest.mark.parametrize(("use_rslora", "trained_scale"), [(False, 2.0), (True, 4.0)])
def test_the_trained_scale_is_alpha_over_rank_or_its_root_for_rank_stabilised(
    tmp_path, use_rslora, trained_scale
):
    """The log gives it as the scale applied at lora_scale 1 (here alpha 8, rank 4)."""
    config = {"lora_alpha": 8, "use_rslora": use_rslora}
    path = tmp_path / LORA
    save_file(_pair("transformer.proj_out"), path, metadata={METADATA_KEY: json.dumps(config)})
    assert read_lora(path).trained_scale == trained_scale


def test_each_layer_of_a_diffusers_lora_of_mixed_ranks_keeps_its_trained_scale_of_1(tmp_path):
    """Without metadata diffusers takes alpha = rank, layer by layer."""
    tensors = {
        **_pair("transformer.transformer_blocks.0.attn1.to_q"),
        **_pair("transformer.transformer_blocks.0.attn1.to_k"),
    }
    tensors["transformer.proj_out.lora_A.weight"] = torch.ones(2 * RANK, 32)
    tensors["transformer.proj_out.lora_B.weight"] = torch.ones(32, 2 * RANK)
    save_file(tensors, tmp_path / LORA)
    config = {
        k.removeprefix("transformer."): v
        for k, v in read_lora(tmp_path / LORA).lora_config().items()
    }
    for layer in config["target_modules"]:
        rank = config["rank_pattern"].get(f"^{layer}", config["r"])
        alpha = config["alpha_pattern"].get(f"^{layer}", config["lora_alpha"])
        assert alpha / rank == 1.0, layer


def test_read_lora_reports_layout_rank_and_alpha(generator, loras):
    for folder, layout in [("a", "pipeline"), ("a-sat", "pipeline"), ("a-bare", "transformer")]:
        lora = read_lora(generator.lora_cache.get(_url(loras, folder)))
        assert (lora.layout, lora.rank, lora.alpha) == (layout, RANK, RANK)
        assert lora.alpha_source == "the diffusers convention, alpha = rank"
    with_alpha = read_lora(generator.lora_cache.get(_url(loras, "a-alpha8")))
    assert (with_alpha.alpha, with_alpha.alpha_source) == (8.0, "the file's metadata")


def test_the_layers_a_lora_adapts_are_read_from_its_header_with_or_without_its_prefix(
    tiny_weights, tmp_path
):
    transformer = tiny_weights["1.0-t2v"] / "transformer"
    tensors = lora_tensors(transformer, RANK, seed=3, targets=["to_q", "proj_out"])
    layers = {key.split(".lora_")[0] for key in tensors}
    assert "proj_out" in layers
    assert adapted_layers(save_diffusers_lora(tensors, tmp_path / "diffusers")) == layers
    assert adapted_layers(save_renamed(tensors, tmp_path / "bare" / LORA, lambda k: k)) == layers


def _compiled_generator(tiny_weights, tmp_path) -> VideoGenerator:
    """The tiny model with its blocks compiled (aot_eager: dynamo's guards, as inductor's)."""
    variant = VARIANTS["cogvideox-5b"]
    pipe = build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none")
    compile_transformer(pipe.transformer, GUARDS_BACKEND)
    generator = VideoGenerator(variant, pipe, CPU)
    generator.lora_cache = LoraCache(tmp_path / "cache", 1 << 30, 1 << 30, 60)
    return generator


def test_a_lora_loaded_on_a_compiled_transformer_warns_that_it_compiles_again(
    tiny_weights, loras, tmp_path, caplog
):
    """The first prediction after it takes minutes on the real model: the log says why."""
    generator = _compiled_generator(tiny_weights, tmp_path)
    with caplog.at_level(logging.WARNING, logger="cogvideox_cog.lora.slot"):
        generator.lora.use(generator.lora_cache.get(_url(loras, "a")), 1.0)
    assert "lora: the compiled transformer compiles again" in caplog.text


def test_compiled_transformer_switches_between_loras_of_one_shape_without_compiling(
    tiny_weights, loras, tmp_path
):
    """COGVIDEOX_COMPILE with LoRAs: the first one compiles, A -> B -> A does not (aot_eager
    on a CPU here; configure_pipeline compiles on CUDA only, the guards are the same)."""
    from torch._dynamo.utils import counters

    generator = _compiled_generator(tiny_weights, tmp_path)
    try:
        first = _frames(generator, _url(loras, "a"))
        graphs = counters["stats"]["unique_graphs"]
        _frames(generator, _url(loras, "b"))
        again = _frames(generator, _url(loras, "a"))
        assert counters["stats"]["unique_graphs"] == graphs
        np.testing.assert_array_equal(again, first)
    finally:
        torch._dynamo.reset()


def test_compiled_transformer_takes_any_lora_scale_after_its_second_without_compiling(
    tiny_weights, loras, tmp_path
):
    """The first prediction at a second lora_scale compiles again (dynamo specialises on the
    first scale, then makes it an input); after that no scale compiles anything."""
    from torch._dynamo.utils import counters

    generator = _compiled_generator(tiny_weights, tmp_path)
    try:
        _frames(generator, _url(loras, "a"), 1.0)
        _frames(generator, _url(loras, "a"), 0.5)
        graphs = counters["stats"]["unique_graphs"]
        for scale in (0.7, -1.0, 2.5):
            _frames(generator, _url(loras, "a"), scale)
        _frames(generator, _url(loras, "b"), 0.3)
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_switching_loras_does_not_accumulate_tensors(generator, loras):
    """A, B, none, A, B, none...: the same tensors are alive at the same point of each cycle."""
    urls = [_url(loras, "a"), _url(loras, "b"), None]

    def cycle() -> list[int]:
        counts = []
        for url in urls:
            generator.lora.use(generator.lora_cache.get(url) if url else None, 1.0)
            counts.append(_live_tensors())
        return counts

    first = cycle()
    for _ in range(3):  # a leak of one tensor a cycle already shows in the second
        assert cycle() == first
