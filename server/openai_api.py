"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

The routes translate OpenAI request bodies into the server's own generation pipeline
(:func:`server.app.start_generation`) and its output back into OpenAI's response and stream
formats. Two extra body fields steer the fused model as on ``/generate``: ``preference`` (the
slider, 1 most helpful, 0 most harmless) or ``coefficients`` (α, β). Every response also
carries a ``peo`` object with the coefficients used, the preference, and whether the fused model
came from the cache. ``top_k`` and ``ignore_eos`` are accepted as extras, as on ``/generate``.

OpenAI fields this server cannot honour are accepted only at their neutral values (for example
``presence_penalty: 0`` or ``n: 1``); any other value is a 422 that names the field.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.background import BackgroundTask

from server.app import (
    ServerState,
    check_api_key,
    finish_response,
    start_generation,
    wait_for_result,
)
from server.engine import RequestError
from server.generation import Finished
from server.runner import GenerationFailed, GenerationJob
from server.schemas import MAX_SEED, MAX_STOP_LENGTH, Coefficients, SamplingFields

logger = logging.getLogger(__name__)

# OpenAI's default sampling temperature; /generate keeps its own default of 0.7.
DEFAULT_TEMPERATURE = 1.0
OWNER = "peo"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# keys that clients copy from a previous assistant message; accepted when null
NULLABLE_MESSAGE_KEYS = ("refusal", "tool_calls", "function_call", "audio", "annotations")


def _require_neutral(value: Any, neutral: tuple, allowed: str) -> Any:
    """Return ``value`` when it is one of the ``neutral`` values, else raise a ``ValueError``."""
    if value in neutral:
        return value
    raise ValueError(f"must be {allowed}")


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last chunk with token counts."""

    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class OpenAIFields(BaseModel):
    """Fields shared by the completion and chat completion bodies."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = Field(None, description="must be the served model id when given")
    max_tokens: int | None = Field(None, ge=1, description="maximum number of tokens to generate")
    temperature: float | None = Field(None, ge=0.0, le=5.0, description="0 means greedy decoding")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = Field(
        None, validate_default=True, description="stop sequences, not included in the output"
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, description="choices per request; only 1 is supported")
    user: str | None = Field(None, max_length=256, description="accepted and ignored")
    presence_penalty: float | None = Field(None, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, description="only 0 is supported")
    logit_bias: dict[str, float] | None = Field(None, description="only an empty map is supported")
    preference: float | None = Field(
        None, ge=0.0, le=1.0, description="slider: 1 most helpful, 0 most harmless"
    )
    coefficients: Coefficients | None = None
    # extensions that other OpenAI-compatible servers (vLLM, llama.cpp) also accept
    top_k: int | None = Field(None, ge=0, le=100_000, description="0 disables top-k filtering")
    ignore_eos: bool | None = Field(None, description="keep generating past end-of-sequence tokens")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        return _require_neutral(value, (None, 1), "1 (one choice per request)")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        return _require_neutral(value, (None, 0), "0 (penalties are not supported)")

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict | None) -> dict | None:
        return _require_neutral(value, (None, {}), "null or {} (logit bias is not supported)")

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, value: str | list[str] | None) -> list[str]:
        if value is None:
            stops = []
        elif isinstance(value, str):
            stops = [value]
        else:
            stops = value
        for index, stop in enumerate(stops):
            if not stop or len(stop) > MAX_STOP_LENGTH:
                raise ValueError(
                    f"stop[{index}] must be a non-empty string of at most "
                    f"{MAX_STOP_LENGTH} characters"
                )
        return stops


class CompletionRequest(OpenAIFields):
    """Body of ``POST /v1/completions``."""

    prompt: str = Field(max_length=1_000_000, description="one prompt string")
    echo: bool | None = Field(None, description="only false is supported")
    best_of: int | None = Field(None, description="only 1 is supported")
    logprobs: int | None = Field(None, description="only null is supported")
    suffix: str | None = Field(None, description="only null is supported")

    @field_validator("prompt", mode="before")
    @classmethod
    def _single_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            return value[0]
        if not isinstance(value, str):
            raise ValueError(
                "must be one string (or a list of one string); "
                "batches and token ids are not supported"
            )
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        return _require_neutral(value, (None, False), "false")

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        return _require_neutral(value, (None, 1), "1")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        return _require_neutral(value, (None,), "null (log probabilities are not supported)")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        return _require_neutral(value, (None,), "null (insertion is not supported)")


class TextPart(BaseModel):
    """One text part of a message whose content is a list of parts."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str = Field(max_length=1_000_000)


class ChatMessage(BaseModel):
    """One chat turn; ``developer`` is read as ``system``, text parts are joined by newlines."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, description="accepted and ignored")

    @model_validator(mode="before")
    @classmethod
    def _drop_null_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                key: item
                for key, item in value.items()
                if not (key in NULLABLE_MESSAGE_KEYS and item is None)
            }
        return value

    def as_template_message(self) -> dict:
        """Return the ``{"role", "content"}`` dict the chat template expects."""
        content = (
            self.content
            if isinstance(self.content, str)
            else "\n".join(part.text for part in self.content)
        )
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(OpenAIFields):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens")
    logprobs: bool | None = Field(None, description="only false is supported")
    top_logprobs: int | None = Field(None, description="only 0 is supported")
    response_format: dict[str, Any] | None = Field(
        None, description='only {"type": "text"} is supported'
    )
    tools: list[dict[str, Any]] | None = Field(None, description="only an empty list is supported")
    tool_choice: str | None = Field(None, description='only "none" is supported')
    parallel_tool_calls: bool | None = Field(None, description="accepted and ignored")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        return _require_neutral(value, (None, False), "false (log probabilities are not supported)")

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value: int | None) -> int | None:
        return _require_neutral(value, (None, 0), "0 (log probabilities are not supported)")

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict | None) -> dict | None:
        return _require_neutral(value, (None, {"type": "text"}), '{"type": "text"}')

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list | None) -> list | None:
        return _require_neutral(value, (None, []), "null or [] (tool calls are not supported)")

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: str | None) -> str | None:
        return _require_neutral(value, (None, "none"), '"none" (tool calls are not supported)')


def _max_tokens(state: ServerState, body: OpenAIFields) -> int | None:
    """Return the requested max tokens; a value over the server's limit raises a 422 naming it."""
    name, value = "max_tokens", body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        if value is not None and value != body.max_completion_tokens:
            raise RequestError(
                422,
                "invalid_request",
                f"max_tokens is {value} and max_completion_tokens is {body.max_completion_tokens}; "
                "allowed: set one of them, or both to the same value",
                "max_completion_tokens",
            )
        name, value = "max_completion_tokens", body.max_completion_tokens
    limit = state.settings.max_new_tokens
    if value is not None and value > limit:
        raise RequestError(
            422,
            "invalid_request",
            f"{name} is {value}; allowed: an integer from 1 to {limit}",
            name,
        )
    return value


def _check_request(state: ServerState, body: OpenAIFields, served_model: str) -> SamplingFields:
    """Check the fields that depend on the server and return the sampling fields to use."""
    if body.model is not None and body.model != served_model:
        raise RequestError(
            404,
            "model_not_found",
            f"model is {body.model!r}; this server serves only {served_model!r}",
            "model",
        )
    if body.preference is not None and body.coefficients is not None:
        raise RequestError(
            422,
            "invalid_request",
            f"preference is {body.preference} and coefficients are set; "
            "allowed: at most one of them",
            "coefficients",
        )
    return SamplingFields(
        max_new_tokens=_max_tokens(state, body),
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=list(body.stop or ()),
        top_k=body.top_k or 0,
        ignore_eos=bool(body.ignore_eos),
    )


def openai_finish_reason(reason: str) -> str:
    """Map a generation's finish reason to OpenAI's: ``length`` stays, everything else is ``stop``.

    Generations ended by a client disconnect or a server shutdown also report ``stop``; the
    original reason is kept in the response's ``peo.finish_reason``.
    """
    return "length" if reason == "length" else "stop"


def _peo_extras(done: dict) -> dict:
    """Return the ``peo`` object of a response from the body :func:`finish_response` built."""
    return {
        "request_id": done["request_id"],
        "preference": done["preference"],
        "coefficients": done["coefficients"],
        "cache": done["cache"],
        "engine": done["engine"],
        "finish_reason": done["finish_reason"],
        "timings": done["timings"],
    }


def _usage(done: dict) -> dict:
    prompt, completion = done["usage"]["prompt_tokens"], done["usage"]["completion_tokens"]
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _data(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


class _ResponseBuilder:
    """Builder of the response bodies and stream chunks of one OpenAI-style request."""

    def __init__(self, chat: bool, request_id: str, model: str):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.model = model

    def envelope(self, object_type: str, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": object_type,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = (
                {"role": "assistant", "content": ""}
                if role
                else {}
                if text is None
                else {"content": text}
            )
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self.envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self.envelope("text_completion", [choice])

    def response(self, done: dict) -> dict:
        reason = openai_finish_reason(done["finish_reason"])
        if self.chat:
            message = {"role": "assistant", "content": done["text"]}
            body = self.envelope(
                "chat.completion",
                [{"index": 0, "message": message, "logprobs": None, "finish_reason": reason}],
            )
        else:
            body = self.envelope(
                "text_completion",
                [{"index": 0, "text": done["text"], "logprobs": None, "finish_reason": reason}],
            )
        return body | {"usage": _usage(done), "peo": _peo_extras(done)}


async def _stream_chunks(
    state: ServerState,
    job: GenerationJob,
    known: dict,
    builder: _ResponseBuilder,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """Yield OpenAI stream chunks of one generation, then ``data: [DONE]``.

    The chunk with ``finish_reason`` carries the ``peo`` object. A failed decode loop yields one
    ``{"error": ...}`` chunk before ``[DONE]``. If the client disconnects, ``finally`` stops the
    decode loop, as on ``/generate``.
    """
    try:
        if builder.chat:
            yield _data(builder.chunk(None, role=True))
        async for item in job.events():
            if isinstance(item, Finished):
                done = finish_response(state, known, item)
                last = builder.chunk(None, openai_finish_reason(done["finish_reason"])) | {
                    "peo": _peo_extras(done)
                }
                yield _data(last)
                if include_usage:
                    yield _data(builder.envelope(last["object"], []) | {"usage": _usage(done)})
                break
            yield _data(builder.chunk(item))
        yield b"data: [DONE]\n\n"
    except GenerationFailed as error:
        yield _data({"error": {"type": "generation_failed", "message": str(error)}})
        yield b"data: [DONE]\n\n"
    finally:
        if job.finish_reason is None and not job.sequence.cancel_event.is_set():
            logger.info("client disconnected; stopping generation of request %s", job.request_id)
        job.cancel("cancelled")


async def _complete(state: ServerState, request: Request, body: OpenAIFields, chat: bool):
    """Run one OpenAI-style request: check it, start the generation, stream or collect output."""
    served_model = state.engine.bundle.manifest.name
    fields = _check_request(state, body, served_model)
    prompt = None if chat else body.prompt
    messages = [message.as_template_message() for message in body.messages] if chat else None
    coefficients = body.coefficients.model_dump() if body.coefficients is not None else None
    job, known = await start_generation(
        state, request, prompt, messages, body.preference, coefficients, fields
    )
    builder = _ResponseBuilder(chat, known["request_id"], served_model)

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _stream_chunks(state, job, known, builder, include_usage),
            media_type="text/event-stream",
            headers=STREAM_HEADERS,
            background=BackgroundTask(job.cancel, "cancelled"),
        )

    finished = await wait_for_result(request, job)
    return builder.response(finish_response(state, known, finished))


def register_openai_routes(app: FastAPI, state: ServerState) -> None:
    """Add the OpenAI-compatible routes to ``app``; they share ``state`` with ``/generate``."""
    started = int(time.time())

    def require_api_key(request: Request) -> None:
        # a route dependency runs before body validation, so a client without the token gets a
        # 401 whatever it sends, never a 422 that describes the request schema
        check_api_key(state.settings, request)

    authorized = [Depends(require_api_key)]

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: CompletionRequest, request: Request):
        """Complete a prompt in OpenAI's ``text_completion`` format; ``stream: true`` for chunks."""
        return await _complete(state, request, body, chat=False)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """Generate a chat reply in the ``chat.completion`` format; ``stream: true`` for chunks."""
        return await _complete(state, request, body, chat=True)

    @app.get("/v1/models", dependencies=authorized)
    async def models():
        """List the one served model: the bundle's name."""
        name = state.engine.bundle.manifest.name
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": started, "owned_by": OWNER}],
        }
