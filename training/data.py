"""Read HH-RLHF preference pairs and turn them into prompt / chosen / rejected examples.

Each row of an HH-RLHF file contains two whole dialogues, ``chosen`` and ``rejected``, in the
transcript format ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. Only the last Assistant turn differs
inside a pair, so the prompt is everything up to and including the last ``"\\n\\nAssistant:"``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

ASSISTANT_MARKER = "\n\nAssistant:"
_TURN_PATTERN = re.compile(r"\n\n(Human|Assistant): ?")


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair: the shared dialogue turns and the two final Assistant responses."""

    messages: tuple[tuple[str, str], ...]
    chosen: str
    rejected: str
    source: str

    def key(self) -> str:
        """Return a stable hash of the pair, used for the deterministic train / held-out split."""
        text = json.dumps([self.messages, self.chosen, self.rejected])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_transcript(transcript: str) -> list[tuple[str, str]]:
    """Split an HH-RLHF transcript into ``(role, text)`` turns with chat-template role names.

    Raises:
        ValueError: the transcript has no Human or Assistant turn.
    """
    if not transcript.startswith("\n\n"):
        transcript = "\n\n" + transcript
    pieces = _TURN_PATTERN.split(transcript)
    if len(pieces) < 3:
        raise ValueError(f"transcript has no Human/Assistant turns: {transcript[:80]!r}")

    turns = []
    for speaker, text in zip(pieces[1::2], pieces[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        turns.append((role, text.strip()))
    return turns


def split_pair(chosen: str, rejected: str, source: str) -> PreferencePair | None:
    """Split one HH-RLHF row into a shared prompt and the two final responses.

    Returns:
        The pair, or None when the row cannot be used: the two sides are identical, the prompts
        differ, the dialogue does not end with an Assistant turn, or a response is empty.
    """
    if chosen == rejected:
        return None

    cut_chosen = chosen.rfind(ASSISTANT_MARKER)
    cut_rejected = rejected.rfind(ASSISTANT_MARKER)
    if cut_chosen < 0 or cut_rejected < 0:
        return None

    prompt = chosen[: cut_chosen + len(ASSISTANT_MARKER)]
    if rejected[: cut_rejected + len(ASSISTANT_MARKER)] != prompt:
        return None

    chosen_response = chosen[cut_chosen + len(ASSISTANT_MARKER) :].strip()
    rejected_response = rejected[cut_rejected + len(ASSISTANT_MARKER) :].strip()
    if not chosen_response or not rejected_response or chosen_response == rejected_response:
        return None

    turns = parse_transcript(prompt[: -len(ASSISTANT_MARKER)])
    if not turns or turns[-1][0] != "user":
        return None
    return PreferencePair(tuple(turns), chosen_response, rejected_response, source)


def read_pairs(path: Path) -> list[PreferencePair]:
    """Read every usable pair of an HH-RLHF ``.jsonl`` or ``.jsonl.gz`` file or folder.

    A folder is read as its ``*.jsonl.gz`` and ``*.jsonl`` files in name order.
    """
    path = Path(path)
    files = (
        sorted(path.glob("*.jsonl.gz")) + sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    )
    if not files:
        raise FileNotFoundError(f"no .jsonl or .jsonl.gz files in {path}")

    pairs = []
    for file in files:
        opener = gzip.open if file.suffix == ".gz" else open
        with opener(file, "rt", encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{file}:{line_number}: invalid JSON: {error}") from error
                pair = split_pair(row["chosen"], row["rejected"], str(file))
                if pair is not None:
                    pairs.append(pair)
    return pairs


def data_files(path: Path) -> list[Path]:
    """Return the data files that :func:`read_pairs` reads for ``path``."""
    path = Path(path)
    if path.is_dir():
        return sorted(path.glob("*.jsonl.gz")) + sorted(path.glob("*.jsonl"))
    return [path]


def split_train_heldout(
    pairs: list[PreferencePair], heldout_fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split pairs deterministically by a seeded hash of their content.

    A pair's side depends only on its content and the seed, never on file order, so the
    held-out set stays the same when files are reordered or more data is added.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")

    train, heldout = [], []
    for pair in pairs:
        bucket = int(hashlib.sha256(f"{seed}:{pair.key()}".encode()).hexdigest()[:8], 16)
        if bucket / 0xFFFFFFFF < heldout_fraction:
            heldout.append(pair)
        else:
            train.append(pair)
    return train, heldout


def render_prompt(pair: PreferencePair, tokenizer, max_prompt_tokens: int) -> str:
    """Render a pair's dialogue with the tokenizer's chat template, ending at the reply header.

    Whole turns are dropped from the front (keeping the last user turn) until the prompt fits in
    ``max_prompt_tokens``; a single turn that is still too long is cut from its start.
    """
    turns = list(pair.messages)
    while True:
        messages = [{"role": role, "content": text} for role, text in turns]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        token_count = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if token_count <= max_prompt_tokens:
            return prompt
        if len(turns) > 1:
            turns = turns[1:] if turns[1][0] == "user" else turns[2:]
            continue

        # One user turn longer than the budget: keep its end, where the request usually is.
        role, text = turns[0]
        if not text:
            raise ValueError(
                f"max_prompt_tokens={max_prompt_tokens} is smaller than the chat template's own "
                f"{token_count} tokens; raise it"
            )
        text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        overflow = token_count - max_prompt_tokens
        turns = [(role, tokenizer.decode(text_ids[overflow + 1 :]))]


def to_dpo_rows(pairs: list[PreferencePair], tokenizer, max_prompt_tokens: int) -> list[dict]:
    """Return TRL DPO rows ``{"prompt", "chosen", "rejected"}`` with chat-rendered prompts."""
    rows = []
    for pair in pairs:
        prompt = render_prompt(pair, tokenizer, max_prompt_tokens)
        rows.append({"prompt": prompt, "chosen": pair.chosen, "rejected": pair.rejected})
    return rows
