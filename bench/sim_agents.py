"""N simulated node agents in one process: real WebSockets, asyncio, 1 s heartbeats.

Started by bench/nodes.py. Each agent registers, sends heartbeats, and answers every
command at once (ack, then result). Heartbeat latency is the stored ``lastHeartbeatAt``
(the controller's clock when it writes) minus the wall-clock time the agent sent that
heartbeat; the ``nodes`` collection is read every 200 ms to see the stored values. (A
change stream was tried first: on SecantusDB it cost a full core at 50 nodes.)
Reports JSON lines on stdout; reads ``stats`` (print percentiles, reset) and ``quit``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import defaultdict, deque
from typing import Any

from pymongo import AsyncMongoClient
from websockets.asyncio.client import ClientConnection, connect

from aiwm.protocol import make_frame

SENT: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=8))  # wall-clock sends
SEEN: dict[str, float] = {}
LATENCIES: list[float] = []


def say(**event: Any) -> None:
    print(json.dumps(event), flush=True)


async def agent(url: str, node_id: str, token: str, beat: float, ready: asyncio.Event,
                welcomed: list[float]) -> None:
    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                       open_timeout=300, max_size=None, ping_interval=None) as ws:
        await ws.send(json.dumps(make_frame("node.register", {
            "nodeId": node_id, "agentVersion": "sim", "hostname": f"sim-{node_id}",
            "cpuCores": 8, "ramTotal": 64 * 2**30, "heartbeatInterval": int(beat * 1000),
            "gpuDevices": [{"index": 0, "name": "Sim GPU", "memoryTotal": 2**34, "mock": True}]})))
        while json.loads(await ws.recv())["type"] != "session.welcome":
            pass
        welcomed.append(time.monotonic())
        await ready.wait()
        await asyncio.gather(heartbeats(ws, node_id, beat), answer(ws))


async def heartbeats(ws: ClientConnection, node_id: str, beat: float) -> None:
    while True:
        SENT[node_id].append(time.time())
        await ws.send(json.dumps(make_frame("telemetry.heartbeat", {"uptimeSeconds": 1})))
        await asyncio.sleep(beat)


async def answer(ws: ClientConnection) -> None:
    async for raw in ws:
        frame = json.loads(raw)
        if frame["type"].startswith(("system.", "deployment.", "model.")):
            await ws.send(json.dumps(make_frame("command.ack", correlation_id=frame["messageId"])))
            await ws.send(json.dumps(make_frame("command.result", {"success": True,
                                                                   "result": {"sim": True}},
                                                 correlation_id=frame["messageId"])))


async def watch(uri: str, db: str, org_id: str, node_ids: list[str]) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True)
    nodes = client[db]["nodes"]
    while True:
        await asyncio.sleep(0.2)
        query = {"orgId": org_id, "id": {"$in": node_ids}}  # the (orgId, id) index serves it
        async for doc in nodes.find(query, {"id": 1, "lastHeartbeatAt": 1}):
            stored = doc.get("lastHeartbeatAt")
            if stored is None:
                continue
            at = stored.timestamp()
            if SEEN.get(doc["id"]) == at:
                continue
            SEEN[doc["id"]] = at
            sends = [s for s in SENT.get(doc["id"], ()) if s <= at + 0.002]
            if sends:
                LATENCIES.append(at - sends[-1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def control() -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line == "stats":
            say(event="stats", samples=len(LATENCIES), p50_ms=pct(LATENCIES, 0.5) * 1000,
                p95_ms=pct(LATENCIES, 0.95) * 1000)
            LATENCIES.clear()
        elif line in ("quit", ""):
            return


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--nodes", required=True, help="JSON file: [{nodeId, token}]")
    parser.add_argument("--mongo", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--beat", type=float, default=1.0)
    parser.add_argument("--org", default="bench")
    args = parser.parse_args()
    nodes = json.load(open(args.nodes))
    ready = asyncio.Event()
    welcomed: list[float] = []
    watcher = asyncio.create_task(watch(args.mongo, args.db, args.org,
                                        [n["nodeId"] for n in nodes]))
    started = time.monotonic()
    tasks = [asyncio.create_task(agent(args.url, n["nodeId"], n["token"], args.beat, ready,
                                       welcomed)) for n in nodes]
    while len(welcomed) < len(nodes):
        failed = [t for t in tasks if t.done()]
        if failed:
            say(event="failed", error=repr(failed[0].exception()))
            return
        await asyncio.sleep(0.05)
    say(event="connected", n=len(nodes), seconds=max(welcomed) - started)
    ready.set()
    await control()
    watcher.cancel()
    for t in tasks:
        t.cancel()


if __name__ == "__main__":
    asyncio.run(main())
