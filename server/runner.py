"""Run one generation on a worker thread and hand its output to the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor

from server.cache import Lease
from server.generation import Finished, SamplingParams, generate

logger = logging.getLogger(__name__)


class GenerationFailed(Exception):
    """The decode loop raised; the original error is the ``__cause__``."""


class GenerationJob:
    """One generation running on an executor thread.

    The thread owns the lease on the fused model. When the decode loop ends for any reason, the
    thread releases the lease and calls ``on_done``. So a slot and a pin are freed only once the
    model is no longer in use, even when the client went away mid-stream.
    """

    def __init__(
        self,
        engine,
        lease: Lease,
        prompt_ids: list[int],
        params: SamplingParams,
        executor: Executor,
        on_done: Callable[[], None],
        request_id: str,
    ):
        self.cancel_event = threading.Event()
        self.cancel_reason = "cancelled"
        self.request_id = request_id
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._engine = engine
        self._lease = lease
        self._prompt_ids = prompt_ids
        self._params = params
        self._on_done = on_done
        self.finished = asyncio.Event()
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self._future = executor.submit(self._run)

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            # the event loop is closed, so no reader is left for the output
            self.cancel_event.set()

    def _run(self) -> None:
        try:
            model = self._lease.value.model
            for item in generate(
                model,
                self._engine.tokenizer,
                self._prompt_ids,
                self._params,
                self.cancel_event,
                self._engine.eos_token_ids,
            ):
                if isinstance(item, Finished):
                    if item.finish_reason == "cancelled":
                        item.finish_reason = self.cancel_reason
                    self.finish_reason = item.finish_reason
                    self.completion_tokens = item.completion_tokens
                self._put(item)
        except Exception as error:
            logger.exception("generation failed for request %s", self.request_id)
            self.finish_reason = "error"
            self._put(error)
        finally:
            self._lease.release()
            try:
                self._loop.call_soon_threadsafe(self._done)
            except RuntimeError:
                pass

    def _done(self) -> None:
        self._on_done()
        self.finished.set()

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the decode loop to stop before its next step."""
        if not self.cancel_event.is_set():
            self.cancel_reason = reason
            self.cancel_event.set()

    async def events(self) -> AsyncIterator[str | Finished]:
        """Yield text deltas, then the :class:`Finished` item.

        Raises:
            GenerationFailed: the decode loop raised.
        """
        while True:
            item = await self._queue.get()
            if isinstance(item, Exception):
                raise GenerationFailed(str(item)) from item
            yield item
            if isinstance(item, Finished):
                return
