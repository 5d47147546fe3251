"""Tests for the preference map from slider position w to the steered coefficients (alpha, beta)."""

from __future__ import annotations

import math

import pytest

from peo_merge.preference_map import MapPoint, PreferenceMap

# A three-point map with a kink at w = 0.4, so interpolation must pick the right segment.
KINKED_POINTS = [MapPoint(0.0, -0.2, 1.2), MapPoint(0.4, 0.6, 0.8), MapPoint(1.0, 1.4, -0.1)]


def _kinked_map() -> PreferenceMap:
    return PreferenceMap(list(KINKED_POINTS), source="test")


@pytest.mark.parametrize("preference", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_soup_line_gives_w_and_one_minus_w(preference):
    alpha, beta = PreferenceMap.soup_line().coefficients(preference)

    assert alpha == pytest.approx(preference, abs=1e-12)
    assert beta == pytest.approx(1.0 - preference, abs=1e-12)


def test_soup_line_source_name():
    assert PreferenceMap.soup_line().source == "soup_line"


@pytest.mark.parametrize("point", KINKED_POINTS)
def test_preference_map_exact_point(point):
    alpha, beta = _kinked_map().coefficients(point.preference)

    assert alpha == point.helpfulness
    assert beta == point.harmlessness


@pytest.mark.parametrize(
    ("preference", "left", "right"),
    [
        (0.1, KINKED_POINTS[0], KINKED_POINTS[1]),
        (0.3, KINKED_POINTS[0], KINKED_POINTS[1]),
        (0.5, KINKED_POINTS[1], KINKED_POINTS[2]),
        (0.85, KINKED_POINTS[1], KINKED_POINTS[2]),
    ],
)
def test_preference_map_interpolates_between_points(preference, left, right):
    fraction = (preference - left.preference) / (right.preference - left.preference)
    expected_alpha = (1 - fraction) * left.helpfulness + fraction * right.helpfulness
    expected_beta = (1 - fraction) * left.harmlessness + fraction * right.harmlessness

    alpha, beta = _kinked_map().coefficients(preference)

    assert alpha == pytest.approx(expected_alpha, abs=1e-12)
    assert beta == pytest.approx(expected_beta, abs=1e-12)


def test_preference_map_midpoint_by_hand():
    # Halfway between (0.4, 0.6, 0.8) and (1.0, 1.4, -0.1): alpha = 1.0, beta = 0.35.
    alpha, beta = _kinked_map().coefficients(0.7)

    assert alpha == pytest.approx(1.0, abs=1e-12)
    assert beta == pytest.approx(0.35, abs=1e-12)


def test_preference_map_sorts_unordered_points():
    shuffled = [KINKED_POINTS[2], KINKED_POINTS[0], KINKED_POINTS[1]]

    preference_map = PreferenceMap(shuffled, source="test")

    assert [point.preference for point in preference_map.points] == [0.0, 0.4, 1.0]
    assert preference_map.coefficients(0.4) == (0.6, 0.8)


def test_preference_map_json_round_trip():
    original = _kinked_map()

    restored = PreferenceMap.from_json(original.to_json())

    assert restored.points == original.points
    assert restored.source == "test"


def test_preference_map_from_json_without_source():
    data = {
        "points": [
            {"preference": 0, "helpfulness": 0, "harmlessness": 1},
            {"preference": 1, "helpfulness": 1, "harmlessness": 0},
        ]
    }

    preference_map = PreferenceMap.from_json(data)

    assert preference_map.source == "preference_map.json"
    assert preference_map.coefficients(0.5) == pytest.approx((0.5, 0.5))


@pytest.mark.parametrize(
    "points",
    [
        # alpha decreases between w = 0.4 and w = 1
        [MapPoint(0.0, 0.0, 1.0), MapPoint(0.4, 0.6, 0.8), MapPoint(1.0, 0.5, 0.0)],
        # beta increases between w = 0 and w = 0.4
        [MapPoint(0.0, 0.0, 1.0), MapPoint(0.4, 0.6, 1.1), MapPoint(1.0, 1.0, 0.0)],
    ],
)
def test_preference_map_rejects_non_monotone(points):
    with pytest.raises(ValueError, match="monotone"):
        PreferenceMap(points, source="test")


@pytest.mark.parametrize(
    "points",
    [
        [MapPoint(0.1, 0.0, 1.0), MapPoint(1.0, 1.0, 0.0)],
        [MapPoint(0.0, 0.0, 1.0), MapPoint(0.9, 1.0, 0.0)],
        [MapPoint(0.2, 0.0, 1.0), MapPoint(0.8, 1.0, 0.0)],
    ],
)
def test_preference_map_rejects_partial_coverage(points):
    with pytest.raises(ValueError, match="w = 0"):
        PreferenceMap(points, source="test")


@pytest.mark.parametrize(
    "bad_point",
    [
        MapPoint(math.nan, 0.5, 0.5),
        MapPoint(0.5, math.nan, 0.5),
        MapPoint(0.5, 0.5, math.nan),
        MapPoint(0.5, math.inf, 0.5),
    ],
)
def test_preference_map_rejects_non_finite_point(bad_point):
    points = [MapPoint(0.0, 0.0, 1.0), bad_point, MapPoint(1.0, 1.0, 0.0)]

    with pytest.raises(ValueError, match="non-finite"):
        PreferenceMap(points, source="test")


def test_preference_map_rejects_duplicate_position():
    points = [
        MapPoint(0.0, 0.0, 1.0),
        MapPoint(0.5, 0.4, 0.6),
        MapPoint(0.5, 0.5, 0.5),
        MapPoint(1.0, 1.0, 0.0),
    ]

    with pytest.raises(ValueError, match="two points"):
        PreferenceMap(points, source="test")


def test_preference_map_rejects_single_point():
    with pytest.raises(ValueError, match="at least 2"):
        PreferenceMap([MapPoint(0.0, 0.0, 1.0)], source="test")


@pytest.mark.parametrize("preference", [-0.01, 1.01, -1.0, 2.0, math.nan, math.inf, -math.inf])
def test_preference_outside_unit_interval_raises(preference):
    with pytest.raises(ValueError, match="preference"):
        _kinked_map().coefficients(preference)


@pytest.mark.parametrize("preference", [-0.01, 1.01, math.nan])
def test_soup_line_rejects_out_of_range(preference):
    with pytest.raises(ValueError, match="preference"):
        PreferenceMap.soup_line().coefficients(preference)
