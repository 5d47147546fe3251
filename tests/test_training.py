"""DPO training of a task vector on a tiny random Llama: training, resuming and exporting.

The base is tiny and random, so nothing is learned; the test covers the machinery: TRL's
DPOTrainer with a PEFT LoRA, checkpoints, the exported vector and the record.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from transformers import LlamaForCausalLM

from peo_merge.fused_model import base_state
from peo_merge.task_vector import load_task_vector
from tests.tiny_model import write_tiny_base
from training.config import AspectRunConfig
from training.dpo import (
    RECORD_FILE,
    VECTOR_FILE,
    export_newest_checkpoint,
    finished_vector,
    train_aspect,
)
from training.dpo import main as run_dpo_command


def write_pairs(path, count: int) -> None:
    rows = [
        {
            "chosen": f"\n\nHuman: What is {i} plus {i}?\n\nAssistant: It is {2 * i}.",
            "rejected": f"\n\nHuman: What is {i} plus {i}?\n\nAssistant: I will not say.",
        }
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def tiny_run_config(aspect, data, output_dir, base) -> AspectRunConfig:
    """Return a two-step DPO run with a rank-2 LoRA, small enough for a tiny Llama."""
    return AspectRunConfig(
        aspect=aspect,
        data=(data,),
        output_dir=output_dir,
        base_model=str(base),
        steps=2,
        batch_size=2,
        gradient_accumulation=1,
        max_length=96,
        max_prompt_tokens=64,
        lora_rank=2,
        lora_alpha=4.0,
        lora_targets=("q_proj", "v_proj"),
        save_every=1,
        threads=1,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("training")
    base = write_tiny_base(folder / "base")
    data = folder / "pairs.jsonl"
    write_pairs(data, 40)
    config = tiny_run_config("helpfulness", data, folder / "run", base)
    train_aspect(config)
    return config, base


def test_training_writes_vector_and_record(run):
    config, base = run
    record = json.loads((config.output_dir / RECORD_FILE).read_text())
    assert record["steps"] == 2
    assert record["lr_schedule"] == {"kind": "cosine", "warmup_steps": 1, "horizon_steps": 2}
    assert record["effective_batch_size"] == 2
    assert record["train_pairs"] + record["heldout_pairs"] == 40
    assert len(record["data_files"]) == 1

    vector = load_task_vector(config.output_dir / VECTOR_FILE, "helpfulness", "lowrank", 2.0)
    state = base_state(LlamaForCausalLM.from_pretrained(base))
    assert len(vector.targets) == 4  # q_proj and v_proj of two layers
    for target in vector.targets:
        lora_a, lora_b = vector.factors[target]
        assert lora_a.shape[0] == 2
        assert (lora_b.shape[0], lora_a.shape[1]) == tuple(state[target].shape)
    # DPO moved B away from its zero initialisation
    assert any(vector.factors[t][1].abs().max() > 0 for t in vector.targets)


def test_export_of_newest_checkpoint_matches_trained_vector(run, tmp_path):
    config, _ = run
    trained = load_task_vector(config.output_dir / VECTOR_FILE, "helpfulness", "lowrank", 2.0)
    export_newest_checkpoint(config)
    exported = load_task_vector(config.output_dir / VECTOR_FILE, "helpfulness", "lowrank", 2.0)
    record = json.loads((config.output_dir / RECORD_FILE).read_text())
    assert record["steps"] == 2
    for target in trained.targets:
        for mine, theirs in zip(trained.factors[target], exported.factors[target], strict=True):
            assert torch.allclose(mine, theirs)


def test_finished_run_is_kept_under_another_thread_count(run):
    config, _ = run
    record_path = config.output_dir / RECORD_FILE
    before = record_path.stat().st_mtime_ns
    assert train_aspect(config.model_copy(update={"threads": 2})) == (
        config.output_dir / VECTOR_FILE
    )
    # nothing was trained or exported again
    assert record_path.stat().st_mtime_ns == before


@pytest.mark.parametrize(
    "update",
    [
        {"learning_rate": 1e-3},
        {"steps": 5},
        {"seed": 1},
        {"lora_rank": 4},
        {"data_seed": 1},
        {"bf16": True},
        {"sft_weight": 0.5},
    ],
)
def test_changed_settings_do_not_count_as_finished(run, update):
    config, _ = run
    assert finished_vector(config) == config.output_dir / VECTOR_FILE
    assert finished_vector(config.model_copy(update=update)) is None


def test_changed_data_does_not_count_as_finished(run, tmp_path):
    config, _ = run
    data = tmp_path / "pairs.jsonl"
    shutil.copy(config.data[0], data)
    moved = tmp_path / "run"
    shutil.copytree(config.output_dir, moved, ignore=shutil.ignore_patterns("checkpoints"))
    record = json.loads((moved / RECORD_FILE).read_text())
    record["data_files"] = {str(data): record["data_files"].popitem()[1]}
    (moved / RECORD_FILE).write_text(json.dumps(record))
    same = config.model_copy(update={"output_dir": moved, "data": (data,)})
    assert finished_vector(same) == moved / VECTOR_FILE
    # the same path with other contents
    data.write_bytes(data.read_bytes() + b"\n")
    assert finished_vector(same) is None


def test_checkpoints_of_other_settings_are_not_resumed(run):
    config, _ = run
    with pytest.raises(ValueError, match="other learning_rate") as error:
        train_aspect(config.model_copy(update={"learning_rate": 1e-3}))
    assert str(config.output_dir) in str(error.value)


def test_training_resumes_to_more_steps(run):
    config, _ = run
    longer = config.model_copy(update={"steps": 3})
    train_aspect(longer)
    record = json.loads((config.output_dir / RECORD_FILE).read_text())
    assert record["steps"] == 3
    assert (config.output_dir / "checkpoints" / "checkpoint-3").is_dir()


def test_export_without_checkpoint_names_the_folder(tmp_path, run):
    config, _ = run
    empty = config.model_copy(update={"output_dir": tmp_path / "empty"})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export_newest_checkpoint(empty)


def first_step_loss(config) -> float:
    train_aspect(config)
    record = json.loads((config.output_dir / RECORD_FILE).read_text())
    return next(log["loss"] for log in record["final_logs"] if log.get("step") == 1)


def test_nll_term_adds_to_dpo_loss(run, tmp_path):
    config, _ = run
    one_step = {"steps": 1, "save_every": 1}
    dpo = config.model_copy(update={**one_step, "output_dir": tmp_path / "dpo"})
    with_nll = config.model_copy(
        update={**one_step, "output_dir": tmp_path / "nll", "sft_weight": 1.0}
    )
    # the LoRA starts at zero, so the policy equals the reference and DPO's loss is log 2
    assert first_step_loss(dpo) == pytest.approx(math.log(2), abs=1e-3)
    # a random tiny model gives the chosen tokens a mean NLL of several nats
    assert first_step_loss(with_nll) - math.log(2) > 3.0
    record = json.loads((with_nll.output_dir / RECORD_FILE).read_text())
    assert record["config"]["sft_weight"] == 1.0


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--sft-weight", "-1", "--sft-weight -1.0 is invalid: input should be greater than or"),
        ("--steps", "0", "--steps 0 is invalid: input should be greater than 0"),
    ],
)
def test_invalid_option_names_the_option(tmp_path, capsys, option, value, expected):
    argv = ["--aspect", "helpfulness", "--data", str(tmp_path), "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        run_dpo_command([*argv, option, value])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
