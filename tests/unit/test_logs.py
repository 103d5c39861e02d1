"""Structured logs and the correlation id: formatting, binding, and each hop that carries it."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from actors.channel import ChannelClient, ChannelServer
from aiwm import logs
from aiwm.protocol import (
    CONTROLLER_TO_NODE,
    NODE_TO_CONTROLLER,
    ProtocolError,
    make_frame,
    parse_frame,
)
from serve.correlation import Correlation


@pytest.fixture()
def root_logging() -> Iterator[None]:
    """Leave the root logger (pytest's capture included) as it was."""
    root = logging.getLogger()
    handlers, level, factory = list(root.handlers), root.level, logging.getLogRecordFactory()
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    logging.setLogRecordFactory(factory)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_record_is_one_json_line_with_the_correlation_id_and_extra_fields(
        root_logging: None, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "aiwm.log"
    logs.configure(level="INFO", fmt="json", process="registry", file=log_file)
    log = logging.getLogger("aiwm.test")
    with logs.bound("req-1"):
        log.info("node %s created", "n1", extra={"nodeId": "n1", "version": 2})
    log.info("outside")
    log.debug("below the level")
    first, second = lines(log_file)
    assert first["message"] == "node n1 created"
    assert (first["level"], first["logger"], first["process"]) == ("INFO", "aiwm.test", "registry")
    assert (first["correlationId"], first["nodeId"], first["version"]) == ("req-1", "n1", 2)
    assert first["ts"].endswith("Z")
    assert "correlationId" not in second and second["message"] == "outside"


def test_exceptions_keep_their_traceback_and_odd_values_do_not_break_a_line(
        root_logging: None, tmp_path: Path) -> None:
    log_file = tmp_path / "aiwm.log"
    logs.configure(file=log_file)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("aiwm.test").exception("it failed", extra={"where": Path("/x"),
                                                                     "text": 'a "quoted"\nline'})
    (line,) = lines(log_file)
    assert "ValueError: boom" in line["exc"] and "Traceback" in line["exc"]
    assert line["where"] == "/x" and line["text"] == 'a "quoted"\nline'


def test_configuring_again_replaces_the_handlers_instead_of_doubling_lines(
        root_logging: None, tmp_path: Path) -> None:
    log_file = tmp_path / "aiwm.log"
    logs.configure(file=log_file)
    logs.configure(file=log_file, fmt="text", process="nodes:0")
    with logs.bound("abc"):
        logging.getLogger("aiwm.test").warning("once")
    text = log_file.read_text().splitlines()
    assert len(text) == 1
    assert text[0].endswith("WARNING aiwm.test nodes:0 [abc]: once")


def test_an_unwritable_log_file_leaves_stderr_logging_in_place(
        root_logging: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    logs.configure(file=blocker / "aiwm.log")  # its parent is a file
    assert "cannot write the log file" in capsys.readouterr().err
    assert any(getattr(h, "_aiwm", False) for h in logging.getLogger().handlers)


def test_bound_nests_and_restores_and_tasks_inherit_the_id() -> None:
    seen: list[str | None] = []

    async def child() -> None:
        seen.append(logs.current())

    async def main() -> None:
        with logs.bound("outer"):
            with logs.bound(None):  # None leaves the current id
                seen.append(logs.current())
            with logs.bound("inner"):
                await asyncio.create_task(child())
            seen.append(logs.current())
        seen.append(logs.current())
        with logs.bound("spawned"):
            await child()

    asyncio.run(main())
    assert seen == ["outer", "inner", "outer", None, "spawned"]


@pytest.mark.parametrize("value,ok", [("a1._:-Z", True), ("x" * 100, True), ("x" * 101, False),
                                      ("", False), ("has space", True), ("ü", False),
                                      ("two\nlines", False), ("tab\t", False), (123, False),
                                      (None, False)])
def test_only_short_plain_ids_are_taken_from_outside(value: object, ok: bool) -> None:
    assert logs.valid_correlation_id(value) == (value if ok else None)


class Plain:
    def __init__(self, name: str) -> None:
        self.name = name

    async def where(self, a: int, *, b: int = 0) -> tuple[int, int, str | None]:
        return a, b, logs.current()

    def sync(self) -> str | None:
        return logs.current()

    async def _private(self) -> None:
        pass


def test_traced_methods_take_the_callers_id_and_keep_names_and_signatures() -> None:
    traced = logs.traced_methods(Plain)
    obj = traced("x")
    assert traced.__name__ == "Plain" and obj.name == "x"
    assert asyncio.run(obj.where(1, b=2, _correlation_id="req-9")) == (1, 2, "req-9")
    assert asyncio.run(obj.where(1)) == (1, 0, None)
    assert asyncio.run(obj.where(1, _correlation_id="bad\nid")) == (1, 0, None)  # refused
    assert obj.sync(_correlation_id="s1") == "s1" and logs.current() is None
    # Ray reads a method's signature through inspect.unwrap: it must see the keyword too.
    assert "_correlation_id" in inspect.signature(inspect.unwrap(traced.where)).parameters
    assert traced._private is Plain._private
    with pytest.raises(TypeError):
        asyncio.run(obj.where(1, c=3))  # other unknown keywords are still refused
    with logs.bound("mine"):
        assert logs.call_kwargs() == {"_correlation_id": "mine"}
    assert logs.call_kwargs() == {}


def test_the_channel_carries_the_callers_id_to_the_node_host() -> None:
    async def main() -> list[str | None]:
        seen: list[str | None] = []

        async def handler(method: str, args: list[Any]) -> str:
            seen.append(logs.current())
            return "ok"

        server = ChannelServer(handler)
        host, port = await server.start("127.0.0.1")

        async def locate() -> dict[str, Any]:
            return {"host": host, "port": port, "key": server.key}

        client = ChannelClient(locate)
        try:
            with logs.bound("req-7"):
                assert await client.request("call", []) == "ok"
            assert await client.request("call", []) == "ok"
        finally:
            await client.close()
            await server.close()
        return seen

    assert asyncio.run(main()) == ["req-7", None]


def test_command_frames_carry_a_trace_id_and_refuse_a_malformed_one() -> None:
    frame = make_frame("system.healthCheck", {}, trace_id="req-1")
    assert frame["traceId"] == "req-1"
    assert "traceId" not in make_frame("system.healthCheck", {})
    parsed = parse_frame(json.dumps(frame), allowed=CONTROLLER_TO_NODE)
    assert parsed.traceId == "req-1"
    result = make_frame("command.result", {"success": True}, correlation_id=frame["messageId"],
                        trace_id="req-1")
    assert parse_frame(json.dumps(result), allowed=NODE_TO_CONTROLLER).traceId == "req-1"
    with pytest.raises(ProtocolError) as e:
        parse_frame(json.dumps({**frame, "traceId": "two\nlines"}), allowed=CONTROLLER_TO_NODE)
    assert e.value.code == "invalid_frame"


def _app() -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"cid": logs.current(),
                             "header": request.headers.get("x-request-id")})

    async def boom(request: Request) -> JSONResponse:
        raise RuntimeError("handler bug")

    app = Starlette(routes=[Route("/echo", echo), Route("/boom", boom)])
    return Correlation(app, access_log=True)  # type: ignore[return-value]


def test_a_request_runs_under_its_x_request_id_and_the_response_returns_it(
        caplog: pytest.LogCaptureFixture, root_logging: None) -> None:
    logs.configure()
    client = TestClient(_app(), raise_server_exceptions=False)
    with caplog.at_level(logging.INFO, logger="aiwm.access"):
        r = client.get("/echo", headers={"X-Request-Id": "client-42"})
    assert r.json() == {"cid": "client-42", "header": "client-42"}
    assert r.headers.get_list("x-request-id") == ["client-42"]
    (record,) = [r for r in caplog.records if r.name == "aiwm.access"]
    assert (record.status, record.path, record.correlationId) == (200, "/echo", "client-42")

    r = client.get("/echo", headers={"X-Request-Id": "x" * 101})
    made = r.json()["cid"]
    assert made and made != "x" * 101 and logs.valid_correlation_id(made)
    assert r.json()["header"] == made == r.headers["x-request-id"]  # handlers see the same id

    assert client.get("/echo").json()["cid"] != client.get("/echo").json()["cid"]


def test_a_request_that_fails_is_logged_with_its_id_even_without_the_access_log(
        caplog: pytest.LogCaptureFixture, root_logging: None) -> None:
    logs.configure()
    app = _app()
    app.access_log = False  # type: ignore[attr-defined]
    client = TestClient(app, raise_server_exceptions=False)
    with caplog.at_level(logging.INFO, logger="aiwm.access"):
        assert client.get("/echo").status_code == 200
        assert client.get("/boom", headers={"X-Request-Id": "req-boom"}).status_code == 500
    (record,) = [r for r in caplog.records if r.name == "aiwm.access"]
    assert record.levelno == logging.WARNING and record.correlationId == "req-boom"
