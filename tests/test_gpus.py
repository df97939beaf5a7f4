"""COGVIDEOX_GPUS: how many rank processes a predictor starts, and what they need agreed."""

from __future__ import annotations

from datetime import timedelta

import pytest

from cogvideox_cog.attention import ATTENTION_BACKEND_ENV
from cogvideox_cog.errors import ConfigError
from cogvideox_cog.lora.store import TIMEOUT_ENV as LORA_TIMEOUT_ENV
from cogvideox_cog.parallel.gpus import GPUS_ENV, gpus_from_env, start_generator
from cogvideox_cog.parallel.group import RankGroup
from cogvideox_cog.parallel.ranks import collective_timeout
from cogvideox_cog.prompts.enhance import ENHANCE_ENV
from cogvideox_cog.prompts.enhance import TIMEOUT_ENV as ENHANCE_TIMEOUT_ENV


def test_unset_means_every_visible_cuda_gpu(monkeypatch):
    monkeypatch.delenv(GPUS_ENV, raising=False)
    assert gpus_from_env(visible_cuda=4) == 4


def test_unset_without_cuda_means_one_process(monkeypatch):
    monkeypatch.delenv(GPUS_ENV, raising=False)
    assert gpus_from_env(visible_cuda=0) == 1


def test_a_count_without_cuda_runs_that_many_cpu_processes(monkeypatch):
    monkeypatch.setenv(GPUS_ENV, "2")
    assert gpus_from_env(visible_cuda=0) == 2


def test_a_count_up_to_the_visible_gpus_is_used_as_given(monkeypatch):
    monkeypatch.setenv(GPUS_ENV, " 2 ")
    assert gpus_from_env(visible_cuda=8) == 2


def test_a_count_of_every_visible_gpu_is_used_as_given(monkeypatch):
    monkeypatch.setenv(GPUS_ENV, "4")
    assert gpus_from_env(visible_cuda=4) == 4


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_anything_but_a_positive_whole_number_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(GPUS_ENV, value)
    with pytest.raises(ConfigError, match=f"{GPUS_ENV}='{value}'"):
        gpus_from_env(visible_cuda=2)


def test_more_gpus_than_visible_is_refused_with_what_to_change(monkeypatch):
    monkeypatch.setenv(GPUS_ENV, "8")
    with pytest.raises(ConfigError, match=r"8, but 4 CUDA GPU.* visible.*--gpus all"):
        gpus_from_env(visible_cuda=4)


def test_several_gpus_refuse_an_attention_backend_that_cannot_split_before_any_rank_starts(
    monkeypatch,
):
    def start(*args):
        raise AssertionError("a rank group was started")

    monkeypatch.setattr(RankGroup, "start", start)
    monkeypatch.setenv(GPUS_ENV, "2")
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "_native_math")
    with pytest.raises(ConfigError, match=r"'_native_math' cannot split attention"):
        start_generator("t2v")


def test_several_gpus_start_a_rank_group_of_that_many_ranks(monkeypatch):
    started = []
    monkeypatch.setattr(RankGroup, "start", lambda mode, count: started.append((mode, count)))
    monkeypatch.setenv(GPUS_ENV, "3")
    monkeypatch.delenv(ATTENTION_BACKEND_ENV, raising=False)
    start_generator("i2v")
    assert started == [("i2v", 3)]


def test_the_collective_timeout_outlasts_rank_0s_lora_download_and_prompt_rewrite(monkeypatch):
    monkeypatch.setenv(LORA_TIMEOUT_ENV, "3000")
    monkeypatch.setenv(ENHANCE_ENV, "openai")
    monkeypatch.setenv(ENHANCE_TIMEOUT_ENV, "600")
    assert collective_timeout() > timedelta(seconds=3000 + 2 * 600)


def test_the_collective_timeout_is_never_below_gloos_default(monkeypatch):
    for name in (LORA_TIMEOUT_ENV, ENHANCE_ENV, ENHANCE_TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)
    assert collective_timeout() >= timedelta(minutes=30)  # NCCL's own default is 10
