"""The serving engine: base model, bundle, fusion, the fused-model cache and prompt handling."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from peo_merge.base_model import load_base_model, resolve_base_model
from peo_merge.bundle import Bundle, load_bundle
from peo_merge.fused_model import base_state, build_fused_model
from peo_merge.fusion import Fuser
from peo_merge.mixed import build_mixed_model, mixed_nbytes
from peo_merge.preference_map import PreferenceMap
from peo_merge.validation import validate_against_base
from server.batching import Route
from server.cache import FusedModelCache, Lease
from server.settings import Settings
from server.threads import run_in_new_thread

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RequestError(Exception):
    """A request the server rejects: an HTTP status, an error type, a message and the field."""

    def __init__(self, status: int, error_type: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.field = field


@dataclass
class FusedEntry:
    """A cached fused model and the buffers its targeted weights live in."""

    model: torch.nn.Module
    buffers: dict[str, torch.Tensor]
    coefficients: tuple[float, float]


def resolve_device(device: str) -> torch.device:
    """Return the torch device for a ``--device`` value; ``auto`` picks CUDA when present."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Return the serving dtype; ``auto`` is float32 on CPU and bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


class Engine:
    """Holds the base model and task vectors, and hands out fused models for coefficient pairs.

    Start-up loads and validates everything before the first request, so a broken bundle stops
    the server instead of failing requests later. Coefficients are rounded to
    ``coefficient_step`` to form the cache key; responses report the rounded values.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)

        # the bundle first: it reads much faster than the base model loads, so a broken one
        # stops the start sooner
        self.bundle: Bundle = load_bundle(Path(settings.bundle))
        self.base_source = resolve_base_model(settings.base_model, settings.cache_dir)
        device = str(self.device)
        try:
            self.model, self.tokenizer = load_base_model(self.base_source, self.dtype, device)
        except (OSError, ValueError) as error:
            folder = self.base_source.path
            raise ValueError(f"base model folder {folder}: loading failed: {error}") from error
        self.base_state = base_state(self.model)
        validate_against_base(self.bundle, self.base_state)
        self.preference_map = (
            PreferenceMap.from_json(self.bundle.preference_map)
            if self.bundle.preference_map is not None
            else PreferenceMap.soup_line()
        )

        # fusion and the cache
        self.fuser = Fuser(
            self.base_state, self.bundle.vectors, expand=settings.fusion_expand, device=self.device
        )
        self.entry_nbytes = sum(
            t.numel() * t.element_size() for t in self.fuser.allocate(self.dtype).values()
        )
        if self.entry_nbytes > settings.cache_max_bytes:
            raise ValueError(
                f"--cache-max-bytes / PEO_CACHE_MAX_BYTES is {settings.cache_max_bytes} bytes, "
                f"smaller than one fused model ({self.entry_nbytes} bytes, "
                f"{self.entry_nbytes / 2**20:.1f} MiB); allowed: at least {self.entry_nbytes} bytes"
            )
        self.on_evict = None
        self.cache = FusedModelCache(
            self._build_entry,
            entry_nbytes=self.entry_nbytes,
            max_entries=settings.cache_max_entries,
            max_bytes=settings.cache_max_bytes,
            wait_timeout=settings.cache_wait_seconds,
            on_evict=lambda key: self.on_evict(key) if self.on_evict else None,
        )

        # the unfused model: base weights plus factors, coefficients per batch row
        self.mixed_model = None
        self.mixed_rows = None
        self.mixed_nbytes = 0
        if settings.engine_mode != "fused":
            try:
                self.mixed_model, self.mixed_rows = build_mixed_model(
                    self.model, self.bundle.vectors, self.dtype
                )
                self.mixed_nbytes = mixed_nbytes(self.mixed_model)
            except ValueError as error:
                if settings.engine_mode == "unfused":
                    raise ValueError(
                        f"--engine-mode / PEO_ENGINE_MODE is unfused, but bundle "
                        f"{self.bundle.path} cannot be served unfused: {error}; allowed: "
                        "fused or auto for this bundle"
                    ) from error
                logger.warning("serving fused only: %s", error)

        # prompt limits and stop tokens
        model_len = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(settings.max_model_len or model_len, model_len)
        self.eos_token_ids = self._eos_token_ids()
        logger.info(
            "engine ready: base=%s bundle=%s vectors=%s device=%s dtype=%s bounds=[%s, %s] map=%s "
            "fused entry=%.1f MiB cache=%d entries/%.1f MiB",
            self.base_source.path,
            self.bundle.path,
            sorted(self.bundle.vectors),
            self.device,
            str(self.dtype).removeprefix("torch."),
            self.bundle.manifest.coefficient_bounds.min,
            self.bundle.manifest.coefficient_bounds.max,
            self.preference_map.source,
            self.entry_nbytes / 2**20,
            settings.cache_max_entries,
            settings.cache_max_bytes / 2**20,
        )

    def _eos_token_ids(self) -> set[int]:
        ids = set()
        for source in (
            self.tokenizer.eos_token_id,
            getattr(self.model.generation_config, "eos_token_id", None),
        ):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(source)
        return ids

    # coefficients

    def round_coefficient(self, value: float) -> float:
        """Round a coefficient to the cache-key step; -0.0 becomes 0.0."""
        step = self.settings.coefficient_step
        return round(round(value / step) * step, 10) + 0.0

    def resolve_coefficients(
        self, preference: float | None, coefficients: dict | None
    ) -> tuple[float | None, tuple[float, float]]:
        """Return the slider value used and the rounded (α, β) for a request.

        Raises:
            RequestError: a coefficient is outside the bundle's bounds (422).
        """
        bounds = self.bundle.manifest.coefficient_bounds
        if coefficients is not None:
            for field in ("helpfulness", "harmlessness"):
                value = coefficients[field]
                if not (math.isfinite(value) and bounds.min <= value <= bounds.max):
                    raise RequestError(
                        422,
                        "invalid_request",
                        f"coefficients.{field} is {value}; allowed: a finite number in [{bounds.min}, {bounds.max}]",
                        f"coefficients.{field}",
                    )
            pair = (coefficients["helpfulness"], coefficients["harmlessness"])
        else:
            if preference is None:
                preference = self.bundle.manifest.default_preference
            pair = self.preference_map.coefficients(preference)
        alpha, beta = (self.round_coefficient(v) for v in pair)
        return preference, (alpha, beta)

    # the fused-model cache

    def _build_entry(
        self, key: tuple[float, float], recycled: FusedEntry | None
    ) -> tuple[FusedEntry, int]:
        started = time.perf_counter()
        buffers = recycled.buffers if recycled is not None else self.fuser.allocate(self.dtype)
        # on a thread of its own, which exits after fusion (see server.threads)
        run_in_new_thread(
            self.fuser.fuse_into, buffers, self.bundle.vector_coefficients(*key), name="fusion"
        )
        model = recycled.model if recycled is not None else build_fused_model(self.model, buffers)
        elapsed = time.perf_counter() - started
        logger.debug(
            "fused %s in %.3f s (recycled buffers: %s)", key, elapsed, recycled is not None
        )
        return FusedEntry(model, buffers, key), self.entry_nbytes

    def fused_route(self, key: tuple[float, float], entry: FusedEntry) -> Route:
        """Return the decode-loop route of a request served by the fused model ``entry``."""
        return Route(("fused", key), entry.model)

    def unfused_route(self, key: tuple[float, float]) -> Route:
        """Return the decode-loop route of a request served by the unfused model."""
        if self.mixed_model is None:
            raise RuntimeError("the unfused engine is not loaded (engine mode fused)")
        row = self.mixed_rows.row(self.bundle.vector_coefficients(*key))
        return Route("unfused", self.mixed_model, self.mixed_rows, row)

    def acquire(self, key: tuple[float, float]) -> Lease:
        """Return a pinned fused model for ``key``; see :class:`FusedModelCache` for the policy."""
        return self.cache.acquire(key)

    # prompts

    def encode_prompt(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        """Tokenize a raw prompt, or render chat messages with the chat template.

        Raises:
            RequestError: the prompt leaves no room to generate within the context (413).
        """
        if messages is not None:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            ids = list(ids)
            field = "messages"
        else:
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            field = "prompt"

        if not ids:
            raise RequestError(
                422, "invalid_request", f"{field} is empty after tokenization", field
            )
        if len(ids) >= self.max_model_len:
            raise RequestError(
                413,
                "prompt_too_long",
                f"{field} has {len(ids)} tokens; the context holds {self.max_model_len}, "
                f"so the prompt must be at most {self.max_model_len - 1} tokens",
                field,
            )
        return ids

    def info(self) -> dict:
        """Return the description served by ``/info``."""
        manifest = self.bundle.manifest
        return {
            "base_model": self.base_source.identity()
            | {"dtype": str(self.dtype).removeprefix("torch.")},
            "device": str(self.device),
            "bundle": {
                "path": str(self.bundle.path),
                "name": manifest.name,
                "format_version": manifest.format_version,
                "vectors": {
                    name: {
                        "kind": entry.kind,
                        "rank": entry.rank,
                        "scaling": entry.scaling,
                        "target_modules": list(entry.target_modules),
                        "bytes": self.bundle.vectors[name].nbytes(),
                    }
                    for name, entry in manifest.vectors.items()
                },
                "offset": manifest.offset,
            },
            "coefficient_bounds": {
                "min": manifest.coefficient_bounds.min,
                "max": manifest.coefficient_bounds.max,
            },
            "coefficient_step": self.settings.coefficient_step,
            "default_preference": manifest.default_preference,
            "preference_map": self.preference_map.to_json(),
            "pareto": self.bundle.pareto,
            "max_model_len": self.max_model_len,
            "max_new_tokens": self.settings.max_new_tokens,
            "fusion_expand": self.settings.fusion_expand,
            "engine_mode": self.settings.engine_mode,
            "unfused_factor_bytes": self.mixed_nbytes,
            "max_batch_size": self.settings.max_batch_size,
            "cache": {
                "entries": len(self.cache),
                "keys": [{"helpfulness": a, "harmlessness": b} for a, b in self.cache.keys()],
                "bytes": self.cache.nbytes(),
                "entry_bytes": self.entry_nbytes,
                "max_entries": self.cache.max_entries,
                "max_bytes": self.cache.max_bytes,
            },
        }
