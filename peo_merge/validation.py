"""Check a bundle's task vectors against the base model they will be fused onto."""

from __future__ import annotations

import math

import torch

from peo_merge.bundle import Bundle, BundleError


def validate_against_base(bundle: Bundle, base_state: dict[str, torch.Tensor]) -> None:
    """Check that every tensor of every vector fits the base, before anything is served.

    Checks that each target names a 2-D weight of the base, that dense deltas have its shape,
    that low-rank factors multiply out to its shape, and that every value is finite.

    Raises:
        BundleError: on the first mismatch, naming the vector file and the tensor.
    """
    for name, vector in bundle.vectors.items():
        file = bundle.path / bundle.manifest.vectors[name].file
        for target in vector.targets:
            if target not in base_state:
                raise BundleError(f"{file}: tensor {target} does not exist in the base model")
            expected = tuple(base_state[target].shape)

            if vector.kind == "dense":
                tensors = {target: vector.deltas[target]}
                actual = tuple(vector.deltas[target].shape)
            else:
                lora_a, lora_b = vector.factors[target]
                tensors = {target + ".lora_A": lora_a, target + ".lora_B": lora_b}
                actual = (lora_b.shape[0], lora_a.shape[1])

            if actual != expected:
                raise BundleError(
                    f"{file}: tensor {target} gives a delta of shape {actual}, "
                    f"but the base weight has shape {expected}"
                )
            for key, tensor in tensors.items():
                if not torch.isfinite(tensor).all():
                    raise BundleError(f"{file}: tensor {key} contains NaN or infinite values")

    bounds = bundle.manifest.coefficient_bounds
    for name, value in bundle.manifest.offset.items():
        if not math.isfinite(value):
            raise BundleError(f"{bundle.path}: offset of {name} is not finite")
    default = bundle.manifest.default_preference
    if not 0.0 <= default <= 1.0:
        raise BundleError(f"{bundle.path}: default_preference {default} is outside [0, 1]")
    if bounds.min > 0.0 or bounds.max < 1.0:
        raise BundleError(
            f"{bundle.path}: coefficient_bounds [{bounds.min}, {bounds.max}] must include [0, 1] "
            "so that every slider position is servable"
        )
