"""One generation on the event loop's side: submitted to the decode loop, read as async events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from server.batching import BatchScheduler, Route, Sequence
from server.cache import Lease
from server.generation import DecodeState, Finished, SamplingParams

logger = logging.getLogger(__name__)


class GenerationFailed(Exception):
    """The decode loop raised; the original error is the ``__cause__``."""


class GenerationJob:
    """One request running in the decode loop.

    The job owns the lease on its fused model (none on the unfused path). When the request
    leaves its fused model (it finished, or moved to the unfused batch), the lease is released.
    When it leaves the decode loop for any reason, ``on_done`` runs on the event loop, and only
    then does the last item (the result or the error) reach the reader. So a slot and a pin are
    freed only once the model is no longer in use, even when the client went away mid-stream,
    and a client that sends its next request on receiving a result finds them freed.
    """

    def __init__(
        self,
        engine,
        scheduler: BatchScheduler,
        route: Route,
        lease: Lease | None,
        prompt_ids: list[int],
        params: SamplingParams,
        on_done: Callable[[], None],
        request_id: str,
        unfused_route: Route | None = None,
    ):
        self.request_id = request_id
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._lease = lease
        self._on_done = on_done
        self.finished = asyncio.Event()
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self._final: Finished | Exception | None = None
        self.sequence = Sequence(
            prompt_ids,
            DecodeState(engine.tokenizer, params, engine.eos_token_ids),
            route,
            emit=self._put,
            on_exit=self._exit,
            unfused_route=unfused_route,
            on_move=self._release_lease,
        )
        scheduler.submit(self.sequence)

    def _put(self, item) -> None:
        # the last item waits for _exit, so that the request's bookkeeping is done before its
        # client can see the end of the response
        if isinstance(item, Finished):
            item.engine = self.engine
            self.finish_reason = item.finish_reason
            self.completion_tokens = item.completion_tokens
            self._final = item
            return
        if isinstance(item, Exception):
            logger.error("generation failed for request %s: %s", self.request_id, item)
            self.finish_reason = "error"
            self._final = item
            return
        self._send(item)

    def _send(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            # the event loop is closed, so no reader is left for the output
            self.sequence.cancel()

    def _release_lease(self) -> None:
        # on the decode loop's thread, when the request leaves its fused model
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    @property
    def engine(self) -> str:
        """The path serving the request now: ``unfused`` once it moved there."""
        return "unfused" if self.sequence.route.rows is not None else "fused"

    def _exit(self) -> None:
        self._release_lease()
        try:
            self._loop.call_soon_threadsafe(self._done)
        except RuntimeError:
            pass

    def _done(self) -> None:
        self._on_done()
        self.finished.set()
        if self._final is not None:
            self._queue.put_nowait(self._final)

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the decode loop to drop this request before its next step."""
        self.sequence.cancel(reason)

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
