"""Fuzz every route of a real server from its own OpenAPI schema with schemathesis.

Checks: no response is a 5xx, and every error response is a JSON object whose ``error`` has a
string ``type`` and a non-empty string ``message``. Each operation gets at most
``MAX_EXAMPLES_PER_MODE`` schema-valid and as many schema-invalid cases, and generation is
capped at 8 tokens, so the run stays short.
"""

from __future__ import annotations

import pytest
import schemathesis
from conftest import ServerProcess
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

# schema-valid and schema-invalid cases each, so an operation with inputs gets 30 in all
MAX_EXAMPLES_PER_MODE = 15


@pytest.fixture(scope="module")
def fuzz_server():
    process = ServerProcess(
        "--max-new-tokens", "8", "--default-max-new-tokens", "4", "--cache-max-entries", "2",
    )  # fmt: skip
    yield process
    process.stop()


@pytest.fixture(scope="module")
def api_operations(fuzz_server):
    """Load every operation of the server's own OpenAPI schema."""
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def error_body_is_json(ctx, response, case) -> None:
    """Check that a 4xx or 5xx response carries the server's JSON error body."""
    if response.status_code < 400:
        return
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), (response.status_code, content_type)
    body = response.json()
    assert isinstance(body, dict), body
    error = body.get("error")
    assert isinstance(error, dict), body
    assert isinstance(error.get("type"), str), body
    assert isinstance(error.get("message"), str), body
    assert error["message"], body


def test_fuzz_covers_every_route(api_operations):
    paths = {operation.path for operation in api_operations}
    assert {"/generate", "/healthz", "/readyz", "/info", "/metrics"} <= paths


# Cases come from each operation's Hypothesis strategy: the schemathesis.pytest.from_fixture
# loader, which would take the schema from a fixture, fails under pytest 9.2: it reads
# Function._nodeid, which pytest 9.2 no longer has.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_operations_answer_cleanly(api_operations, mode):
    for operation in api_operations:
        inputs = [operation.body, operation.query, operation.path_parameters, operation.headers]
        if mode == GenerationMode.NEGATIVE and not any(len(group) for group in inputs):
            # nothing to make invalid: the positive cases already call this operation
            continue

        @settings(
            max_examples=MAX_EXAMPLES_PER_MODE,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def call_and_check(case) -> None:
            case.call_and_validate(checks=[not_a_server_error, error_body_is_json], timeout=60)

        call_and_check()
