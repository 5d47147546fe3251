"""Fusion: W(c) = W₀ + Σₖ cₖ·sₖ·Bₖ·Aₖ (low-rank) or W₀ + Σₖ cₖ·ΔWₖ (dense), written in place.

A :class:`Fuser` is built once per bundle and base. It keeps, for every targeted weight, the
factors of all vectors concatenated along the rank axis in fp32, so one fusion of a weight is a
single ``addmm`` into a preallocated buffer: ``out = W₀ + B_cat · diag(c·s) · A_cat``. Only the
rank-sized ``diag(c·s) · A_cat`` is rebuilt per fusion. Dense vectors, or low-rank vectors
expanded ahead of time (``expand="dense"``), are added with ``add_`` instead.

Accumulation is fp32; the result is cast once into the output buffer's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peo_merge.task_vector import TaskVector

EXPAND_MODES = ("lowrank", "dense")


@dataclass
class _TargetPlan:
    """The precomputed inputs for fusing one base weight."""

    base: torch.Tensor
    names: list[str]
    ranks: list[int]
    scalings: list[float]
    a_cat: torch.Tensor | None
    b_cat: torch.Tensor | None
    dense: dict[str, torch.Tensor]


class Fuser:
    """Fuses task vectors onto base weights for any coefficient assignment.

    Args:
        base_state: base parameter name → tensor (the serving model's own tensors).
        vectors: the task vectors; each target must exist in ``base_state``.
        expand: ``"lowrank"`` keeps factors and expands ``B·A`` on the fly during fusion;
            ``"dense"`` expands every low-rank vector once at construction (more memory, fewer
            FLOPs per fusion).
        device: where the factors live; defaults to the device of the base weights.
    """

    def __init__(
        self,
        base_state: dict[str, torch.Tensor],
        vectors: dict[str, TaskVector],
        expand: str = "lowrank",
        device: torch.device | str | None = None,
    ):
        if expand not in EXPAND_MODES:
            raise ValueError(f"expand must be one of {EXPAND_MODES}, got {expand!r}")
        self.expand = expand
        self.vector_names = list(vectors)
        self.plans: dict[str, _TargetPlan] = {}

        targets = sorted({target for vector in vectors.values() for target in vector.targets})
        for target in targets:
            base = base_state[target]
            target_device = device if device is not None else base.device
            names, ranks, scalings, a_parts, b_parts, dense = [], [], [], [], [], {}
            for name, vector in vectors.items():
                if target not in vector.targets:
                    continue
                if vector.kind == "lowrank" and expand == "lowrank":
                    lora_a, lora_b = vector.factors[target]
                    names.append(name)
                    ranks.append(lora_a.shape[0])
                    scalings.append(vector.scaling)
                    a_parts.append(lora_a.to(target_device, torch.float32))
                    b_parts.append(lora_b.to(target_device, torch.float32))
                else:
                    dense[name] = vector.dense_delta(target).to(target_device, torch.float32)

            a_cat = torch.cat(a_parts, dim=0).contiguous() if a_parts else None
            b_cat = torch.cat(b_parts, dim=1).contiguous() if b_parts else None
            self.plans[target] = _TargetPlan(base, names, ranks, scalings, a_cat, b_cat, dense)

    @property
    def targets(self) -> list[str]:
        """Names of every base weight some vector modifies."""
        return list(self.plans)

    def nbytes(self) -> int:
        """Bytes held by the fp32 factors and dense deltas."""
        total = 0
        for plan in self.plans.values():
            for tensor in [plan.a_cat, plan.b_cat, *plan.dense.values()]:
                if tensor is not None:
                    total += tensor.numel() * tensor.element_size()
        return total

    def allocate(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Return fresh output buffers, one per target, shaped like the base weights."""
        buffers = {}
        for target, plan in self.plans.items():
            buffers[target] = torch.empty_like(plan.base, dtype=dtype or plan.base.dtype)
        return buffers

    def fuse_into(self, buffers: dict[str, torch.Tensor], coefficients: dict[str, float]) -> None:
        """Write W₀ + Σₖ cₖ·ΔWₖ into ``buffers`` in place.

        Args:
            buffers: target → output tensor from :meth:`allocate` (any float dtype).
            coefficients: vector name → coefficient; a missing name counts as 0.
        """
        unknown = set(coefficients) - set(self.vector_names)
        if unknown:
            raise KeyError(f"unknown task vectors {sorted(unknown)}; known: {self.vector_names}")

        with torch.no_grad():
            for target, plan in self.plans.items():
                self._fuse_target(plan, buffers[target], coefficients)

    def _fuse_target(
        self, plan: _TargetPlan, out: torch.Tensor, coefficients: dict[str, float]
    ) -> None:
        accumulate_in_place = out.dtype == torch.float32
        acc = out if accumulate_in_place else torch.empty_like(out, dtype=torch.float32)

        # low-rank part: one addmm over the concatenated factors
        if plan.a_cat is not None:
            weights = [
                coefficients.get(name, 0.0) * s
                for name, s in zip(plan.names, plan.scalings, strict=True)
            ]
            row_scale = torch.repeat_interleave(
                torch.tensor(weights, dtype=torch.float32, device=plan.a_cat.device),
                torch.tensor(plan.ranks, device=plan.a_cat.device),
            )
            scaled_a = plan.a_cat * row_scale[:, None]
            torch.addmm(plan.base.to(torch.float32), plan.b_cat, scaled_a, out=acc)
        else:
            acc.copy_(plan.base)

        # dense part
        for name, delta in plan.dense.items():
            coefficient = coefficients.get(name, 0.0)
            if coefficient != 0.0:
                acc.add_(delta, alpha=coefficient)

        if not accumulate_in_place:
            out.copy_(acc)


def fuse_reference(
    base_state: dict[str, torch.Tensor],
    vectors: dict[str, TaskVector],
    coefficients: dict[str, float],
) -> dict[str, torch.Tensor]:
    """Return the fused targeted weights computed in float64, for checking :class:`Fuser`."""
    targets = sorted({target for vector in vectors.values() for target in vector.targets})
    fused = {}
    for target in targets:
        weight = base_state[target].to(torch.float64).clone()
        for name, vector in vectors.items():
            if target in vector.targets:
                weight += coefficients.get(name, 0.0) * vector.dense_delta(target, torch.float64)
        fused[target] = weight
    return fused
