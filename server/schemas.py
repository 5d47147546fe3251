"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_SEED = 2**63 - 1
MAX_STOP_LENGTH = 256


class Message(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1, max_length=1_000_000)


class Coefficients(BaseModel):
    """The steered coefficients (α, β) of the helpfulness and harmlessness task vectors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    helpfulness: float
    harmlessness: float


class SamplingFields(BaseModel):
    """Sampling parameters shared by ``/generate`` and the OpenAI-compatible routes."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    max_new_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float = Field(0.7, ge=0.0, le=5.0, description="0 means greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=100_000, description="0 disables top-k filtering")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[str] = Field(
        default_factory=list, description="stop sequences, not included in the output"
    )
    ignore_eos: bool = Field(False, description="keep generating past end-of-sequence tokens")


class GenerateRequest(SamplingFields):
    """Body of ``POST /generate``: exactly one of ``prompt`` and ``messages``; at most one of
    ``preference`` and ``coefficients``."""

    prompt: str | None = Field(None, max_length=1_000_000)
    messages: list[Message] | None = Field(None, min_length=1, max_length=1000)
    preference: float | None = Field(
        None, ge=0.0, le=1.0, description="slider: 1 most helpful, 0 most harmless"
    )
    coefficients: Coefficients | None = None
    stream: bool = False

    @model_validator(mode="after")
    def _exclusive_fields(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("set exactly one of 'prompt' and 'messages'")
        if self.preference is not None and self.coefficients is not None:
            raise ValueError("set at most one of 'preference' and 'coefficients'")
        return self

    @field_validator("stop")
    @classmethod
    def _stop_lengths(cls, value: list[str]) -> list[str]:
        for index, stop in enumerate(value):
            if not stop or len(stop) > MAX_STOP_LENGTH:
                raise ValueError(
                    f"stop[{index}] has {len(stop)} characters; allowed: 1 to {MAX_STOP_LENGTH}"
                )
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class Timings(BaseModel):
    """Durations of one request, in seconds."""

    queue: float
    fusion: float
    time_to_first_token: float | None
    total: float


class GenerateResponse(BaseModel):
    """Body of a non-streaming ``/generate`` response, and the data of the stream's ``done`` event."""

    request_id: str
    text: str
    finish_reason: Literal["stop", "length", "cancelled", "shutdown"]
    preference: float | None
    coefficients: Coefficients
    usage: Usage
    timings: Timings
    cache: Literal["hit", "miss", "bypass"] = Field(
        description="fused-model cache outcome; bypass when the unfused engine served the request"
    )
    engine: Literal["fused", "unfused"] = Field(
        description="fused: a fused copy of the weights; unfused: base weights plus factors per row"
    )


class ErrorBody(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
