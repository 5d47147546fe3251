"""Smoke runs of the quick benchmarks: each writes its JSON with the ratio keys as plain numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

EXPECTED_KEYS = {
    "fusion": [
        "ratio_to_bound",
        "ratio_to_peft",
        "ratio_to_state_dict_loop",
        "fusion_s",
        "bound_s",
    ],
    "memory": ["cached_entry_bytes", "targeted_weight_bytes", "base_bytes", "total_ours_bytes"],
    "serving": ["tokens_per_s_ratio", "ttft_ratio"],
    "concurrency": ["mixed_to_single_ratio_8", "mixed_to_one_client_ratio_8"],
    "decode_step": ["unfused_to_fused_ratio_8", "second_team_unfused_slowdown_8"],
}


@pytest.mark.parametrize("name", list(EXPECTED_KEYS))
def test_quick_benchmark_writes_ratios(name, tmp_path):
    env = os.environ | {"PEO_BENCH_RESULTS_DIR": str(tmp_path), "PEO_THREADS": "1"}
    command = [sys.executable, "-m", f"benchmarks.{name}", "--quick"]
    if name != "memory":
        command += ["--threads", "1"]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert completed.returncode == 0, completed.stderr[-2000:]

    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["machine"]["cpu_count"] >= 1
    for key in EXPECTED_KEYS[name]:
        assert isinstance(result[key], (int, float)), key
        assert result[key] > 0, key
    if name == "concurrency":
        runs = result["auto"]
        assert runs["one_client"]["engines"] == {"fused": runs["one_client"]["requests"]}
        assert runs["single_8"]["engines"] == {"fused": runs["single_8"]["requests"]}
        assert runs["mixed_8"]["engines"].get("unfused", 0) >= 1
        per_run = 8 * result["new_tokens"] * result["rounds"]
        assert runs["mixed_8"]["tokens"] == per_run * result["repeats"]
    if name == "decode_step":
        batch = result["batches"]["8"]
        assert batch["unfused_ms"] / batch["fused_ms"] == pytest.approx(
            batch["unfused_to_fused_ratio"]
        )
    if name == "memory":
        assert result["cached_entry_bytes"] <= result["targeted_weight_bytes"]
        assert result["targeted_weight_bytes"] < result["full_model_copy_bytes"]
