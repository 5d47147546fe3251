"""The generalist phase on a tiny random Llama: fusing θ_init, training τ_gen, recording both.

The base and the aspect vectors are random, so nothing is learned. The tests check that θ_init
is the intended interpolation, and that the run trains on top of it and records it.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from peo_merge.bundle import load_bundle
from peo_merge.fused_model import base_state
from peo_merge.task_vector import load_task_vector
from tests.test_training import tiny_run_config, write_pairs
from tests.tiny_model import write_tiny_base, write_tiny_bundle
from training.dpo import RECORD_FILE, VECTOR_FILE
from training.generalist import fuse_into_model, init_coefficients, train_generalist


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generalist")
    base = write_tiny_base(folder / "base")
    bundle = write_tiny_bundle(folder / "bundle", base)
    return folder, base, bundle


def test_init_coefficients_interpolate():
    assert init_coefficients(0.5) == {"helpfulness": 0.5, "harmlessness": 0.5}
    assert init_coefficients(0.25) == {"helpfulness": 0.25, "harmlessness": 0.75}


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_init_coefficients_reject_extrapolation(weight):
    with pytest.raises(ValueError, match=r"allowed: a number in \[0, 1\]"):
        init_coefficients(weight)


def test_fused_init_matches_interpolation(tiny):
    _, base, bundle_path = tiny
    model = LlamaForCausalLM.from_pretrained(base)
    original = {name: tensor.clone() for name, tensor in base_state(model).items()}
    fuse_into_model(model, bundle_path, {"helpfulness": 0.3, "harmlessness": 0.7})

    bundle = load_bundle(bundle_path)
    fused = base_state(model)
    help_vector, harm_vector = bundle.vectors["helpfulness"], bundle.vectors["harmlessness"]
    for name, tensor in fused.items():
        if name not in help_vector.targets:
            assert torch.equal(tensor, original[name]), name
            continue
        expected = original[name].double()
        for weight, vector in ((0.3, help_vector), (0.7, harm_vector)):
            lora_a, lora_b = vector.factors[name]
            expected += weight * vector.scaling * (lora_b.double() @ lora_a.double())
        assert torch.allclose(tensor.double(), expected, atol=1e-5), name


def test_fuse_names_a_missing_vector(tiny):
    _, base, bundle_path = tiny
    model = LlamaForCausalLM.from_pretrained(base)
    with pytest.raises(KeyError, match="has no vector 'generalist'"):
        fuse_into_model(model, bundle_path, {"generalist": 1.0})


def test_generalist_run_trains_and_records_init(tiny, monkeypatch):
    folder, base, bundle_path = tiny
    import training.generalist as generalist

    started_from = {}
    real_train_aspect = generalist.train_aspect

    def recording_train_aspect(config, model=None, tokenizer=None, expected_init=None):
        started_from.update({k: v.clone() for k, v in base_state(model).items()})
        return real_train_aspect(
            config, model=model, tokenizer=tokenizer, expected_init=expected_init
        )

    monkeypatch.setattr(generalist, "train_aspect", recording_train_aspect)
    data = folder / "mixed.jsonl"
    write_pairs(data, 30)
    config = tiny_run_config("mixed", data, folder / "run", base)
    vector_path = train_generalist(config, bundle_path, init_weight=0.5)
    assert vector_path == config.output_dir / VECTOR_FILE

    # training started from θ_init, not from θ₀
    expected = LlamaForCausalLM.from_pretrained(base)
    fuse_into_model(expected, bundle_path, init_coefficients(0.5))
    for name, tensor in base_state(expected).items():
        assert torch.equal(started_from[name], tensor), name

    record = json.loads((config.output_dir / RECORD_FILE).read_text())
    assert record["steps"] == 2
    assert record["aspect"] == "mixed"
    assert record["init"]["lambda"] == 0.5
    assert record["init"]["coefficients"] == {"helpfulness": 0.5, "harmlessness": 0.5}
    assert set(record["init"]["vector_sha256"]) == {"helpfulness", "harmlessness"}
    assert all(len(digest) == 64 for digest in record["init"]["vector_sha256"].values())

    vector = load_task_vector(vector_path, "generalist", "lowrank", 2.0)
    assert len(vector.targets) == 4
    assert any(vector.factors[t][1].abs().max() > 0 for t in vector.targets)


def test_finished_generalist_is_kept(tiny):
    folder, base, bundle_path = tiny
    config = tiny_run_config("mixed", folder / "mixed.jsonl", folder / "run", base)
    record_path = config.output_dir / RECORD_FILE
    before = record_path.stat().st_mtime_ns
    assert train_generalist(config, bundle_path, init_weight=0.5) == config.output_dir / VECTOR_FILE
    assert record_path.stat().st_mtime_ns == before


def test_run_begun_from_another_init_is_rejected(tiny):
    folder, base, bundle_path = tiny
    config = tiny_run_config("mixed", folder / "mixed.jsonl", folder / "run", base)
    with pytest.raises(ValueError, match="another θ_init"):
        train_generalist(config, bundle_path, init_weight=0.25)
