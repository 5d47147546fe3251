"""Helpers shared by the benchmarks: timing, machine description and result files."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
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


REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_LOG = Path("/tmp") / "peo-benchmark-server.log"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, threads: int, bundle: str, *flags: str) -> subprocess.Popen:
    """Start ``python -m server`` on 127.0.0.1 and wait until ``/readyz`` returns 200."""
    command = [
        sys.executable,
        "-m",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--bundle",
        bundle,
        *flags,
    ]
    log = open(SERVER_LOG, "w")
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"server did not become ready; see {SERVER_LOG}")
