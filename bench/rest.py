"""REST throughput: `GET /api/instructions` (20 documents) at 16 connections.

The same FastAPI app and handler are measured twice in one run, against one SecantusDB:
through Ray Serve (as `aiwm up` runs it) and served by plain uvicorn (the baseline).
Load comes from wrk (Debian package `wrk`). Run: `python -m bench.rest`.
Targets (issue 2): Serve at least 30% of plain's requests/s, Serve p99 under 50 ms.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from aiwm import embedded_db
from aiwm.auth import issue_token
from aiwm.settings import Settings, load_settings

DOCS = 20
CONNECTIONS = 16
PATH = "/api/instructions"


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(name: str, url: str, token: str, seconds: int) -> Result:
    cmd = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency",
           "-H", f"Authorization: Bearer {token}", url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    if socket_errors:
        print(f"  {name}: socket errors: {socket_errors.group(1)}")
    return Result(
        name=name,
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        p50_ms=_ms(pct["50"]),
        p99_ms=_ms(pct["99"]),
        errors=int(errors.group(1)) if errors else 0,
    )


def wait_green(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} never became healthy")


def seed(url: str, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    for i in range(DOCS):
        r = httpx.post(f"{url}/api/instructions", headers=headers, timeout=30, json={
            "name": f"bench-{i:02d}", "systemPrompt": "You are a careful assistant. " * 8,
            "guidelines": ["Cite sources", "Be brief"], "tags": ["bench"]})
        r.raise_for_status()


def env_for(settings: Settings) -> dict[str, str]:
    return {**os.environ, "AIWM_HOME": str(settings.aiwm_home),
            "AIWM_DB_PORT": str(settings.aiwm_db_port), "JWT_SECRET": settings.secret(),
            "AIWM_RATE_LIMIT": str(settings.aiwm_rate_limit)}


def run_plain(settings: Settings, token: str, seconds: int) -> Result:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "bench.plain_app:app", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        env=env_for(settings),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_green(url)
        seed(url, token)
        wrk("warm-up", url + PATH, token, 2)
        return wrk("plain uvicorn", url + PATH, token, seconds)
    finally:
        proc.terminate()
        proc.wait(10)


def run_serve(settings: Settings, token: str, seconds: int) -> tuple[Result, str]:
    from serve.ingress import ray_environment

    mode = ray_environment()
    import ray

    from serve.ingress import deploy

    ray.init(address="local", namespace="aiwm", include_dashboard=False, log_to_driver=False)
    try:
        settings.port = _free_port()
        deploy(settings)
        url = f"http://127.0.0.1:{settings.port}"
        wait_green(url)
        wrk("warm-up", url + PATH, token, 2)
        return wrk("Ray Serve", url + PATH, token, seconds), mode.describe()
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    # SIGTERM runs the `finally` blocks too, so the bench's database never outlives it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install -y wrk")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        db_port = _free_port()
        embedded_db.start(home, db_port)
        try:
            # One token drives the whole load: the per-token rate limit would measure itself.
            settings = load_settings(aiwm_home=home, aiwm_db_port=db_port, mongodb_uri=None,
                                     aiwm_rate_limit=0)
            token, _ = issue_token(secret=settings.secret(), sub="bench", org_id="bench",
                                   roles=["operator"], expires_in=3600)
            plain = run_plain(settings, token, args.seconds)
            serve, mode = run_serve(settings, token, args.seconds)
        finally:
            embedded_db.stop(home)
    print(f"\nGET {PATH} ({DOCS} documents), {CONNECTIONS} connections, {args.seconds} s each, "
          f"{os.cpu_count()} CPUs; Serve ingress: {mode}")
    print(f"{'path':<15} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
    for r in (plain, serve):
        print(f"{r.name:<15} {r.rps:>8.0f} {r.p50_ms:>8.1f} {r.p99_ms:>8.1f} {r.errors:>8}")
    ratio = serve.rps / plain.rps if plain.rps else 0.0
    print(f"Serve / plain: {ratio:.0%} (target >= 30%); Serve p99 {serve.p99_ms:.1f} ms "
          f"(target < 50 ms)")


if __name__ == "__main__":
    main()
