"""The variant registry: what each release accepts and how a predictor picks one."""

import pytest

from cogvideox_cog.errors import VariantError
from cogvideox_cog.variants import PREDICTOR_FILES, VARIANTS, get_variant, variant_from_env
from cogvideox_cog.weights.manifest import load_manifest

_REPLICATE_TARS = "https://weights.replicate.delivery/default/THUDM/CogVideo"


def test_registry_covers_all_five_releases():
    assert set(VARIANTS) == {
        "cogvideox-2b",
        "cogvideox-5b",
        "cogvideox-5b-i2v",
        "cogvideox1.5-5b",
        "cogvideox1.5-5b-i2v",
    }


@pytest.mark.parametrize(
    ("variant_id", "allowed"),
    [
        ("cogvideox-2b", [9, 17, 25, 33, 41, 49]),
        ("cogvideox-5b", [9, 17, 25, 33, 41, 49]),
        ("cogvideox-5b-i2v", [9, 17, 25, 33, 41, 49]),
        ("cogvideox1.5-5b", [17, 33, 49, 65, 81, 97, 113, 129, 145, 161]),
        ("cogvideox1.5-5b-i2v", [17, 33, 49, 65, 81, 97, 113, 129, 145, 161]),
    ],
)
def test_frame_rule_lists_exactly_the_counts_upstream_allows(variant_id, allowed):
    assert list(VARIANTS[variant_id].allowed_frames) == allowed


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=list(VARIANTS))
def test_every_allowed_frame_count_fits_the_causal_vae(variant):
    assert variant.default_frames in variant.allowed_frames
    assert all((n - 1) % 4 == 0 for n in variant.allowed_frames)


def test_5b_and_15_models_never_run_in_fp16():
    assert {v.id for v in VARIANTS.values() if v.dtype == "float16"} == {"cogvideox-2b"}


def test_2b_uses_ddim_without_dynamic_cfg_and_5b_uses_dpm_with_it():
    assert (VARIANTS["cogvideox-2b"].scheduler, VARIANTS["cogvideox-2b"].dynamic_cfg) == (
        "ddim",
        False,
    )
    assert (VARIANTS["cogvideox-5b"].scheduler, VARIANTS["cogvideox-5b"].dynamic_cfg) == (
        "dpm",
        True,
    )


def test_5b_variants_default_to_the_public_tars_of_the_original_predictors():
    sources = {variant: load_manifest(variant).sources for variant in VARIANTS}
    assert sources == {
        "cogvideox-2b": (),
        "cogvideox-5b": (f"{_REPLICATE_TARS}/model_cache.tar",),
        "cogvideox-5b-i2v": (f"{_REPLICATE_TARS}/model_cache_i2v.tar",),
        "cogvideox1.5-5b": (),
        "cogvideox1.5-5b-i2v": (),
    }


def test_an_i2v_variant_is_refused_by_the_t2v_predictor_with_the_alternatives():
    with pytest.raises(
        VariantError, match=r"for image-to-video.*cogvideox-2b, cogvideox-5b, cogvideox1.5-5b"
    ):
        get_variant("cogvideox-5b-i2v", "t2v")


def test_a_t2v_variant_is_refused_by_the_i2v_predictor():
    with pytest.raises(VariantError, match=r"'cogvideox-5b' is for text-to-video.*cog-i2v.yaml"):
        get_variant("cogvideox-5b", "i2v")


def test_an_unknown_variant_names_the_known_ones():
    with pytest.raises(VariantError, match=r"'cogvideox-9b' is not a known.*cogvideox1.5-5b-i2v"):
        get_variant("cogvideox-9b", "t2v")


def test_env_default_is_5b_for_each_task(monkeypatch):
    monkeypatch.delenv("COGVIDEOX_MODEL", raising=False)
    assert variant_from_env("t2v").id == "cogvideox-5b"
    assert variant_from_env("i2v").id == "cogvideox-5b-i2v"


def test_env_selects_the_variant_case_insensitively(monkeypatch):
    monkeypatch.setenv("COGVIDEOX_MODEL", "CogVideoX1.5-5B")
    assert variant_from_env("t2v").id == "cogvideox1.5-5b"


def test_the_v2v_predictor_names_itself_when_refusing_an_i2v_variant():
    expected = r"predict_v2v.py \(cog-v2v.yaml\) runs the text-to-video variants"
    with pytest.raises(VariantError, match=expected):
        get_variant("cogvideox-5b-i2v", "t2v", PREDICTOR_FILES["v2v"])
