"""Tests for the task vector file format, the bundle loader and the checks against a base model.

Every file here is a real safetensors or JSON file written to ``tmp_path``. Each error test checks
that the message names the offending file and, where one exists, the tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from peo_merge.bundle import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    PARETO_FILE,
    PREFERENCE_MAP_FILE,
    BundleError,
    Manifest,
    VectorEntry,
    load_bundle,
    read_manifest,
    write_manifest,
)
from peo_merge.fused_model import base_state
from peo_merge.task_vector import TaskVector, load_task_vector, save_task_vector
from peo_merge.validation import validate_against_base

torch.set_num_threads(1)

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
V_PROJ = "model.layers.1.self_attn.v_proj.weight"
K_PROJ = "model.layers.0.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def tiny_base_state() -> dict[str, torch.Tensor]:
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return base_state(LlamaForCausalLM(config).eval())


def _factors(
    out_features: int, in_features: int, rank: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lora_a = torch.randn(rank, in_features, generator=generator)
    lora_b = torch.randn(out_features, rank, generator=generator)
    return lora_a, lora_b


def _lowrank_vector(name: str, seed: int, rank: int = 4) -> TaskVector:
    """A vector on q_proj (32 x 32) and v_proj (16 x 32) of the tiny Llama."""
    factors = {Q_PROJ: _factors(32, 32, rank, seed), V_PROJ: _factors(16, 32, rank, seed + 100)}
    return TaskVector(name, "lowrank", 2.0, factors=factors)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _default_vectors() -> dict[str, TaskVector]:
    return {
        "helpfulness": _lowrank_vector("helpfulness", 1),
        "harmlessness": _lowrank_vector("harmlessness", 2),
    }


def _write_bundle(
    root, vectors: dict[str, TaskVector] | None = None, with_sha256: bool = True
) -> Manifest:
    """Write a bundle of low-rank helpfulness and harmlessness vectors, returning its manifest."""
    if vectors is None:
        vectors = _default_vectors()
    entries = {}
    for name, vector in vectors.items():
        relative = f"vectors/{name}.safetensors"
        save_task_vector(vector, root / relative)
        entries[name] = VectorEntry(
            file=relative,
            kind=vector.kind,
            target_modules=("q_proj", "v_proj"),
            rank=vector.rank,
            scaling=vector.scaling,
            sha256=_sha256(root / relative) if with_sha256 else None,
        )
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name="tiny-test",
        base_model={"origin": "tiny-llama"},
        vectors=entries,
    )
    write_manifest(root, manifest)
    return manifest


def _edit_manifest_json(root, edit) -> None:
    path = root / MANIFEST_FILE
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _assert_factors_equal(actual: TaskVector, expected: TaskVector) -> None:
    assert sorted(actual.factors) == sorted(expected.factors)
    for target, (lora_a, lora_b) in expected.factors.items():
        assert torch.equal(actual.factors[target][0], lora_a), target
        assert torch.equal(actual.factors[target][1], lora_b), target


# Task vector files


def test_task_vector_lowrank_round_trip(tmp_path):
    vector = _lowrank_vector("helpfulness", seed=1)
    path = tmp_path / "helpfulness.safetensors"

    save_task_vector(vector, path)
    loaded = load_task_vector(path, "helpfulness", "lowrank", 2.0)

    assert loaded.name == "helpfulness"
    assert loaded.kind == "lowrank"
    assert loaded.scaling == 2.0
    assert loaded.rank == 4
    assert loaded.targets == sorted([Q_PROJ, V_PROJ])
    _assert_factors_equal(loaded, vector)


def test_task_vector_dense_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(3)
    deltas = {
        Q_PROJ: torch.randn(32, 32, generator=generator),
        K_PROJ: torch.randn(16, 32, generator=generator),
    }
    vector = TaskVector("generalist", "dense", deltas=deltas)
    path = tmp_path / "generalist.safetensors"

    save_task_vector(vector, path)
    loaded = load_task_vector(path, "generalist", "dense", 1.0)

    assert loaded.kind == "dense"
    assert loaded.rank is None
    assert loaded.targets == sorted(deltas)
    for target, delta in deltas.items():
        assert torch.equal(loaded.deltas[target], delta), target


def test_task_vector_round_trip_with_bf16_storage(tmp_path):
    vector = _lowrank_vector("helpfulness", seed=1)
    path = tmp_path / "helpfulness.safetensors"

    save_task_vector(vector, path, dtype=torch.bfloat16)
    loaded = load_task_vector(path, "helpfulness", "lowrank", 2.0)

    for target, (lora_a, lora_b) in vector.factors.items():
        assert loaded.factors[target][0].dtype == torch.bfloat16
        assert torch.equal(loaded.factors[target][0], lora_a.to(torch.bfloat16)), target
        assert torch.equal(loaded.factors[target][1], lora_b.to(torch.bfloat16)), target


def test_task_vector_lora_a_without_lora_b(tmp_path):
    lora_a, _ = _factors(32, 32, 4, seed=1)
    path = tmp_path / "vector.safetensors"
    save_file({Q_PROJ + ".lora_A": lora_a}, str(path))

    with pytest.raises(ValueError) as caught:
        load_task_vector(path, "helpfulness", "lowrank", 1.0)

    message = str(caught.value)
    assert str(path) in message
    assert Q_PROJ + ".lora_A" in message
    assert Q_PROJ + ".lora_B" in message


def test_task_vector_lora_b_without_lora_a(tmp_path):
    _, lora_b = _factors(32, 32, 4, seed=1)
    path = tmp_path / "vector.safetensors"
    save_file({Q_PROJ + ".lora_B": lora_b}, str(path))

    with pytest.raises(ValueError) as caught:
        load_task_vector(path, "helpfulness", "lowrank", 1.0)

    message = str(caught.value)
    assert str(path) in message
    assert Q_PROJ + ".lora_B" in message


def test_task_vector_mismatched_ranks(tmp_path):
    q_a, q_b = _factors(32, 32, 4, seed=1)
    v_a, v_b = _factors(16, 32, 2, seed=2)
    tensors = {
        Q_PROJ + ".lora_A": q_a,
        Q_PROJ + ".lora_B": q_b,
        V_PROJ + ".lora_A": v_a,
        V_PROJ + ".lora_B": v_b,
    }
    path = tmp_path / "vector.safetensors"
    save_file(tensors, str(path))

    with pytest.raises(ValueError) as caught:
        load_task_vector(path, "helpfulness", "lowrank", 1.0)

    message = str(caught.value)
    assert str(path) in message
    assert "rank" in message
    # Keys are checked in sorted order, so the second target is the one reported.
    assert V_PROJ + ".lora_A" in message


def test_task_vector_incompatible_factor_shapes(tmp_path):
    lora_a = torch.zeros(4, 32)
    lora_b = torch.zeros(32, 3)
    path = tmp_path / "vector.safetensors"
    save_file({Q_PROJ + ".lora_A": lora_a, Q_PROJ + ".lora_B": lora_b}, str(path))

    with pytest.raises(ValueError) as caught:
        load_task_vector(path, "helpfulness", "lowrank", 1.0)

    message = str(caught.value)
    assert str(path) in message
    assert Q_PROJ in message
    assert "(4, 32)" in message
    assert "(32, 3)" in message


def test_task_vector_truncated_file(tmp_path):
    path = tmp_path / "vector.safetensors"
    save_task_vector(_lowrank_vector("helpfulness", seed=1), path)
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size - 16)

    with pytest.raises(ValueError) as caught:
        load_task_vector(path, "helpfulness", "lowrank", 1.0)

    assert str(path) in str(caught.value)


def test_task_vector_unsupported_dtype(tmp_path):
    path = tmp_path / "vector.safetensors"
    lora_a = torch.zeros(4, 32, dtype=torch.int32)
    lora_b = torch.zeros(32, 4)
    save_file({Q_PROJ + ".lora_A": lora_a, Q_PROJ + ".lora_B": lora_b}, str(path))

    with pytest.raises(ValueError) as caught:
        load_task_vector(path, "helpfulness", "lowrank", 1.0)

    message = str(caught.value)
    assert str(path) in message
    assert Q_PROJ + ".lora_A" in message
    assert "int32" in message


def test_task_vector_unknown_kind(tmp_path):
    path = tmp_path / "vector.safetensors"
    save_task_vector(_lowrank_vector("helpfulness", seed=1), path)

    with pytest.raises(ValueError) as caught:
        load_task_vector(path, "helpfulness", "sparse", 1.0)

    message = str(caught.value)
    assert str(path) in message
    assert "sparse" in message


def test_task_vector_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_task_vector(tmp_path / "absent.safetensors", "helpfulness", "lowrank", 1.0)


# Bundles


def test_bundle_round_trip(tmp_path, tiny_base_state):
    help_vector = _lowrank_vector("helpfulness", seed=1)
    harm_vector = _lowrank_vector("harmlessness", seed=2)
    manifest = _write_bundle(tmp_path, {"helpfulness": help_vector, "harmlessness": harm_vector})

    bundle = load_bundle(tmp_path)

    assert bundle.path == tmp_path
    assert bundle.manifest == manifest
    assert sorted(bundle.vectors) == ["harmlessness", "helpfulness"]
    assert bundle.vectors["helpfulness"].scaling == 2.0
    _assert_factors_equal(bundle.vectors["helpfulness"], help_vector)
    _assert_factors_equal(bundle.vectors["harmlessness"], harm_vector)
    assert bundle.preference_map is None
    validate_against_base(bundle, tiny_base_state)


def test_bundle_reads_preference_map(tmp_path):
    _write_bundle(tmp_path)
    points = {"points": [{"preference": 0.0, "helpfulness": 0.0, "harmlessness": 1.0}]}
    (tmp_path / PREFERENCE_MAP_FILE).write_text(json.dumps(points))

    bundle = load_bundle(tmp_path)

    assert bundle.preference_map == points


def test_bundle_reads_pareto_summary_without_points(tmp_path):
    _write_bundle(tmp_path)
    document = {
        "reference_point": {"help_score": -1.0, "harm_score": -2.0},
        "hypervolume": {"peo": 0.5, "soup": 0.25},
        "fronts": {"peo": [{"alpha": 0.0, "beta": 1.0, "help_score": 0.1, "harm_score": 0.2}]},
        "points": [{"method": "peo"}] * 3,
    }
    (tmp_path / PARETO_FILE).write_text(json.dumps(document))

    bundle = load_bundle(tmp_path)

    assert bundle.pareto == {
        key: document[key] for key in ("reference_point", "hypervolume", "fronts")
    }
    assert load_bundle(_write_bundle_copy(tmp_path)).pareto is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"fronts": {}}', "'hypervolume'"),
    ],
)
def test_bundle_rejects_bad_pareto_file(tmp_path, text, message):
    _write_bundle(tmp_path)
    (tmp_path / PARETO_FILE).write_text(text)
    with pytest.raises(BundleError, match=message):
        load_bundle(tmp_path)


def _write_bundle_copy(source):
    copy = source.parent / f"{source.name}-copy"
    shutil.copytree(source, copy)
    (copy / PARETO_FILE).unlink()
    return copy


def test_bundle_vector_coefficients_add_offset(tmp_path):
    _write_bundle(tmp_path)
    offset = {"helpfulness": 0.25, "harmlessness": 0.75}
    _edit_manifest_json(tmp_path, lambda raw: raw.update(offset=offset))
    bundle = load_bundle(tmp_path)

    coefficients = bundle.vector_coefficients(0.5, -0.5)

    assert coefficients["helpfulness"] == pytest.approx(0.75)
    assert coefficients["harmlessness"] == pytest.approx(0.25)


def test_bundle_missing_manifest(tmp_path):
    with pytest.raises(BundleError) as caught:
        load_bundle(tmp_path)

    assert str(tmp_path / MANIFEST_FILE) in str(caught.value)


def test_bundle_missing_vector_file(tmp_path):
    _write_bundle(tmp_path)
    missing = tmp_path / "vectors" / "harmlessness.safetensors"
    missing.unlink()

    with pytest.raises(BundleError) as caught:
        load_bundle(tmp_path)

    message = str(caught.value)
    assert str(missing) in message
    assert "not found" in message


def test_bundle_unknown_format_version(tmp_path):
    _write_bundle(tmp_path)
    _edit_manifest_json(tmp_path, lambda raw: raw.update(format_version=FORMAT_VERSION + 1))

    with pytest.raises(BundleError) as caught:
        load_bundle(tmp_path)

    message = str(caught.value)
    assert str(tmp_path / MANIFEST_FILE) in message
    assert "format_version" in message


def test_bundle_sha256_mismatch(tmp_path):
    _write_bundle(tmp_path)
    replaced = tmp_path / "vectors" / "helpfulness.safetensors"
    save_task_vector(_lowrank_vector("helpfulness", seed=9), replaced)

    with pytest.raises(BundleError) as caught:
        load_bundle(tmp_path)

    message = str(caught.value)
    assert str(replaced) in message
    assert "sha256" in message


def test_bundle_without_sha256_skips_hash_check(tmp_path):
    _write_bundle(tmp_path, with_sha256=False)
    replaced = tmp_path / "vectors" / "helpfulness.safetensors"
    save_task_vector(_lowrank_vector("helpfulness", seed=9), replaced)

    bundle = load_bundle(tmp_path)

    assert bundle.manifest.vectors["helpfulness"].sha256 is None


def test_bundle_truncated_vector_file(tmp_path):
    _write_bundle(tmp_path, with_sha256=False)
    truncated = tmp_path / "vectors" / "helpfulness.safetensors"
    os.truncate(truncated, truncated.stat().st_size // 2)

    with pytest.raises(BundleError) as caught:
        load_bundle(tmp_path)

    assert str(truncated) in str(caught.value)


def test_bundle_rank_differs_from_manifest(tmp_path):
    _write_bundle(tmp_path)
    _edit_manifest_json(tmp_path, lambda raw: raw["vectors"]["helpfulness"].update(rank=8))

    with pytest.raises(BundleError) as caught:
        load_bundle(tmp_path)

    message = str(caught.value)
    assert str(tmp_path / "vectors" / "helpfulness.safetensors") in message
    assert "rank" in message


def test_bundle_target_outside_declared_modules(tmp_path):
    _write_bundle(tmp_path)
    _edit_manifest_json(
        tmp_path, lambda raw: raw["vectors"]["helpfulness"].update(target_modules=["q_proj"])
    )

    with pytest.raises(BundleError) as caught:
        load_bundle(tmp_path)

    message = str(caught.value)
    assert str(tmp_path / "vectors" / "helpfulness.safetensors") in message
    assert V_PROJ in message


def test_bundle_vector_tensor_not_in_base(tmp_path, tiny_base_state):
    absent = "model.layers.7.self_attn.q_proj.weight"
    factors = {absent: _factors(32, 32, 4, seed=1)}
    help_vector = TaskVector("helpfulness", "lowrank", 1.0, factors=factors)
    _write_bundle(tmp_path, {**_default_vectors(), "helpfulness": help_vector})
    bundle = load_bundle(tmp_path)

    with pytest.raises(BundleError) as caught:
        validate_against_base(bundle, tiny_base_state)

    message = str(caught.value)
    assert str(tmp_path / "vectors" / "helpfulness.safetensors") in message
    assert absent in message


def test_bundle_lowrank_shape_mismatch_with_base(tmp_path, tiny_base_state):
    # v_proj of the tiny Llama is 16 x 32, but these factors multiply out to 32 x 32.
    factors = {V_PROJ: _factors(32, 32, 4, seed=1)}
    help_vector = TaskVector("helpfulness", "lowrank", 1.0, factors=factors)
    _write_bundle(tmp_path, {**_default_vectors(), "helpfulness": help_vector})
    bundle = load_bundle(tmp_path)

    with pytest.raises(BundleError) as caught:
        validate_against_base(bundle, tiny_base_state)

    message = str(caught.value)
    assert str(tmp_path / "vectors" / "helpfulness.safetensors") in message
    assert V_PROJ in message
    assert "(32, 32)" in message
    assert "(16, 32)" in message


def test_bundle_dense_shape_mismatch_with_base(tmp_path, tiny_base_state):
    dense = TaskVector("harmlessness", "dense", deltas={V_PROJ: torch.zeros(32, 32)})
    vectors = {"helpfulness": _lowrank_vector("helpfulness", 1), "harmlessness": dense}
    _write_bundle(tmp_path, vectors)
    bundle = load_bundle(tmp_path)

    with pytest.raises(BundleError) as caught:
        validate_against_base(bundle, tiny_base_state)

    message = str(caught.value)
    assert str(tmp_path / "vectors" / "harmlessness.safetensors") in message
    assert V_PROJ in message


@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_bundle_non_finite_factor(tmp_path, tiny_base_state, bad_value):
    help_vector = _lowrank_vector("helpfulness", seed=1)
    help_vector.factors[V_PROJ][1][3, 1] = bad_value
    _write_bundle(tmp_path, {**_default_vectors(), "helpfulness": help_vector})
    bundle = load_bundle(tmp_path)

    with pytest.raises(BundleError) as caught:
        validate_against_base(bundle, tiny_base_state)

    message = str(caught.value)
    assert str(tmp_path / "vectors" / "helpfulness.safetensors") in message
    assert V_PROJ + ".lora_B" in message


def test_bundle_missing_helpfulness_vector(tmp_path):
    _write_bundle(tmp_path)
    _edit_manifest_json(tmp_path, lambda raw: raw["vectors"].pop("helpfulness"))

    with pytest.raises(BundleError) as caught:
        read_manifest(tmp_path)

    message = str(caught.value)
    assert str(tmp_path / MANIFEST_FILE) in message
    assert "helpfulness" in message


def test_manifest_requires_helpfulness_vector():
    entry = VectorEntry(
        file="vectors/harmlessness.safetensors", kind="lowrank", target_modules=("q_proj",)
    )

    with pytest.raises(ValidationError, match="helpfulness"):
        Manifest(
            format_version=FORMAT_VERSION,
            name="x",
            base_model={},
            vectors={"harmlessness": entry},
        )


@pytest.mark.parametrize(
    "escaping_path", ["../x.safetensors", "vectors/../../x.safetensors", "/tmp/x.safetensors"]
)
def test_bundle_vector_path_escaping_bundle(tmp_path, escaping_path):
    _write_bundle(tmp_path)
    _edit_manifest_json(
        tmp_path, lambda raw: raw["vectors"]["helpfulness"].update(file=escaping_path)
    )

    with pytest.raises(BundleError) as caught:
        load_bundle(tmp_path)

    message = str(caught.value)
    assert str(tmp_path / MANIFEST_FILE) in message
    assert escaping_path in message


def test_vector_entry_rejects_parent_path():
    with pytest.raises(ValidationError, match="inside the bundle"):
        VectorEntry(file="../x", kind="lowrank", target_modules=("q_proj",))


def test_bundle_manifest_invalid_json(tmp_path):
    _write_bundle(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")

    with pytest.raises(BundleError) as caught:
        load_bundle(tmp_path)

    message = str(caught.value)
    assert str(tmp_path / MANIFEST_FILE) in message
    assert "invalid JSON" in message


def test_bundle_bounds_exclude_unit_interval(tmp_path, tiny_base_state):
    _write_bundle(tmp_path)
    bounds = {"min": 0.0, "max": 0.5}
    _edit_manifest_json(tmp_path, lambda raw: raw.update(coefficient_bounds=bounds))
    bundle = load_bundle(tmp_path)

    with pytest.raises(BundleError) as caught:
        validate_against_base(bundle, tiny_base_state)

    assert "coefficient_bounds" in str(caught.value)
