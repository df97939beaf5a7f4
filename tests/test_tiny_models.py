"""The tiny random models every other test runs on: each must have its release's structure,
or the tests of that release's code path pass without running it, and the same seed must give
the same weights, or a saved tiny model is not reproducible."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from cogvideox_cog.devtools.tiny import build_tiny_pipeline, save_tiny_weights
from cogvideox_cog.devtools.tiny_llm import build_tiny_causal_lm, save_tiny_causal_lm
from cogvideox_cog.devtools.tiny_postprocess import (
    save_tiny_realesrgan,
    save_tiny_rife,
    tiny_ifnet,
    tiny_rrdbnet,
)
from cogvideox_cog.variants import VARIANTS

# What each release's published configs hold, as diffusers reads them. Transformer: time
# patches and patch bias (1.5), rotary positions (all but 2B), learned positions (1.0 I2V),
# an ofs embedding (1.5 I2V), frames trained; VAE: scale, inverted (1.5); scheduler: 2B's SNR
# shift, v-prediction everywhere.
TRANSFORMER_FLAGS = (
    "patch_size_t",
    "patch_bias",
    "use_rotary_positional_embeddings",
    "use_learned_positional_embeddings",
    "sample_frames",
)
RELEASES = {
    # variant: (transformer flags, has an ofs embedding, (VAE scale, inverted), SNR shift)
    "cogvideox-2b": ((None, True, False, False, 49), False, (1.15258426, False), 3.0),
    "cogvideox-5b": ((None, True, True, False, 49), False, (0.7, False), 1.0),
    "cogvideox-5b-i2v": ((None, True, True, True, 49), False, (0.7, False), 1.0),
    "cogvideox1.5-5b": ((2, False, True, False, 81), False, (0.7, True), 1.0),
    "cogvideox1.5-5b-i2v": ((2, False, True, False, 81), True, (0.7, True), 1.0),
}


def _weight_bytes(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*.safetensors")}


def test_the_same_seed_saves_the_same_weights_byte_for_byte(tmp_path):
    first = save_tiny_weights(tmp_path / "first", "1.5", "i2v", seed=3)
    again = save_tiny_weights(tmp_path / "again", "1.5", "i2v", seed=3)
    assert _weight_bytes(first) == _weight_bytes(again)


def test_another_seed_saves_other_weights_in_every_model(tmp_path):
    one = _weight_bytes(save_tiny_weights(tmp_path / "one", "1.0", "t2v", seed=0))
    two = _weight_bytes(save_tiny_weights(tmp_path / "two", "1.0", "t2v", seed=1))
    assert sorted(one) == sorted(two)
    assert [name for name in one if one[name] == two[name]] == []


def test_building_a_tiny_pipeline_leaves_the_global_random_state_as_it_was():
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    build_tiny_pipeline("1.0", "t2v")
    assert torch.equal(torch.rand(4), expected)


def test_every_served_variant_has_its_release_in_the_table():
    assert sorted(RELEASES) == sorted(VARIANTS)


@pytest.mark.parametrize("variant_id", sorted(RELEASES))
def test_the_tiny_model_of_a_variant_has_its_releases_config_flags(variant_id):
    """A flag the tiny model lacked would leave its release's code path untested: diffusers
    reads ofs_embed_dim (1.5 I2V) and invert_scale_latents (1.5 I2V) in the pipeline."""
    variant = VARIANTS[variant_id]
    pipe = build_tiny_pipeline(variant.family, variant.task, size=variant.size)
    transformer, vae = pipe.transformer.config, pipe.vae.config
    flags, ofs, (scale, inverted), snr_shift = RELEASES[variant_id]
    assert tuple(transformer[flag] for flag in TRANSFORMER_FLAGS) == flags
    assert (transformer.ofs_embed_dim is not None) == ofs
    assert (vae.scaling_factor, vae.invert_scale_latents) == (scale, inverted)
    scheduler = pipe.scheduler.config
    assert (scheduler.snr_shift_scale, scheduler.prediction_type) == (snr_shift, "v_prediction")
    assert transformer.in_channels == vae.latent_channels * (2 if variant.task == "i2v" else 1)
    assert transformer.temporal_compression_ratio == vae.temporal_compression_ratio == 4


@pytest.mark.parametrize("variant_id", sorted(RELEASES))
def test_the_tiny_model_of_a_variant_has_upstreams_timestep_schedule(variant_id):
    """Zero-SNR betas and trailing spacing, as every release's scheduler config: another
    schedule would give the reference tests other timesteps than the real models run."""
    variant = VARIANTS[variant_id]
    scheduler = build_tiny_pipeline(variant.family, variant.task, size=variant.size).scheduler
    config = scheduler.config
    assert (config.rescale_betas_zero_snr, config.timestep_spacing) == (True, "trailing")


@pytest.mark.parametrize(("family", "task"), [("1.0", "t2v"), ("1.5", "i2v")])
def test_the_tiny_model_reads_226_prompt_tokens_as_every_release(family, task):
    """The generator cuts prompts at the transformer's max_text_seq_length; the tokenizer's
    own limit is the same, as in the released tokenizer folders."""
    pipe = build_tiny_pipeline(family, task)
    assert pipe.transformer.config.max_text_seq_length == 226
    assert pipe.tokenizer.model_max_length == 226


def test_the_tiny_tokenizer_has_t5s_special_token_ids():
    """<pad>=0, </s>=1, <unk>=2 in the tokenizer and the encoder's config, as T5's: the
    pipeline pads prompts with id 0 and every prompt ends with </s>."""
    pipe = build_tiny_pipeline("1.0", "t2v")
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder.config
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert (encoder.pad_token_id, encoder.eos_token_id) == (0, 1)
    assert tokenizer("a panda").input_ids[-1] == 1


@pytest.mark.parametrize(("family", "task"), [("1.0", "i2v"), ("1.5", "t2v"), ("1.5", "i2v")])
def test_a_2b_tiny_model_is_refused_outside_1_0_text_to_video(family, task):
    with pytest.raises(ValueError, match=r"CogVideoX-2b is a 1\.0 text-to-video model only"):
        build_tiny_pipeline(family, task, size="2b")


def test_the_tiny_weights_are_saved_as_safetensors_not_pickles(tmp_path):
    """As the hub repositories hold them: weights checks and mmap loading read safetensors."""
    saved = save_tiny_weights(tmp_path / "tiny", "1.0", "t2v")
    for model in ("transformer", "vae", "text_encoder"):
        assert list((saved / model).glob("*.safetensors")), model
    assert [p.name for p in saved.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")] == []


def test_the_same_seed_builds_the_same_tiny_llm_and_another_seed_another():
    weights = [build_tiny_causal_lm(300, seed).state_dict() for seed in (5, 5, 6)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["lm_head.weight"], weights[2]["lm_head.weight"])


def test_the_saved_tiny_llm_samples_unless_told_not_to_as_qwens_checkpoint_does(tmp_path):
    """So the tests that the rewriter is greedy whatever the random state can fail."""
    saved = GenerationConfig.from_pretrained(save_tiny_causal_lm(tmp_path / "qwen"))
    assert saved.do_sample
    assert (saved.temperature, saved.top_p) == (0.7, 0.8)


@pytest.mark.parametrize("build", [tiny_ifnet, tiny_rrdbnet], ids=["rife", "realesrgan"])
def test_the_same_seed_builds_the_same_tiny_postprocessing_model(build):
    first, again, other = build(7).state_dict(), build(7).state_dict(), build(8).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_building_the_tiny_llm_leaves_the_global_random_state_as_it_was():
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    build_tiny_causal_lm(300)
    assert torch.equal(torch.rand(4), expected)


def test_the_tiny_postprocessing_files_are_laid_out_as_the_released_ones(tmp_path):
    """So the tests that read them go through the loader's unwrapping of both layouts."""
    rife = torch.load(save_tiny_rife(tmp_path / "flownet.pkl"), weights_only=True)
    assert rife and all(key.startswith("module.") for key in rife)
    realesrgan = torch.load(save_tiny_realesrgan(tmp_path / "x4plus.pth"), weights_only=True)
    assert list(realesrgan) == ["params_ema"]


def test_the_tiny_tokenizer_reads_a_typical_prompts_words_as_one_token_each():
    """As T5's does, so prompts hit the 226-token limit at about a real prompt's length."""
    tokenizer = build_tiny_pipeline("1.0", "t2v").tokenizer
    ids = tokenizer("a panda plays guitar in a bamboo forest").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        *("▁a", "▁panda", "▁plays", "▁guitar", "▁in", "▁a", "▁bamboo", "▁forest"),
        "</s>",
    ]
