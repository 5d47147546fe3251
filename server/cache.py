"""The fused-model cache."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class CacheFullError(RuntimeError):
    """No room for a new fused model because every cached entry is in use."""


@dataclass
class _Entry:
    value: Any
    nbytes: int
    pins: int = 0


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    # True once room is reserved and the build runs; a miss still waiting for room reserves none
    building: bool = False


@dataclass
class Lease:
    """A pinned cache entry; the entry cannot be evicted until :meth:`release` is called."""

    key: Hashable
    value: Any
    hit: bool
    fusion_seconds: float
    _cache: FusedModelCache
    _released: bool = False

    def release(self) -> None:
        """Unpin the entry. Calling it twice has no further effect."""
        if not self._released:
            self._released = True
            self._cache._release(self.key)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class FusedModelCache:
    """An LRU cache of fused models, bounded by entry count and by bytes.

    Policy:
    - ``acquire(key)`` returns a pinned entry, building it with ``factory`` on a miss.
    - Before a build, least recently used entries that no generation pins are evicted until the
      new entry fits both bounds. The evicted value is handed to ``factory`` for reuse, so its
      buffers are overwritten in place instead of allocated again.
    - A pinned entry is never evicted. When only pinned entries are left and the new one does not
      fit, ``acquire`` waits up to ``wait_timeout`` seconds for a release, then raises
      :class:`CacheFullError`.
    - Concurrent ``acquire`` calls for one missing key share a single build (single-flight): the
      first caller builds, the others wait for its outcome without a deadline of their own. If
      the build fails, all of them get its error and nothing is cached.

    Args:
        factory: ``factory(key, recycled) -> (value, nbytes)``; ``recycled`` is an evicted value
            or None.
        entry_nbytes: bytes one entry needs, reserved before its build starts.
        max_entries: the maximum number of entries, pinned or not.
        max_bytes: the maximum bytes held by entries and builds in progress.
        wait_timeout: seconds to wait for room before :class:`CacheFullError`.
        on_evict: called with the key of each evicted entry.
    """

    def __init__(
        self,
        factory: Callable[[Hashable, Any], tuple[Any, int]],
        entry_nbytes: int,
        max_entries: int,
        max_bytes: int,
        wait_timeout: float = 30.0,
        on_evict: Callable[[Hashable], None] | None = None,
    ):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        if entry_nbytes > max_bytes:
            raise ValueError(
                f"cache budget of {max_bytes} bytes is smaller than one fused model "
                f"({entry_nbytes} bytes); raise the byte budget to at least {entry_nbytes}"
            )
        self._factory = factory
        self._entry_nbytes = entry_nbytes
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.wait_timeout = wait_timeout
        self._on_evict = on_evict
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._pending: dict[Hashable, _Pending] = {}
        self._condition = threading.Condition()
        self.builds = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # introspection

    def keys(self) -> list[Hashable]:
        """Cached keys from least to most recently used."""
        with self._condition:
            return list(self._entries)

    def nbytes(self) -> int:
        """Bytes held by cached entries."""
        with self._condition:
            return sum(entry.nbytes for entry in self._entries.values())

    def pins(self, key: Hashable) -> int:
        """Number of leases currently holding ``key`` (0 if absent)."""
        with self._condition:
            entry = self._entries.get(key)
            return entry.pins if entry else 0

    def __len__(self) -> int:
        with self._condition:
            return len(self._entries)

    # acquire and release

    def acquire(self, key: Hashable) -> Lease:
        """Return a pinned lease on the value for ``key``, building it on a miss.

        Raises:
            CacheFullError: no room appeared within ``wait_timeout``.
            Exception: whatever ``factory`` raised for this key.
        """
        started = time.perf_counter()
        deadline = time.monotonic() + self.wait_timeout
        with self._condition:
            while True:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.pins += 1
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return Lease(key, entry.value, True, time.perf_counter() - started, self)

                pending = self._pending.get(key)
                if pending is not None:
                    # the leader either builds the entry or fails; its outcome is ours
                    self._condition.wait()
                    if pending.error is not None:
                        raise pending.error
                    continue

                pending = _Pending()
                self._pending[key] = pending
                self.misses += 1
                try:
                    recycled = self._make_room(deadline, key)
                except CacheFullError as error:
                    self._fail_pending(key, pending, error)
                    raise
                pending.building = True
                break

        # build outside the lock, so hits on other keys are served meanwhile
        try:
            value, nbytes = self._factory(key, recycled)
        except BaseException as error:
            with self._condition:
                self._fail_pending(key, pending, error)
            raise

        with self._condition:
            self._entries[key] = _Entry(value, nbytes, pins=1)
            self.builds += 1
            pending.done.set()
            del self._pending[key]
            if nbytes > self._entry_nbytes:
                logger.warning(
                    "fused model %s has %d bytes, more than the %d reserved",
                    key,
                    nbytes,
                    self._entry_nbytes,
                )
                self._evict_while(lambda: self._used_bytes() > self.max_bytes)
            self._condition.notify_all()
        return Lease(key, value, False, time.perf_counter() - started, self)

    def _fail_pending(self, key: Hashable, pending: _Pending, error: BaseException) -> None:
        pending.error = error
        pending.done.set()
        del self._pending[key]
        self._condition.notify_all()

    def _release(self, key: Hashable) -> None:
        with self._condition:
            entry = self._entries.get(key)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1
            self._condition.notify_all()

    # eviction

    def _used_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def _fits(self) -> bool:
        """Check whether entries, running builds and the caller's build fit both bounds."""
        building = sum(1 for pending in self._pending.values() if pending.building)
        count = len(self._entries) + building + 1
        reserved = (building + 1) * self._entry_nbytes
        return count <= self.max_entries and self._used_bytes() + reserved <= self.max_bytes

    def _evict_one(self) -> tuple[bool, Any]:
        """Evict the least recently used unpinned entry; return ``(evicted, value)``."""
        victim = next((k for k, entry in self._entries.items() if entry.pins == 0), None)
        if victim is None:
            return False, None
        evicted = self._entries.pop(victim)
        self.evictions += 1
        logger.debug("evicted fused model %s (%d bytes)", victim, evicted.nbytes)
        if self._on_evict is not None:
            self._on_evict(victim)
        return True, evicted.value

    def _evict_while(self, condition: Callable[[], bool]) -> None:
        while condition():
            evicted, _ = self._evict_one()
            if not evicted:
                return

    def _make_room(self, deadline: float, key: Hashable) -> Any:
        """Evict unpinned LRU entries until the caller's build fits, waiting while all are pinned.

        Returns:
            The first evicted value, for the factory to reuse, or None.
        """
        recycled = None
        while not self._fits():
            evicted, value = self._evict_one()
            if not evicted:
                self._wait(deadline, key)
                continue
            if recycled is None:
                recycled = value
        return recycled

    def _wait(self, deadline: float, key: Hashable) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._condition.wait(timeout=remaining):
            if time.monotonic() >= deadline:
                raise CacheFullError(
                    f"no room in the fused-model cache for {key} after {self.wait_timeout:g} s: "
                    f"all {len(self._entries)} cached entries are in use"
                )
