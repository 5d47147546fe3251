"""Benchmark resident memory of the base, the task vectors and cached fused models.

Run as ``python -m benchmarks.memory [--quick]``. It builds fused models the way the server's
cache does and counts the bytes each one owns (tensors not shared with the base), then compares
the total for N preferences with keeping one full model copy per preference. It also builds the
unfused model, which serves every preference at once, and counts what it owns. The process's
resident set size is read from ``/proc/self/status`` before and after, as a cross-check.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

from benchmarks.common import write_result
from peo_merge.base_model import load_base_model, resolve_base_model
from peo_merge.bundle import load_bundle
from peo_merge.fused_model import base_state, build_fused_model
from peo_merge.fusion import Fuser
from peo_merge.mixed import build_mixed_model
from server.settings import DEFAULT_BUNDLE


def resident_bytes() -> int:
    """Return this process's resident set size in bytes (Linux), or 0 where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def unique_tensor_bytes(tensors) -> int:
    """Return the bytes of distinct storages among ``tensors`` (shared ones counted once)."""
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def owned_bytes(model, base_pointers: set[int]) -> int:
    """Return the bytes of the model's parameters and buffers whose storage the base does not own."""
    owned = [
        tensor
        for tensor in list(model.parameters()) + list(model.buffers())
        if tensor.untyped_storage().data_ptr() not in base_pointers
    ]
    return unique_tensor_bytes(owned)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer fused models, for a smoke run")
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--preferences", type=int, default=8, help="fused models to build")
    args = parser.parse_args(argv)
    count = 2 if args.quick else args.preferences

    model, _ = load_base_model(resolve_base_model(None))
    bundle = load_bundle(args.bundle)
    state = base_state(model)
    base_tensors = list(model.parameters()) + list(model.buffers())
    base_pointers = {t.untyped_storage().data_ptr() for t in base_tensors}
    base_bytes = unique_tensor_bytes(base_tensors)

    fuser = Fuser(state, bundle.vectors)
    targeted_bytes = sum(state[t].numel() * state[t].element_size() for t in fuser.targets)

    # build fused models as the cache does and measure what each one owns
    gc.collect()
    rss_before = resident_bytes()
    models = []
    for index in range(count):
        alpha = index / max(1, count - 1)
        buffers = fuser.allocate()
        fuser.fuse_into(buffers, {"helpfulness": alpha, "harmlessness": 1.0 - alpha})
        models.append(build_fused_model(model, buffers))
    gc.collect()
    rss_after = resident_bytes()
    entry_bytes = [owned_bytes(fused, base_pointers) for fused in models]

    # the unfused model: shares every base tensor, owns the factors
    mixed, _ = build_mixed_model(model, bundle.vectors)
    unfused_bytes = owned_bytes(mixed, base_pointers)
    del mixed

    full_copy_bytes = base_bytes
    ours = base_bytes + fuser.nbytes() + sum(entry_bytes)
    figures = {
        "preferences": count,
        "base_bytes": base_bytes,
        "task_vector_bytes_stored": bundle.nbytes(),
        "task_vector_bytes_resident": fuser.nbytes(),
        "targeted_weight_bytes": targeted_bytes,
        "cached_entry_bytes": max(entry_bytes),
        "cached_entry_to_targeted_ratio": max(entry_bytes) / targeted_bytes,
        "full_model_copy_bytes": full_copy_bytes,
        "total_ours_bytes": ours,
        "total_full_copies_bytes": count * full_copy_bytes,
        "ours_to_full_copies_ratio": ours / (count * full_copy_bytes),
        "unfused_owned_bytes": unfused_bytes,
        "total_unfused_bytes": base_bytes + unfused_bytes,
        "rss_growth_bytes": rss_after - rss_before,
        "rss_growth_per_entry_bytes": (rss_after - rss_before) / count,
        "torch_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    command = "python -m benchmarks.memory " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_result("memory", figures, command.strip())
    print(f"wrote {path}", file=sys.stderr)
    del models
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return figures


if __name__ == "__main__":
    main()
