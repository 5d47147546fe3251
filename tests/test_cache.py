"""Tests for the fused-model cache: LRU and byte bounds, pins, waits and single-flight builds."""

from __future__ import annotations

import threading
import time

import pytest

from server.cache import CacheFullError, FusedModelCache

ENTRY_NBYTES = 100


class RecordingFactory:
    """A cache factory that records every call and returns ``("value", key, build_number)``."""

    def __init__(self, nbytes: int = ENTRY_NBYTES, delay: float = 0.0, fail_keys: tuple = ()):
        self.nbytes = nbytes
        self.delay = delay
        self.fail_keys = set(fail_keys)
        self.calls: list[tuple] = []
        self._lock = threading.Lock()

    def __call__(self, key, recycled):
        with self._lock:
            self.calls.append((key, recycled))
            build_number = len(self.calls)
        if self.delay:
            time.sleep(self.delay)
        if key in self.fail_keys:
            raise RuntimeError(f"build of {key} failed")
        return ("value", key, build_number), self.nbytes

    def keys_built(self) -> list:
        return [key for key, _ in self.calls]


def _cache(factory, max_entries=3, max_bytes=10_000, wait_timeout=5.0, **kwargs) -> FusedModelCache:
    return FusedModelCache(
        factory,
        entry_nbytes=ENTRY_NBYTES,
        max_entries=max_entries,
        max_bytes=max_bytes,
        wait_timeout=wait_timeout,
        **kwargs,
    )


def _touch(cache: FusedModelCache, key) -> None:
    cache.acquire(key).release()


def _run_threads(targets) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    return threads


def _join(threads, timeout: float = 10.0) -> None:
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a cache thread did not finish"


# Hits, misses and eviction order


def test_cache_miss_then_hit_returns_same_value():
    factory = RecordingFactory()
    cache = _cache(factory)

    first = cache.acquire("a")
    first.release()
    second = cache.acquire("a")

    assert first.hit is False
    assert second.hit is True
    assert second.value is first.value
    assert factory.keys_built() == ["a"]
    assert cache.hits == 1
    assert cache.misses == 1
    assert cache.builds == 1


def test_cache_evicts_least_recently_used_entry():
    evicted = []
    factory = RecordingFactory()
    cache = _cache(factory, max_entries=3, on_evict=evicted.append)
    for key in ["a", "b", "c"]:
        _touch(cache, key)
    _touch(cache, "a")

    _touch(cache, "d")

    assert evicted == ["b"]
    assert cache.keys() == ["c", "a", "d"]
    assert cache.evictions == 1
    assert len(cache) == 3


def test_cache_evicts_in_lru_order():
    evicted = []
    cache = _cache(RecordingFactory(), max_entries=3, on_evict=evicted.append)
    for key in ["a", "b", "c"]:
        _touch(cache, key)
    _touch(cache, "a")

    _touch(cache, "d")
    _touch(cache, "e")
    _touch(cache, "f")

    assert evicted == ["b", "c", "a"]
    assert cache.keys() == ["d", "e", "f"]


def test_cache_evicts_by_byte_budget():
    evicted = []
    # Room for two entries of ENTRY_NBYTES by bytes, though max_entries would allow ten.
    cache = _cache(
        RecordingFactory(),
        max_entries=10,
        max_bytes=2 * ENTRY_NBYTES + 50,
        on_evict=evicted.append,
    )
    _touch(cache, "a")
    _touch(cache, "b")

    _touch(cache, "c")

    assert evicted == ["a"]
    assert cache.keys() == ["b", "c"]
    assert cache.nbytes() == 2 * ENTRY_NBYTES


def test_cache_byte_budget_counts_reported_nbytes():
    evicted = []
    # Each build reports three times the reserved size: two built entries (600 bytes) plus one
    # reservation (100 bytes) exceed 650 bytes, though three reservations alone would fit.
    factory = RecordingFactory(nbytes=3 * ENTRY_NBYTES)
    cache = _cache(factory, max_entries=10, max_bytes=650, on_evict=evicted.append)
    _touch(cache, "a")
    _touch(cache, "b")

    _touch(cache, "c")

    assert evicted == ["a"]
    assert cache.nbytes() == 6 * ENTRY_NBYTES


def test_cache_budget_below_one_entry():
    with pytest.raises(ValueError, match=str(ENTRY_NBYTES)):
        FusedModelCache(
            RecordingFactory(),
            entry_nbytes=ENTRY_NBYTES,
            max_entries=3,
            max_bytes=ENTRY_NBYTES - 1,
        )


def test_cache_zero_max_entries_raises():
    with pytest.raises(ValueError, match="max_entries"):
        FusedModelCache(
            RecordingFactory(), entry_nbytes=ENTRY_NBYTES, max_entries=0, max_bytes=10_000
        )


def test_cache_passes_evicted_value_to_factory():
    factory = RecordingFactory()
    cache = _cache(factory, max_entries=1)
    first = cache.acquire("a")
    first.release()

    cache.acquire("b").release()

    assert factory.calls[0] == ("a", None)
    assert factory.calls[1][0] == "b"
    assert factory.calls[1][1] is first.value


# Pinning and waiting for room


def test_cache_never_evicts_entry_in_use():
    evicted = []
    cache = _cache(RecordingFactory(), max_entries=3, on_evict=evicted.append)
    lease_a = cache.acquire("a")
    _touch(cache, "b")
    _touch(cache, "c")

    _touch(cache, "d")

    assert evicted == ["b"]
    assert "a" in cache.keys()
    assert cache.pins("a") == 1
    lease_a.release()


def test_cache_full_of_pins_times_out():
    factory = RecordingFactory()
    cache = _cache(factory, max_entries=2, wait_timeout=0.2)
    leases = [cache.acquire("a"), cache.acquire("b")]

    started = time.monotonic()
    with pytest.raises(CacheFullError):
        cache.acquire("c")
    waited = time.monotonic() - started

    assert waited >= 0.2
    assert waited < 2.0
    assert cache.keys() == ["a", "b"]
    assert "c" not in factory.keys_built()
    for lease in leases:
        lease.release()


def test_cache_full_error_does_not_block_later_acquire():
    cache = _cache(RecordingFactory(), max_entries=1, wait_timeout=0.1)
    lease = cache.acquire("a")
    with pytest.raises(CacheFullError):
        cache.acquire("b")
    lease.release()

    later = cache.acquire("b")

    assert later.hit is False
    assert cache.keys() == ["b"]
    later.release()


def test_cache_waiting_acquire_succeeds_after_release():
    factory = RecordingFactory()
    cache = _cache(factory, max_entries=1, wait_timeout=5.0)
    lease_a = cache.acquire("a")
    results = {}

    def acquire_b():
        started = time.monotonic()
        lease = cache.acquire("b")
        results["waited"] = time.monotonic() - started
        results["value"] = lease.value
        lease.release()

    threads = _run_threads([acquire_b])
    time.sleep(0.2)
    assert "value" not in results
    lease_a.release()
    _join(threads)

    assert results["value"] == ("value", "b", 2)
    assert results["waited"] >= 0.2
    assert results["waited"] < 4.0
    assert cache.keys() == ["b"]


def test_cache_freed_slot_serves_waiting_miss():
    # Both misses wait while "a" is pinned. Releasing "a" frees one slot, so one of them must be
    # built right away instead of both waiting until their wait_timeout.
    cache = _cache(RecordingFactory(), max_entries=1, wait_timeout=1.5)
    lease_a = cache.acquire("a")
    finished = {}

    def acquire(key):
        try:
            lease = cache.acquire(key)
        except CacheFullError:
            finished[key] = ("full", time.monotonic())
            return
        finished[key] = ("built", time.monotonic())
        time.sleep(0.1)
        lease.release()

    threads = _run_threads([lambda: acquire("b"), lambda: acquire("c")])
    time.sleep(0.2)
    released_at = time.monotonic()
    lease_a.release()
    _join(threads)

    built_times = [at for outcome, at in finished.values() if outcome == "built"]
    assert built_times, f"no waiting acquire was built: {finished}"
    assert min(built_times) - released_at < 1.0


# Leases and pins


def test_cache_counts_pins():
    cache = _cache(RecordingFactory())
    first = cache.acquire("a")
    second = cache.acquire("a")

    assert cache.pins("a") == 2
    first.release()
    assert cache.pins("a") == 1
    second.release()
    assert cache.pins("a") == 0
    assert cache.pins("absent") == 0


def test_lease_release_twice_is_harmless():
    cache = _cache(RecordingFactory())
    first = cache.acquire("a")
    second = cache.acquire("a")

    first.release()
    first.release()

    assert cache.pins("a") == 1
    second.release()
    assert cache.pins("a") == 0


def test_lease_context_manager_releases():
    cache = _cache(RecordingFactory())

    with cache.acquire("a") as lease:
        assert cache.pins("a") == 1
        assert lease.key == "a"

    assert cache.pins("a") == 0


def test_cache_released_entry_becomes_evictable():
    evicted = []
    cache = _cache(RecordingFactory(), max_entries=1, wait_timeout=0.2, on_evict=evicted.append)
    lease = cache.acquire("a")
    lease.release()

    _touch(cache, "b")

    assert evicted == ["a"]


# Single-flight builds


def test_cache_single_flight_builds_once():
    factory = RecordingFactory(delay=0.2)
    cache = _cache(factory, max_entries=3)
    barrier = threading.Barrier(16)
    leases = [None] * 16

    def acquire(index):
        barrier.wait()
        leases[index] = cache.acquire("a")

    threads = _run_threads([lambda index=index: acquire(index) for index in range(16)])
    _join(threads)

    assert factory.keys_built() == ["a"]
    assert all(lease is not None for lease in leases)
    first_value = leases[0].value
    for lease in leases:
        assert lease.value is first_value
    assert sum(1 for lease in leases if not lease.hit) == 1
    assert cache.pins("a") == 16
    assert cache.builds == 1
    for lease in leases:
        lease.release()
    assert cache.pins("a") == 0


def test_cache_failed_build_reaches_waiters():
    factory = RecordingFactory(delay=0.2, fail_keys=("a",))
    cache = _cache(factory, max_entries=3)
    barrier = threading.Barrier(8)
    errors = [None] * 8

    def acquire(index):
        barrier.wait()
        try:
            cache.acquire("a")
        except RuntimeError as error:
            errors[index] = error

    threads = _run_threads([lambda index=index: acquire(index) for index in range(8)])
    _join(threads)

    assert factory.keys_built() == ["a"]
    for error in errors:
        assert isinstance(error, RuntimeError)
        assert "build of a failed" in str(error)
    assert cache.keys() == []
    assert len(cache) == 0
    assert cache.builds == 0


def test_cache_retries_after_failed_build():
    factory = RecordingFactory(fail_keys=("a",))
    cache = _cache(factory)
    with pytest.raises(RuntimeError):
        cache.acquire("a")
    factory.fail_keys.clear()

    lease = cache.acquire("a")

    assert lease.hit is False
    assert factory.keys_built() == ["a", "a"]
    assert cache.keys() == ["a"]
    lease.release()


def test_cache_failed_build_frees_its_reservation():
    factory = RecordingFactory(fail_keys=("a",))
    cache = _cache(factory, max_entries=1, wait_timeout=0.2)
    with pytest.raises(RuntimeError):
        cache.acquire("a")

    lease = cache.acquire("b")

    assert lease.value == ("value", "b", 2)
    lease.release()


def test_cache_serves_hits_while_other_key_builds():
    factory = RecordingFactory()
    cache = _cache(factory, max_entries=3)
    _touch(cache, "a")
    factory.delay = 0.5
    builder = _run_threads([lambda: cache.acquire("b").release()])
    time.sleep(0.1)

    started = time.monotonic()
    cache.acquire("a").release()
    hit_seconds = time.monotonic() - started
    _join(builder)

    assert hit_seconds < 0.3


def test_cache_follower_of_slow_build_gets_value():
    # The cache has room for both entries, so a follower of a build that outlasts wait_timeout is
    # waiting for that build, not for room, and should receive its value.
    factory = RecordingFactory(delay=0.4)
    cache = _cache(factory, max_entries=3, wait_timeout=0.1)
    results = {}

    def acquire(name):
        try:
            lease = cache.acquire("a")
        except CacheFullError as error:
            results[name] = error
            return
        results[name] = lease.value
        lease.release()

    leader = _run_threads([lambda: acquire("leader")])
    time.sleep(0.1)
    follower = _run_threads([lambda: acquire("follower")])
    _join(leader + follower)

    assert results["leader"] == ("value", "a", 1)
    assert results["follower"] == ("value", "a", 1)
    assert factory.keys_built() == ["a"]
