"""Determinism: one prompt, seed, coefficient pair and sampling setting always give one text.

The server keeps a single fused model, so a third request for key A, after one for key B,
fuses A again (a cache miss) and must still give the text of the first request for A.
"""

from __future__ import annotations

import httpx
import pytest
from conftest import ServerProcess
from test_server import PROMPT, parse_sse

KEY_A = {"helpfulness": 0.8, "harmlessness": 0.2}
KEY_B = {"helpfulness": 0.1, "harmlessness": 0.9}
MAX_NEW_TOKENS = 16
# ignore_eos: every request yields MAX_NEW_TOKENS tokens, so no comparison is between empty texts
SAMPLED_BODY = {
    "messages": [{"role": "user", "content": PROMPT}],
    "temperature": 0.8,
    "top_p": 0.95,
    "top_k": 50,
    "max_new_tokens": MAX_NEW_TOKENS,
    "ignore_eos": True,
}


@pytest.fixture(scope="module")
def one_entry_server():
    process = ServerProcess("--cache-max-entries", "1")
    yield process
    process.stop()


@pytest.fixture
def client(one_entry_server):
    with httpx.Client(base_url=one_entry_server.url, timeout=120) as http:
        yield http


def generate(client: httpx.Client, key: dict, seed: int = 1234) -> dict:
    response = client.post("/generate", json=SAMPLED_BODY | {"seed": seed, "coefficients": key})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == MAX_NEW_TOKENS
    return response.json()


def test_same_seed_repeats_text(client):
    first = generate(client, KEY_A)
    second = generate(client, KEY_A)
    assert second["cache"] == "hit"
    assert second["text"] == first["text"]
    assert second["usage"]["completion_tokens"] == first["usage"]["completion_tokens"]


def test_cache_miss_repeats_hit_text(client):
    first = generate(client, KEY_A)
    other = generate(client, KEY_B)
    again = generate(client, KEY_A)
    assert other["cache"] == "miss"
    assert again["cache"] == "miss"
    assert again["text"] == first["text"]


def test_stream_repeats_plain_text(client):
    plain = generate(client, KEY_A)
    body = SAMPLED_BODY | {"seed": 1234, "coefficients": KEY_A, "stream": True}
    with client.stream("POST", "/generate", json=body) as response:
        events = parse_sse(response.iter_lines())
    streamed = "".join(data["text"] for kind, data in events if kind == "token")
    assert events[-1][0] == "done"
    assert events[-1][1]["text"] == plain["text"]
    assert streamed == plain["text"]


def test_other_seed_changes_text(client):
    first = generate(client, KEY_A, seed=1234)
    other = generate(client, KEY_A, seed=4321)
    assert other["text"] != first["text"]
