"""The FastAPI application: routes, error handling and the request life cycle."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections import Counter
from contextlib import asynccontextmanager

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.admission import Admission, OverloadedError
from server.batching import BatchScheduler, LoopClosedError
from server.cache import CacheFullError
from server.engine import Engine, RequestError
from server.generation import Finished, SamplingParams
from server.metrics import Metrics
from server.middleware import RequestContextMiddleware
from server.runner import GenerationFailed, GenerationJob
from server.schemas import ErrorResponse, GenerateRequest, GenerateResponse, SamplingFields
from server.settings import Settings

logger = logging.getLogger(__name__)

# how long auto mode keeps choosing the unfused path after it last saw mixed preferences
AUTO_MIXED_HOLD_SECONDS = 2.0

JSON_TYPE_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
}
# error statuses of /generate, so that the OpenAPI schema describes the real error body
ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "body is not valid UTF-8 JSON",
        401: "missing or invalid bearer token",
        413: "body or prompt too large",
        415: "body is not JSON",
        422: "invalid field",
        500: "fusion or generation failed",
        503: "overloaded or shutting down; see Retry-After",
    }.items()
}


def _error(
    status: int, error_type: str, message: str, field: str | None = None, headers=None
) -> JSONResponse:
    body = {"error": {"type": error_type, "message": message}}
    if field is not None:
        body["error"]["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)


def _describe_validation_error(item: dict) -> tuple[str, str]:
    """Return ``(field, message)`` for one pydantic error, naming the field, value and rule."""
    location = [str(part) for part in item.get("loc", ()) if part != "body"]
    field = ".".join(location) or "body"
    message = item.get("msg", "invalid value").removeprefix("Value error, ")
    if item.get("type") == "extra_forbidden":
        return field, f"{field} is not a known field; remove it"
    if item.get("type") == "missing":
        return field, f"{field} is required"
    if not location and item.get("type") in ("model_attributes_type", "model_type", "dict_type"):
        got = JSON_TYPE_NAMES.get(type(item.get("input")), "null")
        return field, f"request body must be a JSON object; got a JSON {got}"
    if location and "input" in item:
        shown = repr(item["input"])
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return field, f"{field}: {message}; got {shown}"
    return field, message


class ServerState:
    """State shared by the routes: settings, engine, metrics, admission and running jobs."""

    def __init__(self, settings: Settings, engine: Engine, metrics: Metrics):
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.admission: Admission | None = None
        self.scheduler = BatchScheduler(
            settings.max_batch_size,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
            on_step=metrics.batch_size.observe,
            on_move=metrics.rows_moved.inc,
        )
        self.jobs: set[GenerationJob] = set()
        # coefficient keys of the generations admitted and not yet finished
        self.active_keys: Counter = Counter()
        self.mixed_until = 0.0  # monotonic time until which auto mode stays unfused
        metrics.task_vector_bytes.set(engine.bundle.nbytes())
        engine.on_evict = lambda key: metrics.cache_evictions.inc()

    def begin_shutdown(self) -> None:
        """Stop admitting requests, then end the generations still running after the grace period.

        Must run on the event loop. Generations ended this way finish with reason ``shutdown``,
        so their streams close with a ``done`` event that gives the reason.
        """
        if self.admission is not None:
            self.admission.draining = True
        running = len(self.jobs)
        logger.info(
            "shutdown requested: %d generations running, %.0f s grace period",
            running,
            self.settings.shutdown_grace_seconds,
        )

        def end_remaining() -> None:
            for job in list(self.jobs):
                job.cancel("shutdown")
            if self.jobs:
                logger.info("ended %d generations at shutdown", len(self.jobs))

        asyncio.get_running_loop().call_later(self.settings.shutdown_grace_seconds, end_remaining)

    def choose_path(self, key: tuple[float, float]) -> str:
        """Return ``"fused"`` or ``"unfused"`` for a request with coefficient pair ``key``.

        In ``auto`` mode a request takes the fused path while every generation in flight
        requests the same pair (a fused model decodes fastest), and the unfused path as soon as
        preferences mix or an unfused batch is running, so that one batch serves them all
        instead of one batch per pair. Mixed load holds the unfused path for
        ``AUTO_MIXED_HOLD_SECONDS`` after it was last seen, so that clients sending their next
        requests between two waves do not each fuse a model for a moment alone.
        """
        mode = self.settings.engine_mode
        if mode != "auto":
            return mode
        if self.engine.mixed_model is None:
            return "fused"
        now = time.monotonic()
        mixed = any(job.engine == "unfused" for job in self.jobs) or any(
            other != key for other, count in self.active_keys.items() if count
        )
        if mixed:
            self.mixed_until = now + AUTO_MIXED_HOLD_SECONDS
        return "unfused" if mixed or now < self.mixed_until else "fused"

    def forget_key(self, key: tuple[float, float], unfused: bool = False) -> None:
        """Count one generation with coefficient pair ``key`` as no longer in flight.

        Mixed load lasted until now when generations with other pairs are still running, or when
        this generation ran unfused (a running unfused batch counts as mixed load). Either way
        the auto-mode hold on the unfused path restarts from now.
        """
        self.active_keys[key] -= 1
        if self.active_keys[key] <= 0:
            del self.active_keys[key]
        if unfused or any(other != key for other in self.active_keys):
            self.mixed_until = time.monotonic() + AUTO_MIXED_HOLD_SECONDS

    def refresh_cache_gauges(self) -> None:
        self.metrics.cache_entries.set(len(self.engine.cache))
        self.metrics.cache_bytes.set(self.engine.cache.nbytes())


def check_api_key(settings: Settings, request: Request) -> None:
    """Raise a 401 :class:`RequestError` unless the request carries the configured bearer token."""
    if not settings.api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.encode(), settings.api_key.encode()
    ):
        raise RequestError(
            401, "unauthorized", "missing or invalid bearer token in the Authorization header"
        )


def require_api_key(request: Request) -> None:
    """Check the bearer token as a route dependency, which FastAPI runs before body validation.

    So a client without the token gets a 401 whatever it sends, and never a 422 that describes
    the request schema.
    """
    check_api_key(request.app.state.server.settings, request)


def sampling_params(
    state: ServerState, fields: SamplingFields, prompt_tokens: int
) -> SamplingParams:
    """Check request limits that depend on settings and return the sampling parameters.

    ``max_new_tokens`` is cut to the room left in the context after the prompt.
    """
    settings = state.settings
    requested = fields.max_new_tokens
    if requested is None:
        requested = min(settings.default_max_new_tokens, settings.max_new_tokens)
    if requested > settings.max_new_tokens:
        raise RequestError(
            422,
            "invalid_request",
            f"max_new_tokens is {requested}; allowed: an integer from 1 to {settings.max_new_tokens}",
            "max_new_tokens",
        )
    if len(fields.stop) > settings.max_stop_sequences:
        raise RequestError(
            422,
            "invalid_request",
            f"stop has {len(fields.stop)} sequences; allowed: at most {settings.max_stop_sequences}",
            "stop",
        )
    room = state.engine.max_model_len - prompt_tokens
    return SamplingParams(
        max_new_tokens=min(requested, room),
        temperature=fields.temperature,
        top_p=fields.top_p,
        top_k=fields.top_k,
        seed=fields.seed,
        stop=tuple(fields.stop),
        ignore_eos=fields.ignore_eos,
    )


async def start_generation(
    state: ServerState,
    request: Request,
    prompt: str | None,
    messages: list[dict] | None,
    preference: float | None,
    coefficients: dict | None,
    fields: SamplingFields,
) -> tuple[GenerationJob, dict]:
    """Validate, admit, fuse (or hit the cache) and start one generation.

    Returns:
        The running job and the response fields known before decoding starts.

    Raises:
        RequestError: invalid input (422, 413), overload (503) or a failed fusion (500).
    """
    arrived = request.state.arrived
    request_id = request.state.request_id
    engine = state.engine

    # validate
    preference, key = engine.resolve_coefficients(preference, coefficients)
    # on a worker thread: a prompt near the body limit takes about a second to tokenize, and
    # the tokenizer releases the GIL, so other requests and streams go on meanwhile
    prompt_ids = await anyio.to_thread.run_sync(engine.encode_prompt, prompt, messages)
    params = sampling_params(state, fields, len(prompt_ids))

    # admit
    try:
        state.metrics.queued.inc()
        await state.admission.acquire()
    except OverloadedError as error:
        raise RequestError(
            503, "overloaded", f"server is at capacity; retry after {error.retry_after} s"
        ) from error
    finally:
        state.metrics.queued.dec()
    admitted = time.perf_counter()

    # Pick the path. The request counts as active from here on, so that requests arriving
    # during its fusion already see its pair.
    path = state.choose_path(key)
    state.active_keys[key] += 1
    state.metrics.in_flight.inc()
    lease = None
    try:
        if path == "fused":
            # fuse or hit the cache, shielded so that a disconnect cannot drop a pinned lease
            try:
                with anyio.CancelScope(shield=True):
                    lease = await anyio.to_thread.run_sync(engine.acquire, key)
            except CacheFullError as error:
                raise RequestError(503, "overloaded", str(error)) from error
            except Exception as error:
                logger.exception("fusion failed for request %s, coefficients %s", request_id, key)
                raise RequestError(
                    500, "fusion_failed", f"fusion of coefficients {key} failed: {error}"
                ) from error
            route = engine.fused_route(key, lease.value)
            cache_state = "hit" if lease.hit else "miss"
            if lease.hit:
                state.metrics.cache_hits.inc()
            else:
                state.metrics.cache_misses.inc()
                state.metrics.fusion_duration.observe(lease.fusion_seconds)
            state.refresh_cache_gauges()
        else:
            route = engine.unfused_route(key)
            cache_state = "bypass"
        fusion_seconds = lease.fusion_seconds if lease is not None else 0.0

        def on_done() -> None:
            state.metrics.generations_finished.labels(reason=job.finish_reason or "error").inc()
            state.metrics.generated_tokens.inc(job.completion_tokens)
            state.admission.release()
            state.metrics.in_flight.dec()
            state.forget_key(key, unfused=job.engine == "unfused")
            state.jobs.discard(job)

        # in auto mode a fused request may move to the unfused batch once preferences mix
        unfused_route = None
        if path == "fused" and state.settings.engine_mode == "auto" and engine.mixed_model:
            unfused_route = engine.unfused_route(key)
        job = GenerationJob(
            engine,
            state.scheduler,
            route,
            lease,
            prompt_ids,
            params,
            on_done,
            request_id,
            unfused_route=unfused_route,
        )
    except BaseException as error:
        # the request never reached the decode loop: undo its bookkeeping
        if lease is not None:
            lease.release()
        state.admission.release()
        state.metrics.in_flight.dec()
        state.forget_key(key)
        if isinstance(error, LoopClosedError):
            raise RequestError(503, "overloaded", "server is shutting down") from error
        raise
    state.metrics.engine_requests.labels(engine=path).inc()
    state.metrics.prompt_tokens.inc(len(prompt_ids))
    state.jobs.add(job)
    known = {
        "request_id": request_id,
        "preference": preference,
        "coefficients": {"helpfulness": key[0], "harmlessness": key[1]},
        "cache": cache_state,
        "engine": path,
        "prompt_tokens": len(prompt_ids),
        "queue_seconds": admitted - arrived,
        "fusion_seconds": fusion_seconds,
        "arrived": arrived,
    }
    return job, known


def finish_response(state: ServerState, known: dict, finished: Finished) -> dict:
    """Build the non-streaming response body and record the generation's metrics."""
    now = time.perf_counter()
    ttft = None
    if finished.time_to_first_token is not None:
        ttft = known["queue_seconds"] + known["fusion_seconds"] + finished.time_to_first_token
        state.metrics.time_to_first_token.observe(ttft)
    response = GenerateResponse(
        request_id=known["request_id"],
        text=finished.text,
        finish_reason=finished.finish_reason,
        preference=known["preference"],
        coefficients=known["coefficients"],
        usage={
            "prompt_tokens": known["prompt_tokens"],
            "completion_tokens": finished.completion_tokens,
        },
        timings={
            "queue": round(known["queue_seconds"], 6),
            "fusion": round(known["fusion_seconds"], 6),
            "time_to_first_token": None if ttft is None else round(ttft, 6),
            "total": round(now - known["arrived"], 6),
        },
        cache=known["cache"],
        engine=finished.engine or known["engine"],
    )
    return response.model_dump()


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def stream_events(state: ServerState, job: GenerationJob, known: dict):
    """Yield the Server-Sent Events of one generation: ``token`` events, then ``done`` or ``error``.

    If the client disconnects, the response task is cancelled and ``finally`` stops the decode
    loop. The worker thread then frees the slot and the cache pin.
    """
    index = 0
    try:
        async for item in job.events():
            if isinstance(item, Finished):
                yield _sse("done", finish_response(state, known, item))
                return
            yield _sse("token", {"index": index, "text": item})
            index += 1
    except GenerationFailed as error:
        yield _sse("error", {"error": {"type": "generation_failed", "message": str(error)}})
    finally:
        if job.finish_reason is None and not job.sequence.cancel_event.is_set():
            logger.info("client disconnected; stopping generation of request %s", job.request_id)
        job.cancel("cancelled")


DISCONNECT_POLL_SECONDS = 0.25


async def wait_for_result(request: Request, job: GenerationJob) -> Finished:
    """Wait for a non-streamed generation and stop it early if the client disconnects.

    Raises:
        RequestError: the decode loop failed (500).
    """

    async def stop_on_disconnect() -> None:
        while not job.finished.is_set():
            if await request.is_disconnected():
                logger.info(
                    "client disconnected; stopping generation of request %s", job.request_id
                )
                job.cancel("cancelled")
                return
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)

    watcher = asyncio.create_task(stop_on_disconnect())
    try:
        async for item in job.events():
            if isinstance(item, Finished):
                return item
        raise RequestError(500, "generation_failed", "generation ended without a result")
    except GenerationFailed as error:
        raise RequestError(500, "generation_failed", str(error)) from error
    finally:
        watcher.cancel()
        job.cancel("cancelled")


def create_app(settings: Settings, engine: Engine) -> FastAPI:
    """Build the application around a loaded engine."""
    metrics = Metrics()
    state = ServerState(settings, engine, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.admission = Admission(settings.max_concurrency, settings.max_queue)
        logger.info("serving on %s:%s", settings.host, settings.port)
        yield
        state.admission.draining = True
        await anyio.to_thread.run_sync(state.scheduler.close, 5.0)
        logger.info("server stopped")

    app = FastAPI(
        title="PEO preference-steerable model server",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.server = state

    # errors

    @app.exception_handler(RequestError)
    async def handle_request_error(request: Request, error: RequestError):
        headers = {"Retry-After": "1"} if error.status in (429, 503) else None
        if error.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return _error(error.status, error.error_type, error.message, error.field, headers)

    @app.exception_handler(RequestValidationError)
    async def handle_validation_error(request: Request, error: RequestValidationError):
        items = error.errors()
        broken = [item for item in items if item.get("type") == "json_invalid"]
        if broken:
            # FastAPI puts the parser's message in the context and the character offset last
            # in the location
            detail = broken[0].get("ctx", {}).get("error")
            offsets = [part for part in broken[0].get("loc", ()) if isinstance(part, int)]
            message = "request body is not valid UTF-8 JSON"
            if detail:
                message += f": {detail}"
            if offsets:
                message += f" at character {offsets[-1]}"
            return _error(400, "invalid_json", message, "body")
        field, message = _describe_validation_error(items[0])
        if len(items) > 1:
            message += f" (and {len(items) - 1} more problem{'s' if len(items) > 2 else ''})"
        return _error(422, "invalid_request", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def handle_http_error(request: Request, error: StarletteHTTPException):
        if error.status_code == 400:
            # FastAPI raises a bare 400 when the body cannot be decoded before validation runs
            return _error(
                400,
                "invalid_json",
                f"request body is not valid UTF-8 JSON: {error.detail}",
                "body",
            )
        error_type = {404: "not_found", 405: "method_not_allowed"}.get(
            error.status_code, "http_error"
        )
        return _error(
            error.status_code,
            error_type,
            str(error.detail),
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(Exception)
    async def handle_unexpected(request: Request, error: Exception):
        logger.exception("unhandled error in request %s", getattr(request.state, "request_id", "?"))
        return _error(500, "internal_error", "internal server error; see the server log")

    # routes

    @app.post(
        "/generate",
        response_model=GenerateResponse,
        responses=ERROR_RESPONSES,
        dependencies=[Depends(require_api_key)],
    )
    async def generate(body: GenerateRequest, request: Request):
        """Generate from a prompt or chat messages with weights fused for a preference.

        With ``stream: true`` the response is Server-Sent Events: ``token`` events, then one
        ``done`` event with the same fields as the non-streaming response, or one ``error``.
        """
        messages = [m.model_dump() for m in body.messages] if body.messages is not None else None
        coefficients = body.coefficients.model_dump() if body.coefficients is not None else None
        job, known = await start_generation(
            state, request, body.prompt, messages, body.preference, coefficients, body
        )

        if body.stream:
            return StreamingResponse(
                stream_events(state, job, known),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                # runs however the response ends, even when the client left before the first byte
                background=BackgroundTask(job.cancel, "cancelled"),
            )

        finished = await wait_for_result(request, job)
        return finish_response(state, known, finished)

    # HEAD is served for health checkers that use it, but kept out of the OpenAPI schema, where
    # a second method on the same function would repeat its operation id
    @app.head("/healthz", include_in_schema=False)
    @app.get("/healthz")
    async def healthz():
        """Report that the process is alive."""
        return {"status": "ok"}

    @app.head("/readyz", include_in_schema=False)
    @app.get("/readyz")
    async def readyz():
        """Report whether the model and vectors are loaded and new requests are accepted."""
        if state.admission is None or state.admission.draining:
            return _error(
                503,
                "not_ready",
                "server is starting or shutting down",
                headers={"Retry-After": "1"},
            )
        return {
            "status": "ready",
            "in_flight": state.admission.running,
            "queued": state.admission.waiting,
        }

    @app.get("/info")
    async def info(request: Request):
        """Describe the base model, task vectors, bounds, preference map and cache state."""
        if settings.protect_metrics:
            check_api_key(settings, request)
        return engine.info()

    @app.get("/metrics")
    async def prometheus_metrics(request: Request):
        """Expose Prometheus metrics in the text format."""
        if settings.protect_metrics:
            check_api_key(settings, request)
        state.refresh_cache_gauges()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # imported here because both modules import from this one
    from server.openai_api import register_openai_routes
    from server.playground import register_playground_routes

    register_openai_routes(app, state)
    register_playground_routes(app)

    known_routes = {route.path for route in app.routes}
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        known_routes=known_routes,
    )
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        origins = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    return app
