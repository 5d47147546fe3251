"""End-to-end tests against a real server process on the real base model and committed bundle."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest
from conftest import ServerProcess

PROMPT = "How can I get my neighbour's dog to stop barking at night?"


def parse_sse(lines) -> list[tuple[str, dict]]:
    """Return ``(event, data)`` pairs from Server-Sent Events lines."""
    events, event = [], None
    for line in lines:
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((event, json.loads(line.removeprefix("data: "))))
    return events


def metric_value(text: str, name: str, labels: str = "") -> float:
    """Return one sample's value from Prometheus text, or 0 when the series does not exist."""
    pattern = (
        re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(?:\{\})?") + r" (\S+)"
    )
    match = re.search("^" + pattern + "$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_health_routes_report_ok(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"


def test_info_describes_bundle_and_map(client):
    info = client.get("/info").json()
    assert set(info["bundle"]["vectors"]) >= {"helpfulness", "harmlessness"}
    assert info["coefficient_bounds"]["min"] < 0 < 1 < info["coefficient_bounds"]["max"]
    assert info["preference_map"]["points"][0]["preference"] == 0.0
    assert info["base_model"]["source_sha256"]


def test_info_of_default_bundle_has_front_and_map(client):
    info = client.get("/info").json()
    assert set(info["bundle"]["vectors"]) == {"helpfulness", "harmlessness", "generalist"}
    assert info["bundle"]["offset"] == {"helpfulness": 0.5, "harmlessness": 0.5, "generalist": 1.0}
    assert info["preference_map"]["source"] == "pareto"
    pareto = info["pareto"]
    assert set(pareto["hypervolume"]) == {
        "peo",
        "soup",
        "mixed_dpo",
        "base",
        "help_only",
        "harm_only",
    }
    assert len(pareto["fronts"]["peo"]) >= 2
    assert "points" not in pareto


def test_generate_preferences_change_text(client, slider_ends):
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_new_tokens": 48,
    }
    helpful = client.post("/generate", json=body | {"preference": 1.0})
    harmless = client.post("/generate", json=body | {"preference": 0.0})
    assert helpful.status_code == 200, helpful.text
    assert harmless.status_code == 200, harmless.text
    helpful, harmless = helpful.json(), harmless.json()
    assert helpful["text"] != harmless["text"]
    assert helpful["coefficients"] == slider_ends[1.0]
    assert harmless["coefficients"] == slider_ends[0.0]
    # the map steers: the helpful end weighs τ_help more and τ_harm less
    assert helpful["coefficients"]["helpfulness"] > harmless["coefficients"]["helpfulness"]
    assert helpful["coefficients"]["harmlessness"] < harmless["coefficients"]["harmlessness"]
    assert helpful["cache"] in ("hit", "miss")
    assert helpful["usage"]["completion_tokens"] > 0


def test_generate_second_request_hits_cache(client):
    body = {"prompt": "The capital of France is", "temperature": 0, "max_new_tokens": 4}
    body["coefficients"] = {"helpfulness": 0.37, "harmlessness": 0.21}
    first = client.post("/generate", json=body).json()
    second = client.post("/generate", json=body).json()
    assert first["cache"] == "miss"
    assert second["cache"] == "hit"
    assert first["text"] == second["text"]
    assert second["timings"]["fusion"] < first["timings"]["fusion"]


def test_generate_rounds_coefficients_to_step(client):
    body = {
        "prompt": "Hello",
        "max_new_tokens": 1,
        "coefficients": {"helpfulness": 0.123456, "harmlessness": -0.5},
    }
    response = client.post("/generate", json=body).json()
    assert response["coefficients"] == {"helpfulness": 0.12, "harmlessness": -0.5}


def test_stream_yields_tokens_then_one_done(client):
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_new_tokens": 16,
    }
    body |= {"stream": True, "preference": 0.5}
    with client.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(response.iter_lines())
    kinds = [kind for kind, _ in events]
    assert kinds.count("done") == 1
    assert kinds[-1] == "done"
    assert kinds[0] == "token"
    assert set(kinds[:-1]) == {"token"}
    done = events[-1][1]
    streamed = "".join(data["text"] for kind, data in events if kind == "token")
    assert streamed == done["text"]
    assert [data["index"] for kind, data in events if kind == "token"] == list(
        range(len(events) - 1)
    )


def test_stream_matches_non_streaming_text(client):
    body = {"prompt": PROMPT, "temperature": 0, "max_new_tokens": 12, "preference": 0.8}
    plain = client.post("/generate", json=body).json()
    with client.stream("POST", "/generate", json=body | {"stream": True}) as response:
        events = parse_sse(response.iter_lines())
    assert events[-1][1]["text"] == plain["text"]


def test_disconnect_stops_generation(server, client):
    before = client.get("/metrics").text
    cancelled_before = metric_value(before, "peo_generations_finished_total", 'reason="cancelled"')
    tokens_before = metric_value(before, "peo_generated_tokens_total")

    body = {"prompt": PROMPT, "seed": 1, "max_new_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as streaming:
        with streaming.stream("POST", "/generate", json=body) as response:
            received = 0
            for line in response.iter_lines():
                if line.startswith("event: token"):
                    received += 1
                if received >= 3:
                    break

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = client.get("/metrics").text
        if (
            metric_value(metrics, "peo_generations_finished_total", 'reason="cancelled"')
            > cancelled_before
        ):
            break
        time.sleep(0.2)
    assert (
        metric_value(metrics, "peo_generations_finished_total", 'reason="cancelled"')
        == cancelled_before + 1
    )
    assert metric_value(metrics, "peo_requests_in_flight") == 0
    assert metric_value(metrics, "peo_generated_tokens_total") - tokens_before < 1000
    assert "client disconnected" in server.log_text()

    after = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2})
    assert after.status_code == 200


def test_metrics_expose_documented_names(client):
    client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 1})
    text = client.get("/metrics").text
    for name in [
        "peo_requests_total",
        "peo_request_duration_seconds_bucket",
        "peo_time_to_first_token_seconds_bucket",
        "peo_generated_tokens_total",
        "peo_fusion_duration_seconds_bucket",
        "peo_fused_cache_hits_total",
        "peo_fused_cache_misses_total",
        "peo_fused_cache_evictions_total",
        "peo_fused_cache_entries",
        "peo_fused_cache_bytes",
        "peo_task_vector_bytes",
        "peo_requests_in_flight",
    ]:
        assert re.search("^" + name, text, re.MULTILINE), name
    assert metric_value(text, "peo_task_vector_bytes") > 0
    assert 'route="/generate",status="200"' in text


INVALID_BODIES = [
    (
        "nan_coefficient",
        b'{"prompt": "x", "coefficients": {"helpfulness": NaN, "harmlessness": 0}}',
        422,
        "coefficients.helpfulness",
    ),
    (
        "inf_coefficient",
        b'{"prompt": "x", "coefficients": {"helpfulness": 0, "harmlessness": Infinity}}',
        422,
        "coefficients.harmlessness",
    ),
    (
        "coefficient_over_bound",
        {"prompt": "x", "coefficients": {"helpfulness": 9.0, "harmlessness": 0}},
        422,
        "coefficients.helpfulness",
    ),
    (
        "coefficient_under_bound",
        {"prompt": "x", "coefficients": {"helpfulness": 0, "harmlessness": -7}},
        422,
        "coefficients.harmlessness",
    ),
    ("preference_above_one", {"prompt": "x", "preference": 1.5}, 422, "preference"),
    ("preference_negative", {"prompt": "x", "preference": -0.1}, 422, "preference"),
    (
        "preference_and_coefficients",
        {"prompt": "x", "preference": 0.5, "coefficients": {"helpfulness": 0, "harmlessness": 0}},
        422,
        "body",
    ),
    (
        "prompt_and_messages",
        {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
        422,
        "body",
    ),
    ("neither_prompt_nor_messages", {"preference": 0.5}, 422, "body"),
    ("negative_temperature", {"prompt": "x", "temperature": -1}, 422, "temperature"),
    ("top_p_zero", {"prompt": "x", "top_p": 0}, 422, "top_p"),
    ("max_new_tokens_huge", {"prompt": "x", "max_new_tokens": 10**9}, 422, "max_new_tokens"),
    ("max_new_tokens_zero", {"prompt": "x", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ("unknown_field", {"prompt": "x", "temprature": 0.5}, 422, "temprature"),
    ("wrong_type", {"prompt": "x", "temperature": "hot"}, 422, "temperature"),
    ("unknown_role", {"messages": [{"role": "wizard", "content": "y"}]}, 422, "messages.0.role"),
    ("empty_messages", {"messages": []}, 422, "messages"),
    ("too_many_stops", {"prompt": "x", "stop": ["a"] * 10_000}, 422, "stop"),
    ("empty_stop", {"prompt": "x", "stop": [""]}, 422, "stop"),
    ("overlong_stop", {"prompt": "x", "stop": ["a" * 257]}, 422, "stop"),
    (
        "huge_coefficient",
        {"prompt": "x", "coefficients": {"helpfulness": 1e308, "harmlessness": 0}},
        422,
        "coefficients.helpfulness",
    ),
    (
        "overflowing_coefficient",
        b'{"prompt": "x", "coefficients": {"helpfulness": 0, "harmlessness": -1e400}}',
        422,
        "coefficients.harmlessness",
    ),
    (
        "empty_message_content",
        {"messages": [{"role": "user", "content": ""}]},
        422,
        "messages.0.content",
    ),
    ("message_without_role", {"messages": [{"content": "y"}]}, 422, "messages.0.role"),
    (
        "message_unknown_field",
        {"messages": [{"role": "user", "content": "y", "name": "z"}]},
        422,
        "messages.0.name",
    ),
    ("messages_wrong_type", {"messages": "hello"}, 422, "messages"),
    ("prompt_wrong_type", {"prompt": 42}, 422, "prompt"),
    ("stream_wrong_type", {"prompt": "x", "stream": "yes"}, 422, "stream"),
    ("max_new_tokens_float", {"prompt": "x", "max_new_tokens": 2.5}, 422, "max_new_tokens"),
    ("json_array_body", b'[{"prompt": "x"}]', 422, "body"),
    ("json_string_body", b'"x"', 422, "body"),
    ("bundle_field", {"prompt": "x", "bundle": "/etc"}, 422, "bundle"),
    ("base_model_field", {"prompt": "x", "base_model": "/tmp/model"}, 422, "base_model"),
]


@pytest.mark.parametrize(
    "case,body,status,field", INVALID_BODIES, ids=[case[0] for case in INVALID_BODIES]
)
def test_generate_rejects_invalid_input(client, case, body, status, field):
    if isinstance(body, bytes):
        response = client.post(
            "/generate", content=body, headers={"content-type": "application/json"}
        )
    else:
        response = client.post("/generate", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"]
    assert error["message"]
    assert error.get("field") == field, error
    if field != "body":
        assert field.split(".")[0] in error["message"]
    assert client.get("/readyz").status_code == 200


def test_generate_rejects_prompt_past_context(client):
    info = client.get("/info").json()
    prompt = "hello " * (info["max_model_len"] + 10)
    response = client.post("/generate", json={"prompt": prompt, "max_new_tokens": 1})
    assert response.status_code == 413
    assert "tokens" in response.json()["error"]["message"]
    assert client.get("/readyz").status_code == 200


def test_generate_rejects_invalid_utf8(client):
    response = client.post(
        "/generate", content=b'{"prompt": "\xff\xfe"}', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_json"
    assert response.json()["error"]["field"] == "body"
    assert client.get("/readyz").status_code == 200


def test_generate_rejects_truncated_json_with_position(client):
    response = client.post(
        "/generate", content=b'{"prompt": "hi", ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_json"
    assert error["field"] == "body"
    assert error["message"] == (
        "request body is not valid UTF-8 JSON: "
        "Expecting property name enclosed in double quotes at character 17"
    )
    assert client.get("/readyz").status_code == 200


def test_generate_rejects_oversized_body(client):
    body = b'{"prompt": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    response = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "body_too_large"
    assert response.json()["error"]["field"] == "body"
    assert client.get("/healthz").status_code == 200


def test_unknown_route_is_json_404(client):
    response = client.get("/no-such-route")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_generate_rejects_non_json_content_type(client, content_type):
    response = client.post(
        "/generate", content=b'{"prompt": "x"}', headers={"content-type": content_type}
    )
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert error["type"] == "unsupported_media_type"
    assert error["field"] == "Content-Type"
    assert "Content-Type" in error["message"]
    assert content_type in error["message"]
    assert client.get("/readyz").status_code == 200


def test_generate_rejects_json_array_clearly(client):
    response = client.post(
        "/generate", content=b"[1, 2]", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert (
        response.json()["error"]["message"]
        == "request body must be a JSON object; got a JSON array"
    )


def test_generate_rejects_chunked_10mb_body(client):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 1024 * 1024
        yield b'"}'

    response = client.post(
        "/generate", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "body_too_large"
    assert client.get("/readyz").status_code == 200


def test_generate_rejects_declared_10mb_body(client):
    body = b'{"prompt": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    response = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "limit" in response.json()["error"]["message"]
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    "field,value", [("temperature", 1e-300), ("top_p", 1e-300), ("temperature", 5.0)]
)
def test_generate_extreme_sampling_values_succeed(client, field, value):
    body = {"prompt": "Hello", "max_new_tokens": 2, "seed": 3, field: value}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def test_huge_prompt_leaves_health_responsive(server, client):
    body = {"prompt": "a" * 1_000_000, "max_new_tokens": 1}
    outcome = {}

    def send_huge_prompt() -> None:
        started = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=120) as sender:
            outcome["status"] = sender.post("/generate", json=body).status_code
        outcome["seconds"] = time.monotonic() - started

    sender = threading.Thread(target=send_huge_prompt)
    sender.start()
    latencies = []
    while sender.is_alive():
        started = time.monotonic()
        client.get("/healthz")
        latencies.append(time.monotonic() - started)
        time.sleep(0.02)
    sender.join()

    assert outcome["status"] == 413
    assert len(latencies) >= 3
    # tokenizing on the event loop would hold /healthz for about the whole request
    assert max(latencies) < outcome["seconds"] / 2, (latencies, outcome)


def test_non_streaming_disconnect_stops_generation(server, client):
    before = client.get("/metrics").text
    cancelled_before = metric_value(before, "peo_generations_finished_total", 'reason="cancelled"')

    body = {"prompt": PROMPT, "max_new_tokens": 1000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate", json=body, timeout=2)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = client.get("/metrics").text
        cancelled = metric_value(metrics, "peo_generations_finished_total", 'reason="cancelled"')
        if cancelled > cancelled_before:
            break
        time.sleep(0.2)
    assert cancelled == cancelled_before + 1
    assert metric_value(metrics, "peo_requests_in_flight") == 0


def test_generate_reads_body_without_content_type(client):
    body = json.dumps({"prompt": "Hi", "max_new_tokens": 2}).encode()
    request = client.build_request("POST", "/generate", content=body)
    assert "content-type" not in request.headers
    response = client.send(request)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def test_health_routes_answer_head(client):
    assert client.head("/healthz").status_code == 200
    assert client.head("/readyz").status_code == 200


def test_default_max_new_tokens_capped_at_limit():
    small = ServerProcess("--max-new-tokens", "3", "--default-max-new-tokens", "500")
    try:
        response = httpx.post(
            small.url + "/generate",
            json={"prompt": "Tell me a story", "ignore_eos": True},
            timeout=120,
        )
    finally:
        small.stop()
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3
