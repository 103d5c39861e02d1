"""Node channel at scale: N simulated agents against the real stack, N = 10, 50, 200.

Prints per N: time to connect all (register -> welcome), heartbeat sent -> stored
latency p50/p95 (stored lastHeartbeatAt minus send time), command round trip through the REST
API (send -> ack -> result) p50/p95, and controller memory per connected node (unique
memory of all Ray processes, minus the same before any node connected). The baseline
for the round trip is `GET /api/health` through the same ingress in the same run.
Run: `python -m bench.nodes` (about 5 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.stack import make_nodes, running_stack


def ray_memory() -> int:
    """Unique memory (bytes) of every Ray process on this machine except this driver."""
    total = 0
    for p in psutil.process_iter(["cmdline", "pid"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["pid"] == os.getpid() or "ray" not in cmd or "bench." in cmd:
                continue
            total += p.memory_full_info().uss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(client: httpx.Client, method: str, url: str, errors: list[str], **kw: Any) -> float:
    started = time.perf_counter()
    r = client.request(method, url, **kw)
    if r.status_code != 200:
        errors.append(f"{r.status_code} {r.text[:200]}")
    return (time.perf_counter() - started) * 1000


def run_round(n: int, nodes: list[dict], api: httpx.Client, url: str, settings: Any,
              baseline: int, workdir: Path) -> dict[str, Any]:
    spec = workdir / f"nodes-{n}.json"
    spec.write_text(json.dumps(nodes[:n]))
    sim = subprocess.Popen(
        [sys.executable, "-m", "bench.sim_agents", "--url", url.replace("http", "ws") + "/ws/node",
         "--nodes", str(spec), "--mongo", settings.database_uri, "--db", settings.database_name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert sim.stdin is not None and sim.stdout is not None
    try:
        line = json.loads(sim.stdout.readline())
        if line["event"] != "connected":
            raise RuntimeError(f"simulated agents failed: {line}")
        time.sleep(3)
        sim.stdin.write("stats\n")
        sim.stdin.flush()
        sim.stdout.readline()  # discard the warm-up window
        time.sleep(10)
        sim.stdin.write("stats\n")
        sim.stdin.flush()
        beats = json.loads(sim.stdout.readline())
        errors: list[str] = []
        rtts = [timed(api, "POST", f"/nodes/{random.choice(nodes[:n])['nodeId']}/commands",
                      errors, json={"type": "system.healthCheck", "timeout": 10})
                for _ in range(100)]
        health = [timed(api, "GET", "/health", errors) for _ in range(100)]
        for e in errors[:3]:
            print(f"  N={n}: {e}", flush=True)
        memory = ray_memory()
        return {"n": n, "connect_s": line["seconds"], "hb_p50": beats["p50_ms"],
                "hb_p95": beats["p95_ms"], "hb_samples": beats["samples"],
                "rtt_p50": pct(rtts, 0.5), "rtt_p95": pct(rtts, 0.95),
                "health_p50": pct(health, 0.5), "health_p95": pct(health, 0.95),
                "errors": len(errors),
                "mem_per_node_mb": (memory - baseline) / n / 2**20}
    finally:
        sim.stdin.write("quit\n")
        sim.stdin.flush()
        try:
            sim.wait(30)
        except subprocess.TimeoutExpired:
            sim.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10,50,200")
    args = parser.parse_args()
    # SIGTERM runs the `finally` blocks too, so the bench's database never outlives it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp, running_stack(Path(tmp)) as stack:
        api = stack.api(timeout=60)
        nodes = make_nodes(api, max(sizes))
        baseline = ray_memory()
        rows = []
        for n in sizes:
            rows.append(run_round(n, nodes, api, stack.url, stack.settings, baseline, Path(tmp)))
            print(f"  N={n}: {rows[-1]}", flush=True)
    print(f"\nNode channel, {os.cpu_count()} CPUs, 1 s heartbeats; ingress: {stack.ingress}")
    print(f"{'N':>4} {'connect s':>9} {'hb p50 ms':>9} {'hb p95 ms':>9} {'cmd p50 ms':>10} "
          f"{'cmd p95 ms':>10} {'health p50':>10} {'MB/node':>8} {'errors':>6}")
    for r in rows:
        print(f"{r['n']:>4} {r['connect_s']:>9.1f} {r['hb_p50']:>9.1f} {r['hb_p95']:>9.1f} "
              f"{r['rtt_p50']:>10.1f} {r['rtt_p95']:>10.1f} {r['health_p50']:>10.1f} "
              f"{r['mem_per_node_mb']:>8.1f} {r['errors']:>6}")
    print("Targets: 200 nodes held with 1 s heartbeats; command round trip p95 < 20 ms at 50 "
          "nodes. 'health p50' is the baseline: GET /api/health through the same ingress.")


if __name__ == "__main__":
    main()
