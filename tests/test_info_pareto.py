"""``/info`` reports the bundle's Pareto summary and the map the slider uses, and requests use it."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine import Engine
from server.settings import Settings
from tests.tiny_model import write_tiny_base, write_tiny_bundle

PARETO = {
    "reference_point": {"help_score": -1.0, "harm_score": -1.0},
    "hypervolume": {"peo": 0.75, "soup": 0.5},
    "fronts": {
        "peo": [
            {"alpha": -0.5, "beta": 0.5, "help_score": 0.0, "harm_score": 0.5},
            {"alpha": 0.5, "beta": -0.5, "help_score": 0.5, "harm_score": 0.0},
        ],
        "soup": [{"alpha": 0.5, "beta": 0.5, "help_score": 0.2, "harm_score": 0.2}],
    },
    "preference_map_kind": "front",
    "points": [{"method": "peo", "help_score": 0.0, "harm_score": 0.5}],
}
MAP = {
    "source": "pareto",
    "points": [
        {"preference": 0.0, "helpfulness": -0.5, "harmlessness": 0.5},
        {"preference": 1.0, "helpfulness": 0.5, "harmlessness": -0.5},
    ],
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    base = write_tiny_base(root / "base")
    plain = write_tiny_bundle(root / "plain", base)
    mapped = root / "mapped"
    shutil.copytree(plain, mapped)
    (mapped / "pareto.json").write_text(json.dumps(PARETO))
    (mapped / "preference_map.json").write_text(json.dumps(MAP))
    return base, plain, mapped


def served(base, bundle, *requests) -> list[dict]:
    """Return ``/info`` and then the body of a ``/generate`` call for each request body."""
    settings = Settings(base_model=str(base), bundle=bundle, threads=1, max_new_tokens=4)
    with TestClient(create_app(settings, Engine(settings))) as client:
        bodies = [client.get("/info").json()]
        for request in requests:
            response = client.post("/generate", json=request)
            assert response.status_code == 200, response.text
            bodies.append(response.json())
        return bodies


def info_of(base, bundle) -> dict:
    return served(base, bundle)[0]


def test_info_reports_front_and_map(folders):
    base, _, mapped = folders
    info = info_of(base, mapped)
    assert info["preference_map"] == MAP
    assert info["pareto"]["hypervolume"] == PARETO["hypervolume"]
    assert info["pareto"]["fronts"] == PARETO["fronts"]
    assert info["pareto"]["reference_point"] == PARETO["reference_point"]
    assert info["pareto"]["preference_map_kind"] == "front"
    # the scored points stay in the file
    assert "points" not in info["pareto"]


def test_info_without_front_keeps_soup_line(folders):
    base, plain, _ = folders
    info = info_of(base, plain)
    assert info["pareto"] is None
    assert info["preference_map"]["source"] == "soup_line"


@pytest.mark.parametrize(
    ("preference", "expected"), [(0.0, (-0.5, 0.5)), (0.5, (0.0, 0.0)), (1.0, (0.5, -0.5))]
)
def test_slider_follows_the_bundle_map(folders, preference, expected):
    base, _, mapped = folders
    request = {"prompt": "Hello", "preference": preference, "max_new_tokens": 2, "temperature": 0}
    _, body = served(base, mapped, request)
    assert body["coefficients"] == {"helpfulness": expected[0], "harmlessness": expected[1]}
