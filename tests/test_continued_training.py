"""Training a bundle's vector further: the LoRA's start, its record and its manifest recipe."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from peo_merge.bundle import read_manifest
from peo_merge.task_vector import load_task_vector, save_task_vector, task_vector_from_peft
from tests.test_training import tiny_run_config, write_pairs
from tests.tiny_model import write_tiny_base
from training.bundle_writer import write_bundle
from training.dpo import RECORD_FILE, VECTOR_FILE, finished_vector, train_aspect
from training.runs import settings_differences
from training.start_vector import load_start_factors


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """Two-step runs of both aspects from the base, and the bundle made of them."""
    folder = tmp_path_factory.mktemp("continued")
    base = write_tiny_base(folder / "base")
    data = folder / "pairs.jsonl"
    write_pairs(data, 40)
    config = tiny_run_config("helpfulness", data, folder / "first", base)
    train_aspect(config)
    train_aspect(tiny_run_config("harmlessness", data, folder / "harm", base))
    bundle = folder / "bundle"
    write_first_bundle(config, bundle)
    return config, bundle


def write_first_bundle(config, bundle, helpfulness_run=None):
    runs = {
        "helpfulness": helpfulness_run or config.output_dir,
        "harmlessness": config.output_dir.parent / "harm",
    }
    return write_bundle(runs, bundle, "tiny-first")


@pytest.fixture(scope="module")
def continued(first):
    """Two more steps from the first run's bundle: bf16 autocast, another order, an NLL term."""
    config, bundle = first
    more = config.model_copy(
        update={
            "output_dir": config.output_dir.parent / "more",
            "start_bundle": bundle,
            "data_seed": 1,
            "bf16": True,
            "sft_weight": 0.5,
        }
    )
    train_aspect(more)
    return more


def lora_model(config):
    model = LlamaForCausalLM.from_pretrained(config.base_model)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        target_modules=list(config.lora_targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def test_start_factors_equal_bundle_vector(first):
    config, bundle = first
    model = lora_model(config.model_copy(update={"start_bundle": bundle}))
    assert load_start_factors(model, config.model_copy(update={"start_bundle": bundle})) == 4
    started = task_vector_from_peft(model, "helpfulness")
    entry = read_manifest(bundle).vectors["helpfulness"]
    stored = load_task_vector(bundle / entry.file, "helpfulness", "lowrank", entry.scaling)
    assert sorted(started.targets) == sorted(stored.targets)
    for target in stored.targets:
        for mine, theirs in zip(started.factors[target], stored.factors[target], strict=True):
            assert torch.equal(mine, theirs.float())
    # the B factors no longer have their zero initialisation
    assert any(started.factors[t][1].abs().max() > 0 for t in started.targets)


def test_continued_run_records_start(first, continued):
    _, bundle = first
    record = json.loads((continued.output_dir / RECORD_FILE).read_text())
    entry = read_manifest(bundle).vectors["helpfulness"]
    assert record["start"]["bundle"] == "tiny-first"
    assert record["start"]["sha256"] == entry.sha256
    assert record["start"]["recipe"] == entry.recipe
    assert record["config"]["bf16"] is True
    assert record["config"]["data_seed"] == 1
    assert finished_vector(continued) == continued.output_dir / VECTOR_FILE


def test_continued_vector_differs_from_start(first, continued):
    _, bundle = first
    entry = read_manifest(bundle).vectors["helpfulness"]
    start = load_task_vector(bundle / entry.file, "helpfulness", "lowrank", entry.scaling)
    trained = load_task_vector(continued.output_dir / VECTOR_FILE, "helpfulness", "lowrank", 2.0)
    changes = [
        (trained.factors[t][1] - start.factors[t][1].float()).abs().max() for t in start.targets
    ]
    assert max(changes) > 0


def test_changed_start_vector_is_not_finished(first, continued):
    _, bundle = first
    # same settings and path, other factors: rewrite the vector with its B factors doubled
    vector_file = bundle / "vectors" / "helpfulness.safetensors"
    original = vector_file.read_bytes()
    vector = load_task_vector(vector_file, "helpfulness", "lowrank", 2.0)
    vector.factors = {t: (a, 2 * b) for t, (a, b) in vector.factors.items()}
    save_task_vector(vector, vector_file, dtype=torch.float16)
    try:
        assert finished_vector(continued) is None
    finally:
        vector_file.write_bytes(original)
    assert finished_vector(continued) == continued.output_dir / VECTOR_FILE


@pytest.mark.parametrize(
    ("update", "field"),
    [({"lora_rank": 4}, "rank"), ({"lora_targets": ("q_proj",)}, "target_modules")],
)
def test_start_vector_shape_mismatch(first, tmp_path, update, field):
    config, bundle = first
    wrong = config.model_copy(
        update={**update, "start_bundle": bundle, "output_dir": tmp_path / "run"}
    )
    with pytest.raises(ValueError, match=f"has {field} .* this run's LoRA needs") as error:
        train_aspect(wrong)
    assert str(bundle) in str(error.value)


def test_start_bundle_missing_aspect(first, tmp_path):
    config, bundle = first
    wrong = config.model_copy(
        update={"aspect": "mixed", "start_bundle": bundle, "output_dir": tmp_path / "run"}
    )
    with pytest.raises(
        ValueError,
        match=r"vector 'mixed' not found; the bundle contains \['harmlessness', 'helpfulness'\]",
    ):
        train_aspect(wrong)


def test_manifest_nests_earlier_recipe(first, continued, tmp_path):
    _, bundle = first
    earlier = read_manifest(bundle).vectors["helpfulness"]
    manifest = write_first_bundle(first[0], tmp_path / "b", continued.output_dir)
    recipe = manifest.vectors["helpfulness"].recipe
    assert recipe["continues"]["sha256"] == earlier.sha256
    assert recipe["continues"]["steps"] == earlier.recipe["steps"] == 2
    assert recipe["steps"] == 2
    assert recipe["total_steps"] == 4
    assert recipe["data_seed"] == 1
    assert recipe["bf16_autocast"] is True
    assert recipe["sft_weight"] == 0.5
    assert "plus 0.5 × the per-token NLL of the chosen responses" in recipe["method"]
    assert "continuing the vector of bundle tiny-first" in recipe["method"]
    total = earlier.recipe["wall_time_seconds"] + recipe["wall_time_seconds"]
    assert recipe["total_wall_time_seconds"] == pytest.approx(total, abs=0.11)
    assert manifest.phases["aspect_learning"]["helpfulness"] == recipe["total_wall_time_seconds"]


def test_missing_recorded_settings_use_defaults(first):
    config, _ = first
    recorded = json.loads(config.model_dump_json())
    for newer in ("bf16", "data_seed", "start_bundle", "sft_weight"):
        del recorded[newer]
    assert settings_differences(recorded, config) == []
    assert settings_differences(recorded, config.model_copy(update={"bf16": True})) == ["bf16"]
