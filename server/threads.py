"""Run tensor work that does not belong to the decode loop on a thread that exits afterwards.

PyTorch's CPU build runs its parallel regions on GNU OpenMP. Every thread that opens a parallel
region keeps its own team of worker threads for as long as it lives. Once the teams of all live
threads contain more threads than the machine has cores, GNU OpenMP shortens how long idle
workers spin before they sleep: 100 spins instead of 300,000 by default (GCC's libgomp manual,
``GOMP_SPINCOUNT``). From then on every parallel region pays for waking its workers.
A decode step of a small model is hundreds of short operations, so it pays that cost hundreds of
times: on a 2-core machine, a batch-of-8 step of SmolLM2-135M took 95 ms instead of 72 ms on
fused weights, and 136 ms instead of 80 ms on the unfused path, while a second team was alive
(``python -m benchmarks.decode_step``).

So the decode loop's thread is the only long-lived thread that runs tensor work. Start-up and
fusion run through :func:`run_in_new_thread`: the thread that did the work exits, and its team
goes with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_in_new_thread(function: Callable[..., T], *args, name: str = "tensor-work", **kwargs) -> T:
    """Call ``function(*args, **kwargs)`` on a new thread, wait for it, and return its result.

    The caller blocks until the call ends. An exception raised by ``function`` is raised again
    in the caller, with its traceback.
    """
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as error:  # handed to the caller, which raises it
            outcome["error"] = error

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
