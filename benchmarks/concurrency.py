"""Benchmark aggregate throughput of concurrent clients, with one preference and with many.

Run as ``python -m benchmarks.concurrency [--quick]``. Every client is a thread that sends
streamed ``/generate`` requests one after another to a real server process on 127.0.0.1, each
for a fixed number of new tokens (``ignore_eos``). Client ``i`` of ``n`` always requests its own
preference ``i / (n - 1)``. In the single-preference runs every client requests 0.5. Aggregate
throughput is all completion tokens over the wall time from the first request to the last byte.

Servers, each started in turn with the same threads:

- ``auto`` (the default mode): fused while the requests in flight share a pair, unfused once
  they mix. It runs one client alone, the single-preference runs and the mixed runs, taking
  turns: each kind runs once per repeat (3, or 1 with ``--quick``) and the figures sum a
  kind's runs. The ratios compare kinds measured over the same stretch of time.
- ``fused``: one fused model per pair from the LRU cache (8 entries), at most 8 requests running.
- ``unfused``: base weights plus factors with per-row coefficients, one batch for all.

On the ``fused`` and ``unfused`` servers every run is preceded by one warm-up round of the same
clients, so that the fused runs measure a warm cache where it contains every pair. On the
``auto`` server, the single-preference and the mixed clients each run one warm-up round before
any is measured, because the first pass of a path over new batch shapes runs slower. Where the pairs outnumber the cache entries, every
request fuses anyway; that run is one round with no warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import Counter

import httpx

from benchmarks.common import free_port, start_server, write_result
from server.app import AUTO_MIXED_HOLD_SECONDS
from server.settings import DEFAULT_BUNDLE

PROMPT = "Give me some advice on planning a vegetable garden."


def stream_request(client: httpx.Client, preference: float, new_tokens: int) -> dict:
    """Stream one request and return its ``done`` event."""
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "preference": preference,
        "temperature": 0,
        "max_new_tokens": new_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    done = None
    with client.stream("POST", "/generate", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"status {response.status_code}: {response.read()[:200]!r}")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event in ("done", "error"):
                done = json.loads(line.removeprefix("data: "))
    if done is None or "error" in done:
        raise RuntimeError(f"stream ended without a result: {done}")
    return done


def run_clients(url: str, preferences: list[float], new_tokens: int, rounds: int) -> dict:
    """Run one client thread per preference for ``rounds`` requests each; return throughput."""
    results: list[dict] = []
    errors: list[Exception] = []
    lock = threading.Lock()

    def client_loop(preference: float) -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            for _ in range(rounds):
                try:
                    done = stream_request(client, preference, new_tokens)
                except Exception as error:  # counted and reported, not hidden
                    with lock:
                        errors.append(error)
                    return
                with lock:
                    results.append(done)

    threads = [threading.Thread(target=client_loop, args=(p,)) for p in preferences]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    tokens = sum(done["usage"]["completion_tokens"] for done in results)
    return {
        "clients": len(preferences),
        "requests": len(results),
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "engines": dict(Counter(done["engine"] for done in results)),
        "cache": dict(Counter(done["cache"] for done in results)),
    }


def distinct_preferences(count: int) -> list[float]:
    return [round(i / (count - 1), 4) for i in range(count)]


def measure(
    url: str, preferences: list[float], new_tokens: int, rounds: int, warm_up: bool = True
) -> dict:
    if warm_up:
        run_clients(url, preferences, new_tokens, 1)
    figures = run_clients(url, preferences, new_tokens, rounds)
    print(
        f"  {len(preferences)} clients, {len(set(preferences))} preferences: "
        f"{figures['tokens_per_s']:.1f} tokens/s {figures['engines']}",
        file=sys.stderr,
    )
    return figures


def combine(runs: list[dict]) -> dict:
    """Sum runs of one kind of client set into one figure, keeping each run's rate."""
    tokens = sum(run["tokens"] for run in runs)
    seconds = sum(run["seconds"] for run in runs)
    engines: Counter = Counter()
    cache: Counter = Counter()
    for run in runs:
        engines.update(run["engines"])
        cache.update(run["cache"])
    return {
        "clients": runs[0]["clients"],
        "requests": sum(run["requests"] for run in runs),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "segment_tokens_per_s": [run["tokens_per_s"] for run in runs],
        "engines": dict(engines),
        "cache": dict(cache),
    }


def interleaved(
    url: str, kinds: dict[str, list[float]], new_tokens: int, rounds: int, repeats: int
) -> dict:
    """Run every kind of client set once per repeat, in turn, and sum each kind's runs.

    The speed of a shared machine drifts by tens of percent over tens of seconds, so two
    figures measured one after the other compare the machine as much as the server. Taking
    turns spreads every kind over the same stretch of time. Before each run the server is left
    idle for longer than auto mode's unfused hold, so that each run starts from the path its
    own load selects.
    """
    runs: dict[str, list[dict]] = {name: [] for name in kinds}
    for _ in range(repeats):
        for name, preferences in kinds.items():
            time.sleep(AUTO_MIXED_HOLD_SECONDS + 0.5)
            runs[name].append(run_clients(url, preferences, new_tokens, rounds))
    figures = {name: combine(kind_runs) for name, kind_runs in runs.items()}
    for name, kind in figures.items():
        rates = ", ".join(f"{rate:.1f}" for rate in kind["segment_tokens_per_s"])
        print(
            f"  {name}: {kind['tokens_per_s']:.1f} tokens/s (runs: {rates}) {kind['engines']}",
            file=sys.stderr,
        )
    return figures


def with_server(threads: int, bundle: str, flags: list[str], work) -> dict:
    port = free_port()
    server = start_server(port, threads, bundle, *flags)
    try:
        return work(f"http://127.0.0.1:{port}")
    finally:
        server.terminate()
        server.wait(60)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 clients, auto mode only")
    parser.add_argument("--bundle", default=os.environ.get("PEO_BUNDLE", str(DEFAULT_BUNDLE)))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="server torch threads")
    args = parser.parse_args(argv)
    new_tokens = 32 if args.quick else 64
    rounds = 1 if args.quick else 2
    repeats = 1 if args.quick else 3
    client_counts = [8] if args.quick else [8, 32]
    roomy = ["--max-concurrency", "32", "--max-batch-size", "32", "--max-queue", "64"]

    def auto_runs(url: str) -> dict:
        print("auto mode", file=sys.stderr)
        # warm both paths on every batch shape first: the first pass over new shapes is slower
        for count in client_counts:
            run_clients(url, [0.5] * count, new_tokens, 1)
            run_clients(url, distinct_preferences(count), new_tokens, 1)
        kinds = {"one_client": [0.5]}
        for count in client_counts:
            kinds[f"single_{count}"] = [0.5] * count
            kinds[f"mixed_{count}"] = distinct_preferences(count)
        return interleaved(url, kinds, new_tokens, rounds, repeats)

    def mixed_runs(label: str, cache_entries: int | None = None):
        def work(url: str) -> dict:
            print(f"{label} mode", file=sys.stderr)
            runs = {}
            for count in client_counts:
                if cache_entries is not None and count > cache_entries:
                    # more pairs than cache entries: every request fuses, warm-up or not, so
                    # one round without warm-up measures the same and takes a third of the time
                    runs[f"mixed_{count}"] = measure(
                        url, distinct_preferences(count), new_tokens, 1, warm_up=False
                    )
                else:
                    runs[f"mixed_{count}"] = measure(
                        url, distinct_preferences(count), new_tokens, rounds
                    )
            return runs

        return work

    figures: dict = {
        "new_tokens": new_tokens,
        "rounds": rounds,
        "repeats": repeats,
        "server_threads": args.threads,
    }
    figures["auto"] = with_server(args.threads, args.bundle, roomy, auto_runs)
    if not args.quick:
        fused_flags = ["--engine-mode", "fused", "--max-concurrency", "8", "--max-queue", "64"]
        fused_flags += ["--cache-max-entries", "8"]
        figures["fused"] = with_server(
            args.threads, args.bundle, fused_flags, mixed_runs("fused", cache_entries=8)
        )
        unfused_flags = ["--engine-mode", "unfused", *roomy]
        figures["unfused"] = with_server(
            args.threads, args.bundle, unfused_flags, mixed_runs("unfused")
        )

    auto = figures["auto"]
    for count in client_counts:
        mixed = auto[f"mixed_{count}"]["tokens_per_s"]
        figures[f"mixed_to_single_ratio_{count}"] = mixed / auto[f"single_{count}"]["tokens_per_s"]
        figures[f"mixed_to_one_client_ratio_{count}"] = mixed / auto["one_client"]["tokens_per_s"]
    command = "python -m benchmarks.concurrency " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    path = write_result("concurrency", figures, command.strip())
    ratios = {k: round(v, 3) for k, v in figures.items() if k.startswith("mixed_to")}
    print(json.dumps(ratios), file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)
    return figures


if __name__ == "__main__":
    main()
