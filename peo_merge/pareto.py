"""Pareto fronts of scored models, their hypervolume, and the preference map read off a front.

Every evaluated model is a point with two scores to maximise: mean helpfulness and mean
harmlessness of its responses. A point dominates another when it is at least as good on both
scores and better on one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from peo_merge.preference_map import MapPoint, PreferenceMap


@dataclass(frozen=True)
class ScoredPoint:
    """One evaluated model: its coefficients and its two mean scores."""

    helpfulness: float  # α
    harmlessness: float  # β
    help_score: float
    harm_score: float


def dominates(a: ScoredPoint, b: ScoredPoint) -> bool:
    """Return whether ``a`` is at least as good as ``b`` on both scores and better on one."""
    return (
        a.help_score >= b.help_score
        and a.harm_score >= b.harm_score
        and (a.help_score > b.help_score or a.harm_score > b.harm_score)
    )


def pareto_front(points: list[ScoredPoint]) -> list[ScoredPoint]:
    """Return the points no other point dominates, by increasing helpfulness score.

    Of several points with identical scores, the first one given is kept.

    Raises:
        ValueError: a score is not finite.
    """
    for point in points:
        if not (math.isfinite(point.help_score) and math.isfinite(point.harm_score)):
            raise ValueError(f"scores must be finite, got {point}")
    # sweep from the most helpful down, keeping each point that beats every harmlessness so far
    order = sorted(
        range(len(points)), key=lambda i: (-points[i].help_score, -points[i].harm_score, i)
    )
    front, best_harm = [], -math.inf
    for index in order:
        point = points[index]
        if point.harm_score > best_harm:
            front.append(point)
            best_harm = point.harm_score
    return front[::-1]


def hypervolume(points: list[ScoredPoint], reference: tuple[float, float]) -> float:
    """Return the area dominated by ``points`` and bounded below by ``reference``.

    ``reference`` is ``(help_score, harm_score)``; points not better than it on both scores add
    nothing. Larger is better.
    """
    front = [
        p
        for p in pareto_front(points)
        if p.help_score > reference[0] and p.harm_score > reference[1]
    ]
    area, previous_help = 0.0, reference[0]
    # the front by increasing helpfulness has decreasing harmlessness: add one slab per point
    for point in front:
        area += (point.help_score - previous_help) * (point.harm_score - reference[1])
        previous_help = point.help_score
    return area


def preference_map_from_front(front: list[ScoredPoint], source: str) -> PreferenceMap:
    """Derive the slider map from a front: w = 0 is its most harmless point, w = 1 its most helpful.

    Points sit at w proportional to their helpfulness score between the two ends. A map must be
    monotone in the coefficients (α never falls, β never rises as w grows), so of the front
    only the longest chain that is monotone is kept; among chains of equal length, the one
    with the widest spread of helpfulness scores.

    Raises:
        ValueError: the front has fewer than 2 points with different helpfulness scores.
    """
    ordered = sorted(front, key=lambda p: (p.help_score, -p.harm_score))
    if len(ordered) < 2 or ordered[0].help_score == ordered[-1].help_score:
        raise ValueError("a preference map needs a front of at least 2 distinct points")

    # Find the longest chain i1 < i2 < … with α non-decreasing and β non-increasing. Of equal
    # lengths, the chain whose first point has the minimum helpfulness score (widest span) wins.
    count = len(ordered)
    length = [1] * count
    previous = [-1] * count
    start = list(range(count))
    for j in range(count):
        for i in range(j):
            fits = (
                ordered[i].helpfulness <= ordered[j].helpfulness
                and ordered[i].harmlessness >= ordered[j].harmlessness
                and ordered[i].help_score < ordered[j].help_score
            )
            if not fits:
                continue
            candidate = (length[i] + 1, -ordered[start[i]].help_score)
            if candidate > (length[j], -ordered[start[j]].help_score):
                length[j], previous[j], start[j] = length[i] + 1, i, start[i]
    end = max(
        range(count),
        key=lambda j: (length[j], ordered[j].help_score - ordered[start[j]].help_score),
    )
    chain = []
    while end >= 0:
        chain.append(ordered[end])
        end = previous[end]
    chain.reverse()
    if len(chain) < 2:
        raise ValueError("no two points of the front form a monotone map")

    low, high = chain[0].help_score, chain[-1].help_score
    points = [
        MapPoint(
            preference=0.0
            if index == 0
            else 1.0
            if index == len(chain) - 1
            else (point.help_score - low) / (high - low),
            helpfulness=point.helpfulness,
            harmlessness=point.harmlessness,
        )
        for index, point in enumerate(chain)
    ]
    return PreferenceMap(points, source=source)
