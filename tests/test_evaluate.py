"""Tests of the preference-accuracy evaluation: response scoring, padding, accuracy and data split."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peo_merge.base_model import sha256_file
from training.data import read_pairs, split_train_heldout
from training.evaluate import (
    EncodedSequence,
    EvaluationError,
    build_sequence,
    collate,
    load_heldout,
    paired_change,
    preference_accuracy,
    render_markdown,
    response_logprobs,
    reward_accuracy,
    summarize_scores,
)

VOCAB_SIZE = 64
PAD_TOKEN_ID = 3


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def direct_response_logprob(model: LlamaForCausalLM, sequence: EncodedSequence) -> float:
    """Sum log p(token t | tokens before t) over the response positions, one unpadded sequence."""
    ids = torch.tensor([sequence.input_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(
        log_probs[position - 1, sequence.input_ids[position]].item()
        for position in range(sequence.response_start, len(sequence.input_ids))
    )


def test_response_logprobs_match_direct_computation(tiny_model):
    sequences = [
        EncodedSequence((5, 9, 12, 40, 41, 2), response_start=3),
        EncodedSequence((7, 8, 20, 21, 22, 23, 24, 25, 2), response_start=2),
        EncodedSequence((11, 2), response_start=1),
    ]
    batches = [collate(sequences[:2], PAD_TOKEN_ID), collate(sequences[2:], PAD_TOKEN_ID)]

    summed, counts = response_logprobs(tiny_model, batches)

    assert counts.tolist() == [3, 7, 1]
    expected = [direct_response_logprob(tiny_model, sequence) for sequence in sequences]
    assert summed.tolist() == pytest.approx(expected, abs=1e-5)


def test_padding_does_not_change_scores(tiny_model):
    short = EncodedSequence((5, 9, 12, 40, 41), response_start=3)
    longer = EncodedSequence(tuple(range(10, 40)), response_start=12)

    alone, _ = response_logprobs(tiny_model, [collate([short], PAD_TOKEN_ID)])
    padded, counts = response_logprobs(tiny_model, [collate([longer, short], PAD_TOKEN_ID)])

    assert counts.tolist() == [18, 2]
    assert padded[1].item() == pytest.approx(alone[0].item(), abs=1e-5)


def test_collate_masks_only_response_tokens():
    batch = collate(
        [EncodedSequence((1, 2, 3), 2), EncodedSequence((4, 5, 6, 7, 8), 1)], PAD_TOKEN_ID
    )

    assert batch["input_ids"].tolist() == [[1, 2, 3, PAD_TOKEN_ID, PAD_TOKEN_ID], [4, 5, 6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 1, 1]]


def test_preference_accuracy_counts_ties_as_half():
    chosen = [1.0, 2.0, 3.0, 4.0]
    rejected = [0.0, 2.0, 5.0, -1.0]

    assert preference_accuracy(chosen, rejected) == pytest.approx(2.5 / 4)
    with pytest.raises(ValueError):
        preference_accuracy([], [])
    with pytest.raises(ValueError):
        preference_accuracy([1.0], [0.0, 1.0])


def test_summarize_scores_normalises_by_response_length():
    # The chosen response is longer: lower in total, higher per token.
    scores = [[-10.0, 10, -6.0, 3], [-2.0, 2, -4.0, 2]]

    summary = summarize_scores(scores)

    assert summary["pairs"] == 2
    assert summary["accuracy_summed"] == pytest.approx(0.5)
    assert summary["accuracy_per_token"] == pytest.approx(1.0)
    assert summary["mean_margin_summed"] == pytest.approx((-4.0 + 2.0) / 2)
    assert summary["mean_margin_per_token"] == pytest.approx((1.0 + 1.0) / 2)


def test_build_sequence_keeps_the_start():
    sequence = build_sequence([1, 2, 3, 4, 5], list(range(10, 20)), max_length=8)

    assert sequence == EncodedSequence((1, 2, 3, 4, 5, 10, 11, 12), response_start=5)
    assert sequence.response_tokens == 3
    assert build_sequence([1, 2, 3, 4], [10, 11], max_length=4) is None


def _write_pairs(path, count: int) -> None:
    rows = [
        {
            "chosen": f"\n\nHuman: question {i}\n\nAssistant: good answer {i}",
            "rejected": f"\n\nHuman: question {i}\n\nAssistant: bad answer {i}",
        }
        for i in range(count)
    ]
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(json.dumps(row) for row in rows) + "\n")


def test_load_heldout_recreates_the_training_split(tmp_path):
    data_file = tmp_path / "hh-test" / "test.jsonl.gz"
    _write_pairs(data_file, 40)
    recipe = {
        "data_files": {"hh-test/test.jsonl.gz": sha256_file(data_file)},
        "heldout_fraction": 0.25,
        "seed": 3,
        "max_prompt_tokens": 112,
        "max_length": 192,
    }

    heldout = load_heldout("helpfulness", recipe, tmp_path)

    _, expected = split_train_heldout(read_pairs(data_file), 0.25, 3)
    assert heldout.pairs == expected
    assert heldout.total_pairs == 40


def test_load_heldout_rejects_a_changed_data_file(tmp_path):
    data_file = tmp_path / "hh-test" / "test.jsonl.gz"
    _write_pairs(data_file, 4)
    recipe = {
        "data_files": {"hh-test/test.jsonl.gz": "0" * 64},
        "heldout_fraction": 0.1,
        "seed": 0,
        "max_prompt_tokens": 112,
        "max_length": 192,
    }

    with pytest.raises(EvaluationError, match="sha256"):
        load_heldout("harmlessness", recipe, tmp_path)
    with pytest.raises(EvaluationError, match="not found"):
        load_heldout("harmlessness", recipe, tmp_path / "elsewhere")


def test_paired_change_of_hand_made_outcomes():
    # rows are [chosen_sum, chosen_tokens, rejected_sum, rejected_tokens]
    right, wrong, tie = [-1.0, 1, -2.0, 1], [-2.0, 1, -1.0, 1], [-1.0, 1, -1.0, 1]
    base = [wrong, wrong, right, right]
    model = [right, tie, right, right]
    change, stderr = paired_change(base, model)
    # per-pair changes 1, 0.5, 0, 0: mean 0.375, sample variance 0.2292, over 4 pairs
    assert change == pytest.approx(0.375)
    assert stderr == pytest.approx(math.sqrt((0.390625 + 0.015625 + 2 * 0.140625) / 3 / 4))


def test_per_token_paired_change():
    # summed, the chosen side loses; per token (-3/6 against -2/2) it wins
    row = [-3.0, 6, -2.0, 2]
    base = [[-3.0, 6, -1.0, 2], row]
    assert paired_change(base, [row, row]) == (0.0, 0.0)
    change, stderr = paired_change(base, [row, row], per_token=True)
    # per token, the base ties the first pair (-0.5 each) and wins the second.
    # The model wins both, so the changes are 0.5 and 0.
    assert change == pytest.approx(0.25)
    assert stderr == pytest.approx(math.sqrt((0.0625 + 0.0625) / 1 / 2))


def test_reward_accuracy_counts_widened_margins():
    base = [[-10.0, 5, -5.0, 5], [-4.0, 2, -6.0, 2], [-3.0, 1, -3.0, 1]]
    # pair 1 widens by 2 nats though still wrong, pair 2 narrows, pair 3 does not move
    model = [[-9.0, 5, -6.0, 5], [-5.0, 2, -6.0, 2], [-3.0, 1, -3.0, 1]]
    assert reward_accuracy(base, model) == pytest.approx((1 + 0 + 0.5) / 3)
    with pytest.raises(ValueError, match="got 3 base and 2 model scores"):
        reward_accuracy(base, model[:2])


def test_paired_change_rejects_unequal_lists():
    row = [-1.0, 1, -2.0, 1]
    with pytest.raises(ValueError, match="got 2 base and 3 model scores"):
        paired_change([row, row], [row, row, row])


def test_markdown_row_shows_reward_accuracy():
    base = summarize_scores([[-10.0, 5, -5.0, 5], [-4.0, 2, -6.0, 2]])
    tuned = {
        **summarize_scores([[-9.0, 5, -6.0, 5], [-4.0, 2, -6.0, 2]]),
        "change_summed_paired_stderr": 0.012,
        "change_per_token_paired_stderr": 0.034,
        "reward_accuracy": 0.75,
    }
    data = {
        "files": {"pairs.jsonl.gz": "ab" * 32},
        "heldout_fraction": 0.1,
        "seed": 0,
        "heldout_pairs": 2,
        "total_pairs": 20,
        "max_pairs": None,
        "dropped_pairs": 0,
        "max_prompt_tokens": 112,
        "max_length": 192,
    }
    cells = {"base": base, "helpfulness": tuned, "harmlessness": tuned}
    report = {
        "bundle": {"name": "tiny", "path": "checkpoints/tiny"},
        "base_model": {"source_file": "base.gguf"},
        "dtype": "float32",
        "device": "cpu",
        "results": {"helpfulness": cells, "harmlessness": cells},
        "data": {"helpfulness": data, "harmlessness": data},
        "command": "python -m training.evaluate",
        "machine": {"processor": "x86_64", "cpu_count": 2, "torch_threads": 2, "torch": "2"},
        "wall_time_seconds": 1.0,
        "scoring_seconds": 1.0,
    }
    lines = render_markdown(report).splitlines()
    base_row = next(line for line in lines if line.startswith("| helpfulness | θ₀ |"))
    tuned_row = next(line for line in lines if line.startswith("| helpfulness | θ₀ + τ_help |"))
    # both pairs keep their outcomes, and the mean margin is (-3 + 2) / 2
    assert tuned_row.split(" | ")[5:] == ["+0.0 ± 1.2", "50.0", "+0.0 ± 3.4", "-0.50", "75.0 |"]
    assert base_row.endswith("| — |")
