"""Security: bearer auth, protected metrics, the body size limit, no client-named files, CORS.

Each test builds the real app from command-line flags around one real engine over a tiny
random Llama, and talks to it in process.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from tiny_model import write_tiny_base, write_tiny_bundle

from server.app import create_app
from server.engine import Engine
from server.settings import load_settings

API_KEY = "test-key-0123456789"
GENERATE_BODY = {"prompt": "Hello", "max_new_tokens": 2}
ALLOWED_ORIGIN = "http://allowed.test"
# request fields that would let a client point the server at a file or a model of its choosing
PATH_LIKE_FIELDS = {"bundle", "base_model", "cache_dir", "path", "file", "model_path", "checkpoint"}


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    base = write_tiny_base(root / "base")
    bundle = write_tiny_bundle(root / "bundle", base)
    return base, bundle


@pytest.fixture(scope="module")
def tiny_engine(tiny_folders):
    base, bundle = tiny_folders
    flags = ["--base-model", str(base), "--bundle", str(bundle), "--threads", "1"]
    return Engine(load_settings(flags, environ={}))


@pytest.fixture(scope="module")
def client_with_flags(tiny_engine, tiny_folders):
    """Return a function that builds a test client for the app started with extra flags."""
    base, bundle = tiny_folders
    clients = []

    def build(*flags: str, environ: dict[str, str] | None = None) -> TestClient:
        all_flags = ["--base-model", str(base), "--bundle", str(bundle), "--max-new-tokens", "4"]
        settings = load_settings([*all_flags, *flags], environ=environ or {})
        client = TestClient(create_app(settings, tiny_engine))
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def keyed_client(client_with_flags):
    return client_with_flags(environ={"PEO_API_KEY": API_KEY})


@pytest.fixture(scope="module")
def protected_client(client_with_flags):
    return client_with_flags("--protect-metrics", environ={"PEO_API_KEY": API_KEY})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# bearer auth


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong-key"),
        bearer(""),
        {"Authorization": f"Basic {API_KEY}"},
        bearer(API_KEY + "x"),
    ],
    ids=["missing", "wrong", "empty", "basic_scheme", "longer"],
)
def test_auth_bad_token_gets_401(keyed_client, headers):
    response = keyed_client.post("/generate", json=GENERATE_BODY, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["type"] == "unauthorized"
    assert "Authorization" in error["message"]


def test_auth_right_token_generates(keyed_client):
    response = keyed_client.post("/generate", json=GENERATE_BODY, headers=bearer(API_KEY))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def test_auth_scheme_is_case_insensitive(keyed_client):
    response = keyed_client.post(
        "/generate", json=GENERATE_BODY, headers={"Authorization": f"bearer {API_KEY}"}
    )
    assert response.status_code == 200, response.text


def test_auth_checked_before_body_validation(keyed_client):
    response = keyed_client.post("/generate", json={"prompt": 5, "unknown": True})
    assert response.status_code == 401
    assert "prompt" not in response.text


def test_auth_stream_without_token_rejected(keyed_client):
    response = keyed_client.post("/generate", json=GENERATE_BODY | {"stream": True})
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/info"])
def test_auth_default_leaves_observability_open(keyed_client, path):
    assert keyed_client.get(path).status_code == 200


@pytest.mark.parametrize("path", ["/metrics", "/info"])
def test_protect_metrics_requires_token(protected_client, path):
    no_token = protected_client.get(path)
    wrong_token = protected_client.get(path, headers=bearer("wrong-key"))
    right_token = protected_client.get(path, headers=bearer(API_KEY))
    assert no_token.status_code == 401
    assert no_token.json()["error"]["type"] == "unauthorized"
    assert wrong_token.status_code == 401
    assert right_token.status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_protect_metrics_leaves_health_open(protected_client, path):
    assert protected_client.get(path).status_code == 200


def test_no_api_key_generates_without_token(client_with_flags):
    client = client_with_flags()
    response = client.post("/generate", json=GENERATE_BODY)
    assert response.status_code == 200, response.text


# body size limit


def test_body_limit_flag_rejects_larger_body(client_with_flags):
    client = client_with_flags("--max-body-bytes", "2KiB")
    small = client.post("/generate", json={"prompt": "Hello " * 100, "max_new_tokens": 1})
    large = client.post("/generate", json={"prompt": "a" * 3000, "max_new_tokens": 1})
    assert small.status_code == 200, small.text
    assert large.status_code == 413
    assert large.json()["error"]["type"] == "body_too_large"
    assert "2048 bytes" in large.json()["error"]["message"]


# no route loads a file that a client names


def _schema_fields(schema: dict, components: dict, seen: set[str]) -> set[str]:
    """Collect every property name reachable from a JSON schema."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        if name in seen:
            return set()
        seen.add(name)
        return _schema_fields(components[name], components, seen)
    names = set(schema.get("properties", {}))
    children = list(schema.get("properties", {}).values())
    for key in ("anyOf", "oneOf", "allOf"):
        children += schema.get(key, [])
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            children.append(schema[key])
    for child in children:
        names |= _schema_fields(child, components, seen)
    return names


def test_openapi_routes_take_no_paths(keyed_client):
    spec = keyed_client.get("/openapi.json").json()
    components = spec.get("components", {}).get("schemas", {})
    fields = set()
    for operations in spec["paths"].values():
        for operation in operations.values():
            fields |= {parameter["name"] for parameter in operation.get("parameters", [])}
            for content in operation.get("requestBody", {}).get("content", {}).values():
                fields |= _schema_fields(content["schema"], components, set())
    assert "prompt" in fields
    assert not fields & PATH_LIKE_FIELDS


@pytest.mark.parametrize("field", ["bundle", "base_model"])
def test_generate_rejects_file_fields(keyed_client, field):
    body = GENERATE_BODY | {field: "/etc/passwd"}
    response = keyed_client.post("/generate", json=body, headers=bearer(API_KEY))
    assert response.status_code == 422
    assert response.json()["error"]["field"] == field


# CORS


def test_cors_off_by_default(keyed_client):
    simple = keyed_client.get("/healthz", headers={"Origin": ALLOWED_ORIGIN})
    preflight = keyed_client.options(
        "/generate", headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in simple.headers
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_allows_configured_origin(client_with_flags):
    client = client_with_flags("--cors-origins", ALLOWED_ORIGIN)
    simple = client.get("/healthz", headers={"Origin": ALLOWED_ORIGIN})
    preflight = client.options(
        "/generate", headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert simple.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


def test_cors_ignores_other_origin(client_with_flags):
    client = client_with_flags("--cors-origins", ALLOWED_ORIGIN)
    response = client.get("/healthz", headers={"Origin": "http://other.test"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
