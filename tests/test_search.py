"""The extrapolation search and its report, on a tiny random Llama and on hand-made points.

Generation is checked against the fused path: a row of the shared batch must produce the greedy
tokens of the model fused for its coefficients, run alone. Scorers here are plain functions of
the response text, so the bookkeeping (resuming, schemas, the map) is checked exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from peo_merge.bundle import load_bundle
from peo_merge.fused_model import base_state, build_fused_model
from peo_merge.fusion import Fuser
from peo_merge.preference_map import PreferenceMap
from tests.tiny_model import write_tiny_base, write_tiny_bundle
from training.report import MAP_FILE, PARETO_FILE, PLOT_FILE, summarise, write_outputs
from training.search import (
    POINTS_FILE,
    Candidate,
    Generator,
    evaluate_candidates,
    peo_candidates,
    read_points,
    single_candidates,
    soup_candidates,
)

PROMPTS = ["Hello there", "Tell me about the sea and the wind", "Why?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    base = write_tiny_base(folder / "base")
    bundle = load_bundle(write_tiny_bundle(folder / "bundle", base))
    model = LlamaForCausalLM.from_pretrained(base).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    return model, tokenizer, bundle


def test_peo_grid_adds_steering_to_offset():
    offset = {"helpfulness": 0.5, "harmlessness": 0.5, "generalist": 1.0}
    candidates = peo_candidates([-0.5, 1.5], [0.0], offset)
    assert [c.coefficients for c in candidates] == [
        {"helpfulness": 0.0, "harmlessness": 0.5, "generalist": 1.0},
        {"helpfulness": 2.0, "harmlessness": 0.5, "generalist": 1.0},
    ]
    assert [(c.alpha, c.beta) for c in candidates] == [(-0.5, 0.0), (1.5, 0.0)]
    assert len({c.key() for c in candidates}) == 2


def test_soup_spans_both_ends():
    candidates = soup_candidates(3)
    assert [c.coefficients for c in candidates] == [
        {"helpfulness": 0.0, "harmlessness": 1.0},
        {"helpfulness": 0.5, "harmlessness": 0.5},
        {"helpfulness": 1.0, "harmlessness": 0.0},
    ]
    with pytest.raises(ValueError, match="at least 2"):
        soup_candidates(1)


def test_single_candidates_include_mixed_dpo_when_given():
    assert [c.method for c in single_candidates(None)] == ["base", "help_only", "harm_only"]
    assert single_candidates("mixed")[-1].coefficients == {"mixed": 1.0}


def greedy_alone(model, tokenizer, prompt, new_tokens):
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        output = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_shared_batch_rows_match_fused_models(tiny):
    model, tokenizer, bundle = tiny
    generator = Generator(model, tokenizer, bundle.vectors, max_new_tokens=6, batch_size=4)
    assignments = [{}, {"helpfulness": 1.5, "harmlessness": -0.5}, {"harmlessness": 1.0}]
    jobs = [(prompt, c) for c in assignments for prompt in PROMPTS]
    responses = generator.generate(jobs)

    fuser = Fuser(base_state(model), bundle.vectors)
    for (prompt, coefficients), response in zip(jobs, responses, strict=True):
        buffers = fuser.allocate()
        fuser.fuse_into(buffers, coefficients)
        fused = build_fused_model(model, buffers)
        assert response == greedy_alone(fused, tokenizer, prompt, 6), (prompt, coefficients)


def test_generator_names_an_unknown_vector(tiny):
    model, tokenizer, bundle = tiny
    generator = Generator(model, tokenizer, bundle.vectors, max_new_tokens=2, batch_size=2)
    with pytest.raises(KeyError, match="no task vector 'generalist'"):
        generator.generate([("Hi", {"generalist": 1.0})])


def test_evaluation_records_points_and_resumes(tiny, tmp_path):
    model, tokenizer, bundle = tiny
    generator = Generator(model, tokenizer, bundle.vectors, max_new_tokens=4, batch_size=8)
    calls = []

    def length_scorer(dialogues, responses):
        calls.append(len(responses))
        return [float(len(response)) for response in responses]

    def word_scorer(dialogues, responses):
        return [-float(len(response.split())) for response in responses]

    scorers = {"help_score": length_scorer, "harm_score": word_scorer}
    prompts = [(prompt, (("user", prompt),)) for prompt in PROMPTS]
    candidates = soup_candidates(3) + single_candidates(None)
    points = evaluate_candidates(
        candidates, prompts, generator, scorers, tmp_path, candidates_per_batch=2
    )
    assert set(points) == {c.key() for c in candidates}
    assert len(calls) == len(candidates)
    for point in points.values():
        assert len(point["responses"]) == len(PROMPTS)
        lengths = [len(response) for response in point["responses"]]
        assert point["help_score"] == pytest.approx(sum(lengths) / len(lengths))
        assert point["seconds"] > 0

    on_disk = read_points(tmp_path / POINTS_FILE)
    assert set(on_disk) == set(points)
    again = evaluate_candidates(candidates, prompts, generator, scorers, tmp_path)
    assert len(calls) == len(candidates)  # nothing generated or scored again
    assert again == on_disk


def test_incomplete_last_line_is_dropped_and_rescored(tiny, tmp_path):
    model, tokenizer, bundle = tiny
    generator = Generator(model, tokenizer, bundle.vectors, max_new_tokens=2, batch_size=8)
    scorers = {
        "help_score": lambda dialogues, responses: [1.0] * len(responses),
        "harm_score": lambda dialogues, responses: [2.0] * len(responses),
    }
    prompts = [("Hi", (("user", "Hi"),))]
    candidates = soup_candidates(2)
    evaluate_candidates(candidates, prompts, generator, scorers, tmp_path)
    path = tmp_path / POINTS_FILE
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:20])  # as if killed while writing

    assert list(read_points(path)) == [candidates[0].key()]
    points = evaluate_candidates(candidates, prompts, generator, scorers, tmp_path)
    assert set(points) == {c.key() for c in candidates}
    assert len(read_points(path)) == 2


def test_unreadable_middle_line_is_an_error(tmp_path):
    path = tmp_path / POINTS_FILE
    path.write_text('{"broken\n{"key": "x"}\n')
    with pytest.raises(ValueError, match="points.jsonl:1: invalid JSON"):
        read_points(path)


def point(method, alpha, beta, help_score, harm_score):
    return {
        "method": method,
        "alpha": alpha,
        "beta": beta,
        "coefficients": {"helpfulness": alpha, "harmlessness": beta},
        "help_score": help_score,
        "harm_score": harm_score,
    }


HAND_MADE = [
    point("peo", -0.5, 0.5, 0.0, 4.0),
    point("peo", 0.0, 0.0, 2.0, 3.0),
    point("peo", 0.5, -0.5, 4.0, 0.0),
    point("peo", 0.5, 0.5, 1.0, 1.0),  # dominated
    point("soup", 0.0, 1.0, 0.0, 2.0),
    point("soup", 1.0, 0.0, 2.0, 0.0),
    point("base", 0.0, 0.0, 1.0, 1.0),
]


def test_summary_has_fronts_and_known_hypervolumes():
    document = summarise(HAND_MADE)
    # scores span 0..4 on both axes, so the reference sits 0.4 below each minimum
    assert document["reference_point"] == {"help_score": -0.4, "harm_score": -0.4}
    assert [p["help_score"] for p in document["fronts"]["peo"]] == [0.0, 2.0, 4.0]
    # peo: slabs 0.4·4.4 + 2·3.4 + 2·0.4 = 9.36; soup: 0.4·2.4 + 2·0.4 = 1.76; base: 1.4²
    assert document["hypervolume"]["peo"] == pytest.approx(9.36)
    assert document["hypervolume"]["soup"] == pytest.approx(1.76)
    assert document["hypervolume"]["base"] == pytest.approx(1.96)
    assert set(document["hypervolume"]) == {"peo", "soup", "base"}
    assert len(document["points"]) == len(HAND_MADE)


def test_summary_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'ties'"):
        summarise([point("ties", 0.0, 0.0, 1.0, 1.0)])


def test_outputs_follow_their_schemas(tmp_path):
    write_outputs(HAND_MADE, tmp_path)
    document = json.loads((tmp_path / PARETO_FILE).read_text())
    assert set(document) == {
        "reference_point",
        "hypervolume",
        "fronts",
        "points",
        "preference_map_kind",
    }
    assert document["preference_map_kind"] == "front"
    for entry in document["points"]:
        assert set(entry) == {"method", "alpha", "beta", "coefficients", "help_score", "harm_score"}

    mapping = PreferenceMap.from_json(json.loads((tmp_path / MAP_FILE).read_text()))
    assert mapping.coefficients(0.0) == (-0.5, 0.5)  # most harmless end of the front
    assert mapping.coefficients(1.0) == (0.5, -0.5)  # most helpful end
    assert mapping.coefficients(0.5) == (0.0, 0.0)

    assert (tmp_path / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_point_front_maps_every_position_to_it(tmp_path):
    points = [point("peo", 0.5, 0.0, 3.0, 3.0), point("peo", 1.0, -0.5, 2.0, 1.0)]
    document = write_outputs(points, tmp_path)
    assert document["preference_map_kind"] == "single_point"
    mapping = PreferenceMap.from_json(json.loads((tmp_path / MAP_FILE).read_text()))
    assert mapping.coefficients(0.0) == (0.5, 0.0)
    assert mapping.coefficients(1.0) == (0.5, 0.0)


def test_outputs_need_peo_points(tmp_path):
    with pytest.raises(ValueError, match="no PEO points"):
        write_outputs([p for p in HAND_MADE if p["method"] != "peo"], tmp_path)


def test_candidate_key_ignores_coefficient_order():
    first = Candidate("peo", 0.0, 0.0, {"helpfulness": 0.5, "harmlessness": 0.5})
    second = Candidate("peo", 0.0, 0.0, {"harmlessness": 0.5, "helpfulness": 0.5})
    assert first.key() == second.key()
