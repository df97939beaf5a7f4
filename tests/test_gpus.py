"""COGVIDEOX_GPUS: how many rank processes a predictor starts."""

from __future__ import annotations

import pytest

from cogvideox_cog.errors import ConfigError
from cogvideox_cog.parallel.gpus import GPUS_ENV, gpus_from_env


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


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_anything_but_a_positive_whole_number_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(GPUS_ENV, value)
    with pytest.raises(ConfigError, match=f"{GPUS_ENV}='{value}'"):
        gpus_from_env(visible_cuda=2)


def test_more_gpus_than_visible_is_refused_with_what_to_change(monkeypatch):
    monkeypatch.setenv(GPUS_ENV, "8")
    with pytest.raises(ConfigError, match=r"8, but 4 CUDA GPU.* visible.*--gpus all"):
        gpus_from_env(visible_cuda=4)
