"""Read coalescing: callers that arrive while a read is in flight share the *next* read.

Each caller gets the result of a read that started after it arrived, so what it sees is
never older than its own arrival (a write acknowledged before then is visible). Under
load, one database round trip serves every caller that queued during the previous one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class _Slot(Generic[T]):
    __slots__ = ("current", "next", "task")

    def __init__(self) -> None:
        self.current: asyncio.Future[T] | None = None  # callers of the read in flight
        self.next: asyncio.Future[T] | None = None  # callers waiting for the next read
        self.task: asyncio.Task[None] | None = None


class Coalescer(Generic[T]):
    def __init__(self) -> None:
        self._slots: dict[Hashable, _Slot[T]] = {}

    async def run(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """The result of ``read()``, from a call that began after this one was made."""
        slot = self._slots.setdefault(key, _Slot())
        if slot.next is None:
            slot.next = asyncio.get_running_loop().create_future()
        waiter = slot.next
        if slot.task is None:
            slot.task = asyncio.create_task(self._drain(key, slot, read))
            slot.task.add_done_callback(lambda task: self._on_done(key, slot, task))
        return await asyncio.shield(waiter)

    async def _drain(self, key: Hashable, slot: _Slot[T], read: Callable[[], Awaitable[T]]) -> None:
        try:
            while slot.next is not None:
                # Callers arriving from now on wait for the next read, which starts later.
                batch = slot.current = slot.next
                slot.next = None
                try:
                    result = await read()
                except Exception as e:
                    batch.set_exception(e)
                else:
                    batch.set_result(result)
                slot.current = None
        finally:
            # No await between the loop's end and here: a caller either joined the last
            # batch or finds no task and starts one.
            slot.task = None
            if slot.next is None:
                self._slots.pop(key, None)

    def _on_done(self, key: Hashable, slot: _Slot[T], task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            return
        # Cancelled (perhaps before it ever ran): nobody may be left waiting forever.
        for waiting in (slot.current, slot.next):
            if waiting is not None and not waiting.done():
                waiting.set_exception(RuntimeError("read cancelled; retry"))
        slot.current = slot.next = None
        if slot.task is task:
            slot.task = None
        if self._slots.get(key) is slot:
            del self._slots[key]

    def __len__(self) -> int:
        return len(self._slots)
