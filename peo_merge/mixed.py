"""Unfused serving: the base weights plus task-vector factors, with coefficients chosen per row.

A mixed model computes every targeted linear layer as

    y = W₀·x + Σₖ cₖ[row] · sₖ · Bₖ·(Aₖ·x)          (low-rank vectors)
    y = W₀·x + Σₖ cₖ[row] · ΔWₖ·x                   (dense vectors)

so one forward pass serves a batch whose rows ask for different coefficients, without building
a fused copy of any weight. It shares every base tensor with the base model; it owns only the
factors, kept in the serving dtype. Before each forward pass the caller sets one coefficient row
per batch row with :meth:`RowCoefficients.set`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peo_merge.fused_model import shared_copy
from peo_merge.task_vector import TaskVector


class RowCoefficients:
    """The per-row coefficients that every mixed layer of one model reads.

    Layers whose vectors have the same ranks and scalings share a layout; :meth:`set` turns the
    coefficient rows into one fp32 per-rank scale matrix per layout, once per forward pass
    instead of once per layer.

    Args:
        vector_names: the column order of the coefficient matrix.
    """

    def __init__(self, vector_names: list[str]):
        self.vector_names = list(vector_names)
        self.values: torch.Tensor | None = None
        self.scales: dict[tuple, torch.Tensor] = {}
        self._layouts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def layout(self, columns: list[int], scalings: list[float], device: torch.device) -> tuple:
        """Register a layer's rank layout (vector column and scaling per rank component)."""
        key = (tuple(columns), tuple(scalings), str(device))
        if key not in self._layouts:
            self._layouts[key] = (
                torch.tensor(columns, dtype=torch.long, device=device),
                torch.tensor(scalings, dtype=torch.float32, device=device),
            )
        return key

    def row(self, coefficients: dict[str, float]) -> list[float]:
        """Return one coefficient row in column order; a missing name counts as 0."""
        unknown = set(coefficients) - set(self.vector_names)
        if unknown:
            raise KeyError(f"unknown task vectors {sorted(unknown)}; known: {self.vector_names}")
        return [float(coefficients.get(name, 0.0)) for name in self.vector_names]

    def set(self, rows: torch.Tensor) -> None:
        """Use ``rows`` (batch × vectors, float32) for the following forward passes."""
        if rows.dim() != 2 or rows.shape[1] != len(self.vector_names):
            raise ValueError(
                f"coefficient rows must have shape (batch, {len(self.vector_names)}), "
                f"got {tuple(rows.shape)}"
            )
        self.values = rows
        self.scales = {
            key: rows.to(columns.device, torch.float32)[:, columns] * scalings
            for key, (columns, scalings) in self._layouts.items()
        }


class MixedLinear(nn.Module):
    """A base linear layer plus task-vector terms weighted per batch row.

    The base weight and bias are the base model's own parameters. The low-rank factors of all
    vectors that target this layer are concatenated along the rank axis, so the extra work per
    forward pass is two thin matmuls whatever the number of vectors.
    """

    def __init__(
        self,
        base: nn.Linear,
        rows: RowCoefficients,
        vectors: dict[str, TaskVector],
        target: str,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.rows = rows
        device = base.weight.device

        columns, scalings, a_parts, b_parts = [], [], [], []
        self.dense_columns: list[int] = []
        dense_parts = []
        for name, vector in vectors.items():
            if target not in vector.targets:
                continue
            column = rows.vector_names.index(name)
            if vector.kind == "lowrank":
                lora_a, lora_b = vector.factors[target]
                rank = lora_a.shape[0]
                columns += [column] * rank
                scalings += [vector.scaling] * rank
                a_parts.append(lora_a.to(device, dtype))
                b_parts.append(lora_b.to(device, dtype))
            else:
                self.dense_columns.append(column)
                dense_parts.append(vector.dense_delta(target).to(device, dtype))

        self.register_buffer("lora_a", torch.cat(a_parts) if a_parts else None, persistent=False)
        self.register_buffer(
            "lora_b", torch.cat(b_parts, dim=1) if b_parts else None, persistent=False
        )
        self.layout = rows.layout(columns, scalings, device) if columns else None
        self.dense_deltas = dense_parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        rows = self.rows.values
        if rows is None:
            raise RuntimeError("coefficient rows are not set; call RowCoefficients.set first")
        if rows.shape[0] != x.shape[0]:
            raise ValueError(f"{rows.shape[0]} coefficient rows for a batch of {x.shape[0]}")
        # one scale per batch row and rank component, broadcast over the sequence axis
        extra_dims = (1,) * (x.dim() - 2)
        if self.lora_a is not None:
            scale = self.rows.scales[self.layout].view(x.shape[0], *extra_dims, -1)
            hidden = F.linear(x, self.lora_a)
            if hidden.dtype == torch.float32:
                hidden.mul_(scale)
            else:  # scale in fp32 as fusion does, then round once
                hidden = (hidden.float() * scale).to(x.dtype)
            out_features = y.shape[-1]
            y.view(-1, out_features).addmm_(hidden.view(-1, hidden.shape[-1]), self.lora_b.t())
        for column, delta in zip(self.dense_columns, self.dense_deltas, strict=True):
            scale = rows[:, column].to(x.dtype).view(x.shape[0], *extra_dims, 1)
            y = y + scale * F.linear(x, delta)
        return y


def build_mixed_model(
    base_model: nn.Module, vectors: dict[str, TaskVector], dtype: torch.dtype | None = None
) -> tuple[nn.Module, RowCoefficients]:
    """Return a copy of ``base_model`` whose targeted linear layers take per-row coefficients.

    Every base parameter and buffer is shared, not copied. Each vector target must be the
    ``weight`` of an ``nn.Linear``.

    Raises:
        ValueError: a target is not the weight of a linear layer, naming it.
    """
    model = shared_copy(base_model)

    rows = RowCoefficients(list(vectors))
    targets = sorted({target for vector in vectors.values() for target in vector.targets})
    for target in targets:
        module_name, _, attribute = target.rpartition(".")
        module = model.get_submodule(module_name)
        if attribute != "weight" or not isinstance(module, nn.Linear):
            raise ValueError(
                f"target {target} is not the weight of a linear layer "
                f"({type(module).__name__}); unfused serving supports linear layers only"
            )
        layer_dtype = dtype or module.weight.dtype
        mixed = MixedLinear(module, rows, vectors, target, layer_dtype)
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, mixed)
    return model, rows


def mixed_nbytes(model: nn.Module) -> int:
    """Bytes held by the factors and dense deltas of a mixed model's layers."""
    total = 0
    for module in model.modules():
        if isinstance(module, MixedLinear):
            for tensor in [module.lora_a, module.lora_b, *module.dense_deltas]:
                if tensor is not None:
                    total += tensor.numel() * tensor.element_size()
    return total
