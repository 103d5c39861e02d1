"""How fast one API replica's web server can read a request body, and what two of AIWM's
process settings do to that.

A uvicorn server (httptools, uvloop, as in a Ray Serve replica) runs an ASGI app that
reads each request body and throws it away; an httpx client POSTs a ``--size-mb`` MB body
streamed from a file, ``--repeat`` times per variant, the variants interleaved:

- ``glibc defaults``: the baseline, uvicorn as it comes (``AIWM_MALLOC_TUNE=off``);
- ``tune_malloc``: :func:`aiwm.memory.tune_malloc` applied at start, as the API replicas
  and the node agent do;
- ``+ BodyPieces``: also :func:`serve.ingress.fewer_body_copies`, as the replicas do.

Each row gives the median MB/s and the server process's CPU-seconds per GB read (from
/proc). Run: `python -m bench.receive` (about a minute).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

MB = 10**6
ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # name -> (environment, the setup code the server runs first)
    "glibc defaults": ({"AIWM_MALLOC_TUNE": "off"}, ""),
    "tune_malloc": ({}, "from aiwm.memory import tune_malloc; assert tune_malloc()"),
    "+ BodyPieces": ({}, "from aiwm.memory import tune_malloc; assert tune_malloc()\n"
                         "from serve.ingress import fewer_body_copies; assert fewer_body_copies()"),
}
SERVER = textwrap.dedent("""
    import sys, uvicorn
    {setup}

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        out = str(size).encode()
        await send({{"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(out)).encode())]}})
        await send({{"type": "http.response.body", "body": out}})

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http="httptools",
                loop="uvloop", log_level="warning")
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(name: str) -> tuple[subprocess.Popen[bytes], str]:
    env, setup = VARIANTS[name]
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "AIWM_MALLOC_TUNE")}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER.format(setup=setup), str(port)],
                            cwd=ROOT, env={**clean, **env, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}/"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the {name!r} server did not start") from None
            time.sleep(0.05)


def post(client: httpx.Client, url: str, source: Path) -> float:
    def body() -> object:
        with open(source, "rb") as f:
            while piece := f.read(2**20):
                yield piece

    size = source.stat().st_size
    started = time.perf_counter()
    r = client.post(url, content=body(), headers={"Content-Length": str(size)})
    seconds = time.perf_counter() - started
    if r.status_code != 200 or int(r.text) != size:
        raise RuntimeError(f"the server read {r.text[:50]!r} of {size} bytes")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    size = args.size_mb * MB
    servers = {name: start(name) for name in VARIANTS}
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, float] = dict.fromkeys(VARIANTS, 0.0)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-receive-") as tmp, \
                httpx.Client(timeout=httpx.Timeout(60, read=None)) as client:
            source = Path(tmp) / "body.bin"
            with open(source, "wb") as out:
                for _ in range(0, size, 4 * 2**20):
                    out.write(os.urandom(min(4 * 2**20, size - out.tell())))
            for _, url in servers.values():
                post(client, url, source)  # warm up: the first request pays for imports
            for _ in range(args.repeat):
                for name, (proc, url) in servers.items():
                    before = cpu_seconds(proc.pid)
                    seconds = post(client, url, source)
                    cpu[name] += cpu_seconds(proc.pid) - before
                    rates[name].append(size / MB / seconds)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
    base = statistics.median(rates["glibc defaults"])
    print(f"Reading a request body in uvicorn (httptools, uvloop), {size / MB:.0f} MB, "
          f"{args.repeat} run(s) each, {os.cpu_count()} CPUs")
    print(f"{'server':<16} {'median MB/s':>11} {'vs baseline':>11} {'server CPU-s/GB':>15}")
    for name in VARIANTS:
        median = statistics.median(rates[name])
        per_gb = cpu[name] / (args.repeat * size / 10**9)
        print(f"{name:<16} {median:>11.0f} {median / base:>11.0%} {per_gb:>15.2f}")
    print("(baseline: glibc defaults; the API replicas run with both settings)")


if __name__ == "__main__":
    main()
