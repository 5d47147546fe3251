"""Tensor work outside the decode loop runs on threads that exit when it is done.

GNU OpenMP keeps a team of workers for every live thread that ran a parallel region. More team
threads than cores slow every decode step, as ``server.threads`` explains with measurements. These tests
check the mechanism: the work runs on another thread, that thread is gone afterwards, results and
errors reach the caller, and the engine's fusion and start-up go through it.
"""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_model import write_tiny_base, write_tiny_bundle

from server import __main__ as server_main
from server.engine import Engine
from server.settings import Settings
from server.threads import run_in_new_thread


def test_result_from_exited_thread():
    seen = {}

    def work(a, b, scale=1):
        seen["thread"] = threading.current_thread()
        return (a + b) * scale

    assert run_in_new_thread(work, 2, 3, scale=4) == 20
    assert seen["thread"] is not threading.current_thread()
    assert not seen["thread"].is_alive()


def test_error_reraised_in_caller():
    def work():
        raise KeyError("no such vector")

    with pytest.raises(KeyError, match="no such vector"):
        run_in_new_thread(work)


def test_thread_name_is_given():
    assert run_in_new_thread(lambda: threading.current_thread().name, name="fusion") == "fusion"


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    base = write_tiny_base(root / "base")
    bundle = write_tiny_bundle(root / "bundle", base)
    return Engine(Settings(base_model=str(base), bundle=bundle, threads=1, cache_max_entries=2))


def test_fusion_runs_on_a_thread_that_exits(tiny_engine, monkeypatch):
    threads = []
    fuse_into = tiny_engine.fuser.fuse_into

    def recording_fuse_into(buffers, coefficients):
        threads.append(threading.current_thread())
        return fuse_into(buffers, coefficients)

    monkeypatch.setattr(tiny_engine.fuser, "fuse_into", recording_fuse_into)
    with tiny_engine.acquire((0.25, 0.75)) as lease:
        assert not lease.hit
        fused = dict(lease.value.model.named_parameters())
    assert len(threads) == 1
    assert threads[0] is not threading.current_thread()
    assert threads[0].name == "fusion"
    assert not threads[0].is_alive()
    # the work done there is the fusion itself: the targeted weights differ from the base
    base = dict(tiny_engine.model.named_parameters())
    target = next(iter(tiny_engine.fuser.plans))
    assert not torch.equal(fused[target], base[target])


def test_engine_built_on_exited_thread(monkeypatch):
    built_on = []

    class RecordingEngine:
        def __init__(self, settings):
            built_on.append(threading.current_thread())
            raise ValueError("stop after recording")

    monkeypatch.setattr(server_main, "Engine", RecordingEngine)
    # start-up fails on purpose, after the engine constructor has recorded its thread
    assert server_main.main(["--port", "1"]) == 2
    assert built_on[0].name == "start-up"
    assert not built_on[0].is_alive()
