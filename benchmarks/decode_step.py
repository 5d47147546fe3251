"""Benchmark one decode step, fused against unfused, on the decode loop's thread arrangement.

Run as ``python -m benchmarks.decode_step [--quick]``. The model loads on a thread that exits,
as in the server, and the steps run on one long-lived thread. Each step feeds one token per row
against a key/value cache of 60 tokens, which is cut back to 60 before every step. Fused and
unfused steps alternate, so drift in machine speed hits both alike; the figures are medians.

The same steps are then timed while a second thread that has run a parallel operation stays
alive. The server avoids that arrangement (``server.threads``), and the ratio of the two
figures shows what a second team of OpenMP workers costs a step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import torch
from transformers import DynamicCache

from benchmarks.common import write_result
from peo_merge.base_model import load_base_model, resolve_base_model
from peo_merge.bundle import load_bundle
from peo_merge.fused_model import base_state, build_fused_model
from peo_merge.fusion import Fuser
from peo_merge.mixed import build_mixed_model
from server.settings import DEFAULT_BUNDLE
from server.threads import run_in_new_thread

CONTEXT = 60


def load(bundle_path: str, batch_sizes: list[int]) -> dict:
    bundle = load_bundle(bundle_path)
    model, _ = load_base_model(resolve_base_model(None))
    fuser = Fuser(base_state(model), bundle.vectors)
    buffers = fuser.allocate()
    fuser.fuse_into(buffers, bundle.vector_coefficients(0.5, 0.5))
    fused = build_fused_model(model, buffers)
    mixed, rows = build_mixed_model(model, bundle.vectors)
    coefficients = {
        size: torch.tensor(
            [
                rows.row(bundle.vector_coefficients(i / max(size - 1, 1), 1 - i / max(size - 1, 1)))
                for i in range(size)
            ]
        )
        for size in batch_sizes
    }
    return {"fused": fused, "unfused": mixed, "rows": rows, "coefficients": coefficients}


def time_steps(models: dict, batch_size: int, steps: int) -> dict:
    """Time fused and unfused steps of ``batch_size`` rows in turn and return their medians in ms."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 1000, (batch_size, CONTEXT), generator=generator)
    token = torch.randint(100, 1000, (batch_size, 1), generator=generator)
    rows, coefficients = models["rows"], models["coefficients"][batch_size]
    caches, samples = {}, {"fused": [], "unfused": []}
    with torch.inference_mode():
        for name in samples:
            rows.set(coefficients)
            caches[name] = DynamicCache()
            models[name](input_ids=prompt, cache=caches[name], use_cache=True, logits_to_keep=1)
        for step in range(steps + 3):
            for name in samples:
                for layer in caches[name].layers:
                    layer.keys = layer.keys[:, :, :CONTEXT]
                    layer.values = layer.values[:, :, :CONTEXT]
                started = time.perf_counter()
                if name == "unfused":
                    rows.set(coefficients)
                models[name](input_ids=token, cache=caches[name], use_cache=True)
                if step >= 3:  # the first 3 steps are warm-up
                    samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) * 1000 for name, values in samples.items()}


def with_second_team(function):
    """Run ``function`` while another live thread keeps the OpenMP team it created."""
    ready, release = threading.Event(), threading.Event()

    def idle_worker() -> None:
        torch.ones(1 << 22).mul_(2)  # large enough to run as a parallel region
        ready.set()
        release.wait()

    worker = threading.Thread(target=idle_worker, name="idle-team", daemon=True)
    worker.start()
    ready.wait()
    try:
        return function()
    finally:
        release.set()
        worker.join()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 8 only, fewer steps")
    parser.add_argument("--bundle", default=os.environ.get("PEO_BUNDLE", str(DEFAULT_BUNDLE)))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch_sizes = [8] if args.quick else [1, 8, 32]
    steps = 8 if args.quick else 30

    models = run_in_new_thread(load, args.bundle, batch_sizes)
    figures: dict = {"context_tokens": CONTEXT, "steps": steps, "batches": {}}
    for size in batch_sizes:
        alone = run_in_new_thread(time_steps, models, size, steps)
        shared = run_in_new_thread(with_second_team, lambda s=size: time_steps(models, s, steps))
        figures["batches"][str(size)] = {
            "fused_ms": alone["fused"],
            "unfused_ms": alone["unfused"],
            "unfused_to_fused_ratio": alone["unfused"] / alone["fused"],
            "second_team_fused_ms": shared["fused"],
            "second_team_unfused_ms": shared["unfused"],
            "second_team_fused_slowdown": shared["fused"] / alone["fused"],
            "second_team_unfused_slowdown": shared["unfused"] / alone["unfused"],
        }
        print(
            f"batch {size}: fused {alone['fused']:.1f} ms, unfused {alone['unfused']:.1f} ms; "
            f"with a second team {shared['fused']:.1f} / {shared['unfused']:.1f} ms",
            file=sys.stderr,
        )
    batch_8 = figures["batches"]["8"]
    figures["unfused_to_fused_ratio_8"] = batch_8["unfused_to_fused_ratio"]
    figures["second_team_unfused_slowdown_8"] = batch_8["second_team_unfused_slowdown"]
    command = "python -m benchmarks.decode_step " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    path = write_result("decode_step", figures, command.strip())
    print(f"wrote {path}", file=sys.stderr)
    return figures


if __name__ == "__main__":
    main()
