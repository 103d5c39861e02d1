"""The read side's pure parts: read coalescing, the page cache, JSON merge patch."""

from __future__ import annotations

import asyncio

import pytest

from aiwm.catalog import PageCache, to_json
from aiwm.coalesce import Coalescer
from aiwm.models import merge_patch


class Source:
    """A value that changes on demand; each read is an event the test releases."""

    def __init__(self) -> None:
        self.value = 0
        self.started: list[int] = []  # the value current when each read began
        self.gate = asyncio.Event()

    async def read(self) -> int:
        self.started.append(self.value)
        await self.gate.wait()
        self.gate.clear()
        return self.started[-1]


async def test_callers_waiting_together_share_one_read() -> None:
    src, c = Source(), Coalescer[int]()
    first = asyncio.create_task(c.run("k", src.read))
    while not src.started:  # the first read is now in flight
        await asyncio.sleep(0)
    later = [asyncio.create_task(c.run("k", src.read)) for _ in range(5)]
    await asyncio.sleep(0)
    src.gate.set()
    while len(src.started) < 2:
        await asyncio.sleep(0)
    src.gate.set()
    results = await asyncio.gather(first, *later)
    assert results == [0] * 6
    assert len(src.started) == 2  # six callers, two reads
    assert len(c) == 0  # no state is kept once idle


async def test_a_caller_never_gets_a_read_that_began_before_it_arrived() -> None:
    src, c = Source(), Coalescer[int]()
    early = asyncio.create_task(c.run("k", src.read))
    while not src.started:  # the first read is now in flight
        await asyncio.sleep(0)
    src.value = 1  # a write is acknowledged while the first read is in flight...
    late = asyncio.create_task(c.run("k", src.read))  # ...then this caller arrives
    await asyncio.sleep(0)
    src.gate.set()
    assert await early == 0
    while len(src.started) < 2:
        await asyncio.sleep(0)
    src.gate.set()
    assert await late == 1


async def test_errors_reach_every_caller_of_that_read_and_the_next_read_is_fresh() -> None:
    c = Coalescer[int]()
    calls = 0

    async def failing() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        raise ConnectionError("db down")

    results = await asyncio.gather(*(c.run("k", failing) for _ in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)

    async def ok() -> int:
        return 7

    assert await c.run("k", ok) == 7


@pytest.mark.parametrize("in_flight", [False, True])
async def test_a_cancelled_read_leaves_no_caller_waiting(in_flight: bool) -> None:
    src, c = Source(), Coalescer[int]()
    waiter = asyncio.create_task(c.run("k", src.read))
    await asyncio.sleep(0)
    if in_flight:
        while not src.started:
            await asyncio.sleep(0)
    slot_task = c._slots["k"].task
    assert slot_task is not None
    slot_task.cancel()
    with pytest.raises(RuntimeError, match="cancelled"):
        await asyncio.wait_for(waiter, 1)
    assert len(c) == 0


def test_page_cache_serves_only_matching_stamps() -> None:
    cache = PageCache()
    cache.put("k", (1, 4), b"page")
    assert cache.get("k", (1, 4)) == b"page"
    assert cache.get("k", (2, 4)) is None
    assert cache.get("other", (1, 4)) is None


def test_page_cache_pages_expire() -> None:
    now = [100.0]
    cache = PageCache(max_age=30, clock=lambda: now[0])
    cache.put("k", (1,), b"page")
    now[0] += 30
    assert cache.get("k", (1,)) == b"page"
    now[0] += 0.5
    assert cache.get("k", (1,)) is None


def test_page_cache_stays_within_its_byte_budget() -> None:
    cache = PageCache(max_bytes=100)
    for i in range(10):
        cache.put(f"k{i}", (1,), bytes(20))
    assert len(cache) == 5  # the oldest were evicted
    assert cache.get("k0", (1,)) is None and cache.get("k9", (1,)) is not None
    cache.put("huge", (1,), bytes(60))  # over a quarter of the budget: never cached
    assert cache.get("huge", (1,)) is None


def test_to_json_writes_times_as_the_response_models_do() -> None:
    import datetime as dt

    when = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
    assert to_json({"t": when, "n": None}) == b'{"t":"2026-01-02T03:04:05.678000Z","n":null}'
    with pytest.raises(TypeError):
        to_json({"x": object()})


@pytest.mark.parametrize(("target", "patch", "result"), [
    ({"a": 1, "b": {"c": 1, "d": 2}}, {"b": {"d": 3}}, {"a": 1, "b": {"c": 1, "d": 3}}),
    ({"a": 1, "b": 2}, {"a": None}, {"b": 2}),
    ({"b": {"c": 1}}, {"b": {"c": None}}, {"b": {}}),
    ({"a": [1, 2]}, {"a": [3]}, {"a": [3]}),
    ({"a": "x"}, {"a": {"q": None, "r": 1}}, {"a": {"r": 1}}),
    ({}, {"new": {"q": None}}, {"new": {}}),
])
def test_merge_patch_follows_rfc_7396(target: dict, patch: dict, result: dict) -> None:
    before = repr(target)
    assert merge_patch(target, patch) == result
    assert repr(target) == before  # the input is not modified
