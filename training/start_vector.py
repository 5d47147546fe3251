"""Start a DPO run's LoRA from a bundle's task vector, to train that vector further.

The vector must be a low-rank one of the run's rank, scaling and target modules. The run's record
keeps the start bundle's name, the vector file's sha256 and the recipe that made it, so the
manifest of the new vector can nest the recipe it continues.
"""

from __future__ import annotations

from pathlib import Path

import torch

from peo_merge.base_model import sha256_file
from peo_merge.bundle import read_manifest
from peo_merge.task_vector import load_task_vector
from training.config import AspectRunConfig


def start_entry(config: AspectRunConfig) -> dict | None:
    """Return the record entry of the vector a run continues, or None for a run from zero.

    The entry contains the start bundle's name, the vector file's sha256 and the recipe that made it.

    Raises:
        ValueError: the start bundle lacks the aspect, or its vector does not match the run's
            LoRA (kind, rank, scaling or target modules). The message names the bundle and the
            field.
    """
    if config.start_bundle is None:
        return None
    bundle = Path(config.start_bundle)
    manifest = read_manifest(bundle)
    if config.aspect not in manifest.vectors:
        raise ValueError(
            f"start_bundle {bundle}: vector {config.aspect!r} not found; "
            f"the bundle contains {sorted(manifest.vectors)}"
        )
    entry = manifest.vectors[config.aspect]
    expected = {
        "kind": "lowrank",
        "rank": config.lora_rank,
        "scaling": config.lora_alpha / config.lora_rank,
        "target_modules": tuple(config.lora_targets),
    }
    actual = {
        "kind": entry.kind,
        "rank": entry.rank,
        "scaling": entry.scaling,
        "target_modules": tuple(entry.target_modules),
    }
    for field, value in expected.items():
        if actual[field] != value:
            raise ValueError(
                f"start_bundle {bundle}: vector {config.aspect!r} has {field} {actual[field]!r}; "
                f"this run's LoRA needs {value!r}"
            )
    return {
        "bundle": manifest.name,
        "sha256": sha256_file(bundle / entry.file),
        "recipe": entry.recipe,
    }


def load_start_factors(model, config: AspectRunConfig) -> int:
    """Copy the start bundle's factors of ``config.aspect`` into the PEFT model's LoRA layers.

    Returns:
        The number of LoRA layers set.

    Raises:
        ValueError: the vector's targets and the model's LoRA layers differ, or a factor's shape
            does not fit its layer.
    """
    from peft.tuners.lora import LoraLayer

    bundle = Path(config.start_bundle)
    entry = read_manifest(bundle).vectors[config.aspect]
    vector = load_task_vector(bundle / entry.file, config.aspect, "lowrank", entry.scaling)
    layers = {
        name.removeprefix("base_model.model.") + ".weight": module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and "default" in module.lora_A
    }
    if set(layers) != set(vector.factors):
        missing = sorted(set(layers) ^ set(vector.factors))[:3]
        raise ValueError(
            f"start_bundle {bundle}: vector {config.aspect!r} and the LoRA layers differ "
            f"in {missing}"
        )
    with torch.no_grad():
        for target, (lora_a, lora_b) in vector.factors.items():
            module = layers[target]
            for weight, factor in (
                (module.lora_A["default"].weight, lora_a),
                (module.lora_B["default"].weight, lora_b),
            ):
                if weight.shape != factor.shape:
                    raise ValueError(
                        f"start_bundle {bundle}: tensor {target} factor has shape "
                        f"{tuple(factor.shape)}; the LoRA layer needs {tuple(weight.shape)}"
                    )
                weight.copy_(factor.to(weight.dtype))
    return len(layers)
