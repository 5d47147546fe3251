"""Server settings: every field is a command-line flag and a ``PEO_*`` environment variable.

A field ``cache_max_entries`` is set by ``--cache-max-entries`` or ``PEO_CACHE_MAX_ENTRIES``; a
flag wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = REPO_ROOT / "checkpoints" / "smollm2-hh-peo"
ENV_PREFIX = "PEO_"
_SIZE_UNITS = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
}


def parse_bytes(value: str | int) -> int:
    """Parse a byte count such as ``4096``, ``512MiB`` or ``2G``."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", str(value), re.IGNORECASE)
    if match is None:
        raise ValueError(
            f"invalid byte size {value!r}; use a number with an optional unit like 512MiB or 2G"
        )
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "").lower()])


class Settings(BaseModel):
    """Everything an operator can configure."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    base_model: str = Field(
        "smollm2-135m-instruct",
        description="local Hugging Face causal-LM folder, or smollm2-135m-instruct for the built-in default",
    )
    bundle: Path = Field(DEFAULT_BUNDLE, description="checkpoint bundle folder with manifest.json")
    cache_dir: Path | None = Field(
        None, description="where the converted default base model is kept"
    )
    device: str = Field("auto", description="torch device: auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="serving dtype; auto is float32 on CPU and bfloat16 on CUDA"
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: all cores")
    fusion_expand: Literal["lowrank", "dense"] = Field(
        "lowrank",
        description="expand low-rank vectors per fusion (lowrank) or once at start-up (dense)",
    )
    coefficient_step: float = Field(
        0.01, gt=0, le=1, description="coefficients are rounded to this step"
    )
    cache_max_entries: int = Field(8, ge=1, description="most fused models kept in the LRU cache")
    cache_max_bytes: int = Field(
        4 * 1024**3, ge=1, description="byte budget of the LRU cache (e.g. 4GiB)"
    )
    cache_wait_seconds: float = Field(
        30.0, gt=0, description="how long a request waits for cache room"
    )
    engine_mode: Literal["auto", "fused", "unfused"] = Field(
        "auto",
        description="fused models per coefficient pair, base weights plus factors per row "
        "(unfused), or auto: fused while all requests in flight share a pair, unfused once they mix",
    )
    max_batch_size: int = Field(
        8, ge=1, description="maximum requests decoded together by one model in one step"
    )
    prefill_chunk_tokens: int = Field(
        256,
        ge=16,
        description="prompt tokens prefilled per turn of the decode loop; longer prompts are "
        "prefilled in chunks of this size between decode steps",
    )
    max_concurrency: int = Field(8, ge=1, description="generations running at once")
    max_queue: int = Field(32, ge=0, description="requests waiting for a slot before 503")
    max_new_tokens: int = Field(
        1024, ge=1, description="upper limit of max_new_tokens in a request"
    )
    default_max_new_tokens: int = Field(
        128, ge=1, description="max_new_tokens when a request omits it, capped at --max-new-tokens"
    )
    max_model_len: int | None = Field(
        None, ge=16, description="context length; default: the model's"
    )
    max_stop_sequences: int = Field(16, ge=0, description="most stop sequences in a request")
    max_body_bytes: int = Field(
        1024**2, ge=1024, description="largest accepted request body (e.g. 1MiB)"
    )
    api_key: str | None = Field(None, description="bearer token required on generation routes")
    protect_metrics: bool = Field(
        False, description="also require the API key on /metrics and /info"
    )
    cors_origins: str = Field(
        "", description="comma-separated origins allowed by CORS; empty disables CORS"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_json: bool = Field(False, description="write logs as JSON lines")
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="time in-flight streams get on SIGTERM"
    )

    @field_validator("cache_max_bytes", "max_body_bytes", mode="before")
    @classmethod
    def _parse_size(cls, value):
        return parse_bytes(value) if isinstance(value, str) else value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with one flag per settings field."""
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Serve a preference-steerable model: fuse task vectors per request and stream the generation.",
    )
    for name, field in Settings.model_fields.items():
        env = ENV_PREFIX + name.upper()
        help_text = f"{field.description} (env {env}; default {field.default})"
        if field.annotation is bool:
            parser.add_argument(
                _flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(_flag(name), dest=name, default=None, help=help_text)
    return parser


def load_settings(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Build settings from flags, then ``PEO_*`` environment variables, then defaults.

    Raises:
        SystemExit: a value is invalid; the message names the flag, the variable and the value.
    """
    environ = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(argv))

    values = {}
    for name in Settings.model_fields:
        env = ENV_PREFIX + name.upper()
        if args.get(name) is not None:
            values[name] = args[name]
        elif environ.get(env, "") != "":
            raw = environ[env]
            values[name] = (
                raw.lower() in ("1", "true", "yes", "on")
                if Settings.model_fields[name].annotation is bool
                else raw
            )

    try:
        return Settings(**values)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            if not item["loc"]:
                problems.append(item["msg"].removeprefix("Value error, "))
                continue
            name = str(item["loc"][0])
            problems.append(
                f"{_flag(name)} / {ENV_PREFIX}{name.upper()}={values.get(name)!r}: {item['msg']}"
            )
        raise SystemExit("invalid settings: " + "; ".join(problems)) from error
