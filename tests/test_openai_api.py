"""The OpenAI-compatible routes, driven by the official ``openai`` client against a real server."""

from __future__ import annotations

import time

import httpx
import pytest
from conftest import ServerProcess
from test_server import metric_value

openai = pytest.importorskip(
    "openai", reason="the openai package is not installed: pip install -e '.[test]'"
)

PROMPT = "The three primary colours are"
QUESTION = "How can I get my neighbour's dog to stop barking at night?"
HELPFUL = {"helpfulness": 1.0, "harmlessness": 0.0}
API_KEY = "test-token-4f1c"


@pytest.fixture(scope="module")
def api(server):
    """An OpenAI client pointed at the test server; retries are off so errors surface at once."""
    with openai.OpenAI(
        base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120
    ) as client:
        yield client


@pytest.fixture(scope="module")
def model_id(server) -> str:
    """Return the served model id: the bundle name that ``/info`` reports."""
    return httpx.get(server.url + "/info", timeout=30).json()["bundle"]["name"]


# models


def test_models_list_has_bundle_name(api, model_id):
    models = api.models.list().data
    assert len(models) == 1
    assert models[0].id == model_id
    assert models[0].object == "model"


# completions


def test_completion_returns_text_and_usage(api, model_id):
    completion = api.completions.create(
        model=model_id, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"preference": 1.0}
    )
    choice = completion.choices[0]
    assert completion.object == "text_completion"
    assert completion.model == model_id
    assert len(completion.choices) == 1
    assert choice.text
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens > 0
    assert (
        completion.usage.total_tokens
        == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_completion_reports_peo_extras(api, model_id, slider_ends):
    completion = api.completions.create(
        model=model_id, prompt=PROMPT, max_tokens=2, temperature=0, extra_body={"preference": 1.0}
    )
    peo = completion.peo
    assert peo["preference"] == 1.0
    assert peo["coefficients"] == slider_ends[1.0]
    assert peo["cache"] in ("hit", "miss")
    assert peo["finish_reason"] in ("stop", "length")
    assert peo["request_id"]


def test_completion_matches_generate_text(api, client, model_id):
    body = {"prompt": PROMPT, "temperature": 0, "max_new_tokens": 10, "preference": 0.3}
    native = client.post("/generate", json=body).json()
    completion = api.completions.create(
        model=model_id, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"preference": 0.3}
    )
    assert completion.choices[0].text == native["text"]
    assert completion.peo["coefficients"] == native["coefficients"]


def test_completion_coefficients_hit_cache(api, model_id):
    coefficients = {"helpfulness": 0.41, "harmlessness": 0.17}
    first = api.completions.create(
        model=model_id, prompt=PROMPT, max_tokens=1, extra_body={"coefficients": coefficients}
    )
    second = api.completions.create(
        model=model_id, prompt=PROMPT, max_tokens=1, extra_body={"coefficients": coefficients}
    )
    assert first.peo["cache"] == "miss"
    assert second.peo["cache"] == "hit"
    assert second.peo["coefficients"] == coefficients
    assert second.peo["preference"] is None


def test_completion_stop_sequence_cuts_text(api, model_id):
    plain = api.completions.create(model=model_id, prompt=PROMPT, max_tokens=16, temperature=0)
    text = plain.choices[0].text
    stop = text.strip().split()[1]
    stopped = api.completions.create(
        model=model_id, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.peo["finish_reason"] == "stop"


def test_completion_stream_joins_to_full_text(api, model_id):
    plain = api.completions.create(
        model=model_id, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"preference": 0.9}
    )
    chunks = list(
        api.completions.create(
            model=model_id,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            extra_body={"preference": 0.9},
        )
    )
    finishing = [chunk for chunk in chunks if chunk.choices[0].finish_reason is not None]
    assert len(chunks) > 2
    assert {chunk.object for chunk in chunks} == {"text_completion"}
    assert len({chunk.id for chunk in chunks}) == 1
    assert "".join(chunk.choices[0].text for chunk in chunks) == plain.choices[0].text
    assert len(finishing) == 1
    assert finishing[0] is chunks[-1]
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].peo["coefficients"] == plain.peo["coefficients"]
    assert chunks[-1].peo["cache"] == "hit"


# chat completions


def test_chat_completion_returns_assistant_message(api, model_id, slider_ends):
    reply = api.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=12,
        temperature=0,
        extra_body={"preference": 0.0},
    )
    message = reply.choices[0].message
    assert reply.object == "chat.completion"
    assert message.role == "assistant"
    assert message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0
    assert reply.peo["coefficients"] == slider_ends[0.0]
    assert reply.peo["preference"] == 0.0


def test_chat_completion_matches_generate_text(api, client, model_id):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": QUESTION},
    ]
    native = client.post(
        "/generate",
        json={"messages": messages, "temperature": 0, "max_new_tokens": 12, "preference": 0.7},
    ).json()
    reply = api.chat.completions.create(
        model=model_id,
        messages=messages,
        max_tokens=12,
        temperature=0,
        extra_body={"preference": 0.7},
    )
    assert reply.choices[0].message.content == native["text"]


def test_chat_developer_role_reads_as_system(api, model_id):
    def reply_to(role: str) -> str:
        messages = [
            {"role": role, "content": "Answer briefly."},
            {"role": "user", "content": QUESTION},
        ]
        reply = api.chat.completions.create(
            model=model_id, messages=messages, max_tokens=6, temperature=0
        )
        return reply.choices[0].message.content

    assert reply_to("developer") == reply_to("system")


def test_chat_stream_sends_role_text_and_usage(api, model_id, slider_ends):
    messages = [{"role": "user", "content": QUESTION}]
    plain = api.chat.completions.create(
        model=model_id,
        messages=messages,
        max_tokens=10,
        temperature=0,
        extra_body={"preference": 1.0},
    )
    chunks = list(
        api.chat.completions.create(
            model=model_id,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"preference": 1.0},
        )
    )

    with_choices = [chunk for chunk in chunks if chunk.choices]
    finishing = [chunk for chunk in with_choices if chunk.choices[0].finish_reason is not None]
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in with_choices)

    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert streamed == plain.choices[0].message.content
    assert len(finishing) == 1
    assert finishing[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert finishing[0].peo["coefficients"] == slider_ends[1.0]
    assert finishing[0].peo["cache"] == "hit"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


# errors


def test_two_choices_rejected_with_422(api, model_id):
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        api.completions.create(model=model_id, prompt=PROMPT, max_tokens=1, n=2)
    error = raised.value.response.json()["error"]
    assert raised.value.status_code == 422
    assert error["field"] == "n"
    assert "got 2" in error["message"]


def test_chat_penalty_rejected_with_422(api, model_id):
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        api.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=1,
            presence_penalty=0.5,
        )
    assert raised.value.status_code == 422
    assert raised.value.response.json()["error"]["field"] == "presence_penalty"


def test_zero_penalties_are_accepted(api, model_id):
    completion = api.completions.create(
        model=model_id,
        prompt=PROMPT,
        max_tokens=1,
        presence_penalty=0,
        frequency_penalty=0,
        user="tester",
    )
    assert completion.usage.completion_tokens == 1


def test_unknown_model_not_found(api):
    with pytest.raises(openai.NotFoundError) as raised:
        api.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=1)
    assert raised.value.status_code == 404
    assert raised.value.response.json()["error"]["field"] == "model"
    assert "gpt-4o" in raised.value.response.json()["error"]["message"]


def _chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1} | fields


def _completion(**fields) -> dict:
    return {"prompt": "Hi", "max_tokens": 1} | fields


INVALID_BODIES = [
    ("n_two", "/v1/completions", _completion(n=2), 422, "n"),
    (
        "presence_penalty",
        "/v1/completions",
        _completion(presence_penalty=0.5),
        422,
        "presence_penalty",
    ),
    (
        "frequency_penalty",
        "/v1/chat/completions",
        _chat(frequency_penalty=-1.0),
        422,
        "frequency_penalty",
    ),
    ("logit_bias", "/v1/completions", _completion(logit_bias={"50256": -100}), 422, "logit_bias"),
    ("logprobs", "/v1/completions", _completion(logprobs=3), 422, "logprobs"),
    ("echo", "/v1/completions", _completion(echo=True), 422, "echo"),
    ("best_of", "/v1/completions", _completion(best_of=3), 422, "best_of"),
    ("prompt_batch", "/v1/completions", _completion(prompt=["a", "b"]), 422, "prompt"),
    ("prompt_tokens", "/v1/completions", _completion(prompt=[1, 2, 3]), 422, "prompt"),
    ("prompt_missing", "/v1/completions", {"max_tokens": 1}, 422, "prompt"),
    ("empty_stop", "/v1/completions", _completion(stop=""), 422, "stop"),
    ("too_many_stops", "/v1/completions", _completion(stop=["a"] * 1000), 422, "stop"),
    ("max_tokens_huge", "/v1/completions", _completion(max_tokens=10**9), 422, "max_tokens"),
    ("max_tokens_zero", "/v1/completions", _completion(max_tokens=0), 422, "max_tokens"),
    ("temperature_negative", "/v1/completions", _completion(temperature=-1), 422, "temperature"),
    ("preference_above_one", "/v1/completions", _completion(preference=1.5), 422, "preference"),
    (
        "coefficient_out_of_bounds",
        "/v1/completions",
        _completion(coefficients={"helpfulness": 99, "harmlessness": 0}),
        422,
        "coefficients.helpfulness",
    ),
    (
        "preference_and_coefficients",
        "/v1/completions",
        _completion(preference=0.5, coefficients=HELPFUL),
        422,
        "coefficients",
    ),
    ("unknown_field", "/v1/completions", _completion(temprature=0.5), 422, "temprature"),
    ("wrong_model", "/v1/chat/completions", _chat(model="gpt-4o"), 404, "model"),
    ("chat_n_two", "/v1/chat/completions", _chat(n=2), 422, "n"),
    (
        "chat_tools",
        "/v1/chat/completions",
        _chat(tools=[{"type": "function", "function": {"name": "f"}}]),
        422,
        "tools",
    ),
    (
        "chat_json_mode",
        "/v1/chat/completions",
        _chat(response_format={"type": "json_object"}),
        422,
        "response_format",
    ),
    ("chat_logprobs", "/v1/chat/completions", _chat(logprobs=True), 422, "logprobs"),
    (
        "chat_tool_role",
        "/v1/chat/completions",
        {"messages": [{"role": "tool", "content": "x"}]},
        422,
        "messages.0.role",
    ),
    ("chat_no_messages", "/v1/chat/completions", {"messages": []}, 422, "messages"),
    (
        "chat_both_token_limits",
        "/v1/chat/completions",
        _chat(max_tokens=2, max_completion_tokens=3),
        422,
        "max_completion_tokens",
    ),
]


@pytest.mark.parametrize(
    "case,route,body,status,field", INVALID_BODIES, ids=[case[0] for case in INVALID_BODIES]
)
def test_openai_routes_reject_invalid_input(client, case, route, body, status, field):
    response = client.post(route, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"]
    assert error.get("field") == field, error
    assert field.split(".")[0] in error["message"]


# accepted variants and metrics


def test_chat_accepts_text_parts_and_null_keys(client):
    message = {
        "role": "user",
        "content": [{"type": "text", "text": "Hi"}],
        "refusal": None,
        "tool_calls": None,
    }
    response = client.post(
        "/v1/chat/completions", json={"messages": [message], "max_tokens": 1, "n": 1}
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 1


def test_openai_routes_counted_in_metrics(api, client, model_id):
    api.completions.create(model=model_id, prompt=PROMPT, max_tokens=1)
    api.models.list()
    text = client.get("/metrics").text
    assert metric_value(text, "peo_requests_total", 'route="/v1/completions",status="200"') > 0
    assert metric_value(text, "peo_requests_total", 'route="/v1/models",status="200"') > 0


def test_stream_disconnect_cancels_generation(server, client, model_id):
    cancelled_before = metric_value(
        client.get("/metrics").text, "peo_generations_finished_total", 'reason="cancelled"'
    )
    body = {
        "prompt": PROMPT,
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": True,
        "model": model_id,
    }
    with httpx.Client(base_url=server.url, timeout=60) as streaming:
        with streaming.stream("POST", "/v1/completions", json=body) as response:
            received = 0
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    received += 1
                if received >= 3:
                    break

    deadline = time.monotonic() + 30
    cancelled = cancelled_before
    while cancelled == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.2)
        metrics = client.get("/metrics").text
        cancelled = metric_value(metrics, "peo_generations_finished_total", 'reason="cancelled"')
    assert response.status_code == 200
    assert cancelled == cancelled_before + 1
    assert metric_value(metrics, "peo_requests_in_flight") == 0


# the API key


@pytest.fixture(scope="module")
def keyed_server():
    """A second server process that requires a bearer token on the generation routes."""
    process = ServerProcess("--api-key", API_KEY)
    yield process
    process.stop()


def test_api_key_checked_before_body(keyed_server):
    response = httpx.post(keyed_server.url + "/v1/completions", json={"n": 2}, timeout=30)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "unauthorized"


def test_api_key_wrong_token_rejected(keyed_server):
    with openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as raised:
            wrong.models.list()
    assert raised.value.status_code == 401


def test_api_key_right_token_accepted(keyed_server):
    with openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=API_KEY, max_retries=0) as keyed:
        models = keyed.models.list().data
        completion = keyed.completions.create(model=models[0].id, prompt=PROMPT, max_tokens=1)
    assert len(models) == 1
    assert completion.usage.completion_tokens == 1
