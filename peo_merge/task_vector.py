"""Task vectors: the weight difference that one training phase adds to the base.

A task vector is stored as one safetensors file. A low-rank vector holds, for every targeted base
weight ``W`` named ``<module>.weight``, the LoRA factors ``<module>.weight.lora_A`` (rank × in)
and ``<module>.weight.lora_B`` (out × rank); its delta is ``scaling · B · A``. A dense vector
holds the delta itself under the base weight's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

LORA_A_SUFFIX = ".lora_A"
LORA_B_SUFFIX = ".lora_B"
KINDS = ("lowrank", "dense")
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TaskVector:
    """The weight delta of one aspect, keyed by the base parameter it modifies.

    Attributes:
        name: the vector's name in the bundle (``helpfulness``, ``harmlessness``, ``generalist``).
        kind: ``lowrank`` (``factors`` is filled) or ``dense`` (``deltas`` is filled).
        scaling: the LoRA scaling ``alpha / rank`` applied to ``B · A``; 1.0 for dense vectors.
        factors: base parameter name → ``(A, B)``.
        deltas: base parameter name → dense delta with the parameter's shape.
    """

    name: str
    kind: str
    scaling: float = 1.0
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        """Base parameter names this vector modifies, sorted."""
        return sorted(self.factors if self.kind == "lowrank" else self.deltas)

    @property
    def rank(self) -> int | None:
        """The LoRA rank, or None for a dense vector."""
        if self.kind != "lowrank" or not self.factors:
            return None
        first_a, _ = next(iter(self.factors.values()))
        return int(first_a.shape[0])

    def nbytes(self) -> int:
        """Bytes the stored tensors occupy."""
        tensors = [t for pair in self.factors.values() for t in pair] + list(self.deltas.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def dense_delta(self, target: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return the full delta of one target in ``dtype`` (``scaling · B · A`` when low-rank)."""
        if self.kind == "dense":
            return self.deltas[target].to(dtype)
        lora_a, lora_b = self.factors[target]
        return self.scaling * (lora_b.to(dtype) @ lora_a.to(dtype))

    def to_dense(self) -> TaskVector:
        """Return a dense copy whose deltas are the expanded fp32 products."""
        deltas = {target: self.dense_delta(target) for target in self.targets}
        return TaskVector(self.name, "dense", 1.0, deltas=deltas)


def save_task_vector(vector: TaskVector, path: Path, dtype: torch.dtype | None = None) -> None:
    """Write a task vector as one safetensors file, optionally casting the stored tensors."""
    tensors: dict[str, torch.Tensor] = {}
    if vector.kind == "lowrank":
        for target, (lora_a, lora_b) in vector.factors.items():
            tensors[target + LORA_A_SUFFIX] = lora_a
            tensors[target + LORA_B_SUFFIX] = lora_b
    else:
        tensors.update(vector.deltas)

    if dtype is not None:
        tensors = {key: value.to(dtype) for key, value in tensors.items()}
    tensors = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}

    metadata = {"name": vector.name, "kind": vector.kind, "scaling": repr(float(vector.scaling))}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    Path(path).chmod(0o644)


def load_task_vector(path: Path, name: str, kind: str, scaling: float) -> TaskVector:
    """Read a task vector file written by :func:`save_task_vector`.

    Raises:
        ValueError: the file is unreadable, or its tensors do not form a vector of ``kind``
            (a factor without its partner, mismatched ranks, an unknown dtype); the message
            names the file and the tensor.
    """
    if kind not in KINDS:
        raise ValueError(f"{path}: unknown task vector kind {kind!r}; expected one of {KINDS}")

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ValueError(f"{path}: not a readable safetensors file: {error}") from error

    for key, tensor in tensors.items():
        if tensor.dtype not in STORAGE_DTYPES.values():
            raise ValueError(f"{path}: tensor {key} has unsupported dtype {tensor.dtype}")

    if kind == "dense":
        return TaskVector(name, "dense", 1.0, deltas=tensors)

    factors = {}
    rank = None
    for key in sorted(tensors):
        if key.endswith(LORA_B_SUFFIX):
            continue
        if not key.endswith(LORA_A_SUFFIX):
            raise ValueError(
                f"{path}: tensor {key} is neither a {LORA_A_SUFFIX} nor a {LORA_B_SUFFIX} factor"
            )
        target = key[: -len(LORA_A_SUFFIX)]
        partner = target + LORA_B_SUFFIX
        if partner not in tensors:
            raise ValueError(f"{path}: tensor {key} has no matching {partner}")

        lora_a, lora_b = tensors[key], tensors[partner]
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_b.shape[1] != lora_a.shape[0]:
            raise ValueError(
                f"{path}: factors of {target} have incompatible shapes "
                f"A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)}"
            )
        if rank is not None and lora_a.shape[0] != rank:
            raise ValueError(f"{path}: tensor {key} has rank {lora_a.shape[0]}, others have {rank}")
        rank = lora_a.shape[0]
        factors[target] = (lora_a, lora_b)

    orphans = [
        k for k in tensors if k.endswith(LORA_B_SUFFIX) and k[: -len(LORA_B_SUFFIX)] not in factors
    ]
    if orphans:
        raise ValueError(f"{path}: tensor {orphans[0]} has no matching {LORA_A_SUFFIX} factor")
    return TaskVector(name, "lowrank", float(scaling), factors=factors)


def task_vector_from_peft(model, name: str, adapter: str = "default") -> TaskVector:
    """Extract the LoRA factors of a PEFT model's adapter as a low-rank task vector.

    Keys are mapped from PEFT module names (``base_model.model.<module>``) to base parameter
    names (``<module>.weight``).
    """
    from peft.tuners.lora import LoraLayer

    factors = {}
    scalings = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        target = module_name.removeprefix("base_model.model.") + ".weight"
        lora_a = module.lora_A[adapter].weight.detach().float().cpu().clone()
        lora_b = module.lora_B[adapter].weight.detach().float().cpu().clone()
        factors[target] = (lora_a, lora_b)
        scalings.add(float(module.scaling[adapter]))

    if not factors:
        raise ValueError(f"model has no LoRA layers for adapter {adapter!r}")
    if len(scalings) != 1:
        raise ValueError(
            f"adapter {adapter!r} uses several scalings {sorted(scalings)}; expected one"
        )
    return TaskVector(name, "lowrank", scalings.pop(), factors=factors)
