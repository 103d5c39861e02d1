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
    __slots__ = ("next", "task")

    def __init__(self) -> None:
        self.next: asyncio.Future[T] | None = None
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
        return await asyncio.shield(waiter)

    async def _drain(self, key: Hashable, slot: _Slot[T], read: Callable[[], Awaitable[T]]) -> None:
        try:
            while slot.next is not None:
                batch, slot.next = slot.next, None  # later arrivals wait for the next read
                try:
                    batch.set_result(await read())
                except Exception as e:
                    batch.set_exception(e)
        finally:
            slot.task = None
            if slot.next is None:
                self._slots.pop(key, None)

    def __len__(self) -> int:
        return len(self._slots)
