"""SIGTERM handling of a real server process: streams end with a reason and the exit code is 0."""

from __future__ import annotations

import signal
import threading

import httpx

from conftest import ServerProcess
from test_server import parse_sse


def test_sigterm_ends_stream_with_done_and_exits_zero():
    server = ServerProcess("--shutdown-grace-seconds", "1")
    body = {"prompt": "Tell me a long story.", "max_new_tokens": 1000, "ignore_eos": True, "stream": True}
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
