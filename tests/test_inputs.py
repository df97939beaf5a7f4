"""Input rules checked before any heavy work."""

import pytest

from cogvideox_cog import inputs
from cogvideox_cog.errors import InputError
from cogvideox_cog.variants import VARIANTS

V10 = VARIANTS["cogvideox-5b"]
V15 = VARIANTS["cogvideox1.5-5b"]


def test_empty_num_frames_takes_the_variant_default():
    assert inputs.check_num_frames(V10, None) == 49
    assert inputs.check_num_frames(V15, None) == 81


@pytest.mark.parametrize(("variant", "frames"), [(V10, 25), (V10, 49), (V15, 17), (V15, 161)])
def test_frame_counts_on_the_rule_are_accepted(variant, frames):
    assert inputs.check_num_frames(variant, frames) == frames


@pytest.mark.parametrize(("variant", "frames"), [(V10, 48), (V10, 57), (V10, 81), (V15, 49 + 8)])
def test_frame_counts_off_the_rule_are_refused_listing_allowed_values(variant, frames):
    with pytest.raises(InputError, match=rf"num_frames={frames} .*{variant.id}.*one of"):
        inputs.check_num_frames(variant, frames)


def test_a_fractional_frame_count_is_refused_not_rounded_down():
    with pytest.raises(InputError, match=r"num_frames=49.5 is not supported"):
        inputs.check_num_frames(V10, 49.5)


def test_1_5_frame_error_lists_16n_plus_1_values():
    with pytest.raises(InputError, match=r"16\*N\+1 frames, one of 17, 33, 49, 65, 81,"):
        inputs.check_num_frames(V15, 50)


def test_empty_fps_takes_the_variant_fps():
    assert inputs.check_fps(V10, None) == 8
    assert inputs.check_fps(V15, None) == 16
    assert inputs.check_fps(V15, 24) == 24


@pytest.mark.parametrize("fps", [0, 2.5])
def test_fps_that_is_not_a_whole_number_from_1_is_refused(fps):
    with pytest.raises(InputError, match=rf"fps={fps} must be a whole number from 1"):
        inputs.check_fps(V10, fps)


@pytest.mark.parametrize("strength", [0.0, 1.0001])
def test_strength_outside_above_0_to_1_is_refused(strength):
    with pytest.raises(InputError, match="must be above 0 and at most 1"):
        inputs.check_strength(strength, 0.8, 50)


def test_strength_1_redraws_the_whole_clip_and_is_taken():
    assert inputs.check_strength(1.0, 0.8, 1) == 1.0


def test_a_strength_too_small_for_the_steps_is_refused_with_a_step_count_that_runs_one():
    with pytest.raises(InputError, match=r"leaves no denoising step.*num_inference_steps=4\."):
        inputs.check_strength(0.3, 0.8, 3)
    assert inputs.check_strength(0.3, 0.8, 4) == 0.3


@pytest.mark.parametrize("blank", ["   \n", "\u200b\u200b", "\ufeff \u2060", "\x00\t"])
def test_blank_prompt_is_refused_for_text_to_video(blank):
    with pytest.raises(InputError, match="prompt is empty"):
        inputs.check_prompt(blank, required=True)


@pytest.mark.parametrize("blank", ["\u3164", "\u2800\u2800", "\ufe0f", "\u115f\u1160", "\uffa0"])
def test_a_prompt_of_blank_glyphs_or_lone_marks_is_refused_too(blank):
    """Hangul fillers and the blank Braille pattern are letters and symbols drawn as nothing,
    and a variation selector marks nothing on its own: each rendered a video of no prompt."""
    with pytest.raises(InputError, match="prompt is empty"):
        inputs.check_prompt(blank, required=True)


@pytest.mark.parametrize("prompt", ["\u732b", "e\u0301", "\u2764\ufe0f", "\ud55c\uae00"])
def test_a_prompt_of_any_visible_script_is_not_blank(prompt):
    assert inputs.check_prompt(prompt, required=True) == prompt


def test_blank_prompt_is_allowed_for_image_to_video():
    assert inputs.check_prompt("  ", required=False) == "  "


def test_prompt_goes_to_the_encoder_as_given_like_upstream():
    assert inputs.check_prompt("  a cat \n", required=True) == "  a cat \n"


def test_prompt_over_the_character_cap_is_refused_before_tokenizing():
    with pytest.raises(InputError, match="prompt is 10,001 characters; at most 10,000"):
        inputs.check_prompt("a" * 10_001, required=True)


def test_a_prompt_of_exactly_the_character_cap_is_taken():
    """The predictors declare max_length=10000: what Cog's schema lets through must run."""
    assert len(inputs.check_prompt("a" * 10_000, required=True)) == 10_000


def test_negative_prompt_over_the_character_cap_is_refused():
    with pytest.raises(InputError, match="negative_prompt is 20,000 characters"):
        inputs.check_text_length("negative_prompt", "b" * 20_000)


def test_given_seed_is_used_as_is():
    assert inputs.resolve_seed(1234) == 1234


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_the_first_and_last_32_bit_seeds_are_used_as_is(seed):
    assert inputs.resolve_seed(seed) == seed


def test_empty_seed_draws_a_32_bit_seed_not_a_16_bit_one():
    seeds = {inputs.resolve_seed(None) for _ in range(200)}
    assert all(0 <= s <= inputs.MAX_SEED for s in seeds)
    assert max(seeds) >= 2**31  # 200 draws below 2**31 from 32 bits: chance 2**-200
    assert len(seeds) > 190


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5])
def test_out_of_range_or_fractional_seed_is_refused(seed):
    with pytest.raises(InputError, match="seed"):
        inputs.resolve_seed(seed)


@pytest.mark.parametrize(
    ("image_size", "expected"),
    [
        ((1920, 1080), (768, 1360)),  # 16:9 landscape hits the long-side cap
        ((1080, 1920), (1360, 768)),  # portrait: same rule, turned
        ((1024, 1024), (768, 768)),  # square: short side on both
        ((1200, 1000), (768, 928)),  # 6:5 -> 921.6 rounded to the 16 grid
        ((1000, 1200), (928, 768)),  # 5:6 portrait: the same rounding, turned
        ((8000, 500), (768, 1360)),  # extreme panorama is capped, then cropped
    ],
)
def test_image_aspect_size_follows_the_15_i2v_resolution_rule(image_size, expected):
    height, width = inputs.image_aspect_size(image_size, (768, 1360), 16)
    assert (height, width) == expected
    assert height % 16 == 0 and width % 16 == 0
    assert min(height, width) == 768 and max(height, width) <= 1360


class _WordTokenizer:
    """One token per word plus an end token, the shape of T5's output for this check."""

    def __call__(self, text, **_):
        return type("Encoding", (), {"input_ids": [*range(len(text.split())), -1]})()

    def decode(self, ids, **_):
        return " ".join(f"w{i}" for i in ids)


def test_prompt_within_the_limit_has_no_truncated_tail():
    assert inputs.truncated_prompt_tail(_WordTokenizer(), "a b c", max_tokens=4) is None


def test_prompt_over_the_limit_reports_the_ignored_words():
    tail = inputs.truncated_prompt_tail(_WordTokenizer(), "a b c d e", max_tokens=4)
    assert tail == "w3 w4"


class _Config:
    """The transformer config fields the resolution rules read."""

    def __init__(self, sample=(60, 90), learned=False, patch_size_t=None):
        self.sample_height, self.sample_width = sample
        self.use_learned_positional_embeddings = learned
        self.patch_size_t = patch_size_t
        self.patch_size = 2


def test_1_0_models_generate_at_the_config_resolution():
    assert inputs.choose_render_size(V10, _Config(), 8) == (480, 720)


@pytest.mark.parametrize("variant_id", ["cogvideox1.5-5b", "cogvideox1.5-5b-i2v"])
def test_1_5_models_use_the_training_resolution_not_the_config_rotary_bound(variant_id):
    """The image-to-video model too: its short side at 768 is what each image is fitted to."""
    bound = _Config(sample=(300, 300), patch_size_t=2)
    assert inputs.choose_render_size(VARIANTS[variant_id], bound, 8) == (768, 1360)


def test_resolution_override_is_used_when_the_model_allows_it():
    bound = _Config(sample=(300, 300), patch_size_t=2)
    assert inputs.choose_render_size(V15, bound, 8, "1360x768") == (1360, 768)


def test_resolution_override_must_be_on_the_patch_grid():
    with pytest.raises(ValueError, match="multiples of 16"):
        inputs.choose_render_size(V10, _Config(), 8, "480x700")


@pytest.mark.parametrize("override", ["0x720", "480x0", "-16x720"])
def test_resolution_override_must_have_both_sides_above_0(override):
    with pytest.raises(ValueError, match="both sides must be above 0"):
        inputs.choose_render_size(V10, _Config(), 8, override)


def test_resolution_override_must_be_height_x_width():
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        inputs.choose_render_size(V10, _Config(), 8, "720p")


@pytest.mark.parametrize("override", ["720x480", "480x736"], ids=["turned", "only-the-width"])
def test_learned_position_embeddings_allow_only_the_config_resolution(override):
    i2v = VARIANTS["cogvideox-5b-i2v"]
    with pytest.raises(ValueError, match=r"learned position embeddings.*480x720"):
        inputs.choose_render_size(i2v, _Config(learned=True), 8, override)


def test_1_5_resolution_override_must_fit_the_rotary_bound():
    bound = _Config(sample=(12, 12), patch_size_t=2)
    with pytest.raises(ValueError, match="at most 96x96"):
        inputs.choose_render_size(V15, bound, 8, "48x112")


def test_1_5_resolution_override_of_exactly_the_rotary_bound_is_taken():
    bound = _Config(sample=(12, 12), patch_size_t=2)
    assert inputs.choose_render_size(V15, bound, 8, "96x96") == (96, 96)


def test_1_5_weights_whose_bound_forbids_the_training_size_fail_naming_the_override():
    bound = _Config(sample=(12, 12), patch_size_t=2)
    with pytest.raises(
        ValueError,
        match=r"768x1360: these weights generate at most 96x96.*"
        r"COGVIDEOX_RESOLUTION=HEIGHTxWIDTH",
    ):
        inputs.choose_render_size(V15, bound, 8)


def test_a_choice_outside_the_list_is_refused_naming_the_choices():
    """Cog checks choices against the schema; a caller without one gets the same answer."""
    with pytest.raises(InputError, match=r"speed_mode='turbo' is not one of: default, fast\."):
        inputs.check_choice("speed_mode", "turbo", ("default", "fast"))
    assert inputs.check_choice("speed_mode", "fast", ("default", "fast")) == "fast"


def test_an_empty_strength_takes_the_default_given():
    assert inputs.check_strength(None, 0.6, 50) == 0.6


def test_a_resolution_setting_of_the_wrong_form_is_refused_before_the_weights(monkeypatch):
    """Read in setup before the download: a typo must not cost 20 GB first."""
    monkeypatch.setenv(inputs.RESOLUTION_ENV, "720p")
    with pytest.raises(ValueError, match=r"COGVIDEOX_RESOLUTION='720p' is not HEIGHTxWIDTH"):
        inputs.resolution_setting()
    monkeypatch.setenv(inputs.RESOLUTION_ENV, "480x720")
    assert inputs.resolution_setting() == "480x720"


def test_a_whole_float_frame_count_is_taken_as_an_int():
    """A caller without Cog's schema may send 49.0; the pipeline slices and counts with it."""
    frames = inputs.check_num_frames(V10, 49.0)
    assert frames == 49 and type(frames) is int


def test_a_resolution_override_may_write_its_x_in_upper_case():
    bound = _Config(sample=(300, 300), patch_size_t=2)
    assert inputs.choose_render_size(V15, bound, 8, "768X1360") == (768, 1360)


def test_an_extreme_portrait_image_is_capped_at_the_long_side():
    assert inputs.image_aspect_size((500, 8000), (768, 1360), 16) == (1360, 768)
