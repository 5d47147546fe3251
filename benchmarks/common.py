"""Helpers shared by the benchmarks: timing, machine description and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# PEO_BENCH_RESULTS_DIR redirects results, so that smoke runs in tests leave the recorded ones alone
RESULTS_DIR = Path(
    os.environ.get("PEO_BENCH_RESULTS_DIR") or Path(__file__).resolve().parent / "results"
)


def time_call(function: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """Time ``function`` and return the median, minimum and every sample, in seconds."""
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples}


def machine() -> dict:
    """Describe the machine a benchmark ran on."""
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_result(name: str, figures: dict, command: str) -> Path:
    """Write a benchmark's figures, machine and command to ``benchmarks/results/NAME.json``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    record = {"benchmark": name, "command": command, "machine": machine(), **figures}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
