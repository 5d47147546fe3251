"""The whole offline pipeline from one config, on a tiny random Llama and a tiny random encoder.

Every phase runs for real with tiny settings: DPO for both aspects, the scorers, the generalist,
the mixed-data baseline, the search and the final bundle. The test checks each output file's
schema, that the server's loader accepts the bundle, and that a second run skips every phase.
"""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image
from transformers import AutoTokenizer

from peo_merge.bundle import BundleError, load_bundle, read_manifest
from peo_merge.preference_map import PreferenceMap
from tests.test_training import write_pairs
from tests.tiny_model import write_tiny_base, write_tiny_encoder
from training.bundle_writer import write_bundle
from training.pipeline import (
    PHASE_FILE,
    STARTED_FILE,
    Phases,
    PipelineConfig,
    held_out_prompts,
    run_pipeline,
)
from training.report import METHODS
from training.reward import default_encoder

PHASES = [
    "helpfulness",
    "harmlessness",
    "aspect_bundle",
    "scorer_helpfulness",
    "scorer_harmlessness",
    "generalist",
    "mixed",
    "search",
    "bundle",
    "slider",
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    write_pairs(root / "help.jsonl", 40)
    write_pairs(root / "harm.jsonl", 30)
    config = PipelineConfig.model_validate(
        {
            "base_model": str(write_tiny_base(root / "base")),
            "helpfulness_data": [str(root / "help.jsonl")],
            "harmlessness_data": [str(root / "harm.jsonl")],
            "work_dir": str(root / "work"),
            "bundle_dir": str(root / "bundle"),
            "bundle_name": "tiny",
            "threads": 1,
            "dpo": {
                "steps": 2,
                "batch_size": 2,
                "gradient_accumulation": 1,
                "max_length": 96,
                "max_prompt_tokens": 64,
                "lora_rank": 2,
                "lora_alpha": 4.0,
                "lora_targets": ["q_proj", "v_proj"],
                "save_every": 1,
            },
            "scorer": {
                "encoder": str(
                    write_tiny_encoder(
                        root / "encoder", AutoTokenizer.from_pretrained(default_encoder()), layers=1
                    )
                ),
                "batch_size": 8,
                "max_length": 64,
                "learning_rate": 1e-3,
            },
            "search": {
                "alphas": [-0.5, 0.5, 1.5],
                "betas": [-0.5, 0.5, 1.5],
                "soup_points": 3,
                "prompts_per_aspect": 2,
                "max_prompt_tokens": 64,
                "max_new_tokens": 3,
                "batch_size": 8,
                "candidates_per_batch": 3,
            },
        }
    )
    first = run_pipeline(config)
    return config, first


def test_first_run_runs_every_phase(pipeline):
    config, first = pipeline
    assert first == {"ran": PHASES, "skipped": []}
    for phase in PHASES:
        record = json.loads((config.work_dir / phase / PHASE_FILE).read_text())
        assert record["phase"] == phase
        assert len(record["config_sha256"]) == 64


def test_second_run_skips_every_phase(pipeline):
    config, _ = pipeline
    assert run_pipeline(config) == {"ran": [], "skipped": PHASES}


def test_changed_search_reruns_search_and_bundle(pipeline):
    config, _ = pipeline
    points_file = config.work_dir / "search" / "points.jsonl"
    before = points_file.stat().st_mtime_ns
    search_record = json.loads((config.work_dir / "search" / PHASE_FILE).read_text())
    changed = config.model_copy(
        update={"search": config.search.model_copy(update={"max_new_tokens": 2})}
    )
    result = run_pipeline(changed)
    assert result["ran"] == ["search", "bundle", "slider"]
    points = points_file.read_text().splitlines()
    assert len(points) == 9 + 3 + 4  # the grid, soup, and base, aspects alone, mixed DPO
    # the points were generated again under the new setting, in a file written afresh
    assert points_file.stat().st_mtime_ns > before
    new_record = json.loads((config.work_dir / "search" / PHASE_FILE).read_text())
    assert new_record["config_sha256"] != search_record["config_sha256"]


def test_bundle_holds_vectors_offset_and_phases(pipeline):
    config, _ = pipeline
    bundle = load_bundle(config.bundle_dir)
    assert set(bundle.vectors) == {"helpfulness", "harmlessness", "generalist"}
    manifest = bundle.manifest
    assert manifest.offset == {"helpfulness": 0.5, "harmlessness": 0.5, "generalist": 1.0}
    generalist = manifest.vectors["generalist"].recipe
    assert generalist["init"]["lambda"] == 0.5
    assert "θ₀ + 0.5·τ_helpfulness + 0.5·τ_harmlessness" in generalist["method"]
    for phase in ("aspect_learning", "scorers", "generalist", "mixed_dpo_baseline", "search"):
        assert phase in manifest.phases
    points = (config.work_dir / "search" / "points.jsonl").read_text().splitlines()
    assert manifest.phases["search"] == pytest.approx(
        sum(json.loads(line)["seconds"] for line in points), abs=0.1
    )
    assert bundle.preference_map is not None


def test_pareto_json_schema(pipeline):
    config, _ = pipeline
    document = json.loads((config.bundle_dir / "pareto.json").read_text())
    assert set(document["hypervolume"]) == set(METHODS)
    assert all(volume >= 0 for volume in document["hypervolume"].values())
    assert set(document["fronts"]) == set(METHODS)
    methods = [point["method"] for point in document["points"]]
    assert methods.count("peo") == 9
    assert methods.count("soup") == 3
    for point in document["points"]:
        assert isinstance(point["help_score"], float)
        assert isinstance(point["harm_score"], float)
    assert set(document["reference_point"]) == {"help_score", "harm_score"}


def test_preference_map_and_plot(pipeline):
    config, _ = pipeline
    mapping = PreferenceMap.from_json(
        json.loads((config.bundle_dir / "preference_map.json").read_text())
    )
    alphas = [mapping.coefficients(w / 10)[0] for w in range(11)]
    betas = [mapping.coefficients(w / 10)[1] for w in range(11)]
    assert alphas == sorted(alphas)
    assert betas == sorted(betas, reverse=True)
    with Image.open(config.bundle_dir / "pareto.png") as image:
        assert image.format == "PNG"
        assert image.size[0] > 300


def test_slider_document(pipeline):
    config, _ = pipeline
    document = json.loads((config.bundle_dir / "slider.json").read_text())
    assert document["map_source"] == "pareto"
    # two held-out prompts per aspect, not the ones the search used
    assert document["prompts"] == 4
    assert [row["preference"] for row in document["positions"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    mapping = PreferenceMap.from_json(
        json.loads((config.bundle_dir / "preference_map.json").read_text())
    )
    for row in document["positions"]:
        assert (row["alpha"], row["beta"]) == mapping.coefficients(row["preference"])
        assert row["coefficients"]["generalist"] == 1.0
        assert isinstance(row["help_score"], float)
    for flag in ("help_rises", "harm_falls", "help_monotone", "harm_monotone"):
        assert isinstance(document[flag], bool)
    assert json.loads((config.work_dir / "slider" / "slider.json").read_text()) == document


@pytest.mark.parametrize("positions", [[0.0, 0.5], [0.5, 1.0], [0.0, 1.0, 1.5]])
def test_slider_positions_need_both_ends_within_range(pipeline, positions):
    config, _ = pipeline
    with pytest.raises(ValueError, match="slider_positions"):
        PipelineConfig.model_validate(
            config.model_dump(mode="json") | {"slider_positions": positions}
        )


def test_phase_with_changed_settings_starts_empty(tmp_path):
    phases = Phases(tmp_path)
    phases.run("train", {"rate": 1}, lambda folder: (folder / "checkpoint").write_text("old"))
    seen = []
    phases.run("train", {"rate": 2}, lambda folder: seen.extend(p.name for p in folder.iterdir()))
    assert seen == [STARTED_FILE]


def test_interrupted_phase_resumes_in_its_folder(tmp_path):
    phases = Phases(tmp_path)

    def interrupted(folder):
        (folder / "checkpoint").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        phases.run("train", {"rate": 1}, interrupted)
    assert not (tmp_path / "train" / PHASE_FILE).exists()
    seen = []
    phases.run(
        "train", {"rate": 1}, lambda folder: seen.append((folder / "checkpoint").read_text())
    )
    assert seen == ["half"]
    assert phases.ran == ["train"]


def test_existing_aspect_bundle_replaces_phase_one(pipeline, tmp_path):
    config, _ = pipeline
    aspects = config.work_dir / "aspect_bundle"
    reused = config.model_copy(
        update={
            "aspect_bundle": aspects,
            "work_dir": tmp_path / "work",
            "bundle_dir": tmp_path / "bundle",
        }
    )
    result = run_pipeline(reused)
    assert result == {"ran": PHASES[3:], "skipped": []}
    assert not (tmp_path / "work" / "helpfulness").exists()
    source = read_manifest(aspects).vectors
    final = load_bundle(tmp_path / "bundle")
    for name in ("helpfulness", "harmlessness"):
        entry = final.manifest.vectors[name]
        # copied byte for byte, recipe included
        assert entry.sha256 == source[name].sha256
        assert entry.recipe == source[name].recipe
        assert (
            final.manifest.phases["aspect_learning"][name]
            == source[name].recipe["wall_time_seconds"]
        )
    generalist = final.manifest.vectors["generalist"].recipe
    assert generalist["init"]["vector_sha256"] == {
        name: source[name].sha256 for name in ("helpfulness", "harmlessness")
    }


def test_aspect_bundle_without_an_aspect_is_an_error(pipeline, tmp_path):
    config, _ = pipeline
    partial = tmp_path / "partial"
    shutil.copytree(config.work_dir / "aspect_bundle", partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    del manifest["vectors"]["harmlessness"]
    (partial / "manifest.json").write_text(json.dumps(manifest))
    broken = config.model_copy(update={"aspect_bundle": partial, "work_dir": tmp_path / "work"})
    with pytest.raises(BundleError, match="harmlessness"):
        run_pipeline(broken)
    assert not (tmp_path / "work" / "generalist").exists()


def test_copy_into_own_bundle_rejected(pipeline):
    config, _ = pipeline
    with pytest.raises(ValueError, match="into itself"):
        write_bundle({}, config.bundle_dir, "same", copies={"helpfulness": config.bundle_dir})
    # the bundle is untouched
    assert load_bundle(config.bundle_dir).manifest.name == "tiny"


def test_unbegun_folder_wiped_unless_adopted(tmp_path):
    for adopt, expected in (((), [STARTED_FILE]), (("train",), ["checkpoint", STARTED_FILE])):
        work = tmp_path / str(bool(adopt))
        (work / "train").mkdir(parents=True)
        (work / "train" / "checkpoint").write_text("by hand")
        seen = []
        Phases(work, adopt).run(
            "train",
            {"rate": 1},
            lambda folder, seen=seen: seen.extend(p.name for p in folder.iterdir()),
        )
        assert sorted(seen) == expected


def test_adopt_wipes_a_folder_begun_under_other_settings(tmp_path):
    Phases(tmp_path).run(
        "train", {"rate": 1}, lambda folder: (folder / "checkpoint").write_text("old")
    )
    (tmp_path / "train" / PHASE_FILE).unlink()  # interrupted before it finished
    seen = []
    Phases(tmp_path, ("train",)).run(
        "train", {"rate": 2}, lambda folder: seen.extend(p.name for p in folder.iterdir())
    )
    assert seen == [STARTED_FILE]


def test_slider_prompts_follow_the_search_prompts(pipeline):
    config, _ = pipeline
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    search = held_out_prompts(config, tokenizer, start=0)
    slider = held_out_prompts(config, tokenizer, start=config.search.prompts_per_aspect)
    assert len(search) == len(slider) == 2 * config.search.prompts_per_aspect
    assert not {prompt for prompt, _ in search} & {prompt for prompt, _ in slider}


def test_too_few_held_out_pairs_is_an_error(pipeline):
    config, _ = pipeline
    greedy = config.model_copy(
        update={"search": config.search.model_copy(update={"prompts_per_aspect": 50})}
    )
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    with pytest.raises(ValueError, match="prompts_per_aspect is 50"):
        held_out_prompts(greedy, tokenizer, start=0)


def test_bundle_dir_must_differ_from_aspect_bundle(pipeline):
    config, _ = pipeline
    with pytest.raises(ValueError, match="aspect_bundle and bundle_dir are both"):
        PipelineConfig.model_validate(
            config.model_dump(mode="json")
            | {"aspect_bundle": str(config.bundle_dir), "bundle_dir": str(config.bundle_dir)}
        )
