"""Benchmark fusing one coefficient pair against the memory bound and two peer implementations.

Run as ``python -m benchmarks.fusion [--quick]``. In one process it measures:

- ours: ``Fuser.fuse_into`` into preallocated buffers, for the configured expand mode;
- the bound for that mode: bytes that must move (read W₀ and, in dense mode, each delta; write
  W) over the copy bandwidth measured here, plus, for low-rank expansion, the matmul FLOPs of
  ``B_cat · A_cat`` over the matmul rate measured here on the same shapes;
- PEFT: ``add_weighted_adapter(..., combination_type="cat")`` then ``merge_and_unload``;
- a plain state-dict loop: ``W₀ + Σ c·s·(B @ A)`` per weight, allocating fresh tensors.

Ratios are our time over theirs; all four compute the same weights (checked here).
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from benchmarks.common import time_call, write_result
from peo_merge.base_model import load_base_model, resolve_base_model
from peo_merge.bundle import load_bundle
from peo_merge.fused_model import base_state
from peo_merge.fusion import Fuser
from server.settings import DEFAULT_BUNDLE

ALPHA, BETA = 0.7, 0.3


def measure_copy_bandwidth(total_bytes: int, repeats: int) -> float:
    """Return bytes per second moved by ``copy_`` (read plus write) for a buffer of ``total_bytes``."""
    source = torch.randn(total_bytes // 4)
    target = torch.empty_like(source)
    timing = time_call(lambda: target.copy_(source), repeats)
    return 2 * total_bytes / timing["median_s"]


def measure_matmul_rate(fuser: Fuser, repeats: int) -> tuple[float, float]:
    """Return ``(flops, flops_per_second)`` of the ``B_cat · A_cat`` products of every target."""
    plans = [plan for plan in fuser.plans.values() if plan.a_cat is not None]
    outputs = [torch.empty(plan.b_cat.shape[0], plan.a_cat.shape[1]) for plan in plans]
    flops = sum(
        2 * plan.b_cat.shape[0] * plan.b_cat.shape[1] * plan.a_cat.shape[1] for plan in plans
    )

    def run() -> None:
        for plan, out in zip(plans, outputs, strict=True):
            torch.mm(plan.b_cat, plan.a_cat, out=out)

    timing = time_call(run, repeats)
    return flops, flops / timing["median_s"]


def build_peft_model(model, bundle):
    """Wrap a copy of the base in PEFT with one LoRA adapter per task vector, factors loaded."""
    from peft import LoraConfig, get_peft_model

    peft_model = None
    for name, vector in bundle.vectors.items():
        entry = bundle.manifest.vectors[name]
        config = LoraConfig(
            r=vector.rank,
            lora_alpha=vector.rank * vector.scaling,
            target_modules=list(entry.target_modules),
        )
        if peft_model is None:
            peft_model = get_peft_model(copy.deepcopy(model), config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        for target, (lora_a, lora_b) in vector.factors.items():
            module = peft_model.base_model.model.get_submodule(target.removesuffix(".weight"))
            module.lora_A[name].weight.data.copy_(lora_a.float())
            module.lora_B[name].weight.data.copy_(lora_b.float())
    return peft_model


def peft_merge(peft_model, coefficients: dict[str, float]):
    """Merge the adapters with PEFT for ``coefficients`` and return the merged base model."""
    names = list(coefficients)
    peft_model.add_weighted_adapter(
        names, [coefficients[n] for n in names], adapter_name="merged", combination_type="cat"
    )
    peft_model.set_adapter("merged")
    return peft_model.merge_and_unload(adapter_names=["merged"])


def state_dict_loop(state: dict, bundle, coefficients: dict[str, float]) -> dict:
    """Return fused weights computed the plain way: a new tensor per weight."""
    fused = {}
    for name, vector in bundle.vectors.items():
        for target, (lora_a, lora_b) in vector.factors.items():
            delta = coefficients[name] * vector.scaling * (lora_b.float() @ lora_a.float())
            fused[target] = (fused[target] if target in fused else state[target]) + delta
    return fused


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, for a smoke run")
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 10

    model, _ = load_base_model(resolve_base_model(None))
    bundle = load_bundle(args.bundle)
    state = base_state(model)
    # every vector's coefficient, the bundle's offset (such as τ_gen's) included
    coefficients = bundle.vector_coefficients(ALPHA, BETA)
    figures: dict = {"coefficients": coefficients, "repeats": repeats}

    for mode in ("lowrank", "dense"):
        fuser = Fuser(state, bundle.vectors, expand=mode)
        buffers = fuser.allocate()
        timing = time_call(lambda f=fuser, b=buffers: f.fuse_into(b, coefficients), repeats)
        target_bytes = sum(t.numel() * t.element_size() for t in buffers.values())

        bandwidth = measure_copy_bandwidth(target_bytes, repeats)
        if mode == "lowrank":
            moved = 2 * target_bytes
            flops, flop_rate = measure_matmul_rate(fuser, repeats)
            bound = moved / bandwidth + flops / flop_rate
        else:
            moved = (2 + len(bundle.vectors)) * target_bytes
            flops, flop_rate = 0, None
            bound = moved / bandwidth

        figures[mode] = {
            "fusion_s": timing["median_s"],
            "fusion_min_s": timing["min_s"],
            "bound_s": bound,
            "ratio_to_bound": timing["median_s"] / bound,
            "bytes_moved": moved,
            "copy_bandwidth_bytes_per_s": bandwidth,
            "matmul_flops": flops,
            "matmul_flops_per_s": flop_rate,
            "targeted_weight_bytes": target_bytes,
            "resident_vector_bytes": fuser.nbytes(),
        }
        print(
            f"{mode}: fusion {timing['median_s'] * 1e3:.1f} ms, bound {bound * 1e3:.1f} ms",
            file=sys.stderr,
        )

    # peers: the same merge done by PEFT and by a state-dict loop
    reference = figures["lowrank"]
    loop_timing = time_call(lambda: state_dict_loop(state, bundle, coefficients), repeats)

    peft_model = build_peft_model(model, bundle)
    peft_samples = []
    merged = None
    for _ in range(max(2, repeats // 3)):
        candidate = copy.deepcopy(peft_model)
        timing = time_call(lambda c=candidate: peft_merge(c, coefficients), 1, warmup=0)
        peft_samples.append(timing["median_s"])
        merged = candidate.base_model.model
    peft_seconds = sorted(peft_samples)[len(peft_samples) // 2]

    # all implementations must agree on the weights they produce
    fuser = Fuser(state, bundle.vectors)
    buffers = fuser.allocate()
    fuser.fuse_into(buffers, coefficients)
    looped = state_dict_loop(state, bundle, coefficients)
    merged_state = merged.state_dict()
    figures["max_abs_difference"] = {
        "state_dict_loop": max((buffers[k] - looped[k]).abs().max().item() for k in buffers),
        "peft": max((buffers[k] - merged_state[k]).abs().max().item() for k in buffers),
    }

    figures["peft_s"] = peft_seconds
    figures["state_dict_loop_s"] = loop_timing["median_s"]
    figures["fusion_s"] = reference["fusion_s"]
    figures["bound_s"] = reference["bound_s"]
    figures["ratio_to_bound"] = reference["ratio_to_bound"]
    figures["ratio_to_peft"] = reference["fusion_s"] / peft_seconds
    figures["ratio_to_state_dict_loop"] = reference["fusion_s"] / loop_timing["median_s"]
    command = "python -m benchmarks.fusion " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_result("fusion", figures, command.strip())
    print(f"wrote {path}", file=sys.stderr)
    return figures


if __name__ == "__main__":
    main()
