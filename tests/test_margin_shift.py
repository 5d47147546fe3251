"""Tests of the margin-shift analysis on hand-made per-pair scores."""

from __future__ import annotations

import json

import pytest

from training.margin_shift import (
    MarginShiftError,
    analyse,
    load_rows,
    main,
    read_report,
    scaled_shift_change,
    uniform_shift_change,
)

# rows are [chosen_sum, chosen_tokens, rejected_sum, rejected_tokens]
BASE = [[-10.0, 5, -7.0, 5], [-40.0, 9, -8.0, 3], [-5.0, 2, -9.0, 4], [-6.0, 3, -6.0, 3]]
# the vector widens the first margin by 4 nats, the second by 1, narrows the third by 2
MODEL = [[-8.0, 5, -9.0, 5], [-39.0, 9, -8.0, 3], [-6.0, 2, -8.0, 4], [-6.0, 3, -6.0, 3]]


def test_uniform_shift_counts_crossings():
    base_margins = [-3.0, -32.0, 4.0, 0.0]
    # base accuracy: one win and one tie of four
    assert uniform_shift_change(base_margins, 2.0) == pytest.approx(0.5 / 4)
    assert uniform_shift_change(base_margins, 5.0) == pytest.approx(1.5 / 4)
    assert uniform_shift_change(base_margins, 40.0) == pytest.approx(2.5 / 4)


def test_scaled_shift_extrapolates_each_pair():
    base_margins = [-3.0, -32.0, 4.0]
    model_margins = [1.0, -31.0, 2.0]
    assert scaled_shift_change(base_margins, model_margins, 1.0) == pytest.approx(1 / 3)
    # doubled, the third pair's 2-nat loss sends it to exactly zero, a tie
    assert scaled_shift_change(base_margins, model_margins, 2.0) == pytest.approx(0.5 / 3)
    with pytest.raises(ValueError, match="got 3 base and 2 model margins"):
        scaled_shift_change(base_margins, model_margins[:2], 1.0)


def test_analyse_reports_spread_and_mean_shift():
    result = analyse(BASE, MODEL)
    assert result["pairs"] == 4
    # absolute base margins 3, 32, 4, 0
    assert result["median_abs_base_margin"] == pytest.approx(3.5)
    assert result["near_zero_share"] == pytest.approx(3 / 4)
    assert result["mean_shift"] == pytest.approx((4 + 1 - 2 + 0) / 4)
    assert result["scaled"][1.0] == pytest.approx(1 / 4)


def write_report(folder, complete=True):
    cells = {}
    for aspect in ("helpfulness", "harmlessness"):
        for model, rows in (("base", BASE), (aspect, MODEL)):
            scores = {str(index): row for index, row in enumerate(rows)}
            cells[f"{model}/{aspect}"] = {"scores": scores, "complete": complete, "seconds": 1.0}
    cache = folder / "cache.json"
    cache.write_text(json.dumps({"key": {}, "cells": cells}))
    results = {aspect: {"base": {"pairs": 4}} for aspect in ("helpfulness", "harmlessness")}
    report = {
        "bundle": {"name": "tiny"},
        "cache_file": str(cache),
        "command": "python -m training.evaluate --bundle tiny",
        "results": results,
    }
    path = folder / "report.json"
    path.write_text(json.dumps(report))
    return path


def test_command_writes_table(tmp_path):
    output = tmp_path / "shift.md"
    main(["--report", str(write_report(tmp_path)), "--output", str(output)])
    rows = [line for line in output.read_text().splitlines() if line.startswith("| help")]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[:6] == ["helpfulness", "θ₀ + τ_help", "4", "3.5", "75.0 %", "+0.75"]
    # +2 nats leaves the -3 margin negative and turns the tie into a win: +12.5 points
    assert cells[6] == "+12.5"


def test_incomplete_cell_names_the_cell(tmp_path):
    report = json.loads(write_report(tmp_path, complete=False).read_text())
    with pytest.raises(
        MarginShiftError, match="cell base/helpfulness is incomplete. Run the report"
    ):
        load_rows(report)


def test_missing_cache_names_the_command(tmp_path):
    report = json.loads(write_report(tmp_path).read_text())
    report["cache_file"] = str(tmp_path / "gone.json")
    with pytest.raises(MarginShiftError, match=r"gone.json not found\. Run .*training.evaluate"):
        load_rows(report)


def test_markdown_report_is_rejected(tmp_path):
    table = tmp_path / "accuracy.md"
    table.write_text("# Preference accuracy\n")
    with pytest.raises(MarginShiftError, match=r"accuracy.md is not JSON .* Pass the \.json file"):
        read_report(table)


def test_report_without_cache_key_is_rejected(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"bundle": {}, "command": "x", "results": {}}))
    with pytest.raises(
        MarginShiftError, match="not a training.evaluate report: missing cache_file"
    ):
        read_report(path)
