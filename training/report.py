"""Turn scored points into the bundle's ``pareto.json``, ``preference_map.json`` and ``pareto.png``.

Every method's points get their own Pareto front and hypervolume, all against one reference
point: the lowest helpfulness and harmlessness scores among all evaluated points, each lowered
by a tenth of that score's range. So every evaluated point adds area if it is on a front, and the
hypervolumes of the methods are comparable. The preference map is read off the PEO front, or
is constant when that front is a single point.
"""

from __future__ import annotations

import json
from pathlib import Path

from peo_merge.pareto import ScoredPoint, hypervolume, pareto_front, preference_map_from_front
from peo_merge.preference_map import MapPoint, PreferenceMap

METHODS = ("peo", "soup", "mixed_dpo", "base", "help_only", "harm_only")
PARETO_FILE = "pareto.json"
MAP_FILE = "preference_map.json"
PLOT_FILE = "pareto.png"


def scored(point: dict) -> ScoredPoint:
    return ScoredPoint(point["alpha"], point["beta"], point["help_score"], point["harm_score"])


def reference_point(points: list[dict]) -> tuple[float, float]:
    """Return the reference point described in the module docstring."""
    helps = [point["help_score"] for point in points]
    harms = [point["harm_score"] for point in points]
    margin_help = 0.1 * (max(helps) - min(helps)) or 0.1
    margin_harm = 0.1 * (max(harms) - min(harms)) or 0.1
    return (min(helps) - margin_help, min(harms) - margin_harm)


def summarise(points: list[dict]) -> dict:
    """Return the ``pareto.json`` document for scored points of any of :data:`METHODS`."""
    unknown = sorted({point["method"] for point in points} - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; allowed: {list(METHODS)}")
    reference = reference_point(points)
    fronts, volumes = {}, {}
    for method in METHODS:
        mine = [scored(point) for point in points if point["method"] == method]
        if not mine:
            continue
        front = pareto_front(mine)
        fronts[method] = [
            {
                "alpha": p.helpfulness,
                "beta": p.harmlessness,
                "help_score": p.help_score,
                "harm_score": p.harm_score,
            }
            for p in front
        ]
        volumes[method] = hypervolume(mine, reference)
    return {
        "reference_point": {"help_score": reference[0], "harm_score": reference[1]},
        "hypervolume": volumes,
        "fronts": fronts,
        "points": [
            {key: point[key] for key in ("method", "alpha", "beta", "coefficients")}
            | {"help_score": point["help_score"], "harm_score": point["harm_score"]}
            for point in points
        ],
    }


def write_outputs(points: list[dict], folder: Path) -> dict:
    """Write ``pareto.json``, ``preference_map.json`` and ``pareto.png`` into ``folder``.

    Returns:
        The ``pareto.json`` document.

    Raises:
        ValueError: there are no PEO points, or their front cannot give a monotone map.
    """
    document = summarise(points)
    if "peo" not in document["fronts"]:
        raise ValueError("no PEO points were scored, so there is no front to map")
    front = [scored(point | {"method": "peo"}) for point in document["fronts"]["peo"]]
    preference_map = map_from_front(front)
    document["preference_map_kind"] = "single_point" if len(front) == 1 else "front"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PARETO_FILE).write_text(json.dumps(document, indent=2) + "\n")
    (folder / MAP_FILE).write_text(json.dumps(preference_map.to_json(), indent=2) + "\n")
    plot(document, folder / PLOT_FILE)
    return document


def map_from_front(front: list[ScoredPoint]) -> PreferenceMap:
    """Return the slider map of a PEO front.

    A front of one point means that model is at least as good as every other on both scores, so
    every slider position maps to it. Otherwise the map is read off the front
    (:func:`peo_merge.pareto.preference_map_from_front`).
    """
    if len(front) == 1:
        point = front[0]
        ends = [MapPoint(w, point.helpfulness, point.harmlessness) for w in (0.0, 1.0)]
        return PreferenceMap(ends, source="pareto")
    return preference_map_from_front(front, source="pareto")


def plot(document: dict, path: Path) -> None:
    """Draw every method's points and fronts with both scores on the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "peo": ("tab:blue", "o"),
        "soup": ("tab:orange", "s"),
        "mixed_dpo": ("tab:green", "D"),
        "base": ("black", "x"),
        "help_only": ("tab:red", "^"),
        "harm_only": ("tab:purple", "v"),
    }
    figure, axes = plt.subplots(figsize=(7, 5))
    for method, (color, marker) in styles.items():
        points = [p for p in document["points"] if p["method"] == method]
        if not points:
            continue
        volume = document["hypervolume"][method]
        axes.scatter(
            [p["help_score"] for p in points],
            [p["harm_score"] for p in points],
            color=color,
            marker=marker,
            alpha=0.35 if method == "peo" else 0.9,
            label=f"{method} (hypervolume {volume:.3g})",
        )
        front = document["fronts"][method]
        if len(front) > 1:
            axes.plot(
                [p["help_score"] for p in front],
                [p["harm_score"] for p in front],
                color=color,
            )
    axes.set_xlabel("mean helpfulness score")
    axes.set_ylabel("mean harmlessness score")
    axes.set_title("Pareto fronts of the evaluated models")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
