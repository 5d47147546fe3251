"""A bounded load test: mixed preferences and streaming against a small server on 127.0.0.1.

At most ``TOTAL_REQUESTS`` requests from ``CLIENTS`` concurrent clients, each requesting at
most 4 tokens; the run also ends after ``RUN_SECONDS``. The server admits 2 running
and 8 queued generations and keeps 3 fused models, so most requests are turned away and the
six steering keys keep evicting each other.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from conftest import ServerProcess
from test_server import metric_value, parse_sse

TOTAL_REQUESTS = 160
CLIENTS = 48
RUN_SECONDS = 120.0
# Headroom over the base weights, the cache budget and the task vectors, for the Python and
# torch runtime, the tokenizer, KV caches and activations. An estimate: a float32 run on CPU
# peaked about 430 MiB above the base weights plus a full cache.
RSS_MARGIN_BYTES = 1024**3
STEERING = [
    {"preference": 0.0},
    {"preference": 0.5},
    {"preference": 1.0},
    {"coefficients": {"helpfulness": 1.5, "harmlessness": -0.5}},
    {"coefficients": {"helpfulness": -0.5, "harmlessness": 1.5}},
    {"coefficients": {"helpfulness": 0.25, "harmlessness": 0.25}},
]
INVALID_FRACTION = 0.1
REQUEST_PATTERN = re.compile(
    r'^peo_requests_total\{route="/generate",status="(\d+)"\} (\S+)$', re.M
)


@pytest.fixture(scope="module", params=["auto", "fused"])
def loaded_server(request):
    """A small server in the default mode, and one that serves every pair fused."""
    process = ServerProcess(
        "--engine-mode", request.param,
        "--max-concurrency", "2", "--max-queue", "8", "--cache-max-entries", "3",
        "--max-new-tokens", "8", "--default-max-new-tokens", "4",
    )  # fmt: skip
    process.engine_mode = request.param
    yield process
    process.stop()


def resident_bytes(pid: int) -> int:
    """Return the resident set size of a process, from VmRSS in /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


class PeakSampler:
    """Sample a process's resident memory on a thread and keep the largest value."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid = pid
        self.interval = interval
        self.peak = resident_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, resident_bytes(self.pid))

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def request_body(index: int, rng: random.Random) -> dict:
    body = {"prompt": "Tell me about dogs.", "max_new_tokens": rng.randint(1, 4), "seed": 7}
    # in turn, so that consecutive requests use different keys and the cache keeps evicting
    body |= STEERING[index % len(STEERING)]
    body["stream"] = rng.random() < 0.5
    if rng.random() < INVALID_FRACTION:
        body = {"prompt": "x", "preference": 1.5}
    return body


async def send_one(client: httpx.AsyncClient, body: dict, outcomes: Counter) -> float:
    """Send one request and count its outcome; return the seconds to wait before the next."""
    if body.get("stream"):
        async with client.stream("POST", "/generate", json=body) as response:
            lines = [line async for line in response.aiter_lines()]
    else:
        response = await client.post("/generate", json=body)
        lines = []

    if response.status_code == 200:
        if body.get("stream"):
            kinds = [kind for kind, _ in parse_sse(lines)]
            outcomes["ok" if kinds and kinds[-1] == "done" else "broken_stream"] += 1
        else:
            outcomes["ok"] += 1
        return 0.0
    if response.status_code in (429, 503):
        retry_after = response.headers.get("retry-after", "")
        outcomes["rejected" if retry_after.isdigit() else "rejected_without_retry_after"] += 1
        return float(retry_after or 1)
    if response.status_code == 422 and "error" in response.json():
        outcomes["client_error"] += 1
        return 0.0
    outcomes[f"unexpected_{response.status_code}"] += 1
    return 0.0


async def run_load(url: str) -> Counter:
    """Send up to TOTAL_REQUESTS requests from CLIENTS concurrent clients; count outcomes."""
    rng = random.Random(0)
    bodies = [request_body(index, rng) for index in range(TOTAL_REQUESTS)]
    outcomes: Counter = Counter()
    deadline = time.monotonic() + RUN_SECONDS
    limits = httpx.Limits(max_connections=CLIENTS)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            while bodies and time.monotonic() < deadline:
                body = bodies.pop()
                try:
                    wait = await send_one(client, body, outcomes)
                except httpx.HTTPError as error:
                    outcomes[f"transport_error_{type(error).__name__}"] += 1
                    continue
                await asyncio.sleep(wait * rng.uniform(0.5, 1.0))

        await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return outcomes


def generate_counts(metrics: str) -> dict[str, float]:
    return {status: float(value) for status, value in REQUEST_PATTERN.findall(metrics)}


def test_load_mixed_requests_stay_bounded(loaded_server):
    client = httpx.Client(base_url=loaded_server.url, timeout=30)
    info = client.get("/info").json()
    base_folder = Path(info["base_model"]["path"])
    base_bytes = sum(path.stat().st_size for path in base_folder.glob("*.safetensors"))
    cache = info["cache"]
    cache_budget = min(cache["max_entries"] * cache["entry_bytes"], cache["max_bytes"])
    vector_bytes = metric_value(client.get("/metrics").text, "peo_task_vector_bytes")
    unfused_bytes = info["unfused_factor_bytes"]
    rss_limit = base_bytes + cache_budget + vector_bytes + unfused_bytes + RSS_MARGIN_BYTES

    with PeakSampler(loaded_server.process.pid) as sampler:
        outcomes = asyncio.run(run_load(loaded_server.url))
    sent = sum(outcomes.values())

    # the middleware counts a stream once its last byte is sent, so let the counters settle
    deadline = time.monotonic() + 10
    counts = generate_counts(client.get("/metrics").text)
    while sum(counts.values()) < sent and time.monotonic() < deadline:
        time.sleep(0.2)
        counts = generate_counts(client.get("/metrics").text)
    metrics = client.get("/metrics").text
    ready = client.get("/readyz")
    client.close()

    assert set(outcomes) <= {"ok", "rejected", "client_error"}, outcomes
    assert outcomes["ok"] > 0
    assert outcomes["rejected"] > 0
    assert outcomes["client_error"] > 0
    assert sampler.peak < rss_limit, (sampler.peak / 2**20, rss_limit / 2**20)
    assert ready.status_code == 200
    assert ready.json()["in_flight"] == 0
    assert ready.json()["queued"] == 0
    assert metric_value(metrics, "peo_requests_in_flight") == 0
    assert metric_value(metrics, "peo_requests_queued") == 0
    assert metric_value(metrics, "peo_fused_cache_entries") <= 3
    if loaded_server.engine_mode == "fused":
        # more pairs than cache entries: the LRU cache turns over
        assert metric_value(metrics, "peo_fused_cache_evictions_total") > 0
        assert unfused_bytes == 0
    else:
        # mixed pairs in flight together take the unfused path
        assert metric_value(metrics, 'peo_engine_requests_total{engine="unfused"}') > 0
    assert sum(counts.values()) == sent
    assert counts.get("200", 0) == outcomes["ok"]
    assert counts.get("422", 0) == outcomes["client_error"]
    assert counts.get("503", 0) + counts.get("429", 0) == outcomes["rejected"]
