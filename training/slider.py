"""Check that the slider steers: score the served model's responses at several slider positions.

For each position w, the bundle's preference map (the soup line when it has none) gives the
steered pair (α, β), and θ(α, β) responds to held-out prompts greedily. Both scorers score every
response. The slider steers the right way when the mean helpfulness score at w = 1 is above the
one at w = 0 and the mean harmlessness score is below it. Positions in between are reported
too, with whether each step keeps both directions.
"""

from __future__ import annotations

import json
from pathlib import Path

from peo_merge.bundle import Bundle
from peo_merge.preference_map import PreferenceMap
from training.search import Generator, Scorer

SLIDER_FILE = "slider.json"
DEFAULT_POSITIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def slider_map(bundle: Bundle) -> PreferenceMap:
    """Return the map the server would use for ``bundle``."""
    if bundle.preference_map is None:
        return PreferenceMap.soup_line()
    return PreferenceMap.from_json(bundle.preference_map)


def check_slider(
    bundle: Bundle,
    prompts: list[tuple[str, tuple]],
    generator: Generator,
    scorers: dict[str, Scorer],
    positions: tuple[float, ...] = DEFAULT_POSITIONS,
) -> dict:
    """Score the responses at each slider position; return the ``slider.json`` document.

    Args:
        bundle: the bundle whose map and vectors are served.
        prompts: ``(rendered prompt, dialogue turns)`` for each held-out prompt.
        generator: a generator over the bundle's vectors.
        scorers: ``{"help_score": scorer, "harm_score": scorer}``.
        positions: slider positions; must include 0 and 1.

    Raises:
        ValueError: there are no prompts, or ``positions`` lacks 0 or 1.
    """
    if not prompts:
        raise ValueError("the slider check needs at least one held-out prompt, got none")
    positions = tuple(sorted(set(positions)))
    if not positions or positions[0] != 0.0 or positions[-1] != 1.0:
        raise ValueError(f"slider positions {list(positions)} must include 0 and 1, within [0, 1]")
    mapping = slider_map(bundle)
    dialogues = [turns for _, turns in prompts]
    rows = []
    for preference in positions:
        alpha, beta = mapping.coefficients(preference)
        coefficients = bundle.vector_coefficients(alpha, beta)
        responses = generator.generate([(prompt, coefficients) for prompt, _ in prompts])
        row = {
            "preference": preference,
            "alpha": alpha,
            "beta": beta,
            "coefficients": coefficients,
        }
        for name, scorer in scorers.items():
            scores = scorer(dialogues, responses)
            row[name] = sum(scores) / len(scores)
        rows.append(row)
    first, last = rows[0], rows[-1]
    steps = list(zip(rows, rows[1:], strict=False))
    return {
        "map_source": mapping.source,
        "prompts": len(prompts),
        "positions": rows,
        "help_rises": last["help_score"] > first["help_score"],
        "harm_falls": last["harm_score"] < first["harm_score"],
        "help_monotone": all(right["help_score"] >= left["help_score"] for left, right in steps),
        "harm_monotone": all(right["harm_score"] <= left["harm_score"] for left, right in steps),
    }


def write_slider(document: dict, folder: Path) -> Path:
    """Write ``slider.json`` into ``folder``; return its path."""
    path = Path(folder) / SLIDER_FILE
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
