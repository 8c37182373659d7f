"""The warm pool follows demand (docs/sessions.md, "The warm pool"): requests
that find it empty wait for the next pooled kernel instead of starting a cold
one each, it grows while sessions are taken faster than it refills and
shrinks back to pool_size when idle, and it starts nothing while available
memory is low.  Real sandboxed kernels, in-process SessionManager; no preload
(the pool's behaviour, not pandas' import time, is under test)."""

from __future__ import annotations

import asyncio
import time

from broker.sessions import SessionManager


def manager(tmp_path, **kw) -> SessionManager:
    settings = dict(data_root=str(tmp_path / "s"), pool_size=1, pool_max_size=3, pool_preload="",
                    pool_refill_delay=0, pool_refill_parallel=2, cull_interval=0.2)
    settings.update(kw)
    m = SessionManager(**settings)
    m.restore()
    return m


async def until(cond, timeout=120.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not reached in time"
        await asyncio.sleep(0.05)


def test_burst_waits_for_pooled_kernels_then_the_pool_grows_and_shrinks_back(tmp_path):
    async def main():
        m = manager(tmp_path, pool_shrink_after=3600)
        m.start_background()
        try:
            await until(lambda: len(m._pool) == 1)
            sessions = await asyncio.gather(*(m.create("alice") for _ in range(3)))
            # One from the pool at once, two waited for the next pooled
            # kernels: none started a cold kernel of its own.
            assert m.pool_stats == {"from_pool": 1, "waited": 2, "cold": 0}, m.pool_stats
            assert len({s.id for s in sessions}) == 3
            for s in sessions:
                assert s.owner == "alice" and s.kernel is not None and await s.kernel.is_alive()
            # Two misses: the pool aims at 1 + 2 = 3 (pool_max_size) and fills to it.
            assert m._pool_target == 3
            await until(lambda: len(m._pool) == 3 and not m._pool_starting)
            # Nothing taken for pool_shrink_after: back to pool_size (the
            # surplus kernels stopped), and it stays there.
            m.pool_shrink_after = 0.5
            await until(lambda: len(m._pool) == 1)
            await asyncio.sleep(0.5)
            assert len(m._pool) == 1 and not m._pool_starting and m._pool_target == 1
            # The sessions handed out are untouched by the shrink.
            assert all(s.id in m.sessions for s in sessions)
        finally:
            await m.shutdown()

    asyncio.run(main())


def test_no_refill_while_memory_is_low_and_a_create_then_starts_its_own(tmp_path):
    async def main():
        m = manager(tmp_path, pool_min_available=1 << 50)   # more than any machine has available
        m.start_background()
        try:
            await asyncio.sleep(1.0)
            assert not m._pool and not m._pool_starting, "the pool started a kernel with memory low"
            s = await m.create("alice")
            assert m.pool_stats == {"from_pool": 0, "waited": 0, "cold": 1}, m.pool_stats
            assert await s.kernel.is_alive()
            await asyncio.sleep(0.5)
            assert not m._pool and not m._pool_starting
        finally:
            await m.shutdown()

    asyncio.run(main())
