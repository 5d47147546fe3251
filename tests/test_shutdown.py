"""Process-level behaviour of a real server: SIGTERM handling and structured logs."""

from __future__ import annotations

import json
import signal
import threading

import httpx
from conftest import ServerProcess
from test_server import parse_sse


def test_sigterm_ends_stream_with_done_and_exits_zero():
    server = ServerProcess("--shutdown-grace-seconds", "1")
    body = {
        "prompt": "Tell me a long story.",
        "max_new_tokens": 1000,
        "ignore_eos": True,
        "stream": True,
    }
    started = threading.Event()
    lines: list[str] = []

    def read_stream() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            with client.stream("POST", "/generate", json=body) as response:
                for line in response.iter_lines():
                    lines.append(line)
                    if line.startswith("event: token"):
                        started.set()

    reader = threading.Thread(target=read_stream)
    reader.start()
    assert started.wait(60), server.log_text()

    server.process.send_signal(signal.SIGTERM)
    reader.join(60)
    exit_code = server.stop()

    events = parse_sse(lines)
    kinds = [kind for kind, _ in events]
    assert not reader.is_alive()
    assert kinds[-1] == "done"
    assert kinds.count("done") == 1
    assert events[-1][1]["finish_reason"] == "shutdown"
    assert exit_code == 0
    assert "shutdown requested" in server.log_text()


def test_json_logs_carry_request_id():
    server = ServerProcess("--log-json")
    try:
        response = httpx.post(
            server.url + "/generate",
            json={"prompt": "Hi", "max_new_tokens": 1},
            headers={"X-Request-ID": "trace-42"},
            timeout=120,
        )
        assert response.status_code == 200
        assert response.headers["x-request-id"] == "trace-42"
    finally:
        server.stop()

    entries = []
    for line in server.log_text().splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    tagged = [entry for entry in entries if entry.get("request_id") == "trace-42"]
    assert entries
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    assert any("POST /generate" in entry["message"] for entry in tagged)
