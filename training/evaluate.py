"""Measure preference accuracy of the base model and each single-aspect model on held-out pairs.

Run as ``python -m training.evaluate --bundle checkpoints/smollm2-hh --output
docs/preference_accuracy.md``. For each aspect the held-out pairs are those its task vector was
not trained on: the command re-creates the training split from the vector's manifest recipe
(data files, held-out fraction, seed). Each pair is scored by three models, θ₀, θ₀ + τ_help and
θ₀ + τ_harm, and counts as correct when the model gives the chosen response a higher
log-probability than the rejected one. The command writes a Markdown table to ``--output``, the
same figures as JSON next to it, and prints the table.

Scores are cached per (model, aspect) cell in ``runs/eval/``, so a restarted run skips finished
cells and continues a cell from its last save.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peo_merge.base_model import load_base_model, resolve_base_model, sha256_file
from peo_merge.bundle import ASPECTS, Bundle, BundleError, load_bundle
from peo_merge.fused_model import base_state, build_fused_model
from peo_merge.fusion import Fuser
from peo_merge.validation import validate_against_base
from training.data import PreferencePair, read_pairs, render_prompt, split_train_heldout

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT_ENV = "PEO_DATA_ROOT"
DEFAULT_CACHE_DIR = REPO_ROOT / "runs" / "eval"
# Bump when the scoring changes, so that cached scores of the old method are not reused.
SCORING_VERSION = 1
CACHE_SAVE_SECONDS = 60.0
LOG_EVERY_BATCHES = 5

# Model name → task vector coefficients, where None means the unmodified base model. A bundle's
# offset vectors (a generalist) get coefficient 0 here, so each fused model is exactly θ₀ + τ_aspect.
MODELS: dict[str, dict[str, float] | None] = {
    "base": None,
    "helpfulness": {"helpfulness": 1.0, "harmlessness": 0.0},
    "harmlessness": {"helpfulness": 0.0, "harmlessness": 1.0},
}
MODEL_LABELS = {"base": "θ₀", "helpfulness": "θ₀ + τ_help", "harmlessness": "θ₀ + τ_harm"}


class EvaluationError(RuntimeError):
    """An evaluation input is missing or does not match the bundle's recipe."""


@dataclass(frozen=True)
class EncodedSequence:
    """Token ids of a prompt followed by one response, and where the response starts."""

    input_ids: tuple[int, ...]
    response_start: int

    @property
    def response_tokens(self) -> int:
        """Number of response tokens left after truncation."""
        return len(self.input_ids) - self.response_start


@dataclass(frozen=True)
class HeldoutSet:
    """The held-out pairs of one aspect and the facts needed to reproduce them."""

    aspect: str
    pairs: list[PreferencePair]
    data_files: dict[str, str]
    heldout_fraction: float
    seed: int
    total_pairs: int
    max_prompt_tokens: int
    max_length: int


def default_data_root() -> Path:
    """Return ``$PEO_DATA_ROOT``, or else the ``shared/data`` folder next to the repository."""
    configured = os.environ.get(DATA_ROOT_ENV)
    if configured:
        return Path(configured).expanduser()
    return REPO_ROOT.parent / "shared" / "data"


def load_heldout(aspect: str, recipe: dict, data_root: Path) -> HeldoutSet:
    """Re-create the held-out split that an aspect's task vector was trained without.

    Each file of ``recipe["data_files"]`` (``<folder>/<file>`` → sha256) is read from
    ``data_root`` in recipe order, which is the order training read them, and must match its
    sha256. The concatenated pairs are split with the recipe's held-out fraction and seed.

    Args:
        aspect: the aspect name, used in messages.
        recipe: the vector's manifest recipe.
        data_root: the folder that contains the ``<folder>/<file>`` data paths.

    Returns:
        The held-out pairs, in file order.

    Raises:
        EvaluationError: the recipe lacks a field, or a data file is missing or has another hash.
    """
    required = ("data_files", "heldout_fraction", "seed", "max_prompt_tokens", "max_length")
    missing = [key for key in required if key not in recipe]
    if missing:
        raise EvaluationError(f"the {aspect} vector's manifest recipe lacks {missing}")
    if not recipe["data_files"]:
        raise EvaluationError(f"the {aspect} vector's manifest recipe lists no data files")

    pairs: list[PreferencePair] = []
    for relative, expected in recipe["data_files"].items():
        relative_path = Path(relative)
        if relative_path.is_absolute() or ".." in relative_path.parts:
            raise EvaluationError(
                f"data file {relative!r} must be a relative path in the data root"
            )
        path = data_root / relative_path
        if not path.is_file():
            raise EvaluationError(
                f"{path}: data file of the {aspect} vector not found. "
                f"Pass --data-root or set {DATA_ROOT_ENV} to the folder that contains {relative}"
            )
        actual = sha256_file(path)
        if actual != expected:
            raise EvaluationError(
                f"{path}: sha256 {actual} does not match {expected} in the {aspect} vector's "
                "recipe, so this is not the file the vector was trained on"
            )
        pairs.extend(read_pairs(path))

    _, heldout = split_train_heldout(pairs, recipe["heldout_fraction"], recipe["seed"])
    return HeldoutSet(
        aspect=aspect,
        pairs=heldout,
        data_files=dict(recipe["data_files"]),
        heldout_fraction=recipe["heldout_fraction"],
        seed=recipe["seed"],
        total_pairs=len(pairs),
        max_prompt_tokens=recipe["max_prompt_tokens"],
        max_length=recipe["max_length"],
    )


def _common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


def build_sequence(
    prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int
) -> EncodedSequence | None:
    """Join prompt and response ids and keep the first ``max_length`` tokens.

    Returns:
        The sequence, or None when the prompt alone fills ``max_length`` and no response token
        is left. DPO training drops such pairs too.
    """
    if len(prompt_ids) >= max_length:
        return None
    input_ids = (tuple(prompt_ids) + tuple(response_ids))[:max_length]
    return EncodedSequence(input_ids, len(prompt_ids))


def encode_pair(
    pair: PreferencePair, tokenizer, max_prompt_tokens: int, max_length: int
) -> tuple[EncodedSequence, EncodedSequence] | None:
    """Tokenize a pair into ``(chosen, rejected)`` sequences the way DPO training saw them.

    This mirrors the preprocessing of TRL 1.16's ``DPOTrainer`` for plain-text rows: the
    response gets the EOS token appended, ``prompt + response`` is tokenized as one string, and
    the response starts where that tokenization stops agreeing with the prompt's. Sequences are
    truncated to ``max_length`` keeping the start (TRL's ``keep_start``).

    Returns:
        The two sequences, or None when the prompt leaves no room for a response token.
    """
    prompt = render_prompt(pair, tokenizer, max_prompt_tokens)
    eos = tokenizer.eos_token
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = []
    for response in (pair.chosen, pair.rejected):
        text = response if response.endswith(eos) else response + eos
        full_ids.append(tokenizer(prompt + text)["input_ids"])

    prompt_length = min(_common_prefix_length(prompt_ids, ids) for ids in full_ids)
    chosen, rejected = (
        build_sequence(ids[:prompt_length], ids[prompt_length:], max_length) for ids in full_ids
    )
    if chosen is None or rejected is None:
        return None
    return chosen, rejected


def collate(sequences: Sequence[EncodedSequence], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad sequences into a batch.

    Returns:
        ``input_ids``, ``attention_mask`` and ``response_mask`` (1 on response tokens), each of
        shape (batch, longest sequence).
    """
    width = max(len(sequence.input_ids) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        length = len(sequence.input_ids)
        input_ids[row, :length] = torch.tensor(sequence.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        response_mask[row, sequence.response_start : length] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
    }


def batch_logprobs(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score the response tokens of one batch from :func:`collate`.

    Returns:
        ``(summed, counts)``: per sequence, the summed log-probability of its response tokens
        given everything before them (float64, in nats) and the number of those tokens.
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    response_mask = batch["response_mask"].to(device)
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits

        # The logits at position t predict token t + 1.
        logits = logits[:, :-1].float()
        targets = input_ids[:, 1:]
        target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        token_logps = target_logits - torch.logsumexp(logits, dim=-1)
        scored = response_mask[:, 1:].bool()
        summed = torch.where(scored, token_logps, 0.0).double().sum(dim=-1)
        counts = scored.sum(dim=-1)
    return summed.cpu(), counts.cpu()


def response_logprobs(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score the response tokens of every batch with :func:`batch_logprobs`.

    Returns:
        ``(summed, counts)`` for all sequences, concatenated in batch order.
    """
    results = [batch_logprobs(model, batch) for batch in batches]
    if not results:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.cat([summed for summed, _ in results]), torch.cat(
        [counts for _, counts in results]
    )


def preference_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Return the share of pairs whose chosen score is above the rejected one, ties counting half.

    Raises:
        ValueError: the sequences are empty or of different lengths.
    """
    if len(chosen) != len(rejected):
        raise ValueError(f"got {len(chosen)} chosen and {len(rejected)} rejected scores")
    if len(chosen) == 0:
        raise ValueError("no pairs to score")
    wins = 0.0
    for chosen_score, rejected_score in zip(chosen, rejected, strict=True):
        if chosen_score > rejected_score:
            wins += 1.0
        elif chosen_score == rejected_score:
            wins += 0.5
    return wins / len(chosen)


def summarize_scores(scores: Sequence[Sequence[float]]) -> dict:
    """Summarize per-pair scores ``[chosen_sum, chosen_tokens, rejected_sum, rejected_tokens]``.

    Returns:
        Pair count, accuracy with summed and with per-token mean log-probabilities, the binomial
        standard error of the summed accuracy, and the mean chosen − rejected margin of each.
    """
    chosen_sum = [row[0] for row in scores]
    rejected_sum = [row[2] for row in scores]
    chosen_mean = [row[0] / row[1] for row in scores]
    rejected_mean = [row[2] / row[3] for row in scores]
    accuracy = preference_accuracy(chosen_sum, rejected_sum)
    count = len(scores)
    return {
        "pairs": count,
        "accuracy_summed": accuracy,
        "accuracy_summed_stderr": math.sqrt(accuracy * (1.0 - accuracy) / count),
        "accuracy_per_token": preference_accuracy(chosen_mean, rejected_mean),
        "mean_margin_summed": math.fsum(chosen_sum) / count - math.fsum(rejected_sum) / count,
        "mean_margin_per_token": math.fsum(chosen_mean) / count - math.fsum(rejected_mean) / count,
    }


def paired_change(
    base_scores: Sequence[Sequence[float]],
    scores: Sequence[Sequence[float]],
    per_token: bool = False,
):
    """Return the change in accuracy against the base and its paired standard error.

    ``per_token`` compares mean log-probabilities per token instead of summed ones.

    Both models score the same pairs, so the error comes from the per-pair change in outcome
    (1 correct, 0.5 tie, 0 wrong): its sample standard deviation over √n. It is smaller than
    the two accuracies' own errors when most pairs get the same outcome from both models.

    Raises:
        ValueError: the two lists score different numbers of pairs, or fewer than two.
    """
    if len(base_scores) != len(scores):
        raise ValueError(f"got {len(base_scores)} base and {len(scores)} model scores")
    if len(scores) < 2:
        raise ValueError("a paired standard error needs at least two pairs")

    def outcome(row: Sequence[float]) -> float:
        chosen, rejected = (row[0] / row[1], row[2] / row[3]) if per_token else (row[0], row[2])
        if chosen > rejected:
            return 1.0
        if chosen == rejected:
            return 0.5
        return 0.0

    changes = [
        outcome(mine) - outcome(base) for base, mine in zip(base_scores, scores, strict=True)
    ]
    count = len(changes)
    mean = math.fsum(changes) / count
    variance = math.fsum((change - mean) ** 2 for change in changes) / (count - 1)
    return mean, math.sqrt(variance / count)


def reward_accuracy(
    base_scores: Sequence[Sequence[float]], scores: Sequence[Sequence[float]]
) -> float:
    """Return the share of pairs whose summed margin the model widens against the base.

    This is the accuracy of DPO's implicit reward with the base as the reference: a pair counts
    when (log π(chosen) − log π₀(chosen)) − (log π(rejected) − log π₀(rejected)) is positive,
    ties counting half. It shows what the vector learned, whatever the base's own margin.

    Raises:
        ValueError: the two lists score different numbers of pairs, or none.
    """
    if len(base_scores) != len(scores):
        raise ValueError(f"got {len(base_scores)} base and {len(scores)} model scores")
    chosen = [mine[0] - base[0] for base, mine in zip(base_scores, scores, strict=True)]
    rejected = [mine[2] - base[2] for base, mine in zip(base_scores, scores, strict=True)]
    return preference_accuracy(chosen, rejected)


class ScoreCache:
    """Per-pair scores of every (model, aspect) cell, saved as one JSON file.

    The file name carries a hash of everything the scores depend on, so a changed bundle, data
    file, split or pair limit starts a new file instead of reusing stale scores.
    """

    def __init__(self, path: Path, key: dict):
        self.path = path
        self.key = key
        self.cells: dict[str, dict] = {}
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("key") == key:
                self.cells = stored["cells"]
            else:
                logger.warning("%s: stored key differs from this run, so scoring starts over", path)

    @classmethod
    def for_key(cls, directory: Path, name: str, key: dict) -> ScoreCache:
        """Open the cache file of ``key`` inside ``directory``."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return cls(directory / f"{name}-{digest}.json", key)

    def cell(self, model: str, aspect: str) -> dict:
        """Return the mutable record of one cell: ``scores`` by pair index, ``complete``, ``seconds``."""
        empty = {"scores": {}, "complete": False, "seconds": 0.0}
        return self.cells.setdefault(f"{model}/{aspect}", empty)

    def save(self) -> None:
        """Write the file atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_suffix(".tmp")
        staging.write_text(json.dumps({"key": self.key, "cells": self.cells}) + "\n")
        staging.replace(self.path)


def score_cell(
    model: nn.Module,
    encoded: dict[int, tuple[EncodedSequence, EncodedSequence]],
    cell: dict,
    cache: ScoreCache,
    label: str,
    batch_size: int,
    pad_token_id: int,
) -> None:
    """Score every pair of ``encoded`` that ``cell`` lacks, saving progress to ``cache``.

    Pairs are batched longest first, which keeps padding small and surfaces memory limits at
    the start. Each batch contains the chosen and the rejected sequence of ``batch_size`` pairs.
    """
    scores = cell["scores"]
    todo = [index for index in encoded if str(index) not in scores]
    todo.sort(key=lambda index: -max(len(sequence.input_ids) for sequence in encoded[index]))
    batch_count = math.ceil(len(todo) / batch_size)
    if scores:
        logger.info("%s: resuming with %d of %d pairs scored", label, len(scores), len(encoded))

    started = time.monotonic()
    last_save = started
    for batch_number, offset in enumerate(range(0, len(todo), batch_size), start=1):
        indices = todo[offset : offset + batch_size]
        sequences = [sequence for index in indices for sequence in encoded[index]]
        summed, counts = batch_logprobs(model, collate(sequences, pad_token_id))
        for row, index in enumerate(indices):
            chosen, rejected = 2 * row, 2 * row + 1
            scores[str(index)] = [
                summed[chosen].item(),
                counts[chosen].item(),
                summed[rejected].item(),
                counts[rejected].item(),
            ]

        now = time.monotonic()
        if batch_number % LOG_EVERY_BATCHES == 0 or batch_number == batch_count:
            logger.info(
                "%s: batch %d/%d, %d/%d pairs, %.0f s",
                label, batch_number, batch_count, len(scores), len(encoded), now - started,
            )  # fmt: skip
        if now - last_save >= CACHE_SAVE_SECONDS:
            cell["seconds"] += now - last_save
            last_save = now
            cache.save()

    cell["seconds"] += time.monotonic() - last_save
    cell["complete"] = True
    cache.save()


def resolve_device(device: str) -> torch.device:
    """Return the torch device for a name, where ``auto`` picks ``cuda`` when a GPU is available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _format_percent(value: float) -> str:
    return f"{100.0 * value:.1f}"


def _format_delta(value: float, base: float) -> str:
    return f"{100.0 * (value - base):+.1f}"


def render_markdown(report: dict) -> str:
    """Return the report as a Markdown document: a header on method and setting, then the table."""
    lines = [
        "# Preference accuracy on held-out HH-RLHF pairs",
        "",
        f"Bundle `{report['bundle']['name']}` (`{report['bundle']['path']}`), base model "
        f"`{report['base_model'].get('source_file') or report['base_model'].get('path')}`, "
        f"scored in {report['dtype']} on {report['device']}.",
        "",
        "A pair counts as correct when the model gives the chosen response a higher "
        "log-probability than the rejected one, given the same prompt. Ties count as half. "
        "**Summed** compares the total log-probability of the response tokens, the policy term "
        "of DPO's implicit reward. **Per-token** compares each response's mean log-probability "
        "per token, which removes the advantage of shorter responses. Δ is the change against "
        "θ₀ in percentage points. The margin is the mean chosen − rejected summed "
        "log-probability in nats. ± is one binomial standard error of the summed accuracy. The "
        "± after each Δ is its paired standard error: both models score the same pairs, so it "
        "is the standard deviation of the per-pair change in outcome over √n. **Reward acc.** is "
        "the accuracy of DPO's implicit reward with θ₀ as the reference: the share of pairs "
        "whose summed margin the vector widens, whatever the sign of θ₀'s own margin.",
        "",
        "| Aspect | Model | Pairs | Summed acc. % | ± | Δ summed | Per-token acc. % "
        "| Δ per-token | Mean margin (nats) | Reward acc. % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for aspect in ASPECTS:
        cells = report["results"][aspect]
        base = cells["base"]
        for model in MODELS:
            cell = cells[model]
            deltas = ["—", "—"]
            if model != "base":
                deltas = [
                    _format_delta(cell[key], base[key])
                    for key in ("accuracy_summed", "accuracy_per_token")
                ]
                for column, key in enumerate(
                    ("change_summed_paired_stderr", "change_per_token_paired_stderr")
                ):
                    if key in cell:
                        deltas[column] += f" ± {_format_percent(cell[key])}"
            reward = "—"
            if "reward_accuracy" in cell:
                reward = _format_percent(cell["reward_accuracy"])
            lines.append(
                f"| {aspect} | {MODEL_LABELS[model]} | {cell['pairs']} "
                f"| {_format_percent(cell['accuracy_summed'])} "
                f"| {_format_percent(cell['accuracy_summed_stderr'])} | {deltas[0]} "
                f"| {_format_percent(cell['accuracy_per_token'])} | {deltas[1]} "
                f"| {cell['mean_margin_summed']:+.2f} | {reward} |"
            )

    lines += ["", "## Setting", ""]
    for aspect in ASPECTS:
        data = report["data"][aspect]
        files = ", ".join(
            f"`{name}` (sha256 {digest[:12]}…)" for name, digest in data["files"].items()
        )
        limit = "" if data["max_pairs"] is None else f", limited to the first {data['max_pairs']}"
        dropped = ""
        if data["dropped_pairs"]:
            dropped = f", {data['dropped_pairs']} dropped because the prompt fills max_length"
        lines.append(
            f"- {aspect}: {files}. Held-out split of the {aspect} vector's training run: "
            f"fraction {data['heldout_fraction']}, seed {data['seed']}, {data['heldout_pairs']} "
            f"of {data['total_pairs']} pairs{limit}{dropped}. Prompts rendered with the chat "
            f"template to at most {data['max_prompt_tokens']} tokens, prompt + response cut to "
            f"{data['max_length']} tokens keeping the start."
        )
    machine = report["machine"]
    lines += [
        f"- Command: `{report['command']}`",
        f"- Machine: {machine['processor']}, {machine['cpu_count']} CPUs, {machine['torch_threads']} "
        f"torch threads, torch {machine['torch']}.",
        f"- Wall time: {report['wall_time_seconds']:.1f} s for this run, and "
        f"{report['scoring_seconds']:.1f} s of scoring summed over all cells, including cells "
        "scored by earlier, resumed runs.",
        "",
    ]
    return "\n".join(lines)


def evaluate(
    bundle_path: Path,
    data_root: Path,
    max_pairs: int | None = None,
    batch_size: int = 8,
    base_model: str | None = None,
    device: str = "auto",
    cache_dir: Path = DEFAULT_CACHE_DIR,
) -> dict:
    """Score the held-out pairs of both aspects with θ₀, θ₀ + τ_help and θ₀ + τ_harm.

    Args:
        bundle_path: the bundle folder.
        data_root: the folder containing the data files named in the vectors' recipes.
        max_pairs: the number of held-out pairs of each aspect to score, from the first, or
            None for all of them.
        batch_size: pairs per forward pass (two sequences each).
        base_model: the base model, as :func:`peo_merge.base_model.resolve_base_model` takes it.
        device: ``auto``, ``cpu``, ``cuda`` or another torch device name.
        cache_dir: where the per-cell score cache lives.

    Returns:
        The report: per aspect and model the summary of :func:`summarize_scores`, plus the data,
        bundle, base model and device it was computed with. The caller adds command, machine and
        timing.

    Raises:
        EvaluationError: a data file is missing or does not match the recipe.
        BundleError: the bundle is invalid or does not fit the base model.
    """
    bundle: Bundle = load_bundle(bundle_path)
    heldout = {
        aspect: load_heldout(aspect, bundle.manifest.vectors[aspect].recipe, data_root)
        for aspect in ASPECTS
    }
    for aspect, heldout_set in heldout.items():
        logger.info(
            "%s: %d held-out of %d pairs (fraction %s, seed %s)",
            aspect,
            len(heldout_set.pairs),
            heldout_set.total_pairs,
            heldout_set.heldout_fraction,
            heldout_set.seed,
        )

    torch_device = resolve_device(device)
    source = resolve_base_model(base_model)
    expected_sha = bundle.manifest.base_model.get("source_sha256")
    if expected_sha and source.source_sha256 and expected_sha != source.source_sha256:
        logger.warning(
            "base model source sha256 %s differs from the bundle's %s",
            source.source_sha256,
            expected_sha,
        )
    model, tokenizer = load_base_model(source, torch.float32, str(torch_device))
    validate_against_base(bundle, base_state(model))
    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.eos_token_id

    # Encode every pair once, because the tokens do not depend on the model.
    encoded: dict[str, dict[int, tuple[EncodedSequence, EncodedSequence]]] = {}
    for aspect, heldout_set in heldout.items():
        pairs = heldout_set.pairs if max_pairs is None else heldout_set.pairs[:max_pairs]
        encoded[aspect] = {}
        for index, pair in enumerate(pairs):
            sequences = encode_pair(
                pair, tokenizer, heldout_set.max_prompt_tokens, heldout_set.max_length
            )
            if sequences is not None:
                encoded[aspect][index] = sequences
        if not encoded[aspect]:
            raise EvaluationError(f"{aspect}: no held-out pair leaves room for a response token")

    # A converted base is identified by its source file's hash, a local folder by its path.
    base_identity = source.identity()
    if source.source_sha256:
        base_identity["path"] = None
    cache_key = {
        "scoring_version": SCORING_VERSION,
        "base_model": base_identity,
        "vectors": {
            name: sha256_file(bundle.path / entry.file)
            for name, entry in bundle.manifest.vectors.items()
        },
        "data": {
            aspect: {
                "files": heldout_set.data_files,
                "heldout_fraction": heldout_set.heldout_fraction,
                "seed": heldout_set.seed,
                "max_prompt_tokens": heldout_set.max_prompt_tokens,
                "max_length": heldout_set.max_length,
            }
            for aspect, heldout_set in heldout.items()
        },
        "max_pairs": max_pairs,
        "dtype": "float32",
        "device": torch_device.type,
    }
    cache = ScoreCache.for_key(cache_dir, bundle.manifest.name, cache_key)
    logger.info("score cache: %s", cache.path)

    fuser = None
    buffers = None
    for model_name, coefficients in MODELS.items():
        pending = [aspect for aspect in ASPECTS if not cache.cell(model_name, aspect)["complete"]]
        if not pending:
            logger.info("%s: all cells cached", model_name)
            continue
        if coefficients is None:
            scorer = model
        else:
            if fuser is None:
                fuser = Fuser(base_state(model), bundle.vectors)
                buffers = fuser.allocate()
            fuser.fuse_into(buffers, coefficients)
            scorer = build_fused_model(model, buffers)
            scorer.eval()
        for aspect in pending:
            label = f"{MODEL_LABELS[model_name]} on {aspect}"
            cell = cache.cell(model_name, aspect)
            score_cell(scorer, encoded[aspect], cell, cache, label, batch_size, pad_token_id)
        del scorer

    results: dict[str, dict[str, dict]] = {}
    scoring_seconds = 0.0
    for aspect in ASPECTS:
        results[aspect] = {}
        rows = {}
        for model_name in MODELS:
            cell = cache.cell(model_name, aspect)
            scoring_seconds += cell["seconds"]
            rows[model_name] = [cell["scores"][str(index)] for index in encoded[aspect]]
            results[aspect][model_name] = summarize_scores(rows[model_name])
            if model_name != "base" and len(rows[model_name]) > 1:
                cell_result = results[aspect][model_name]
                _, stderr = paired_change(rows["base"], rows[model_name])
                cell_result["change_summed_paired_stderr"] = stderr
                _, stderr = paired_change(rows["base"], rows[model_name], per_token=True)
                cell_result["change_per_token_paired_stderr"] = stderr
                cell_result["reward_accuracy"] = reward_accuracy(rows["base"], rows[model_name])

    data = {}
    for aspect, heldout_set in heldout.items():
        considered = len(heldout_set.pairs)
        if max_pairs is not None:
            considered = min(max_pairs, considered)
        data[aspect] = {
            "files": heldout_set.data_files,
            "heldout_fraction": heldout_set.heldout_fraction,
            "seed": heldout_set.seed,
            "total_pairs": heldout_set.total_pairs,
            "heldout_pairs": len(heldout_set.pairs),
            "max_pairs": max_pairs,
            "scored_pairs": len(encoded[aspect]),
            "dropped_pairs": considered - len(encoded[aspect]),
            "max_prompt_tokens": heldout_set.max_prompt_tokens,
            "max_length": heldout_set.max_length,
        }
    return {
        "bundle": {
            "name": bundle.manifest.name,
            "path": str(bundle_path),
            "vector_sha256": cache_key["vectors"],
        },
        "base_model": source.identity(),
        "dtype": "float32",
        "device": str(torch_device),
        "data": data,
        "results": results,
        "scoring_seconds": scoring_seconds,
        "cache_file": str(cache.path),
    }


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, type=Path, help="bundle folder")
    parser.add_argument(
        "--output",
        required=True,
        type=Path,
        help="Markdown file to write, with the JSON next to it",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help=f"folder containing the recipes' data files (default: ${DATA_ROOT_ENV}, else the "
        "shared/data folder next to the repository)",
    )
    parser.add_argument(
        "--max-pairs", type=int, default=None, help="max held-out pairs per aspect (default: all)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--base-model", default=None, help="local model folder (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="folder of the score cache"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the evaluation command."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_pairs is not None and args.max_pairs < 1:
        parser.error("--max-pairs must be at least 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)

    started = time.monotonic()
    try:
        report = evaluate(
            args.bundle,
            args.data_root if args.data_root is not None else default_data_root(),
            max_pairs=args.max_pairs,
            batch_size=args.batch_size,
            base_model=args.base_model,
            device=args.device,
            cache_dir=args.cache_dir,
        )
    except (EvaluationError, BundleError) as error:
        sys.exit(f"error: {error}")

    arguments = sys.argv[1:] if argv is None else argv
    report["command"] = shlex.join(["python", "-m", "training.evaluate", *arguments])
    report["machine"] = {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    report["wall_time_seconds"] = time.monotonic() - started

    markdown = render_markdown(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(markdown)
    json_path = args.output.with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s and %s", args.output, json_path)
    print(markdown)


if __name__ == "__main__":
    main()
