"""serve.frame_batch.FrameBatcher against a fake NodeHost client (pure asyncio)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import serve.frame_batch as frame_batch
from aiwm.errors import AiwmError, Unavailable
from aiwm.settings import Settings


class FakeHost:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.batches: list[list[Any]] = []
        self.fail = fail
        self.gate = asyncio.Event()
        self.gate.set()

    async def call(self, method: str, items: list[Any]) -> list[dict[str, Any]]:
        assert method == "on_frames"
        self.batches.append(items)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [{"error": Unavailable("gone")} if frame.get("bad") else {"frames": [frame]}
                for _, _, _, frame in items]


@pytest.fixture()
def host(monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    fake = FakeHost()
    monkeypatch.setattr(frame_batch, "node_host_client", lambda settings, shard: fake)
    return fake


def _batcher() -> frame_batch.FrameBatcher:
    return frame_batch.FrameBatcher(Settings(node_proxy_shards=1))


async def test_frames_queued_together_go_in_one_call(host: FakeHost) -> None:
    batcher = _batcher()
    answers = [batcher.submit(f"n{i}", "o", "s", {"i": i}) for i in range(5)]
    assert [(await a)["frames"][0]["i"] for a in answers] == list(range(5))
    assert len(host.batches) == 1 and len(host.batches[0]) == 5


async def test_frames_gather_while_a_batch_is_in_flight(host: FakeHost) -> None:
    batcher = _batcher()
    host.gate.clear()
    first = batcher.submit("n", "o", "s", {"i": 0})
    await asyncio.sleep(0.01)  # the first batch is now waiting on the host
    later = [batcher.submit("n", "o", "s", {"i": i}) for i in (1, 2, 3)]
    host.gate.set()
    await asyncio.gather(first, *later)
    assert [len(b) for b in host.batches] == [1, 3]


async def test_errors_reach_every_waiter(host: FakeHost) -> None:
    batcher = _batcher()
    good, bad = batcher.submit("n", "o", "s", {"i": 1}), batcher.submit("n", "o", "s", {"bad": 1})
    assert (await good)["frames"] == [{"i": 1}]
    with pytest.raises(Unavailable, match="gone"):
        await bad
    host.fail = RuntimeError("boom")
    failed = [batcher.submit("n", "o", "s", {"i": i}) for i in range(3)]
    for f in failed:
        with pytest.raises(AiwmError, match="boom"):
            await f
    host.fail = None  # the batcher keeps working after a failed batch
    assert (await batcher.submit("n", "o", "s", {"i": 9}))["frames"] == [{"i": 9}]
