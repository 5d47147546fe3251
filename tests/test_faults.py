"""Faults: client disconnects, a failing fusion, broken start-up inputs and a cache full of pins."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO_ROOT, ServerProcess, free_port
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from test_server import PROMPT, metric_value
from tiny_model import write_tiny_base, write_tiny_bundle

from peo_merge.base_model import sha256_file
from server.app import create_app
from server.engine import Engine
from server.settings import DEFAULT_BUNDLE, Settings

STARTUP_TIMEOUT_SECONDS = 120


def default_bundle() -> Path:
    """Return the bundle a server started without ``--bundle`` serves."""
    return Path(os.environ.get("PEO_BUNDLE") or DEFAULT_BUNDLE)


def wait_for_metric(client: httpx.Client, name: str, expected: float, timeout: float = 30.0) -> str:
    """Poll /metrics until the sample ``name`` equals ``expected``; return the last text."""
    deadline = time.monotonic() + timeout
    text = client.get("/metrics").text
    while metric_value(text, name) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
        text = client.get("/metrics").text
    return text


class StreamHolder:
    """Hold a long stream open on a thread until :meth:`close`, counting its token events."""

    def __init__(self, url: str, body: dict):
        self.first_token = threading.Event()
        self.stop = threading.Event()
        self.tokens = 0
        self.status: int | None = None
        self.thread = threading.Thread(target=self._read, args=(url, body), daemon=True)
        self.thread.start()

    def _read(self, url: str, body: dict) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            with client.stream("POST", "/generate", json=body | {"stream": True}) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("event: token"):
                        self.tokens += 1
                        self.first_token.set()
                    if self.stop.is_set():
                        return

    def close(self) -> None:
        """Stop reading and close the connection, as a client that goes away would."""
        self.stop.set()
        self.thread.join(60)


@pytest.fixture(scope="module")
def small_cache_server():
    """A fused-only server with room for one fused model that waits at most 1 s for cache room.

    Fused-only, because in ``auto`` mode a second pair would take the unfused path instead of
    waiting for cache room.
    """
    process = ServerProcess(
        "--engine-mode",
        "fused",
        "--cache-max-entries",
        "1",
        "--cache-wait-seconds",
        "1",
        "--max-new-tokens",
        "512",
    )
    yield process
    process.stop()


@pytest.fixture
def small_cache_client(small_cache_server):
    with httpx.Client(base_url=small_cache_server.url, timeout=120) as client:
        yield client


def long_stream_body(helpfulness: float) -> dict:
    return {
        "prompt": PROMPT,
        "max_new_tokens": 512,
        "ignore_eos": True,
        "seed": 1,
        "coefficients": {"helpfulness": helpfulness, "harmlessness": 0.0},
    }


def short_body(helpfulness: float) -> dict:
    return {
        "prompt": "Hello",
        "max_new_tokens": 2,
        "coefficients": {"helpfulness": helpfulness, "harmlessness": 0.0},
    }


# (a) a client that disconnects mid-stream frees its slot and its cache pin


def test_disconnect_frees_slot_and_pin(small_cache_server, small_cache_client):
    client = small_cache_client
    holder = StreamHolder(small_cache_server.url, long_stream_body(0.31))
    assert holder.first_token.wait(60), small_cache_server.log_text()
    evictions_before = metric_value(client.get("/metrics").text, "peo_fused_cache_evictions_total")

    holder.close()
    metrics = wait_for_metric(client, "peo_requests_in_flight", 0)

    assert holder.status == 200
    assert metric_value(metrics, "peo_requests_in_flight") == 0
    cached = client.get("/info").json()["cache"]["keys"]
    assert cached == [{"helpfulness": 0.31, "harmlessness": 0.0}]

    # with one entry and a 1 s wait, this miss is served only if the pin on 0.31 is gone
    other = client.post("/generate", json=short_body(0.32))
    assert other.status_code == 200, other.text
    assert other.json()["cache"] == "miss"
    cached = client.get("/info").json()["cache"]["keys"]
    assert cached == [{"helpfulness": 0.32, "harmlessness": 0.0}]
    evictions = metric_value(client.get("/metrics").text, "peo_fused_cache_evictions_total")
    assert evictions == evictions_before + 1
    assert client.get("/readyz").status_code == 200


# (e) an entry in use is never evicted, even when another key needs the room


def test_pinned_entry_blocks_other_key(small_cache_server, small_cache_client):
    client = small_cache_client
    holder = StreamHolder(small_cache_server.url, long_stream_body(0.41))
    assert holder.first_token.wait(60), small_cache_server.log_text()

    started = time.monotonic()
    blocked = client.post("/generate", json=short_body(0.42))
    waited = time.monotonic() - started

    stream_running = holder.thread.is_alive()
    cached = client.get("/info").json()["cache"]["keys"]
    # the client ends the stream; the server then releases the pin
    holder.close()
    assert stream_running
    assert waited >= 1.0
    assert blocked.status_code == 503, blocked.text
    assert blocked.headers.get("retry-after") == "1"
    error = blocked.json()["error"]
    assert error["type"] == "overloaded"
    assert "cache" in error["message"]
    assert cached == [{"helpfulness": 0.41, "harmlessness": 0.0}]

    wait_for_metric(client, "peo_requests_in_flight", 0)
    served = client.post("/generate", json=short_body(0.42))
    assert served.status_code == 200, served.text
    assert served.json()["coefficients"] == {"helpfulness": 0.42, "harmlessness": 0.0}


# (b) a fusion that fails at run time fails that request only


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory):
    """The real app on a real engine over a tiny random Llama and its bundle, in process."""
    root = tmp_path_factory.mktemp("tiny")
    base = write_tiny_base(root / "base")
    bundle = write_tiny_bundle(root / "bundle", base)
    settings = Settings(base_model=str(base), bundle=bundle, threads=1, max_new_tokens=8)
    engine = Engine(settings)
    with TestClient(create_app(settings, engine)) as client:
        yield client, engine


def test_failed_fusion_fails_one_request(tiny_app, monkeypatch):
    client, engine = tiny_app
    original = engine.fuser.fuse_into
    corrupt_key = {"helpfulness": 0.7, "harmlessness": 0.3}

    def fuse_into_with_corrupt_tensor(buffers, coefficients):
        # Injected fault: the fusion of one key meets a corrupt vector tensor and raises.
        if coefficients == corrupt_key:
            raise RuntimeError(
                "task vector tensor model.layers.0.self_attn.q_proj.weight is corrupt"
            )
        original(buffers, coefficients)

    monkeypatch.setattr(engine.fuser, "fuse_into", fuse_into_with_corrupt_tensor)
    body = {"prompt": "Hello", "max_new_tokens": 2}

    failed = client.post("/generate", json=body | {"coefficients": corrupt_key})
    served = client.post("/generate", json=body | {"preference": 1.0})
    retried = client.post("/generate", json=body | {"coefficients": corrupt_key})

    assert failed.status_code == 500
    assert failed.headers["content-type"] == "application/json"
    assert failed.json()["error"]["type"] == "fusion_failed"
    assert "corrupt" in failed.json()["error"]["message"]
    assert served.status_code == 200, served.text
    assert retried.status_code == 500
    keys = [tuple(key.values()) for key in client.get("/info").json()["cache"]["keys"]]
    assert (0.7, 0.3) not in keys
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "peo_requests_in_flight") == 0
    assert client.app.state.server.admission.running == 0
    assert client.get("/readyz").status_code == 200


# (c, d) broken start-up inputs stop the server before it serves


def run_server_until_exit(*flags: str) -> subprocess.CompletedProcess:
    """Run ``python -m server`` and return once it exits; a working set-up would time out."""
    command = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(free_port())]
    return subprocess.run(
        [*command, *flags],
        cwd=REPO_ROOT,
        env=os.environ | {"PEO_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT_SECONDS,
    )


def copy_bundle(tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(default_bundle(), copy)
    return copy


def edit_manifest(bundle: Path, edit) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def helpfulness_file(bundle: Path) -> Path:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return bundle / manifest["vectors"]["helpfulness"]["file"]


def delete_vector(bundle: Path) -> Path:
    path = helpfulness_file(bundle)
    path.unlink()
    return path


def truncate_vector(bundle: Path) -> Path:
    path = helpfulness_file(bundle)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def truncate_vector_without_hash(bundle: Path) -> Path:
    edit_manifest(bundle, lambda manifest: manifest["vectors"]["helpfulness"].pop("sha256"))
    return truncate_vector(bundle)


def widen_vector(bundle: Path) -> Path:
    """Give every lora_A factor one input column too many, with a matching sha256."""
    path = helpfulness_file(bundle)
    tensors = load_file(path)
    for key, tensor in tensors.items():
        if key.endswith(".lora_A"):
            tensors[key] = tensor.new_zeros(tensor.shape[0], tensor.shape[1] + 1)
    save_file(tensors, path)
    digest = sha256_file(path)
    edit_manifest(bundle, lambda manifest: manifest["vectors"]["helpfulness"].update(sha256=digest))
    return path


def bump_format_version(bundle: Path) -> Path:
    edit_manifest(bundle, lambda manifest: manifest.update(format_version=99))
    return bundle / "manifest.json"


BROKEN_BUNDLES = [
    ("missing_vector", delete_vector, "not found"),
    ("truncated_vector", truncate_vector, "sha256"),
    ("truncated_vector_without_hash", truncate_vector_without_hash, "not a readable safetensors"),
    ("mismatched_vector", widen_vector, "shape"),
    ("unknown_format_version", bump_format_version, "format_version 99"),
]


@pytest.mark.parametrize(
    "damage,expected",
    [case[1:] for case in BROKEN_BUNDLES],
    ids=[case[0] for case in BROKEN_BUNDLES],
)
def test_startup_broken_bundle_exits(tmp_path, damage, expected):
    bundle = copy_bundle(tmp_path)
    damaged_file = damage(bundle)

    result = run_server_until_exit("--bundle", str(bundle))

    assert result.returncode != 0
    assert str(damaged_file) in result.stderr
    assert expected in result.stderr
    assert "start-up failed" in result.stderr
    assert "Traceback" not in result.stderr


def test_startup_base_shape_mismatch_exits(tmp_path):
    base = write_tiny_base(tmp_path / "tiny-base")
    bundle = default_bundle()

    result = run_server_until_exit("--base-model", str(base), "--bundle", str(bundle))

    assert result.returncode != 0
    assert str(bundle / "vectors") in result.stderr
    assert "shape" in result.stderr
    assert "Traceback" not in result.stderr


def test_startup_base_without_tokenizer_exits(tmp_path):
    base = write_tiny_base(tmp_path / "tiny-base")
    for name in os.listdir(base):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.remove(base / name)
    bundle = write_tiny_bundle(tmp_path / "tiny-bundle", base)

    result = run_server_until_exit("--base-model", str(base), "--bundle", str(bundle))

    assert result.returncode != 0
    assert str(base) in result.stderr
    assert "start-up failed" in result.stderr


def test_startup_cache_budget_below_one_model_exits():
    result = run_server_until_exit("--cache-max-bytes", "1MiB")

    assert result.returncode != 0
    assert "--cache-max-bytes" in result.stderr
    assert "smaller than one fused model" in result.stderr
    assert "Traceback" not in result.stderr
