"""ASGI middleware: request ids, the body size limit, and per-request metrics."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from server.logs import current_request_id
from server.metrics import Metrics

logger = logging.getLogger(__name__)

_REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._\-]{1,64}")


def is_json_media_type(content_type: bytes) -> bool:
    """Return whether a Content-Type header names JSON: ``application/json`` or ``*/*+json``."""
    media_type = content_type.split(b";", 1)[0].strip().lower()
    return media_type == b"application/json" or media_type.endswith(b"+json")


def error_payload(error_type: str, message: str, field: str | None = None) -> bytes:
    """Return the JSON body of an error response."""
    body = {"error": {"type": error_type, "message": message}}
    if field is not None:
        body["error"]["field"] = field
    return json.dumps(body).encode()


class RequestContextMiddleware:
    """Assign a request id, enforce the body size limit, and record request metrics.

    A client-supplied ``X-Request-ID`` is kept when it is 1–64 characters of ``[A-Za-z0-9._-]``;
    otherwise a new id is generated. Bodies are read up to ``max_body_bytes`` before the route
    runs, so an oversized body gets a 413 whether or not it declares ``Content-Length``. A
    non-empty body whose declared ``Content-Type`` is not JSON gets a 415; a body without the
    header is parsed as JSON.
    Metrics use the matched route's path as the label, or ``other`` for unknown paths, so a
    client cannot create unbounded label values.
    """

    def __init__(self, app, metrics: Metrics, max_body_bytes: int, known_routes: set[str]):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.known_routes = known_routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        supplied = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = supplied if _REQUEST_ID_PATTERN.fullmatch(supplied) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        current_request_id.set(request_id)
        scope["state"]["arrived"] = started
        route = scope["path"] if scope["path"] in self.known_routes else "other"
        status_holder = {"status": 500}

        async def send_with_context(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (b"x-request-id", request_id.encode())
                ]
            await send(message)

        async def reject(status: int, error_type: str, text: str, field: str) -> None:
            body = error_payload(error_type, text, field)
            await send_with_context(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                declared = headers.get(b"content-length")
                if declared is not None and (
                    not declared.isdigit() or int(declared) > self.max_body_bytes
                ):
                    await reject(
                        413,
                        "body_too_large",
                        f"request body exceeds the limit of {self.max_body_bytes} bytes",
                        "body",
                    )
                    return
                body = await self._read_body(receive)
                if body is None:
                    await reject(
                        413,
                        "body_too_large",
                        f"request body exceeds the limit of {self.max_body_bytes} bytes",
                        "body",
                    )
                    return
                content_type = headers.get(b"content-type")
                if body and content_type is not None and not is_json_media_type(content_type):
                    declared_type = content_type.decode("latin-1")[:80]
                    logger.info(
                        "request %s: Content-Type %r is not JSON", request_id, declared_type
                    )
                    await reject(
                        415,
                        "unsupported_media_type",
                        f"Content-Type header is {declared_type!r}; allowed: application/json",
                        "Content-Type",
                    )
                    return
                if body and content_type is None:
                    # FastAPI parses a body as JSON only when Content-Type declares JSON, so a
                    # body sent without the header is marked as JSON here instead of dropped
                    scope["headers"] = list(scope["headers"]) + [
                        (b"content-type", b"application/json")
                    ]
                receive = self._replay(body, receive)
            await self.app(scope, receive, send_with_context)
        finally:
            status = str(status_holder["status"])
            self.metrics.requests.labels(route=route, status=status).inc()
            self.metrics.request_duration.labels(route=route).observe(time.perf_counter() - started)

    async def _read_body(self, receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive):
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay
