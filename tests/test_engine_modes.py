"""Fused, unfused and auto engine modes on real server processes with the committed bundle."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from server.app import AUTO_MIXED_HOLD_SECONDS
from tests.conftest import ServerProcess
from tests.test_faults import metric_value

PROMPT = "What should I pack for a weekend hiking trip?"
REQUESTS = [
    {"preference": 1.0},
    {"preference": 0.0},
    {"coefficients": {"helpfulness": 1.5, "harmlessness": -0.5}},
    {"coefficients": {"helpfulness": -0.5, "harmlessness": 0.0}},
]


@pytest.fixture(autouse=True)
def idle_auto_mode():
    """Let auto mode's hold on the unfused path run out after each test, so every test (and
    every later test on the shared server) starts from an idle server."""
    yield
    time.sleep(AUTO_MIXED_HOLD_SECONDS + 0.1)


@pytest.fixture(scope="module")
def fused_server():
    process = ServerProcess("--engine-mode", "fused")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def unfused_server():
    process = ServerProcess("--engine-mode", "unfused")
    yield process
    process.stop()


def generate(url: str, body: dict) -> dict:
    payload = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_new_tokens": 24,
        "temperature": 0.0,
    } | body
    response = httpx.post(url + "/generate", json=payload, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("body", REQUESTS, ids=["pref-1", "pref-0", "extrapolate", "negative"])
def test_fused_and_unfused_give_the_same_tokens(fused_server, unfused_server, body):
    fused = generate(fused_server.url, body)
    unfused = generate(unfused_server.url, body)
    assert fused["engine"] == "fused"
    assert fused["cache"] in ("hit", "miss")
    assert unfused["engine"] == "unfused"
    assert unfused["cache"] == "bypass"
    assert unfused["timings"]["fusion"] == 0.0
    assert fused["coefficients"] == unfused["coefficients"]
    assert fused["usage"]["completion_tokens"] > 0
    assert fused["text"] == unfused["text"]


def test_unfused_server_builds_no_fused_model(unfused_server):
    info = httpx.get(unfused_server.url + "/info").json()
    assert info["engine_mode"] == "unfused"
    assert info["cache"]["entries"] == 0
    # two rank-8 vectors over seven projections of 30 layers, kept in fp32
    assert info["unfused_factor_bytes"] == 2 * sum(
        vector["bytes"] for vector in info["bundle"]["vectors"].values()
    )


def test_auto_mode_batches_mixed_preferences_unfused(server):
    """Concurrent requests with distinct preferences share decode steps on the unfused path."""
    before = httpx.get(server.url + "/metrics").text
    steps_before = metric_value(before, "peo_decode_batch_size_count") or 0.0
    single_before = metric_value(before, 'peo_decode_batch_size_bucket{le="1.0"}') or 0.0

    bodies = [
        {"preference": preference, "max_new_tokens": 48, "ignore_eos": True}
        for preference in (0.11, 0.33, 0.55, 0.77)
    ]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda body: generate(server.url, body), bodies))

    engines = [result["engine"] for result in results]
    assert "unfused" in engines, engines
    assert all(result["usage"]["completion_tokens"] == 48 for result in results)
    after = httpx.get(server.url + "/metrics").text
    steps = metric_value(after, "peo_decode_batch_size_count") - steps_before
    single = metric_value(after, 'peo_decode_batch_size_bucket{le="1.0"}') - single_before
    assert single < steps, "no decode step held more than one row"
    assert metric_value(after, 'peo_engine_requests_total{engine="unfused"}') >= 1


def test_auto_mode_keeps_a_lone_request_fused(server):
    result = generate(server.url, {"preference": 0.9})
    assert result["engine"] == "fused"
    assert result["cache"] in ("hit", "miss")


def wait_for_one_in_flight(url: str, timeout: float = 60.0) -> None:
    """Poll the metrics until one request is in flight, or until ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric_value(httpx.get(url + "/metrics").text, "peo_requests_in_flight") == 1:
            return
        time.sleep(0.05)


def test_auto_mode_moves_a_running_fused_request_into_the_unfused_batch(server):
    """A fused request that is running when another preference arrives ends unfused."""
    before = metric_value(
        httpx.get(server.url + "/metrics").text, "peo_rows_moved_to_unfused_total"
    )
    first_body = {"preference": 0.64, "max_new_tokens": 160, "ignore_eos": True}
    second_body = {"preference": 0.14, "max_new_tokens": 8, "ignore_eos": True}
    # fuse the first pair beforehand: on a loaded machine a fusion can outlast the second
    # request, and the first would then rightly decode fused alone
    generate(server.url, first_body | {"max_new_tokens": 1})
    time.sleep(AUTO_MIXED_HOLD_SECONDS + 0.1)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(generate, server.url, first_body)
        wait_for_one_in_flight(server.url)
        time.sleep(1.5)  # a cache hit, and decoding by now
        second = pool.submit(generate, server.url, second_body)
        first, second = first.result(), second.result()
    assert second["engine"] == "unfused"
    assert first["engine"] == "unfused", "the running fused request did not move"
    assert first["cache"] == "hit"  # it started fused, from the cache
    after = metric_value(httpx.get(server.url + "/metrics").text, "peo_rows_moved_to_unfused_total")
    assert after >= before + 1


def test_auto_mode_sequential_requests_stay_fused(server):
    """A request sent as soon as the previous result arrives finds that request gone."""
    engines = [
        generate(server.url, {"preference": preference, "max_new_tokens": 2})["engine"]
        for preference in (0.21, 0.79) * 4
    ]
    assert engines == ["fused"] * 8


def test_auto_mode_holds_unfused_briefly_after_mixed_load(server):
    """Right after mixed load, a lone request still runs unfused; once the hold passes, fused."""
    body = {"preference": 0.3, "max_new_tokens": 24, "ignore_eos": True}
    # fuse the first pair beforehand: a first request still fusing when the second finished
    # would then decode alone, after the mixed load, and rightly run fused
    generate(server.url, body | {"max_new_tokens": 1})
    time.sleep(AUTO_MIXED_HOLD_SECONDS + 0.1)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(generate, server.url, body)
        wait_for_one_in_flight(server.url)
        second = pool.submit(generate, server.url, body | {"preference": 0.7})
        assert second.result()["engine"] == "unfused"
        # the first request moved into the unfused batch when the second arrived
        assert first.result()["engine"] == "unfused"
    right_after = generate(server.url, {"preference": 0.5, "max_new_tokens": 2})
    time.sleep(AUTO_MIXED_HOLD_SECONDS + 0.1)
    later = generate(server.url, {"preference": 0.5, "max_new_tokens": 2})
    assert right_after["engine"] == "unfused"
    assert later["engine"] == "fused"
