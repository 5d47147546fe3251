"""Generate and score responses for many coefficient assignments, resumably, in shared batches.

Every evaluated model is θ₀ + Σₖ cₖ·τₖ over one set of task vectors, so a single unfused model
(:func:`peo_merge.mixed.build_mixed_model`) serves all of them: each batch row carries its own
coefficients, and one batch mixes rows of many candidates. Responses are greedy, so a candidate's
scores depend on its coefficients, the prompts and the scorers, and on the batch it shared only
through rounding (padding and batch size change the order of floating-point sums).

Each candidate's result goes to one line of ``points.jsonl`` as soon as it is scored, with the
seconds spent generating and scoring it. A run that is started again skips candidates already
there, keyed by their method and coefficients, so the points' seconds add up to the search's
compute time across interrupted runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peo_merge.mixed import build_mixed_model
from peo_merge.task_vector import TaskVector

logger = logging.getLogger(__name__)

POINTS_FILE = "points.jsonl"


@dataclass(frozen=True)
class Candidate:
    """One model to evaluate: the method it belongs to and the coefficient of every vector.

    ``alpha`` and ``beta`` are the steering coordinates reported for it: for PEO points the
    offsets from θ_init + τ_gen, for the other methods the aspect coefficients themselves.
    """

    method: str
    alpha: float
    beta: float
    coefficients: dict[str, float] = field(hash=False)

    def key(self) -> str:
        """Return the identity used to skip a candidate already scored."""
        parts = ",".join(f"{name}={value:.6g}" for name, value in sorted(self.coefficients.items()))
        return f"{self.method}|{parts}"


def peo_candidates(
    alphas: Sequence[float], betas: Sequence[float], offset: dict[str, float]
) -> list[Candidate]:
    """Return θ_init + τ_gen + α·τ_help + β·τ_harm for every (α, β) of the grid.

    ``offset`` contains the coefficients of θ_init + τ_gen, for example ``{"helpfulness": 0.5,
    "harmlessness": 0.5, "generalist": 1.0}``.
    """
    candidates = []
    for alpha in alphas:
        for beta in betas:
            coefficients = dict(offset)
            coefficients["helpfulness"] = coefficients.get("helpfulness", 0.0) + alpha
            coefficients["harmlessness"] = coefficients.get("harmlessness", 0.0) + beta
            candidates.append(Candidate("peo", alpha, beta, coefficients))
    return candidates


def soup_candidates(count: int) -> list[Candidate]:
    """Return θ₀ + w·τ_help + (1 − w)·τ_harm for ``count`` values of w spread over [0, 1]."""
    if count < 2:
        raise ValueError(f"soup needs at least 2 points, got {count}")
    weights = [index / (count - 1) for index in range(count)]
    return [
        Candidate("soup", w, 1.0 - w, {"helpfulness": w, "harmlessness": 1.0 - w}) for w in weights
    ]


def single_candidates(mixed_vector: str | None) -> list[Candidate]:
    """Return the base, each aspect model alone, and mixed-data DPO when its vector is given."""
    candidates = [
        Candidate("base", 0.0, 0.0, {}),
        Candidate("help_only", 1.0, 0.0, {"helpfulness": 1.0}),
        Candidate("harm_only", 0.0, 1.0, {"harmlessness": 1.0}),
    ]
    if mixed_vector is not None:
        candidates.append(Candidate("mixed_dpo", 0.0, 0.0, {mixed_vector: 1.0}))
    return candidates


def read_points(path: Path) -> dict[str, dict]:
    """Return the scored points of ``points.jsonl`` keyed by candidate key; none if absent.

    A last line cut short, by a run killed while writing it, is dropped with a warning: that
    candidate counts as not scored. An unreadable line anywhere else is an error.
    """
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    points = {}
    for number, line in enumerate(lines, start=1):
        try:
            point = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                logger.warning("%s: dropping an incomplete last line: %s", path, error)
                break
            raise ValueError(f"{path}:{number}: invalid JSON: {error}") from error
        points[point["key"]] = point
    return points


class Generator:
    """Greedy batched generation where every row has its own coefficients.

    Args:
        model: the base causal LM; its weights are shared, not copied.
        tokenizer: its tokenizer, with a chat template.
        vectors: every task vector a candidate may use.
        max_new_tokens: the length limit of one response.
        batch_size: rows per batch.
    """

    def __init__(
        self,
        model,
        tokenizer,
        vectors: dict[str, TaskVector],
        max_new_tokens: int,
        batch_size: int,
    ):
        self.model, self.rows = build_mixed_model(model, vectors)
        self.model.eval()
        self.tokenizer = tokenizer
        self.vector_names = list(vectors)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def coefficient_row(self, coefficients: dict[str, float]) -> list[float]:
        unknown = sorted(set(coefficients) - set(self.vector_names))
        if unknown:
            raise KeyError(f"no task vector {unknown[0]!r}; loaded: {self.vector_names}")
        return [float(coefficients.get(name, 0.0)) for name in self.vector_names]

    def generate(self, jobs: list[tuple[str, dict[str, float]]]) -> list[str]:
        """Return the greedy response to each ``(prompt, coefficients)`` job, in order."""
        responses: list[str] = []
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start : start + self.batch_size]
            encoded = [
                self.tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt, _ in batch
            ]
            width = max(len(ids) for ids in encoded)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, sequence in enumerate(encoded):
                ids[row, width - len(sequence) :] = torch.tensor(sequence)
                mask[row, width - len(sequence) :] = 1
            self.rows.set(torch.tensor([self.coefficient_row(c) for _, c in batch]))
            with torch.inference_mode():
                output = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    num_return_sequences=1,
                    pad_token_id=pad,
                )
            for row in output[:, width:]:
                responses.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return responses


Scorer = Callable[[list, list[str]], list[float]]


def evaluate_candidates(
    candidates: list[Candidate],
    prompts: list[tuple[str, tuple]],
    generator: Generator,
    scorers: dict[str, Scorer],
    output_dir: Path,
    candidates_per_batch: int = 1,
) -> dict[str, dict]:
    """Generate, score and record every candidate not yet in ``points.jsonl``; return all points.

    Args:
        candidates: the models to evaluate.
        prompts: ``(rendered prompt, dialogue turns)`` for each held-out prompt.
        generator: the batched generator.
        scorers: ``{"help_score": scorer, "harm_score": scorer}``; each scores dialogue turns
            and responses.
        output_dir: where ``points.jsonl`` lives.
        candidates_per_batch: candidates generated together (their rows share batches).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / POINTS_FILE
    points = read_points(path)
    # rewrite what was read, so that an incomplete last line is gone before new lines follow
    path.write_text("".join(json.dumps(point) + "\n" for point in points.values()))
    todo = [candidate for candidate in candidates if candidate.key() not in points]
    logger.info("%d candidates, %d already scored", len(candidates), len(candidates) - len(todo))
    dialogues = [turns for _, turns in prompts]
    for start in range(0, len(todo), candidates_per_batch):
        group = todo[start : start + candidates_per_batch]
        jobs = [(prompt, c.coefficients) for c in group for prompt, _ in prompts]
        started = time.monotonic()
        responses = generator.generate(jobs)
        # the group's generation time, shared evenly; each point adds its own scoring time
        generation_share = (time.monotonic() - started) / len(group)
        for index, candidate in enumerate(group):
            scoring_started = time.monotonic()
            mine = responses[index * len(prompts) : (index + 1) * len(prompts)]
            point = {
                "key": candidate.key(),
                "method": candidate.method,
                "alpha": candidate.alpha,
                "beta": candidate.beta,
                "coefficients": candidate.coefficients,
            }
            for name, scorer in scorers.items():
                scores = scorer(dialogues, mine)
                if not all(math.isfinite(score) for score in scores):
                    raise ValueError(f"{name} gave a non-finite score for {candidate.key()}")
                point[name] = sum(scores) / len(scores)
            point["seconds"] = round(generation_share + time.monotonic() - scoring_started, 3)
            point["responses"] = mine
            with path.open("a") as handle:
                handle.write(json.dumps(point) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            points[point["key"]] = point
            logger.info(
                "scored %s: %s",
                candidate.key(),
                {name: round(point[name], 4) for name in scorers},
            )
        logger.info("progress: %d of %d candidates", len(points), len(candidates))
    return points
