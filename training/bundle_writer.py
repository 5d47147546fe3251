"""Assemble a checkpoint bundle from finished aspect runs.

Run as ``python -m training.bundle_writer --help-run runs/helpfulness --harm-run runs/harmlessness
--output checkpoints/smollm2-hh``. Each run folder must hold ``task_vector.safetensors`` and
``record.json`` written by :mod:`training.dpo`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from peo_merge.base_model import sha256_file
from peo_merge.bundle import (
    FORMAT_VERSION,
    CoefficientBounds,
    Manifest,
    VectorEntry,
    read_manifest,
    write_manifest,
)
from peo_merge.task_vector import load_task_vector, save_task_vector
from training.dpo import RECORD_FILE, VECTOR_FILE
from training.runs import portable_hashes

STORAGE_DTYPE = torch.float16


def recipe_from_record(record: dict) -> dict:
    """Return the manifest recipe of a run: data, steps, batch, length, rates, LoRA and timing."""
    config = record["config"]
    init = record.get("init")
    start = "the base model"
    if init is not None:
        start = "θ₀ + " + " + ".join(
            f"{value:g}·τ_{name}" for name, value in init["coefficients"].items()
        )
    recipe = {
        "method": f"DPO (TRL DPOTrainer) with a LoRA adapter, from {start}",
        "data_files": portable_hashes(record["data_files"]),
        "train_pairs": record["train_pairs"],
        "heldout_pairs": record["heldout_pairs"],
        "heldout_fraction": config["heldout_fraction"],
        "steps": record["steps"],
        "batch_size": record["effective_batch_size"],
        "per_device_batch_size": config["batch_size"],
        "gradient_accumulation": config["gradient_accumulation"],
        "max_length": config["max_length"],
        "max_prompt_tokens": config["max_prompt_tokens"],
        "learning_rate": config["learning_rate"],
        "lr_schedule": record.get("lr_schedule"),
        "beta": config["beta"],
        "lora_rank": config["lora_rank"],
        "lora_alpha": config["lora_alpha"],
        "lora_targets": config["lora_targets"],
        "seed": config["seed"],
        "wall_time_seconds": record["wall_time_seconds"],
        "torch_threads": record.get("torch_threads"),
    }
    if config.get("data_seed") is not None:
        recipe["data_seed"] = config["data_seed"]
    recipe["bf16_autocast"] = bool(config.get("bf16", False))
    if config.get("sft_weight"):
        recipe["sft_weight"] = config["sft_weight"]
        recipe["method"] += (
            f", plus {config['sft_weight']:g} × the per-token NLL of the chosen responses"
        )
    if init is not None:
        recipe["init"] = {key: init[key] for key in ("lambda", "coefficients", "vector_sha256")}
    start = record.get("start")
    if start is not None:
        earlier = start["recipe"]
        recipe["method"] += (
            f", continuing the vector of bundle {start['bundle']} "
            f"(sha256 {start['sha256'][:12]}…, {total_steps(earlier)} steps)"
        )
        recipe["continues"] = {"bundle": start["bundle"], "sha256": start["sha256"], **earlier}
        recipe["total_steps"] = total_steps(earlier) + record["steps"]
        recipe["total_wall_time_seconds"] = round(
            total_wall_time(earlier) + record["wall_time_seconds"], 1
        )
    return recipe


def total_steps(recipe: dict) -> int:
    """Optimizer steps of a vector's recipe, those of the runs it continues included."""
    return recipe.get("total_steps", recipe["steps"])


def total_wall_time(recipe: dict) -> float:
    """Training seconds of a vector's recipe, those of the runs it continues included."""
    return recipe.get("total_wall_time_seconds", recipe["wall_time_seconds"])


def _copy_sources(copies: dict[str, Path], output: Path) -> dict[str, tuple]:
    """Read each vector to copy: its manifest entry, its file's bytes and its bundle's base."""
    copied = {}
    for aspect, bundle in copies.items():
        if Path(bundle).resolve() == Path(output).resolve():
            raise ValueError(f"cannot copy vector {aspect!r} from {bundle} into itself")
        manifest = read_manifest(bundle)
        if aspect not in manifest.vectors:
            raise ValueError(
                f"bundle {bundle} has no vector {aspect!r}; it has {sorted(manifest.vectors)}"
            )
        entry = manifest.vectors[aspect]
        data = (Path(bundle) / entry.file).read_bytes()
        copied[aspect] = (entry, data, manifest.base_model)
    identities = {json.dumps(identity, sort_keys=True) for _, _, identity in copied.values()}
    if len(identities) > 1:
        raise ValueError(f"the copied vectors come from different base models: {identities}")
    return copied


def write_bundle(
    runs: dict[str, Path],
    output: Path,
    name: str,
    offset: dict[str, float] | None = None,
    phases: dict | None = None,
    copies: dict[str, Path] | None = None,
) -> Manifest:
    """Copy each run's task vector into ``output/vectors`` as fp16 and write the manifest.

    Args:
        runs: vector name → run folder.
        output: the bundle folder.
        name: the bundle's name.
        offset: coefficients every request adds, for example θ_init + τ_gen.
        phases: the manifest's ``phases``; by default the wall time of each run.
        copies: vector name → an existing bundle to copy that vector from, file and manifest
            entry (recipe included) unchanged.

    Raises:
        ValueError: a copied bundle is ``output`` itself, lacks the vector, or was trained on
            another base model than the runs.
    """
    copied = _copy_sources(copies or {}, output)
    output.mkdir(parents=True, exist_ok=True)
    vectors_dir = output / "vectors"
    if vectors_dir.exists():
        shutil.rmtree(vectors_dir)
    vectors_dir.mkdir()

    entries = {}
    base_identity = None
    for aspect, (entry, data, source_identity) in copied.items():
        relative = f"vectors/{aspect}.safetensors"
        (output / relative).write_bytes(data)
        entries[aspect] = entry.model_copy(update={"file": relative})
        base_identity = source_identity
    for aspect, run_dir in runs.items():
        record = json.loads((run_dir / RECORD_FILE).read_text())
        config = record["config"]
        scaling = config["lora_alpha"] / config["lora_rank"]
        vector = load_task_vector(run_dir / VECTOR_FILE, aspect, "lowrank", scaling)
        relative = f"vectors/{aspect}.safetensors"
        save_task_vector(vector, output / relative, dtype=STORAGE_DTYPE)
        entries[aspect] = VectorEntry(
            file=relative,
            kind="lowrank",
            target_modules=tuple(config["lora_targets"]),
            rank=config["lora_rank"],
            scaling=scaling,
            sha256=sha256_file(output / relative),
            recipe=recipe_from_record(record),
        )
        run_identity = {key: value for key, value in record["base_model"].items() if key != "path"}
        if base_identity is not None and run_identity != base_identity:
            raise ValueError(
                f"run {run_dir} was trained on base {run_identity}, but the other vectors "
                f"on {base_identity}"
            )
        base_identity = run_identity

    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name=name,
        base_model=base_identity,
        dtype="float16",
        vectors=entries,
        offset=offset or {},
        coefficient_bounds=CoefficientBounds(min=-1.0, max=2.0),
        default_preference=0.5,
        phases=phases
        or {
            "aspect_learning": {
                aspect: total_wall_time(entry.recipe) for aspect, entry in entries.items()
            }
        },
    )
    write_manifest(output, manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--help-run", required=True, type=Path, help="run folder of the helpfulness vector"
    )
    parser.add_argument(
        "--harm-run", required=True, type=Path, help="run folder of the harmlessness vector"
    )
    parser.add_argument("--output", required=True, type=Path, help="bundle folder to write")
    parser.add_argument("--name", default="smollm2-hh")
    args = parser.parse_args(argv)
    manifest = write_bundle(
        {"helpfulness": args.help_run, "harmlessness": args.harm_run}, args.output, args.name
    )
    print(f"wrote {args.output} with vectors {sorted(manifest.vectors)}")


if __name__ == "__main__":
    main()
