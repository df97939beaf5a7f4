"""Dynamic CFG follows the intended schedule over the step index (diffusers uses the timestep)."""

import itertools
import math

import pytest

from cogvideox_cog.pipeline import dynamic_guidance_scale


def test_schedule_starts_without_guidance():
    assert dynamic_guidance_scale(6.0, 0, 50) == 1.0


def test_schedule_ends_at_one_plus_the_guidance_scale():
    assert dynamic_guidance_scale(6.0, 50, 50) == pytest.approx(7.0)


def test_schedule_rises_monotonically_over_the_steps():
    scales = [dynamic_guidance_scale(6.0, i, 50) for i in range(50)]
    assert all(a <= b for a, b in itertools.pairwise(scales))


def test_schedule_matches_the_upstream_formula_at_every_step():
    for i in range(50):
        expected = 1 + 6.0 * (1 - math.cos(math.pi * (i / 50) ** 5)) / 2
        assert dynamic_guidance_scale(6.0, i, 50) == pytest.approx(expected, abs=1e-12)
