"""Pareto filter, hypervolume and map derivation on hand-made points with known results."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from peo_merge.pareto import (
    ScoredPoint,
    dominates,
    hypervolume,
    pareto_front,
    preference_map_from_front,
)


def point(help_score, harm_score, alpha=0.0, beta=0.0):
    return ScoredPoint(alpha, beta, help_score, harm_score)


def scores(points):
    return [(p.help_score, p.harm_score) for p in points]


def test_front_of_a_known_set():
    points = [point(1, 5), point(2, 4), point(2, 3), point(3, 1), point(0, 0), point(1.5, 4.5)]
    assert scores(pareto_front(points)) == [(1, 5), (1.5, 4.5), (2, 4), (3, 1)]


def test_front_keeps_one_of_identical_points_and_drops_ties_on_one_axis():
    points = [point(1, 1, alpha=0.1), point(1, 1, alpha=0.2), point(1, 0.5), point(0.5, 1)]
    front = pareto_front(points)
    assert scores(front) == [(1, 1)]
    assert front[0].helpfulness == 0.1


def test_front_rejects_non_finite_scores():
    with pytest.raises(ValueError, match="finite"):
        pareto_front([point(math.nan, 1)])


def test_front_matches_brute_force_on_random_points():
    rng = random.Random(3)
    for _ in range(50):
        points = [point(rng.randint(0, 6), rng.randint(0, 6)) for _ in range(rng.randint(1, 12))]
        expected = {
            (p.help_score, p.harm_score) for p in points if not any(dominates(q, p) for q in points)
        }
        assert set(scores(pareto_front(points))) == expected


def test_hypervolume_of_known_staircase():
    # slabs: [0,1]×5 + [1,2]×4 + [2,3]×1 = 5 + 4 + 1
    points = [point(1, 5), point(2, 4), point(3, 1), point(1, 1)]
    assert hypervolume(points, (0, 0)) == pytest.approx(10.0)


def test_hypervolume_with_reference_point_inside():
    points = [point(1, 5), point(2, 4), point(3, 1)]
    # reference (1.5, 2): only (2, 4) counts fully: (2-1.5)·(4-2) = 1
    assert hypervolume(points, (1.5, 2)) == pytest.approx(1.0)


def test_hypervolume_single_point_and_nothing_above_reference():
    assert hypervolume([point(2, 3)], (0, 1)) == pytest.approx(4.0)
    assert hypervolume([point(-1, -1)], (0, 0)) == 0.0
    assert hypervolume([], (0, 0)) == 0.0


def test_hypervolume_matches_grid_count():
    rng = random.Random(5)
    points = [point(rng.randint(1, 8), rng.randint(1, 8)) for _ in range(7)]
    covered = sum(
        1
        for x, y in itertools.product(range(8), range(8))
        if any(p.help_score >= x + 1 and p.harm_score >= y + 1 for p in points)
    )
    assert hypervolume(points, (0, 0)) == pytest.approx(covered)


def test_map_from_a_monotone_front():
    front = [
        point(0.0, 3.0, alpha=-0.5, beta=1.5),
        point(1.0, 2.5, alpha=0.5, beta=1.0),
        point(4.0, 1.0, alpha=1.5, beta=0.0),
    ]
    mapping = preference_map_from_front(front, "test")
    assert [p.preference for p in mapping.points] == [0.0, 0.25, 1.0]
    assert mapping.coefficients(0.0) == (-0.5, 1.5)
    assert mapping.coefficients(1.0) == (1.5, 0.0)
    assert mapping.coefficients(0.25) == (0.5, 1.0)


def test_map_drops_points_that_break_monotonicity():
    front = [
        point(0.0, 3.0, alpha=0.0, beta=1.0),
        point(1.0, 2.0, alpha=1.2, beta=0.2),  # α jumps past the next point's α
        point(2.0, 1.5, alpha=0.8, beta=0.5),
        point(3.0, 1.0, alpha=1.5, beta=0.0),
    ]
    mapping = preference_map_from_front(front, "test")
    kept = [(p.helpfulness, p.harmlessness) for p in mapping.points]
    assert len(kept) == 3
    assert kept[0] == (0.0, 1.0)
    assert kept[-1] == (1.5, 0.0)
    alphas = [a for a, _ in kept]
    betas = [b for _, b in kept]
    assert alphas == sorted(alphas)
    assert betas == sorted(betas, reverse=True)


def test_map_needs_two_distinct_points():
    with pytest.raises(ValueError, match="at least 2"):
        preference_map_from_front([point(1, 1)], "test")
