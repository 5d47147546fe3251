"""How far summed preference accuracy can move for a given shift of the log-probability margins.

Run as ``python -m training.margin_shift --report docs/preference_accuracy_420.json --output
docs/margin_shift_420.md`` after ``training.evaluate`` has written that report. It reads the
per-pair scores from the evaluation's score cache and answers two questions for each aspect:

- how many points summed accuracy would gain if every pair's margin rose by a fixed number of
  nats (a uniform shift, the best case for a given mean shift), and
- how many it would gain if the vector's own per-pair shift were multiplied by a factor. This is
  a linear extrapolation of the measured shift, not a score of a fused model at that coefficient.

Both are read off the base model's margins, whose spread decides how many pairs lie near zero.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from peo_merge.bundle import ASPECTS
from training.evaluate import MODEL_LABELS, preference_accuracy

UNIFORM_SHIFTS = (2.0, 5.0, 10.0, 20.0)
VECTOR_FACTORS = (1.0, 2.0, 3.0, 5.0)
NEAR_ZERO_NATS = 5.0


class MarginShiftError(Exception):
    """Raised when the report or its score cache cannot be used."""


def margins(rows: Sequence[Sequence[float]]) -> list[float]:
    """Return the summed chosen − rejected margin of each ``[c_sum, c_tokens, r_sum, r_tokens]``."""
    return [row[0] - row[2] for row in rows]


def accuracy_of_margins(values: Sequence[float]) -> float:
    """Return the share of positive margins, zero counting half."""
    return preference_accuracy(list(values), [0.0] * len(values))


def uniform_shift_change(base_margins: Sequence[float], shift: float) -> float:
    """Return the accuracy change when every margin rises by ``shift`` nats."""
    shifted = [margin + shift for margin in base_margins]
    return accuracy_of_margins(shifted) - accuracy_of_margins(base_margins)


def scaled_shift_change(
    base_margins: Sequence[float], model_margins: Sequence[float], factor: float
) -> float:
    """Return the accuracy change when each pair's measured shift is multiplied by ``factor``.

    Raises:
        ValueError: the two lists have different lengths.
    """
    if len(base_margins) != len(model_margins):
        raise ValueError(f"got {len(base_margins)} base and {len(model_margins)} model margins")
    scaled = [
        base + factor * (model - base)
        for base, model in zip(base_margins, model_margins, strict=True)
    ]
    return accuracy_of_margins(scaled) - accuracy_of_margins(base_margins)


def analyse(base_rows: Sequence[Sequence[float]], model_rows: Sequence[Sequence[float]]) -> dict:
    """Return the margin statistics of one aspect: spread, uniform and scaled shifts."""
    base_margins = margins(base_rows)
    model_margins = margins(model_rows)
    shifts = [model - base for base, model in zip(base_margins, model_margins, strict=True)]
    count = len(base_margins)
    return {
        "pairs": count,
        "median_abs_base_margin": statistics.median(abs(margin) for margin in base_margins),
        "near_zero_share": sum(abs(margin) < NEAR_ZERO_NATS for margin in base_margins) / count,
        "mean_shift": statistics.fmean(shifts),
        "uniform": {shift: uniform_shift_change(base_margins, shift) for shift in UNIFORM_SHIFTS},
        "scaled": {
            factor: scaled_shift_change(base_margins, model_margins, factor)
            for factor in VECTOR_FACTORS
        },
    }


REPORT_KEYS = ("bundle", "cache_file", "command", "results")


def read_report(path: Path) -> dict:
    """Read a JSON report of ``training.evaluate``.

    Raises:
        MarginShiftError: the file is not JSON or lacks a key of such a report.
    """
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MarginShiftError(
            f"{path} is not JSON ({error}). Pass the .json file that training.evaluate writes "
            "next to its Markdown table"
        ) from error
    missing = [key for key in REPORT_KEYS if not isinstance(report, dict) or key not in report]
    if missing:
        raise MarginShiftError(
            f"{path} is not a training.evaluate report: missing {', '.join(missing)}"
        )
    return report


def load_rows(report: dict) -> dict[str, tuple[list, list]]:
    """Return ``{aspect: (base rows, own-vector rows)}`` from the report's score cache.

    Raises:
        MarginShiftError: the cache file is missing or lacks a complete cell.
    """
    cache_path = Path(report["cache_file"])
    if not cache_path.is_file():
        raise MarginShiftError(
            f"score cache {cache_path} not found. Run the report's command again to rebuild "
            f"it: {report['command']}"
        )
    cells = json.loads(cache_path.read_text())["cells"]
    rows = {}
    for aspect in ASPECTS:
        pair_count = report["results"][aspect]["base"]["pairs"]
        pair_rows = []
        for model in ("base", aspect):
            cell = cells.get(f"{model}/{aspect}")
            if cell is None or not cell["complete"] or len(cell["scores"]) != pair_count:
                raise MarginShiftError(
                    f"{cache_path}: cell {model}/{aspect} is incomplete. Run the report's "
                    f"command again to finish it: {report['command']}"
                )
            pair_rows.append([cell["scores"][key] for key in sorted(cell["scores"], key=int)])
        rows[aspect] = (pair_rows[0], pair_rows[1])
    return rows


def display_path(path: str) -> str:
    """Return ``path`` relative to the working directory when it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def render_markdown(report: dict, results: dict[str, dict], command: str) -> str:
    """Return the analysis as a Markdown document."""
    uniform_header = " | ".join(f"+{shift:g} nats" for shift in UNIFORM_SHIFTS)
    scaled_header = " | ".join(f"×{factor:g}" for factor in VECTOR_FACTORS)
    lines = [
        f"# Margin shifts and summed accuracy: `{report['bundle']['name']}`",
        "",
        "Summed accuracy changes only for pairs whose margin crosses zero. The table gives the "
        f"base model's median |margin|, the share of pairs within {NEAR_ZERO_NATS:g} nats of "
        "zero, and the mean shift the aspect's own vector gives. Then, in points of summed "
        "accuracy: the change if every pair's margin rose by a fixed amount, and the change if "
        "the vector's measured per-pair shift were multiplied by a factor. The factors are a "
        "linear extrapolation, not scores of fused models.",
        "",
        "| Aspect | Vector | Pairs | Median abs. base margin | Within "
        f"{NEAR_ZERO_NATS:g} nats | Mean shift | {uniform_header} | {scaled_header} |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * (len(UNIFORM_SHIFTS) + len(VECTOR_FACTORS)),
    ]
    for aspect, result in results.items():
        uniform = " | ".join(f"{100 * change:+.1f}" for change in result["uniform"].values())
        scaled = " | ".join(f"{100 * change:+.1f}" for change in result["scaled"].values())
        lines.append(
            f"| {aspect} | {MODEL_LABELS[aspect]} | {result['pairs']} "
            f"| {result['median_abs_base_margin']:.1f} | {100 * result['near_zero_share']:.1f} % "
            f"| {result['mean_shift']:+.2f} | {uniform} | {scaled} |"
        )
    lines += [
        "",
        f"- Scores: `{display_path(report['cache_file'])}`, written by `{report['command']}`.",
        f"- Command: `{command}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the analysis command."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--report", required=True, type=Path, help="JSON report written by training.evaluate"
    )
    parser.add_argument("--output", required=True, type=Path, help="Markdown file to write")
    args = parser.parse_args(argv)
    try:
        report = read_report(args.report)
        rows = load_rows(report)
    except (OSError, MarginShiftError) as error:
        sys.exit(f"error: {error}")
    results = {aspect: analyse(*rows[aspect]) for aspect in ASPECTS}
    command = "python -m training.margin_shift " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    args.output.write_text(render_markdown(report, results, command))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
