"""Admission control: a bounded number of running generations and a bounded wait queue."""

from __future__ import annotations

import asyncio


class OverloadedError(Exception):
    """The server has no free slot and its wait queue is full."""

    def __init__(self, retry_after: int):
        super().__init__("server is at capacity; retry later")
        self.retry_after = retry_after


class Admission:
    """Grants generation slots in arrival order.

    Policy: up to ``max_running`` generations run at once; up to ``max_waiting`` more wait for a
    slot; any request beyond that is rejected at once with :class:`OverloadedError`, so overload
    shows up as a fast 503 with ``Retry-After`` instead of an ever-growing latency. While
    draining for shutdown every new request is rejected.
    """

    def __init__(self, max_running: int, max_waiting: int, retry_after: int = 1):
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.retry_after = retry_after
        self.running = 0
        self.waiting = 0
        self.draining = False
        self._semaphore = asyncio.Semaphore(max_running)

    async def acquire(self) -> None:
        """Wait for a slot. Raises :class:`OverloadedError` when the queue is full or draining."""
        if self.draining:
            raise OverloadedError(self.retry_after)
        if self._semaphore.locked() and self.waiting >= self.max_waiting:
            raise OverloadedError(self.retry_after)
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        """Free a slot taken by :meth:`acquire`."""
        self.running -= 1
        self._semaphore.release()
