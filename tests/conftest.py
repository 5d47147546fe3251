"""Shared fixtures: a real server process on 127.0.0.1 serving the committed bundle."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from peo_merge.preference_map import PreferenceMap

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = REPO_ROOT / "checkpoints" / "smollm2-hh-peo"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A ``python -m server`` child process and its base URL."""

    def __init__(
        self, *flags: str, env: dict[str, str] | None = None, ready_timeout: float = 180.0
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = (
            Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / f"peo-server-{self.port}.log"
        )
        command = [
            sys.executable,
            "-m",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *flags,
        ]
        child_env = os.environ.copy()
        child_env.setdefault("PEO_THREADS", "1")
        child_env.update(env or {})
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=child_env, stdout=self.log, stderr=subprocess.STDOUT
        )
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}:\n{self.log_text()}"
                )
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


def slider_coefficients(info: dict, preference: float) -> dict[str, float]:
    """Return the coefficients a server reports for slider ``preference``, from its ``/info``.

    The slider goes through the bundle's preference map, and the server rounds the result to
    its coefficient step.
    """
    alpha, beta = PreferenceMap.from_json(info["preference_map"]).coefficients(preference)
    step = info["coefficient_step"]
    rounded = [round(round(value / step) * step, 10) + 0.0 for value in (alpha, beta)]
    return {"helpfulness": rounded[0], "harmlessness": rounded[1]}


@pytest.fixture(scope="session")
def slider_ends(server) -> dict[float, dict[str, float]]:
    """The default server's coefficients at slider positions 1 (helpful) and 0 (harmless)."""
    info = httpx.get(server.url + "/info", timeout=30).json()
    return {position: slider_coefficients(info, position) for position in (1.0, 0.0)}


@pytest.fixture(scope="session")
def server():
    """A server on the default base model and the committed bundle, shared by a test session."""
    process = ServerProcess()
    yield process
    process.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http
