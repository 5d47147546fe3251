"""Tests for reading HH-RLHF preference pairs and rendering their prompts."""

from __future__ import annotations

import gzip
import json
import random

import pytest

from training.data import (
    PreferencePair,
    parse_transcript,
    read_pairs,
    render_prompt,
    split_pair,
    split_train_heldout,
)

PROMPT = "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: And 3+3?\n\nAssistant:"
CHOSEN = PROMPT + " It is 6."
REJECTED = PROMPT + " Seven, I think."
EXPECTED_MESSAGES = (("user", "What is 2+2?"), ("assistant", "It is 4."), ("user", "And 3+3?"))


# parse_transcript and split_pair


def test_parse_transcript_maps_roles_and_strips_text():
    turns = parse_transcript("\n\nHuman:  hello there \n\nAssistant: hi\n\nHuman: bye")

    assert turns == [("user", "hello there"), ("assistant", "hi"), ("user", "bye")]


def test_parse_transcript_without_turns_raises():
    with pytest.raises(ValueError, match="no Human/Assistant turns"):
        parse_transcript("just some text")


def test_split_pair_splits_at_last_assistant_marker():
    pair = split_pair(CHOSEN, REJECTED, "source.jsonl")

    assert pair is not None
    assert pair.messages == EXPECTED_MESSAGES
    assert pair.chosen == "It is 6."
    assert pair.rejected == "Seven, I think."
    assert pair.source == "source.jsonl"


def test_split_pair_ignores_marker_without_blank_line():
    # "Assistant:" inside a response is not preceded by a blank line, so it is not a turn.
    chosen = PROMPT + " Assistant: here is a note.\nDone."
    rejected = PROMPT + " No."

    pair = split_pair(chosen, rejected, "source.jsonl")

    assert pair is not None
    assert pair.messages == EXPECTED_MESSAGES
    assert pair.chosen == "Assistant: here is a note.\nDone."


def test_split_pair_drops_identical_sides():
    assert split_pair(CHOSEN, CHOSEN, "source.jsonl") is None


def test_split_pair_drops_responses_equal_after_strip():
    assert split_pair(PROMPT + " Same.", PROMPT + " Same.  ", "source.jsonl") is None


def test_split_pair_drops_differing_prompts():
    other_prompt = PROMPT.replace("And 3+3?", "And 4+4?")

    assert split_pair(CHOSEN, other_prompt + " Eight.", "source.jsonl") is None


def test_split_pair_drops_empty_response():
    assert split_pair(PROMPT + "  ", REJECTED, "source.jsonl") is None


def test_split_pair_drops_row_without_assistant_turn():
    assert split_pair("\n\nHuman: hello", "\n\nHuman: hi", "source.jsonl") is None


@pytest.mark.parametrize(
    "prompt",
    [
        "Human: What is 2+2?\n\nAssistant:",
        "Human: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: And 3+3?\n\nAssistant:",
    ],
    ids=["single_turn", "multi_turn"],
)
def test_split_pair_unprefixed_first_turn(prompt):
    # The row must be skipped or keep its first Human turn, because raising would stop read_pairs.
    pair = split_pair(prompt + " Yes.", prompt + " No.", "source.jsonl")

    assert pair is None or pair.messages[0] == ("user", "What is 2+2?")


# split_train_heldout


def _many_pairs(count: int) -> list[PreferencePair]:
    return [
        PreferencePair(
            (("user", f"question {index}"),), f"good answer {index}", f"bad answer {index}", "s"
        )
        for index in range(count)
    ]


def _keys(pairs: list[PreferencePair]) -> set[str]:
    return {pair.key() for pair in pairs}


def test_split_train_heldout_is_deterministic():
    pairs = _many_pairs(200)

    first_train, first_heldout = split_train_heldout(pairs, 0.2, seed=7)
    second_train, second_heldout = split_train_heldout(pairs, 0.2, seed=7)

    assert first_train == second_train
    assert first_heldout == second_heldout


def test_split_train_heldout_is_disjoint_and_complete():
    pairs = _many_pairs(200)

    train, heldout = split_train_heldout(pairs, 0.2, seed=7)

    assert _keys(train).isdisjoint(_keys(heldout))
    assert _keys(train) | _keys(heldout) == _keys(pairs)
    assert len(train) + len(heldout) == len(pairs)
    # 200 pairs at a fraction of 0.2 give about 40 held out, with a standard deviation near 5.7.
    assert 10 <= len(heldout) <= 80


def test_split_train_heldout_ignores_input_order():
    pairs = _many_pairs(200)
    shuffled = list(pairs)
    random.Random(3).shuffle(shuffled)

    train, heldout = split_train_heldout(pairs, 0.2, seed=7)
    shuffled_train, shuffled_heldout = split_train_heldout(shuffled, 0.2, seed=7)

    assert _keys(shuffled_train) == _keys(train)
    assert _keys(shuffled_heldout) == _keys(heldout)


def test_split_train_heldout_stable_when_extended():
    pairs = _many_pairs(200)

    _, heldout = split_train_heldout(pairs[:100], 0.2, seed=7)
    _, heldout_with_more = split_train_heldout(pairs, 0.2, seed=7)

    assert _keys(heldout) == _keys(heldout_with_more) & _keys(pairs[:100])


def test_split_train_heldout_depends_on_seed():
    pairs = _many_pairs(200)

    _, heldout = split_train_heldout(pairs, 0.2, seed=7)
    _, other_heldout = split_train_heldout(pairs, 0.2, seed=8)

    assert _keys(heldout) != _keys(other_heldout)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_train_heldout_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_train_heldout(_many_pairs(3), fraction, seed=0)


# read_pairs


def _write_jsonl_gz(path, rows: list[dict], blank_lines: bool = False) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
            if blank_lines:
                handle.write("\n")


def test_read_pairs_reads_gzip_jsonl(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    other = "\n\nHuman: Name a colour.\n\nAssistant:"
    rows = [
        {"chosen": CHOSEN, "rejected": REJECTED},
        {"chosen": CHOSEN, "rejected": CHOSEN},
        {"chosen": other + " Blue.", "rejected": other + " No."},
    ]
    _write_jsonl_gz(path, rows, blank_lines=True)

    pairs = read_pairs(path)

    assert len(pairs) == 2
    assert pairs[0].messages == EXPECTED_MESSAGES
    assert pairs[0].chosen == "It is 6."
    assert pairs[1].messages == (("user", "Name a colour."),)
    assert pairs[1].chosen == "Blue."
    assert pairs[1].source == str(path)


def test_read_pairs_reads_folder_in_name_order(tmp_path):
    first = "\n\nHuman: first?\n\nAssistant:"
    second = "\n\nHuman: second?\n\nAssistant:"
    plain = "\n\nHuman: plain?\n\nAssistant:"
    second_row = {"chosen": second + " B.", "rejected": second + " b."}
    first_row = {"chosen": first + " A.", "rejected": first + " a."}
    plain_row = {"chosen": plain + " C.", "rejected": plain + " c."}
    _write_jsonl_gz(tmp_path / "b.jsonl.gz", [second_row])
    _write_jsonl_gz(tmp_path / "a.jsonl.gz", [first_row])
    (tmp_path / "c.jsonl").write_text(json.dumps(plain_row) + "\n")

    pairs = read_pairs(tmp_path)

    assert [pair.chosen for pair in pairs] == ["A.", "B.", "C."]


def test_read_pairs_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"chosen": CHOSEN, "rejected": REJECTED}) + "\n")
        handle.write("{not json\n")

    with pytest.raises(ValueError) as caught:
        read_pairs(path)

    assert f"{path}:2" in str(caught.value)


def test_read_pairs_empty_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_pairs(tmp_path)


# render_prompt


class CallLimitExceeded(Exception):
    """Raised by the fake tokenizer when render_prompt keeps calling it, that is, never returns."""


class WordTokenizer:
    """A fake tokenizer: one token per whitespace-separated word and a plain-text chat template.

    The template renders each message as ``<role> text`` and the reply header as ``<assistant>``,
    so a rendered prompt costs one token per role marker plus one per word.
    """

    def __init__(self, max_calls: int = 200):
        self.vocabulary: list[str] = []
        self.ids: dict[str, int] = {}
        self.calls = 0
        self.max_calls = max_calls

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert tokenize is False
        self.calls += 1
        if self.calls > self.max_calls:
            raise CallLimitExceeded(f"apply_chat_template called {self.calls} times")
        parts = [f"<{message['role']}> {message['content']}" for message in messages]
        if add_generation_prompt:
            parts.append("<assistant>")
        return " ".join(parts)

    def __call__(self, text, add_special_tokens=True):
        input_ids = []
        for word in text.split():
            if word not in self.ids:
                self.ids[word] = len(self.vocabulary)
                self.vocabulary.append(word)
            input_ids.append(self.ids[word])
        return {"input_ids": input_ids}

    def decode(self, ids):
        return " ".join(self.vocabulary[index] for index in ids)

    def count(self, text: str) -> int:
        return len(text.split())


def _long_dialogue() -> PreferencePair:
    messages = (
        ("user", "one two three four five"),
        ("assistant", "six seven eight nine ten"),
        ("user", "eleven twelve thirteen"),
        ("assistant", "fourteen fifteen"),
        ("user", "last question here"),
    )
    return PreferencePair(messages, "yes", "no", "s")


def test_render_prompt_keeps_everything_when_it_fits():
    tokenizer = WordTokenizer()

    prompt = render_prompt(_long_dialogue(), tokenizer, max_prompt_tokens=100)

    assert prompt.startswith("<user> one two three four five")
    assert prompt.endswith("<user> last question here <assistant>")
    assert tokenizer.count(prompt) == 24


def test_render_prompt_drops_early_turns_to_fit():
    tokenizer = WordTokenizer()
    # The last exchange plus the final question costs 4 + 3 + 4 + 1 = 12 tokens; adding the first
    # exchange would cost 12 more.
    prompt = render_prompt(_long_dialogue(), tokenizer, max_prompt_tokens=15)

    assert tokenizer.count(prompt) <= 15
    assert prompt.startswith("<user> eleven twelve thirteen")
    assert "one" not in prompt.split()
    assert "six" not in prompt.split()
    assert prompt.endswith("<user> last question here <assistant>")


def test_render_prompt_keeps_only_last_user_turn():
    tokenizer = WordTokenizer()

    prompt = render_prompt(_long_dialogue(), tokenizer, max_prompt_tokens=6)

    assert prompt == "<user> last question here <assistant>"


def test_render_prompt_cuts_long_single_turn_from_start():
    words = [f"w{index}" for index in range(30)]
    pair = PreferencePair((("user", " ".join(words)),), "yes", "no", "s")
    tokenizer = WordTokenizer()

    prompt = render_prompt(pair, tokenizer, max_prompt_tokens=10)

    assert tokenizer.count(prompt) <= 10
    assert prompt.startswith("<user> ")
    assert prompt.endswith("w29 <assistant>")
    assert "w0" not in prompt.split()


def test_render_prompt_budget_below_template():
    # The template alone costs 2 tokens ("<user>" and "<assistant>"), so a budget of 1 cannot be
    # met. render_prompt must then return or raise ValueError instead of looping.
    pair = PreferencePair((("user", "a b c d"),), "yes", "no", "s")
    tokenizer = WordTokenizer(max_calls=200)

    try:
        render_prompt(pair, tokenizer, max_prompt_tokens=1)
    except ValueError:
        pass
    except CallLimitExceeded:
        pytest.fail("render_prompt rendered the prompt 200 times without returning or raising")
