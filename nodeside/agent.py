"""``aiwm-node``: the agent on a GPU host. It dials out to the controller's relay,
registers, reports heartbeats and metrics, and runs the commands it is sent.

It reconnects forever with jittered exponential backoff. A result is written to disk
before it is sent and deleted only when the controller acknowledges it, so neither a
dropped connection nor an agent restart loses one. Never imports Ray.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections import OrderedDict
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect

from aiwm import __version__
from aiwm.backoff import backoff_delay
from aiwm.logs import bound
from aiwm.logs import configure as configure_logging
from aiwm.memory import tune_malloc
from aiwm.protocol import (
    COMMANDS,
    CONTROLLER_TO_NODE,
    PROTOCOL_VERSION,
    ProtocolError,
    make_frame,
    parse_frame,
)
from nodeside import telemetry
from nodeside.config import AgentSettings
from nodeside.deployments import DeploymentHandlers
from nodeside.handlers import (
    CURRENT_COMMAND,
    CommandFailed,
    Commands,
    SystemHandlers,
    default_commands,
)
from nodeside.models import ModelHandlers, cache_summary
from nodeside.runtimes import Runtime
from nodeside.runtimes.docker import DockerRuntime
from nodeside.runtimes.process import ProcessRuntime
from nodeside.spool import Spool

log = logging.getLogger("aiwm.node")
DEFAULT_MAX_FRAME = 1024 * 1024  # WS_MAX_FRAME_BYTES's default, until the welcome says
FATAL_CLOSES = {4401: "unauthorized", 4403: "token for another node", 4410: "token revoked",
                4404: "node deleted"}


class Agent:
    def __init__(self, *, settings: AgentSettings, commands: Commands | None = None,
                 gpus: telemetry.Gpus | None = None) -> None:
        self.settings = settings
        self.gpus = gpus or telemetry.Gpus(mock=settings.gpu_mock_mode)
        self.spool = Spool(settings.aiwm_node_state_dir)
        self.deployments: DeploymentHandlers | None = None
        self.models: ModelHandlers | None = None
        if commands is None:
            self.deployments, self.models = self._deployment_handlers()
        self.commands = commands or default_commands(
            SystemHandlers(gpus=self.gpus, docker_socket=settings.docker_socket,
                           state_dir=str(settings.aiwm_node_state_dir),
                           restart=self._schedule_restart),
            deployments=self.deployments, models=self.models)
        self._running: dict[str, asyncio.Task[None]] = {}  # command id -> its task
        self._cancelled: set[str] = set()  # commands the controller asked to cancel
        self._completed: OrderedDict[str, None] = OrderedDict()  # results the controller has
        self._ws: ClientConnection | None = None  # the live connection, for late results
        self._restart_requested = False
        self.sessions = 0  # how many sessions were registered (for logs and tests)
        self.max_frame_bytes = DEFAULT_MAX_FRAME  # the controller says its limit at welcome

    def _deployment_handlers(self) -> tuple[DeploymentHandlers, ModelHandlers]:
        s = self.settings
        real_gpus = not self.gpus.mock and bool(self.gpus.devices())
        runtimes: dict[str, Runtime] = {
            "docker": DockerRuntime(socket_path=s.docker_socket, publish_host=s.aiwm_node_publish_host,
                                    real_gpus=lambda: real_gpus, stop_grace=s.aiwm_node_stop_grace),
            "process": ProcessRuntime(state_dir=s.aiwm_node_state_dir,
                                      stop_grace=s.aiwm_node_stop_grace),
        }
        deployments = DeploymentHandlers(
            runtimes=runtimes, model_dir=s.model_dir, emit=self.emit,
            advertise_host=s.advertise_host(telemetry._ip()),  # the IP it registers with
            start_timeout=s.aiwm_node_start_timeout)
        return deployments, ModelHandlers(root=s.model_dir, emit=self.emit,
                                          in_use=deployments.model_dirs_in_use,
                                          max_bytes=s.aiwm_node_model_cache_max)

    async def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Send a frame now if connected. Progress and status are lossy by design: without
        a connection the frame is dropped, and the next state reported replaces it."""
        live = self._ws
        if live is None:
            log.debug("not connected: dropped %s %s", kind, data)
            return
        try:
            await self._send(live, make_frame(kind, data))
        except websockets.ConnectionClosed:
            log.debug("connection closed: dropped %s", kind)

    # --- connection loop ---------------------------------------------------------------

    async def run_forever(self) -> None:
        watcher = asyncio.create_task(self._watch())
        try:
            await self._connect_forever()
        finally:
            watcher.cancel()

    async def _watch(self) -> None:
        if self.deployments is not None:
            await self.deployments.watch(self.settings.aiwm_node_watch_interval)

    async def _connect_forever(self) -> None:
        attempt = 0
        while True:
            registered_before = self.sessions
            try:
                async with connect(
                    self.settings.controller_url,
                    additional_headers={"Authorization":
                                        f"Bearer {self.settings.node_token.get_secret_value()}"},
                    open_timeout=10, max_size=16 * 1024 * 1024, ping_interval=20,
                ) as ws:
                    await self._session(ws)
            except websockets.ConnectionClosed as e:
                self._log_close(e.rcvd.code if e.rcvd else None, e.rcvd.reason if e.rcvd else "")
            except (OSError, TimeoutError, websockets.InvalidHandshake) as e:
                log.warning("cannot reach %s: %s", self.settings.controller_url, e)
            except Exception:  # a bug or a broken probe must not end the agent
                log.exception("session failed")
            finally:
                self._ws = None
            if self._restart_requested:
                self._exec_self()
            if self.sessions > registered_before:
                attempt = 0  # it worked for a while: start the backoff over
            delay = backoff_delay(attempt, cap=self.settings.aiwm_node_max_backoff)
            attempt += 1
            log.info("reconnecting in %.1fs (attempt %d)", delay, attempt)
            await asyncio.sleep(delay)

    def _log_close(self, code: int | None, reason: str) -> None:
        if code in FATAL_CLOSES:
            log.error("controller refused this node (%s, %s): %s; check NODE_TOKEN", code,
                      FATAL_CLOSES[code], reason)
        else:
            log.warning("connection closed (%s %s)", code, reason)

    async def _session(self, ws: ClientConnection) -> None:
        """One connection: register, then serve until it closes."""
        info = telemetry.system_info(hostname=self.settings.node_hostname, gpus=self.gpus,
                                     docker_socket=self.settings.docker_socket)
        await self._send(ws, make_frame("node.register", {
            "nodeId": self.settings.node_id, "name": self.settings.node_name,
            "protocolVersion": PROTOCOL_VERSION, "agentVersion": __version__,
            "heartbeatInterval": self.settings.heartbeat_interval,
            "metricsInterval": self.settings.metrics_interval, **info}))
        early: list[dict[str, Any]] = []  # anything before the welcome is handled after it
        while (welcome := await self._next(ws)) is None or welcome["type"] != "session.welcome":
            if welcome is not None and welcome["type"] == "error":
                log.error("registration refused: %s", welcome["data"])
            elif welcome is not None:
                early.append(welcome)
        self.sessions += 1
        self._ws = ws
        self.max_frame_bytes = int(welcome["data"].get("maxFrameBytes") or DEFAULT_MAX_FRAME)
        log.info("registered as %s (session %s)", self.settings.node_id,
                 welcome["data"].get("sessionId"))
        for frame in self.spool.pending():  # results the controller has not acknowledged
            await self._send(ws, frame)
        if self.deployments is not None:
            await self.deployments.announce()  # the controller may have missed changes
        beats = asyncio.create_task(self._every(ws, self.settings.heartbeat_interval, self._beat))
        reports = asyncio.create_task(self._every(ws, self.settings.metrics_interval,
                                                  self._report))
        try:
            for frame in early:
                await self._handle(ws, frame)
            while True:
                received = await self._next(ws)
                if received is not None:
                    await self._handle(ws, received)
        finally:
            beats.cancel()
            reports.cancel()

    async def _next(self, ws: ClientConnection) -> dict[str, Any] | None:
        raw = await ws.recv()
        try:
            return parse_frame(raw, allowed=CONTROLLER_TO_NODE).model_dump(mode="json")
        except ProtocolError as e:
            log.warning("bad frame from the controller (%s): %s", e.code, e.message)
            return None

    async def _send(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        await ws.send(json.dumps(frame, separators=(",", ":")))

    async def _every(self, ws: ClientConnection, interval_ms: int, job: Any) -> None:
        while True:
            try:
                await job(ws)
            except websockets.ConnectionClosed:
                return
            except Exception:  # e.g. NVML failing: report again next time
                log.exception("%s failed", getattr(job, "__name__", "job"))
            await asyncio.sleep(interval_ms / 1000)

    async def _beat(self, ws: ClientConnection) -> None:
        await self._send(ws, make_frame("telemetry.heartbeat", {
            "uptimeSeconds": telemetry.uptime_seconds(), "runningCommands": len(self._running)}))

    async def _report(self, ws: ClientConnection) -> None:
        data = await asyncio.to_thread(telemetry.metrics, gpus=self.gpus,
                                       docker_socket=self.settings.docker_socket)
        if self.deployments is not None:
            data["containers"] += await self.deployments.telemetry_entries()
        if self.models is not None:
            data.update(await asyncio.to_thread(cache_summary, self.models.root,
                                                self.models.max_bytes))
        await self._send(ws, make_frame("telemetry.metrics", data))

    # --- frames from the controller ------------------------------------------------------

    async def _handle(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "command.ack":
            done = self.spool.acknowledged(frame.get("correlationId") or "")
            if done is not None:
                self._completed[done] = None
                while len(self._completed) > 10_000:
                    self._completed.popitem(last=False)
        elif kind == "command.cancel":
            self._cancel(frame.get("correlationId") or "")
        elif kind == "error":
            log.warning("controller error %s: %s", frame["data"].get("code"),
                        frame["data"].get("message"))
        elif kind in COMMANDS:
            command_id = frame["messageId"]
            trace = frame.get("traceId")
            await self._send(ws, make_frame("command.ack", correlation_id=command_id,
                                            trace_id=trace))
            stored = self.spool.get(command_id)
            if stored is not None:  # sent again after a reconnect: we already have the answer
                await self._send(ws, stored)
            elif command_id in self._completed:
                pass  # the controller already has its result (the ack overtook this copy)
            elif command_id not in self._running:
                with bound(trace):  # the task, and all it logs, runs under the command's id
                    log.info("command %s received", kind, extra={"commandId": command_id})
                    self._running[command_id] = asyncio.create_task(self._run(ws, frame))

    def _cancel(self, command_id: str) -> None:
        task = self._running.get(command_id)
        if task is None or task.done():
            log.debug("cancel for %s: no such command running", command_id)
            return
        log.info("cancelling command %s", command_id)
        self._cancelled.add(command_id)
        task.cancel()

    async def _run(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        command_id = frame["messageId"]
        CURRENT_COMMAND.set(command_id)  # this task's own context: its handler's progress
        try:
            try:
                result = {"success": True, "result": await self.commands.run(frame["type"],
                                                                             frame["data"])}
            except asyncio.CancelledError:
                if command_id not in self._cancelled:
                    raise  # the agent itself is stopping
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()  # handled: the result below still has to go out
                result = {"success": False, "error": {
                    "code": "cancelled", "message": f"{frame['type']} cancelled by the controller"}}
            except CommandFailed as e:
                result = {"success": False, "error": {"code": e.code, "message": e.message}}
            except Exception as e:
                log.exception("command %s failed", frame["type"])
                result = {"success": False,
                          "error": {"code": "handler_error", "message": f"{type(e).__name__}: {e}"}}
            trace = frame.get("traceId")
            reply = make_frame("command.result", result, correlation_id=command_id,
                               trace_id=trace, resource=frame.get("resource"))
            size = len(json.dumps(reply, separators=(",", ":")))
            if size > self.max_frame_bytes:
                # The controller would close the session on it, and the spool would send it
                # again after every reconnect: answer that it was too large instead.
                reply = make_frame("command.result", {"success": False, "error": {
                    "code": "result_too_large", "message": f"the result of {frame['type']} is "
                    f"{size} bytes; the controller accepts frames up to {self.max_frame_bytes}"}},
                    correlation_id=command_id, trace_id=trace, resource=frame.get("resource"))
            outcome = reply["data"]
            if outcome["success"]:
                log.info("command %s done", frame["type"], extra={"commandId": command_id})
            else:
                log.warning("command %s failed: %s", frame["type"], outcome["error"]["message"],
                            extra={"commandId": command_id, "errorCode": outcome["error"]["code"]})
            self.spool.save(command_id, reply)  # on disk before it is sent
            live = self._ws  # the connection may have been replaced while this ran
            if live is not None:
                try:
                    await self._send(live, reply)
                except websockets.ConnectionClosed:
                    pass  # sent from the spool after the next connect
        finally:
            self._running.pop(command_id, None)
            self._cancelled.discard(command_id)

    async def aclose(self) -> None:
        """Stop running commands and close the handlers' HTTP clients (for tests and
        embedding; ``main`` just exits)."""
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)
        for handlers in (self.deployments, self.models):
            if handlers is not None:
                await handlers.aclose()

    # --- restart ---------------------------------------------------------------------------

    def _schedule_restart(self) -> None:
        self._restart_requested = True
        loop = asyncio.get_running_loop()
        loop.call_later(1.0, self._exec_self)  # after the result is sent (and spooled)

    def _exec_self(self) -> None:
        log.warning("restarting the agent on the controller's request")
        os.execv(sys.executable, [sys.executable, "-m", "nodeside.agent"])


def main() -> None:
    settings = AgentSettings()  # type: ignore[call-arg]
    configure_logging(level=settings.log_level, fmt=settings.aiwm_log_format,
                      process=f"node:{settings.node_id}")
    tune_malloc()  # model downloads stream through this process
    log.info("aiwm-node %s for node %s -> %s%s", __version__, settings.node_id,
             settings.controller_url, " (mock GPUs)" if settings.gpu_mock_mode else "")
    try:
        asyncio.run(Agent(settings=settings).run_forever())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
