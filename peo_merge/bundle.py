"""The checkpoint bundle: a manifest, task vector files and the preference map of one base.

A bundle folder contains ``manifest.json`` and ``vectors/*.safetensors``, and optionally
``preference_map.json``, ``pareto.json`` and ``pareto.png``. The manifest describes the affine
family that every served model belongs to::

    θ(α, β) = θ₀ + Σ_v offset_v · τ_v + α · τ_helpfulness + β · τ_harmlessness

``offset`` is empty until a generalist exists; with one it is ``{generalist: 1, helpfulness: λ,
harmlessness: 1 − λ}``, which makes θ(α, β) = θ_init + τ_gen + α·τ_help + β·τ_harm.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peo_merge.base_model import sha256_file
from peo_merge.task_vector import KINDS, TaskVector, load_task_vector

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
PREFERENCE_MAP_FILE = "preference_map.json"
PARETO_FILE = "pareto.json"
# the parts of pareto.json a server reports; the scored points stay in the file
PARETO_SUMMARY_KEYS = ("reference_point", "hypervolume", "fronts", "preference_map_kind")
ASPECTS = ("helpfulness", "harmlessness")


class BundleError(ValueError):
    """A bundle that cannot be served: the message names the file and, where known, the tensor."""


class VectorEntry(BaseModel):
    """One task vector file as the manifest describes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    kind: Literal["lowrank", "dense"]
    target_modules: tuple[str, ...]
    rank: int | None = None
    scaling: float = 1.0
    sha256: str | None = None
    recipe: dict = Field(default_factory=dict)

    @field_validator("file")
    @classmethod
    def _file_stays_inside_bundle(cls, value: str) -> str:
        path = Path(value)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError(f"vector file {value!r} must be a relative path inside the bundle")
        return value


class CoefficientBounds(BaseModel):
    """Inclusive range allowed for each steered coefficient."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float = -1.0
    max: float = 2.0

    @model_validator(mode="after")
    def _ordered_and_finite(self) -> CoefficientBounds:
        if not (math.isfinite(self.min) and math.isfinite(self.max)) or self.min >= self.max:
            raise ValueError(
                f"coefficient bounds must be finite with min < max, got [{self.min}, {self.max}]"
            )
        return self


class Manifest(BaseModel):
    """The contents of ``manifest.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int
    name: str
    base_model: dict
    dtype: str = "float32"
    vectors: dict[str, VectorEntry]
    offset: dict[str, float] = Field(default_factory=dict)
    coefficient_bounds: CoefficientBounds = CoefficientBounds()
    default_preference: float = Field(default=0.5, ge=0.0, le=1.0)
    phases: dict = Field(default_factory=dict)

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != FORMAT_VERSION:
            raise ValueError(
                f"unknown format_version {value}; this server reads version {FORMAT_VERSION}"
            )
        return value

    @model_validator(mode="after")
    def _aspects_present(self) -> Manifest:
        for aspect in ASPECTS:
            if aspect not in self.vectors:
                raise ValueError(f"vectors must include {aspect!r}; found {sorted(self.vectors)}")
        for name, value in self.offset.items():
            if name not in self.vectors:
                raise ValueError(f"offset names vector {name!r}, which is not in vectors")
            if not math.isfinite(value):
                raise ValueError(f"offset of {name!r} must be finite, got {value}")
        return self


class Bundle:
    """A loaded bundle: its folder, manifest, task vectors and optional preference map."""

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        vectors: dict[str, TaskVector],
        preference_map: dict | None,
        pareto: dict | None = None,
    ):
        self.path = path
        self.manifest = manifest
        self.vectors = vectors
        self.preference_map = preference_map
        self.pareto = pareto

    def vector_coefficients(self, alpha: float, beta: float) -> dict[str, float]:
        """Return the coefficient of every task vector for the steered pair (α, β)."""
        coefficients = {name: 0.0 for name in self.vectors}
        coefficients.update(self.manifest.offset)
        coefficients["helpfulness"] += alpha
        coefficients["harmlessness"] += beta
        return coefficients

    def nbytes(self) -> int:
        """Bytes the task vectors occupy in memory."""
        return sum(vector.nbytes() for vector in self.vectors.values())


def read_manifest(path: Path) -> Manifest:
    """Parse and validate ``manifest.json`` of a bundle folder.

    Raises:
        BundleError: the file is missing, not JSON, or fails validation.
    """
    manifest_path = Path(path) / MANIFEST_FILE
    try:
        raw = json.loads(manifest_path.read_text())
    except FileNotFoundError as error:
        raise BundleError(f"{manifest_path}: manifest not found") from error
    except json.JSONDecodeError as error:
        raise BundleError(f"{manifest_path}: invalid JSON: {error}") from error

    try:
        return Manifest.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc']) or 'manifest'}: {item['msg']}"
            for item in error.errors()
        )
        raise BundleError(f"{manifest_path}: {problems}") from error


def load_bundle(path: Path) -> Bundle:
    """Read a bundle's manifest, task vectors and preference map, checking each file.

    Shapes against a base model are checked separately by :func:`peo_merge.validation.validate_against_base`.

    Raises:
        BundleError: any file is missing, unreadable or inconsistent with the manifest.
    """
    path = Path(path)
    manifest = read_manifest(path)

    vectors = {}
    for name, entry in manifest.vectors.items():
        file = path / entry.file
        if not file.is_file():
            raise BundleError(f"{file}: task vector {name!r} file not found")
        if entry.sha256 is not None and sha256_file(file) != entry.sha256:
            raise BundleError(
                f"{file}: sha256 does not match the manifest; the file is truncated or replaced"
            )
        try:
            vector = load_task_vector(file, name, entry.kind, entry.scaling)
        except ValueError as error:
            raise BundleError(str(error)) from error

        declared_modules = set(entry.target_modules)
        for target in vector.targets:
            module_type = target.rsplit(".", 2)[-2] if target.count(".") >= 1 else target
            if declared_modules and module_type not in declared_modules:
                raise BundleError(
                    f"{file}: tensor {target} targets {module_type!r}, "
                    f"which is not in the manifest's target_modules {sorted(declared_modules)}"
                )
        if entry.kind == "lowrank" and entry.rank is not None and vector.rank != entry.rank:
            raise BundleError(
                f"{file}: factors have rank {vector.rank}, but the manifest declares rank {entry.rank}"
            )
        vectors[name] = vector

    preference_map = _optional_json(path / PREFERENCE_MAP_FILE)
    pareto = _optional_json(path / PARETO_FILE)
    if pareto is not None:
        missing = [key for key in ("fronts", "hypervolume") if key not in pareto]
        if missing:
            raise BundleError(f"{path / PARETO_FILE}: no {missing[0]!r} entry")
        pareto = {key: pareto[key] for key in PARETO_SUMMARY_KEYS if key in pareto}
    return Bundle(path, manifest, vectors, preference_map, pareto)


def _optional_json(path: Path) -> dict | None:
    """Return the JSON object in ``path``, or None when there is no such file."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BundleError(f"{path}: invalid JSON: {error}") from error
    if not isinstance(value, dict):
        raise BundleError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` into a bundle folder."""
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")


__all__ = [
    "ASPECTS",
    "FORMAT_VERSION",
    "KINDS",
    "Bundle",
    "BundleError",
    "CoefficientBounds",
    "Manifest",
    "VectorEntry",
    "load_bundle",
    "read_manifest",
    "write_manifest",
]
