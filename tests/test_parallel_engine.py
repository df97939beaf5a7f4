"""Several processes render the frames of one: the context-parallel engine on gloo.

One spawn of rank processes per rank count renders several cases (tests/parallel_ranks.py);
each test compares one case's rank-0 frames with the same case rendered here on one process
without the engine, and checks from the shapes the first attention layer was given that the
work was really split (a layout that computed everything everywhere would pass the first
check alone). The tiny models have 2 attention heads, so Ulysses goes up to 2 ranks on them;
a 4-head copy of the 5B-shaped model covers Ulysses-4.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from cogvideox_cog.devtools.tiny import save_tiny_weights
from cogvideox_cog.parallel.engine import PROJ_OUT_REFUSAL, SequenceShards
from cogvideox_cog.parallel.layout import Layout, choose_layout, replica_warnings
from tests.lora_files import lora_tensors, save_diffusers_lora
from tests.parallel_ranks import Case, Rendered, lora_requests, render, run_ranks

TOLERANCE = 1e-5  # float32 sums in another order
_FLOAT = torch.zeros(1)
GUIDED, UNGUIDED = 6.0, 1.0


# ---- choose_layout ---------------------------------------------------------------------


def test_one_rank_runs_alone():
    assert choose_layout(1, classifier_free_guidance=True) == Layout(cfg=1, ulysses=1)


def test_no_ranks_is_refused_naming_the_count():
    with pytest.raises(ValueError, match="world_size must be at least 1, not 0"):
        choose_layout(0, classifier_free_guidance=True)


def test_two_ranks_split_the_guidance_batch():
    assert choose_layout(2, classifier_free_guidance=True) == Layout(cfg=2, ulysses=1)


def test_two_ranks_split_the_sequence_without_guidance():
    assert choose_layout(2, classifier_free_guidance=False) == Layout(cfg=1, ulysses=2)


def test_four_ranks_split_the_batch_then_the_sequence():
    assert choose_layout(4, classifier_free_guidance=True) == Layout(cfg=2, ulysses=2)


def test_eight_ranks_are_cfg_2_by_ulysses_4():
    layout = choose_layout(8, classifier_free_guidance=True, heads=48)
    assert (layout, str(layout)) == (Layout(cfg=2, ulysses=4), "CFG-2 x Ulysses-4")


def test_without_guidance_every_rank_splits_the_sequence():
    assert choose_layout(8, classifier_free_guidance=False, heads=48) == Layout(1, 8)


def test_ulysses_never_splits_heads_unevenly():
    # CogVideoX-2B has 30 heads: 4 ranks without guidance cannot each take a quarter.
    assert choose_layout(4, classifier_free_guidance=False, heads=30) == Layout(1, 2)


def test_other_counts_take_the_largest_layout_that_divides_them():
    assert choose_layout(6, classifier_free_guidance=True, heads=48) == Layout(2, 3)
    assert choose_layout(7, classifier_free_guidance=True, heads=48) == Layout(1, 1)


def test_ranks_left_over_by_a_layout_are_reported_as_replicas():
    [warning] = replica_warnings(7, [choose_layout(7, classifier_free_guidance=True, heads=48)])
    assert "the other 6 compute the same video as replicas" in warning


def test_replicas_are_reported_once_when_both_guidance_layouts_are_the_same():
    """3 ranks on a 2-head model run one process's layout with guidance and without: one
    warning, not one per layout (the engine chooses both at setup)."""
    layouts = [choose_layout(3, guidance, heads=2) for guidance in (True, False)]
    assert replica_warnings(3, layouts) == [
        "3 ranks: layout single process uses 1; the other 2 compute the same video as "
        "replicas, no faster"
    ]


def test_layouts_that_use_every_rank_give_no_replica_warning():
    layouts = [choose_layout(4, guidance, heads=48) for guidance in (True, False)]
    assert replica_warnings(4, layouts) == []


def test_a_layout_names_its_splits():
    assert [str(Layout(1, 1)), str(Layout(2, 1)), str(Layout(1, 2))] == [
        "single process",
        "CFG-2",
        "Ulysses-2",
    ]


# ---- sequence shards -------------------------------------------------------------------


def test_shards_of_the_5b_sequence_are_equal_without_padding_on_four_ranks():
    shards = SequenceShards.plan(text_tokens=226, video_tokens=17_550, ranks=4)
    assert shards.text == [57, 57, 56, 56] and shards.padding == 0
    assert {t + v for t, v in zip(shards.text, shards.video, strict=True)} == {4444}


def test_an_odd_total_pads_the_video_and_masks_only_the_padding():
    shards = SequenceShards.plan(text_tokens=226, video_tokens=45, ranks=2)
    assert (shards.text, shards.video, shards.padding) == ([113, 113], [23, 23], 1)
    assert shards.key_mask(0, _FLOAT) is None or not shards.key_mask(0, _FLOAT).isinf().any()
    last = shards.key_mask(1, _FLOAT).flatten()
    assert last.isinf().nonzero().flatten().tolist() == [135]


def test_a_rank_given_only_padding_masks_every_key_it_holds():
    """Few video tokens over many ranks: the last rank's share is all padding, none of it
    a key, not just its last token."""
    plan = SequenceShards.plan(text_tokens=3, video_tokens=2, ranks=4)
    assert (plan.text[3], plan.video[3], plan.padding) == (0, 2, 3)
    assert plan.key_mask(3, _FLOAT).flatten().isinf().all()


# ---- frames on several processes ---------------------------------------------------------


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def clip():
    rng = np.random.default_rng(4)
    return [Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)) for _ in range(9)]


@pytest.fixture(scope="module")
def lora(tiny_weights, tmp_path_factory):
    tensors = lora_tensors(tiny_weights["1.0-t2v"] / "transformer", rank=4, seed=1)
    return save_diffusers_lora(tensors, tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def lora_on_proj_out(tiny_weights, tmp_path_factory):
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]
    tensors = lora_tensors(tiny_weights["1.0-t2v"] / "transformer", 4, 2, targets=targets)
    return save_diffusers_lora(tensors, tmp_path_factory.mktemp("lora-proj-out"))


@pytest.fixture(scope="module")
def four_heads(tmp_path_factory):
    return save_tiny_weights(tmp_path_factory.mktemp("heads") / "1.0-t2v", "1.0", "t2v", heads=4)


@pytest.fixture(scope="module")
def cases(tiny_weights, picture, clip, lora, lora_on_proj_out, four_heads) -> dict[str, Case]:
    w = tiny_weights
    size_15 = {"height": 48, "width": 80}
    unguided = Case("cogvideox-5b", w["1.0-t2v"], call={"num_frames": 9}, guidance_scale=UNGUIDED)
    return {
        "5b": Case("cogvideox-5b", w["1.0-t2v"], call={"num_frames": 9}),
        "5b-unguided": unguided,
        "5b-unguided-compiled": replace(unguided, compiled=True),
        "2b": Case("cogvideox-2b", w["1.0-t2v-2b"], call={"num_frames": 9}),
        "2b-unguided": Case(
            "cogvideox-2b", w["1.0-t2v-2b"], call={"num_frames": 9}, guidance_scale=UNGUIDED
        ),
        "5b-i2v": Case(
            "cogvideox-5b-i2v", w["1.0-i2v"], "i2v", {"num_frames": 9, "image": picture}
        ),
        "1.5-unguided-even": Case(
            "cogvideox1.5-5b",
            w["1.5-t2v"],
            call={"num_frames": 9, **size_15},
            guidance_scale=UNGUIDED,
        ),
        "1.5-i2v": Case(
            "cogvideox1.5-5b-i2v",
            w["1.5-i2v"],
            "i2v",
            {"num_frames": 9, "image": picture, **size_15},
        ),
        "v2v": Case("cogvideox-5b", w["1.0-t2v"], "v2v", {"video": clip, "strength": 1.0}),
        "5b-i2v-untiled-rank-1": Case(
            "cogvideox-5b-i2v",
            w["1.0-i2v"],
            "i2v",
            {"num_frames": 9, "image": picture},
            untiled_ranks=(1,),
        ),
        "lora": Case("cogvideox-5b", w["1.0-t2v"], call={"num_frames": 9}, lora=lora),
        "lora-on-proj-out": replace(unguided, lora=lora_on_proj_out),
        "5b-unguided-offloaded": replace(unguided, offload="model", renders=2),
        "5b-after-unguided": Case(
            "cogvideox-5b", w["1.0-t2v"], call={"num_frames": 9}, earlier_guidance_scale=UNGUIDED
        ),
        "fast": Case(
            "cogvideox-5b", w["1.0-t2v"], call={"num_frames": 9}, steps=4, speed_mode="fast"
        ),
        "faster": Case(
            "cogvideox-5b", w["1.0-t2v"], call={"num_frames": 9}, steps=6, speed_mode="faster"
        ),
        "4-heads-unguided": Case(
            "cogvideox-5b", four_heads, call={"num_frames": 9}, guidance_scale=UNGUIDED
        ),
    }


TWO_RANKS = (
    "5b",
    "5b-i2v",
    "5b-i2v-untiled-rank-1",
    "v2v",
    "5b-unguided",
    "5b-unguided-compiled",
    "2b",
    "2b-unguided",
    "1.5-unguided-even",
    "fast",
    "faster",
    "lora-on-proj-out",
    "5b-unguided-offloaded",
    "5b-after-unguided",
)
FOUR_RANKS = ("5b", "1.5-i2v", "lora", "5b-unguided", "4-heads-unguided")


@pytest.fixture(scope="module")
def one_process(cases):
    """Each case rendered here without the engine, once (on one thread, as each rank)."""
    rendered: dict[str, Rendered] = {}
    threads = torch.get_num_threads()

    def get(name: str) -> Rendered:
        if name not in rendered:
            torch.set_num_threads(1)
            try:
                rendered[name] = render(cases[name])
            finally:
                torch.set_num_threads(threads)
        return rendered[name]

    return get


@pytest.fixture(scope="module")
def two_ranks(cases, tmp_path_factory):
    return run_ranks(2, {name: cases[name] for name in TWO_RANKS}, tmp_path_factory.mktemp("2"))


@pytest.fixture(scope="module")
def four_ranks(cases, tmp_path_factory):
    return run_ranks(4, {name: cases[name] for name in FOUR_RANKS}, tmp_path_factory.mktemp("4"))


def _assert_same_frames(ranks: list[Rendered], reference: Rendered) -> None:
    difference = np.abs(ranks[0].frames - reference.frames).max()
    assert difference <= TOLERANCE, f"rank 0's frames differ by up to {difference:.3g}"


def _assert_split(rank: Rendered, reference: Rendered, layout: Layout) -> None:
    """The rank's first attention layer saw its share: a 1/cfg of the batch and a 1/ulysses
    of the tokens (rounded up: padding)."""
    batch, video, text = reference.attention_inputs[0]
    expected = (batch // layout.cfg, math.ceil((video + text) / layout.ulysses))
    got_batch, got_video, got_text = rank.attention_inputs[0]
    assert (got_batch, got_video + got_text) == expected


def _check(ranks: list[Rendered], reference: Rendered, layout: Layout) -> None:
    assert ranks[0].layout == str(layout)
    _assert_same_frames(ranks, reference)
    for rank in ranks[: layout.world_size]:
        _assert_split(rank, reference, layout)


def test_cfg_2_renders_the_5b_frames_of_one_process(two_ranks, one_process):
    _check(two_ranks["5b"], one_process("5b"), Layout(cfg=2, ulysses=1))


def test_cfg_2_renders_the_5b_image_to_video_frames_of_one_process(two_ranks, one_process):
    _check(two_ranks["5b-i2v"], one_process("5b-i2v"), Layout(cfg=2, ulysses=1))


def test_ranks_that_chose_different_vae_tiling_encode_the_image_as_one_process(
    two_ranks, one_process
):
    """Every rank encodes the image with its VAE, and COGVIDEOX_VAE_TILING=auto chooses by each
    GPU's free memory: a rank that would encode whole frames tiles as the others do, so both
    halves of the guidance batch see the latents of one process."""
    _check(two_ranks["5b-i2v-untiled-rank-1"], one_process("5b-i2v"), Layout(cfg=2, ulysses=1))


def test_cfg_2_renders_the_video_to_video_frames_of_one_process(two_ranks, one_process):
    _check(two_ranks["v2v"], one_process("v2v"), Layout(cfg=2, ulysses=1))


def test_ulysses_2_renders_the_frames_of_one_process_from_an_odd_token_count(
    two_ranks, one_process
):
    # 226 text + 45 video tokens: one token of padding, masked.
    _check(two_ranks["5b-unguided"], one_process("5b-unguided"), Layout(cfg=1, ulysses=2))


def test_cfg_2_renders_the_2b_frames_of_one_process(two_ranks, one_process):
    """2B's constant guidance on DDIM: each rank computes one half of the guidance batch, its
    sine-cosine positions added to both halves alike."""
    _check(two_ranks["2b"], one_process("2b"), Layout(cfg=2, ulysses=1))


def test_ulysses_2_renders_the_2b_frames_of_one_process(two_ranks, one_process):
    """2B adds sine-cosine positions to the patches instead of rotary tables to attention:
    the split comes after them, so each rank's tokens keep their own positions."""
    _check(two_ranks["2b-unguided"], one_process("2b-unguided"), Layout(cfg=1, ulysses=2))


def test_compiled_blocks_split_the_sequence_and_render_the_frames_of_one_process(
    two_ranks, one_process
):
    """COGVIDEOX_COMPILE=1 with ranks: setup compiles the blocks, then the engine's hooks and
    Ulysses' all-to-all run inside the compiled blocks. The reference is uncompiled."""
    _check(two_ranks["5b-unguided-compiled"], one_process("5b-unguided"), Layout(cfg=1, ulysses=2))


def test_compiled_blocks_take_the_engine_hooks_without_a_graph_break(two_ranks):
    # The first block's split hook runs inside its compiled graph; a break would split that
    # graph and leave the hook's Python between the pieces (it did: inspect.signature).
    assert [rank.graph_breaks for rank in two_ranks["5b-unguided-compiled"]] == [0, 0]


def test_rank_0_reports_progress_from_its_blocks_during_a_render(two_ranks):
    """Its hooks send Progress as the blocks run (the frames are the other tests'); the other
    ranks have none."""
    assert [rank.progress > 0 for rank in two_ranks["5b"]] == [True, False]


def test_compiled_blocks_run_rank_0_progress_hooks_without_a_graph_more(two_ranks):
    """The hooks run before each block's compiled forward, outside its graph: rank 0, with
    them, compiled as many graphs as rank 1, without, and none broke."""
    rank_0, rank_1 = two_ranks["5b-unguided-compiled"]
    assert rank_0.progress > 0 and rank_1.progress == 0
    assert (rank_0.graphs, rank_0.graph_breaks) == (rank_1.graphs, 0)


def test_with_model_offload_the_split_outlasts_the_first_render(two_ranks, one_process):
    """diffusers takes accelerate's offload hooks off and puts them back after every render
    (and around a LoRA load, which on a CPU it cannot: it asks for an accelerator), and
    accelerate drops the hooks registered over its own. The engine's, installed before the
    weights are placed, lie beneath: the second render still splits (when the engine came
    after offload, every rank rendered the whole video from the second render on)."""
    name = "5b-unguided-offloaded"
    _check(two_ranks[name], one_process(name), Layout(cfg=1, ulysses=2))


def test_a_guided_request_after_an_unguided_one_renders_the_frames_of_one_process(
    two_ranks, one_process
):
    """The ranks keep their pipeline between requests: the key mask of the unguided
    request's padded sequence (Ulysses-2) does not reach the next request's attention."""
    _check(two_ranks["5b-after-unguided"], one_process("5b"), Layout(cfg=2, ulysses=1))


def test_ulysses_2_renders_the_1_5_frames_of_one_process(two_ranks, one_process):
    # 226 text + 30 video tokens (3 latent frames padded to 4 by the pipeline): no padding.
    reference = one_process("1.5-unguided-even")
    _check(two_ranks["1.5-unguided-even"], reference, Layout(cfg=1, ulysses=2))


def test_every_rank_ends_with_the_same_latents(two_ranks, four_ranks):
    for ranks in (two_ranks["5b"], two_ranks["5b-unguided"], four_ranks["1.5-i2v"]):
        for rank in ranks[1:]:
            assert np.array_equal(rank.latents, ranks[0].latents)


def test_speed_mode_fast_on_cfg_2_renders_the_frames_of_one_process(two_ranks, one_process):
    _check(two_ranks["fast"], one_process("fast"), Layout(cfg=2, ulysses=1))


def test_speed_mode_faster_splits_the_sequence_instead_of_the_guidance_batch(
    two_ranks, one_process
):
    # FasterCache computes the negative prompt's half only every few steps: a CFG split
    # would leave a rank idle then, so both ranks take the sequence.
    _check(two_ranks["faster"], one_process("faster"), Layout(cfg=1, ulysses=2))


def test_cfg_2_x_ulysses_2_renders_the_5b_frames_of_one_process(four_ranks, one_process):
    _check(four_ranks["5b"], one_process("5b"), Layout(cfg=2, ulysses=2))


def test_cfg_2_x_ulysses_2_renders_the_1_5_image_to_video_frames_of_one_process(
    four_ranks, one_process
):
    _check(four_ranks["1.5-i2v"], one_process("1.5-i2v"), Layout(cfg=2, ulysses=2))


def test_a_lora_renders_the_frames_of_one_process_on_cfg_2_x_ulysses_2(four_ranks, one_process):
    _check(four_ranks["lora"], one_process("lora"), Layout(cfg=2, ulysses=2))
    assert not np.allclose(one_process("lora").frames, one_process("5b").frames)


def test_a_lora_on_proj_out_is_refused_where_the_sequence_is_split(two_ranks):
    # Its LoRA branch would see one rank's tokens after the gather made the output whole.
    for rank in two_ranks["lora-on-proj-out"]:
        assert "this LoRA adapts proj_out" in rank.refusal
        assert "COGVIDEOX_GPUS=1" in rank.refusal


@pytest.fixture(scope="module")
def proj_out_lora_requests(tiny_weights, lora_on_proj_out, tmp_path_factory) -> dict:
    """Two rank processes' VideoGenerators serve a LoRA on proj_out without guidance (the
    sequence split), then with it (the guidance batch split)."""
    out = tmp_path_factory.mktemp("proj-out-requests")
    return lora_requests(tiny_weights["1.0-t2v"], lora_on_proj_out, (UNGUIDED, GUIDED), out)


def test_a_lora_on_proj_out_is_refused_from_its_file_before_any_rank_loads_it(
    proj_out_lora_requests,
):
    for outcomes in proj_out_lora_requests.values():
        assert outcomes[str(UNGUIDED)] == {"refusal": PROJ_OUT_REFUSAL, "peft": False}


def test_a_lora_on_proj_out_runs_where_only_the_guidance_batch_is_split(proj_out_lora_requests):
    for outcomes in proj_out_lora_requests.values():
        assert outcomes[str(GUIDED)] == {"refusal": None, "peft": True}


def test_ulysses_4_renders_the_frames_of_one_process_from_uneven_text_shards(
    four_ranks, one_process
):
    # 226 text tokens over 4 ranks: 57, 57, 56, 56, the video filling each rank up to 68.
    reference = one_process("4-heads-unguided")
    _check(four_ranks["4-heads-unguided"], reference, Layout(cfg=1, ulysses=4))


def test_ranks_beyond_the_layout_render_the_same_video_as_a_replica(four_ranks, one_process):
    # Without guidance, 2 heads allow Ulysses-2 only: ranks 2 and 3 run it a second time.
    ranks, reference = four_ranks["5b-unguided"], one_process("5b-unguided")
    _check(ranks, reference, Layout(cfg=1, ulysses=2))
    for replica in ranks[2:]:
        _assert_split(replica, reference, Layout(cfg=1, ulysses=2))
        assert np.array_equal(replica.latents, ranks[0].latents)
