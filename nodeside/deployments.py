"""The ``deployment.*`` commands: start, adopt, stop and query model servers, and tell the
controller about each lifecycle change with ``deployment.status`` frames.

The runtimes (:mod:`nodeside.runtimes`) do the starting and stopping; this module decides
when a server counts as started (it answers HTTP on its host port), what a failure is
called, and which status to report. Operations on one deployment run one at a time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from aiwm.protocol import DeploymentRefData, DeploymentSpecData, HttpRequestData, LogsRequestData
from nodeside.handlers import CommandFailed, Emit, parse
from nodeside.models import complete, model_subdir
from nodeside.runtimes import RUNNING, Instance, Runtime, spec_digest

log = logging.getLogger("aiwm.node.deployments")
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
START_LOG_LINES = 30
# When a running server dies, its last lines go to the controller (deployment.logs).
EXIT_LOG_LINES = 50
EXIT_LOG_LINE_CHARS = 2000
EXIT_LOG_BYTES = 64 * 1024
# Headers that describe one hop, not the message: the agent's own client sets its own.
HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
                         "upgrade", "trailer", "host", "content-length"})


class DeploymentHandlers:
    def __init__(self, *, runtimes: Mapping[str, Runtime], model_dir: Path, advertise_host: str,
                 emit: Emit, start_timeout: float = 60.0, probe_interval: float = 0.1,
                 http: httpx.AsyncClient | None = None) -> None:
        self.runtimes = dict(runtimes)
        self.model_dir = model_dir
        self.advertise_host = advertise_host
        self.emit = emit
        self.start_timeout = start_timeout
        self.probe_interval = probe_interval
        self._http = http
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._known: dict[str, tuple[str, str]] = {}  # deployment -> (runtime, status reported)
        self._upstreams: dict[str, str] = {}  # deployment -> its server's base URL, from here

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            # trust_env off: a proxy from the environment must not sit between the agent and
            # a server on its own host.
            self._http = httpx.AsyncClient(trust_env=False, follow_redirects=False)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    def _runtime(self, name: str) -> Runtime:
        runtime = self.runtimes.get(name)
        if runtime is None:
            raise CommandFailed("invalid_spec", f"this node has no {name} runtime")
        return runtime

    async def _locate(self, deployment_id: str) -> tuple[Runtime, Instance] | None:
        for runtime in self.runtimes.values():
            if runtime.present():
                found = await runtime.find(deployment_id)
                if found is not None:
                    return runtime, found
        return None

    def _result(self, instance: Instance, *, adopted: bool) -> dict[str, Any]:
        ref: dict[str, Any] = {"containerId": instance.container_id} \
            if instance.runtime == "docker" else {"pid": instance.pid}
        return {"deploymentId": instance.deployment_id, "runtime": instance.runtime, **ref,
                "hostPort": instance.host_port, "endpoint": self._endpoint(instance),
                "adopted": adopted}

    def _endpoint(self, instance: Instance) -> str:
        return f"http://{self.advertise_host}:{instance.host_port}"

    async def _status(self, deployment_id: str, runtime: str, status: str, *,
                      message: str | None = None, endpoint: str | None = None) -> None:
        self._known[deployment_id] = (runtime, status)
        self._upstreams.pop(deployment_id, None)  # a change may move it to another port
        data = {"deploymentId": deployment_id, "status": status, "message": message,
                "endpoint": endpoint}
        await self.emit("deployment.status", {k: v for k, v in data.items() if v is not None})

    # --- commands ----------------------------------------------------------------------

    async def create(self, data: dict[str, Any]) -> dict[str, Any]:
        spec = parse(DeploymentSpecData, data)
        runtime = self._runtime(spec.runtime)
        async with self._locks[spec.deploymentId]:
            existing = await runtime.find(spec.deploymentId)
            changed = existing is not None and existing.spec_digest is not None \
                and existing.spec_digest != spec_digest(spec)
            if existing is not None and existing.running and existing.host_port and not changed:
                # Adopted, e.g. after an agent restart in the middle of this very command:
                # it may still be starting, so it answers only once it is ready.
                try:
                    existing = await self._wait_ready(runtime, spec, existing)
                except asyncio.CancelledError:
                    await self._remove_cancelled(runtime, spec.deploymentId)
                    raise
                self._known[spec.deploymentId] = (runtime.name, RUNNING)
                return self._result(existing, adopted=True)
            if existing is not None:  # exited, or started from another spec: start afresh
                if changed:
                    log.info("deployment %s runs from another spec (a new image, command or "
                             "model version): replacing its server", spec.deploymentId)
                await runtime.remove(spec.deploymentId)
            return await self._start(runtime, spec)

    async def restart(self, data: dict[str, Any]) -> dict[str, Any]:
        """Replace the server with one started from this spec (which may differ from the
        old one, even in runtime)."""
        spec = parse(DeploymentSpecData, data)
        runtime = self._runtime(spec.runtime)
        async with self._locks[spec.deploymentId]:
            for other in self.runtimes.values():
                if other is runtime or other.present():
                    await other.remove(spec.deploymentId)
            return await self._start(runtime, spec)

    async def model_dirs_in_use(self) -> set[Path]:
        """The model folders this node's servers were given, whatever their state, as long
        as a runtime still has them (a stopped container keeps its folder in use: it can
        be started again). ``docker_unavailable`` if Docker cannot be asked."""
        used = set()
        for runtime in self.runtimes.values():
            if runtime.present():
                used |= {Path(i.model_dir) for i in await runtime.list() if i.model_dir}
        return used

    async def _start(self, runtime: Runtime, spec: DeploymentSpecData) -> dict[str, Any]:
        model_dir = model_subdir(self.model_dir, spec.modelId, spec.modelVersion) \
            if spec.modelId else None
        if model_dir is not None and spec.modelVersion is not None and not complete(model_dir):
            why = "its download did not finish" if model_dir.is_dir() else f"no {model_dir}"
            raise CommandFailed("model_missing", (
                f"version {spec.modelVersion} of model {spec.modelId} is not on this node "
                f"({why}): deploy it again to download it"))
        if model_dir is not None and not model_dir.is_dir():
            # Mounting a missing dir would make Docker create it as root; an empty one is
            # harmless and the server's own error says what is missing.
            log.warning("model %s is not on this node yet; %s starts without it",
                        spec.modelId, spec.deploymentId)
            model_dir.mkdir(parents=True, exist_ok=True)
        await self._status(spec.deploymentId, runtime.name, "starting")
        try:
            instance = await runtime.start(spec, model_dir=model_dir)
            instance = await self._wait_ready(runtime, spec, instance)
        except CommandFailed as e:
            await self._status(spec.deploymentId, runtime.name, "failed", message=e.message)
            self._known.pop(spec.deploymentId, None)  # nothing left to watch
            raise
        except asyncio.CancelledError:
            # The controller cancelled the command (its execution was cancelled): a server
            # half-started for it must not stay behind, running unrouted and unwatched.
            await self._remove_cancelled(runtime, spec.deploymentId)
            raise
        await self._status(spec.deploymentId, runtime.name, RUNNING,
                           endpoint=self._endpoint(instance))
        return self._result(instance, adopted=False)

    async def _remove_cancelled(self, runtime: Runtime, deployment_id: str) -> None:
        """Remove what a cancelled start left (shielded: a second cancel cannot cut the
        cleanup short), and say so."""
        async def remove() -> None:
            await runtime.remove(deployment_id)
            await self._status(deployment_id, runtime.name, "stopped",
                               message="cancelled while starting")
            self._known.pop(deployment_id, None)  # nothing left to watch

        log.info("%s: start cancelled; removing what was started", deployment_id)
        await asyncio.shield(asyncio.ensure_future(remove()))

    async def _wait_ready(self, runtime: Runtime, spec: DeploymentSpecData,
                          instance: Instance) -> Instance:
        """Until the server answers HTTP on its host port. Any answer counts (a server may
        say 503 while it loads): with Docker's port proxy a bare TCP connect succeeds even
        before the server listens, so TCP alone proves nothing."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            if instance.host_port and await self._answers(runtime, instance.host_port,
                                                          spec.healthPath):
                return instance
            current = await runtime.find(spec.deploymentId)
            # A restart count above 0 means Docker already brought it back after a crash.
            if current is None or not current.running or current.restart_count > 0:
                status = current.status if current is not None else "gone"
                raise await self._start_failed(runtime, spec.deploymentId,
                                               f"the server exited while starting ({status})")
            instance = current
            if time.monotonic() > deadline:
                raise await self._start_failed(
                    runtime, spec.deploymentId,
                    f"the server did not accept connections within {self.start_timeout:g}s")
            await asyncio.sleep(self.probe_interval)

    async def _start_failed(self, runtime: Runtime, deployment_id: str, why: str) -> CommandFailed:
        lines = await runtime.logs(deployment_id, START_LOG_LINES) or []
        await runtime.remove(deployment_id)  # do not leave a crash loop behind
        tail = "\n".join(lines) if lines else "(no output)"
        return CommandFailed("start_failed", f"{why}; last log lines:\n{tail}")

    async def _answers(self, runtime: Runtime, port: int, path: str) -> bool:
        try:
            await self._client().get(f"http://{runtime.local_host}:{port}{path}", timeout=2.0)
            return True
        except httpx.HTTPError:
            return False

    async def stop(self, data: dict[str, Any]) -> dict[str, Any]:
        ref = parse(DeploymentRefData, data)
        async with self._locks[ref.deploymentId]:
            found: Instance | None = None
            for runtime in self.runtimes.values():
                if runtime.present():
                    found = await runtime.remove(ref.deploymentId) or found
            if found is not None:
                await self._status(ref.deploymentId, found.runtime, "stopped")
                self._known.pop(ref.deploymentId, None)
        return {"deploymentId": ref.deploymentId, "found": found is not None,
                "stopped": found is not None and found.running}

    async def get_logs(self, data: dict[str, Any]) -> dict[str, Any]:
        request = parse(LogsRequestData, data)
        located = await self._locate(request.deploymentId)
        lines = await located[0].logs(request.deploymentId, request.tail) if located else None
        if lines is None:
            raise CommandFailed("not_found", f"no deployment {request.deploymentId} on this node")
        return {"deploymentId": request.deploymentId, "lines": lines}

    async def get_stats(self, data: dict[str, Any]) -> dict[str, Any]:
        ref = parse(DeploymentRefData, data)
        located = await self._locate(ref.deploymentId)
        usage = await located[0].stats(ref.deploymentId) if located else None
        if located is None or usage is None:
            raise CommandFailed("not_found", f"no deployment {ref.deploymentId} on this node")
        instance = located[1]
        return {"deploymentId": ref.deploymentId, "status": instance.status,
                "cpuPercent": usage["cpuPercent"], "memoryBytes": usage["memoryBytes"],
                "startedAt": instance.started_at, "restartCount": instance.restart_count}

    async def _upstream(self, deployment_id: str, *, fresh: bool) -> str:
        """``http://host:port`` of a running deployment. Remembered, so that the gateway's
        requests do not each ask Docker; a failed connect asks again (``fresh``)."""
        if not fresh and deployment_id in self._upstreams:
            return self._upstreams[deployment_id]
        self._upstreams.pop(deployment_id, None)
        located = await self._locate(deployment_id)
        if located is None:
            raise CommandFailed("not_found", f"no deployment {deployment_id} on this node")
        runtime, instance = located
        if not instance.running or not instance.host_port:
            raise CommandFailed("upstream_unreachable",
                                f"deployment {deployment_id} is {instance.status}")
        self._upstreams[deployment_id] = f"http://{runtime.local_host}:{instance.host_port}"
        return self._upstreams[deployment_id]

    async def request(self, data: dict[str, Any]) -> dict[str, Any]:
        request = parse(HttpRequestData, data)
        try:
            body = base64.b64decode(request.body, validate=True)
        except binascii.Error:
            raise CommandFailed("invalid_spec", "body is not valid base64") from None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        # The body goes back as sent, and the gateway drops Content-Encoding: ask for none
        # (httpx would otherwise ask for gzip by itself).
        headers = {k: v for k, v in headers.items() if k.lower() != "accept-encoding"}
        headers["Accept-Encoding"] = "identity"
        remembered = request.deploymentId in self._upstreams
        try:
            async with asyncio.timeout(request.timeout):  # httpx's timeouts are per read
                try:
                    return await self._forward(request, await self._upstream(
                        request.deploymentId, fresh=False), headers, body)
                except httpx.ConnectError:
                    if not remembered:
                        raise
                    # Restarted elsewhere (new port) since we remembered it: look again.
                    return await self._forward(request, await self._upstream(
                        request.deploymentId, fresh=True), headers, body)
        except (TimeoutError, httpx.TimeoutException):
            raise CommandFailed("upstream_timeout",
                                f"no answer within {request.timeout:g}s") from None
        except httpx.HTTPError as e:
            raise CommandFailed("upstream_unreachable", f"{type(e).__name__}: {e}") from None

    async def _forward(self, request: HttpRequestData, upstream: str, headers: dict[str, str],
                       body: bytes) -> dict[str, Any]:
        async with self._client().stream(request.method, upstream + request.path, headers=headers,
                                         content=body, timeout=request.timeout) as response:
            received = bytearray()
            async for chunk in response.aiter_raw():  # as sent: the headers still fit it
                received += chunk
                if len(received) > MAX_RESPONSE_BYTES:
                    raise CommandFailed("response_too_large",
                                        f"the response is over {MAX_RESPONSE_BYTES} bytes")
        return {"status": response.status_code,
                "headers": {k: v for k, v in response.headers.items()
                            if k.lower() not in HOP_HEADERS},
                "body": base64.b64encode(bytes(received)).decode()}

    # --- watching ----------------------------------------------------------------------

    async def check(self) -> None:
        """Report every deployment whose status differs from the last one reported: one
        that died (``exited``), came back (``running``) or was removed behind the agent's
        back (``stopped``). Deployments with an operation in progress report themselves."""
        listed: dict[str, Instance] = {}
        answered: set[str] = set()
        for runtime in self.runtimes.values():
            if not runtime.present():
                continue
            try:
                instances = await runtime.list()
            except Exception as e:  # Docker down for a moment: judge its ones later
                log.debug("cannot list %s deployments: %s", runtime.name, e)
                continue
            answered.add(runtime.name)
            listed.update({i.deployment_id: i for i in instances})
        for deployment_id, instance in listed.items():
            status = RUNNING if instance.running else "exited"
            before = self._known.get(deployment_id)
            if self._locks[deployment_id].locked() or before == (instance.runtime, status):
                continue
            if before == (instance.runtime, RUNNING) and not instance.running:
                await self._last_words(deployment_id)
            await self._status(
                deployment_id, instance.runtime, status,
                message=None if instance.running else f"the server is {instance.status}",
                endpoint=self._endpoint(instance) if instance.running else None)
        for deployment_id, (runtime_name, _) in list(self._known.items()):
            if deployment_id not in listed and runtime_name in answered \
                    and not self._locks[deployment_id].locked():
                await self._status(deployment_id, runtime_name, "stopped",
                                   message="removed outside the agent")
                self._known.pop(deployment_id, None)

    async def _last_words(self, deployment_id: str) -> None:
        """A server this agent saw running has died: send its last log lines as a
        ``deployment.logs`` frame (the controller keeps it as an event of the node), so
        why it died is on record even after the server is removed. Best effort."""
        runtime_name = self._known[deployment_id][0]
        try:
            lines = await self._runtime(runtime_name).logs(deployment_id, EXIT_LOG_LINES)
        except Exception as e:  # noqa: BLE001 - Docker gone too, say: the status still goes
            log.debug("no last log lines of %s: %s", deployment_id, e)
            return
        if not lines:
            return
        lines = [line[:EXIT_LOG_LINE_CHARS] for line in lines[-EXIT_LOG_LINES:]]
        while len(lines) > 1 and sum(map(len, lines)) > EXIT_LOG_BYTES:
            lines.pop(0)  # the newest lines matter most
        await self.emit("deployment.logs", {"deploymentId": deployment_id, "lines": lines,
                                            "reason": "exited"})

    async def announce(self) -> None:
        """Report every deployment's status afresh (on a new connection). Never fails: the
        session it starts matters more than these frames."""
        self._known.clear()
        try:
            await self.check()
        except Exception:
            log.exception("reporting the deployments' status failed")

    async def watch(self, interval: float) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # a bug must not end the watching
                log.exception("checking deployments failed")
            await asyncio.sleep(interval)

    async def telemetry_entries(self) -> list[dict[str, Any]]:
        """The metrics report's ``containers`` entries of deployments that are no Docker
        containers (telemetry lists those itself)."""
        entries = []
        for runtime in self.runtimes.values():
            if runtime.name == "docker" or not runtime.present():
                continue
            for i in await runtime.list():
                entries.append({"id": f"pid-{i.pid}", "name": i.name or i.deployment_id,
                                "status": i.status, "deploymentId": i.deployment_id})
        return entries
