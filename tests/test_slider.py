"""The slider check: positions go through the bundle's map, and the flags follow the scores.

The generator here is a stand-in that responds with the coefficients it was given, so each score
is a known function of the coefficients. The real generator and scorers run in
``tests/test_pipeline.py``.
"""

from __future__ import annotations

import pytest

from peo_merge.bundle import Bundle, Manifest
from training.slider import check_slider


class EchoGenerator:
    """Respond to every job with its helpfulness and harmlessness coefficients as text."""

    def __init__(self):
        self.calls = []

    def generate(self, jobs):
        self.calls.append(jobs)
        return [f"{c['helpfulness']} {c['harmlessness']}" for _, c in jobs]


def bundle(preference_map=None, offset=None):
    manifest = Manifest.model_validate(
        {
            "format_version": 1,
            "name": "slider-test",
            "base_model": {},
            "vectors": {
                name: {"file": f"vectors/{name}.safetensors", "kind": "dense", "target_modules": []}
                for name in ("helpfulness", "harmlessness")
            },
            "offset": offset or {},
        }
    )
    # vector_coefficients reads only the names of the vectors
    return Bundle(None, manifest, dict.fromkeys(manifest.vectors), preference_map)


def score_by(position):
    return lambda dialogues, responses: [float(r.split()[position]) for r in responses]


SCORERS = {"help_score": score_by(0), "harm_score": score_by(1)}
PROMPTS = [("p1", ()), ("p2", ())]


def test_soup_line_without_a_map_steers_both_ways():
    generator = EchoGenerator()
    document = check_slider(bundle(), PROMPTS, generator, SCORERS, (1.0, 0.0, 0.5))
    assert document["map_source"] == "soup_line"
    assert [row["preference"] for row in document["positions"]] == [0.0, 0.5, 1.0]
    assert [row["help_score"] for row in document["positions"]] == [0.0, 0.5, 1.0]
    assert [row["harm_score"] for row in document["positions"]] == [1.0, 0.5, 0.0]
    assert document["help_rises"]
    assert document["harm_falls"]
    assert document["help_monotone"]
    assert document["harm_monotone"]
    assert document["prompts"] == 2
    assert all(len(jobs) == 2 for jobs in generator.calls)


def test_map_and_offset_set_the_coefficients():
    preference_map = {
        "points": [
            {"preference": 0.0, "helpfulness": -0.5, "harmlessness": 1.5},
            {"preference": 1.0, "helpfulness": 1.5, "harmlessness": -0.5},
        ]
    }
    offset = {"helpfulness": 0.5, "harmlessness": 0.5}
    document = check_slider(
        bundle(preference_map, offset), PROMPTS, EchoGenerator(), SCORERS, (0.0, 0.5, 1.0)
    )
    rows = document["positions"]
    assert (rows[1]["alpha"], rows[1]["beta"]) == (0.5, 0.5)
    assert rows[0]["coefficients"] == {"helpfulness": 0.0, "harmlessness": 2.0}
    assert rows[2]["coefficients"] == {"helpfulness": 2.0, "harmlessness": 0.0}


def test_flags_report_a_slider_that_does_not_steer():
    reversed_scorers = {"help_score": score_by(1), "harm_score": score_by(0)}
    document = check_slider(bundle(), PROMPTS, EchoGenerator(), reversed_scorers, (0.0, 1.0))
    assert not document["help_rises"]
    assert not document["harm_falls"]
    assert not document["help_monotone"]
    assert not document["harm_monotone"]


@pytest.mark.parametrize("positions", [(0.0, 0.5), (0.5, 1.0)])
def test_positions_must_include_both_ends(positions):
    with pytest.raises(ValueError, match="must include 0 and 1"):
        check_slider(bundle(), PROMPTS, EchoGenerator(), SCORERS, positions)
