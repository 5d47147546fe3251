"""The preference map: slider w ∈ [0, 1] → steered coefficients (α, β).

w = 1 is most helpful and w = 0 most harmless. A map is a list of points ``(w, α, β)`` with
increasing w; between points the coefficients are interpolated linearly. A bundle without a map
uses the soup line, (α, β) = (w, 1 − w).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class MapPoint:
    """One point of a preference map."""

    preference: float
    helpfulness: float
    harmlessness: float


class PreferenceMap:
    """A piecewise-linear map from slider position to coefficients.

    The map must cover w = 0 and w = 1, and be monotone: α never decreases and β never increases
    as w grows, so moving the slider toward "helpful" never adds weight to harmlessness.
    """

    def __init__(self, points: list[MapPoint], source: str):
        if len(points) < 2:
            raise ValueError(f"a preference map needs at least 2 points, got {len(points)}")
        points = sorted(points, key=lambda p: p.preference)
        for point in points:
            values = (point.preference, point.helpfulness, point.harmlessness)
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"preference map point {point} has a non-finite value")
        if points[0].preference != 0.0 or points[-1].preference != 1.0:
            raise ValueError("a preference map must start at w = 0 and end at w = 1")
        for left, right in zip(points, points[1:], strict=False):
            if right.preference == left.preference:
                raise ValueError(f"preference map has two points at w = {left.preference}")
            if right.helpfulness < left.helpfulness or right.harmlessness > left.harmlessness:
                raise ValueError(
                    f"preference map is not monotone between w = {left.preference} and "
                    f"w = {right.preference}: α must not decrease and β must not increase"
                )
        self.points = points
        self.source = source
        self._positions = [p.preference for p in points]

    @classmethod
    def soup_line(cls) -> PreferenceMap:
        """Return the map (α, β) = (w, 1 − w), used when a bundle has no map of its own."""
        return cls([MapPoint(0.0, 0.0, 1.0), MapPoint(1.0, 1.0, 0.0)], source="soup_line")

    @classmethod
    def from_json(cls, data: dict) -> PreferenceMap:
        """Build a map from ``preference_map.json``: ``{"points": [{"preference", "helpfulness", "harmlessness"}]}``."""
        points = [
            MapPoint(float(p["preference"]), float(p["helpfulness"]), float(p["harmlessness"]))
            for p in data["points"]
        ]
        return cls(points, source=data.get("source", "preference_map.json"))

    def to_json(self) -> dict:
        """Return the JSON form read by :meth:`from_json`."""
        return {
            "source": self.source,
            "points": [
                {
                    "preference": p.preference,
                    "helpfulness": p.helpfulness,
                    "harmlessness": p.harmlessness,
                }
                for p in self.points
            ],
        }

    def coefficients(self, preference: float) -> tuple[float, float]:
        """Return (α, β) for slider position ``preference``.

        Raises:
            ValueError: ``preference`` is not a finite number in [0, 1].
        """
        if not (math.isfinite(preference) and 0.0 <= preference <= 1.0):
            raise ValueError(f"preference must be a finite number in [0, 1], got {preference}")

        right_index = bisect.bisect_left(self._positions, preference)
        if self._positions[right_index] == preference:
            point = self.points[right_index]
            return point.helpfulness, point.harmlessness

        left, right = self.points[right_index - 1], self.points[right_index]
        t = (preference - left.preference) / (right.preference - left.preference)
        alpha = left.helpfulness + t * (right.helpfulness - left.helpfulness)
        beta = left.harmlessness + t * (right.harmlessness - left.harmlessness)
        return alpha, beta
