"""Fuzzing ``/ws/node`` against the running stack: random and malformed frames from a node.

Hypothesis draws sequences of frames: random text and bytes, broken JSON, JSON that is not
an object, envelopes with a wrong value in one field, unknown and controller-only types,
known types with garbage or hazardous ``data`` (integers beyond 64 bits, NaN, lone
surrogates, field names a database refuses, the channel's reserved ``__aiwm_error__``,
fields that name another node, deep nesting), frames just under and over
``WS_MAX_FRAME_BYTES``, binary messages, duplicate message ids, acks and results for
commands that do not exist, and valid frames between them. They are sent one at a time
(each answer read before the next frame) and in bursts. One node serves every example of
a test; each example is one session of it. Explicit examples reach every documented end of
a session and replay the frames of the bugs this test found.

Envelope-level mistakes are expected to get the code the docs give them; what ``data``
holds is judged with ``parse_frame(..., storable=True)``, the relay's own verdict, and the
checks are on what the running controller does with it.

What must hold (docs/protocol.md, "Errors and close codes"):

1. Every frame is answered as documented, in order: a bad frame with an ``error`` frame of
   the right code (and ``refMessageId``); ``WS_MAX_PROTOCOL_ERRORS`` bad frames in a row
   with close 4400, an oversized frame with ``too_large`` and close 1009, a register for
   another node or protocol version with 4403 / 4400; a valid frame with its answer (a
   receipt, a welcome) or nothing. Never a silent drop, never another close (1011, 1013,
   or none at all).
2. After each example the session still works (a probe is answered) or was closed as
   above, and a new connection of the node registers again.
3. No session leaks: once the sockets are closed the node hosts count no more connected
   nodes than before, and the node's proxy says it is not connected.
4. The node's data is intact: its document keeps the registered values; its document,
   events and metrics are still served as valid JSON; nothing was recorded for another node.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, note
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from aiwm.protocol import (
    CONTROLLER_TO_NODE,
    NODE_TO_CONTROLLER,
    ProtocolError,
    make_frame,
    new_message_id,
    parse_frame,
)
from aiwm.settings import Settings
from tests.conftest import wait_for
from tests.integration.nodes_helpers import Node, make_node, raw_socket, register

pytestmark = pytest.mark.integration

ORG = "org-a"
RECV_TIMEOUT = 10.0
# Frames the relay hands on in the background: a failure there shows only as a close a
# moment later, so an example that sent one listens this long after its probe.
QUIET = 0.15
FUZZ = hsettings(max_examples=70, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])
SIZES = hsettings(FUZZ, max_examples=15)
BURSTS = hsettings(FUZZ, max_examples=15)


# --- what a step expects ---------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One message to send and the answer the protocol documents for it.

    ``expect``: ``error`` (an error frame; a bad frame), ``silent`` (nothing), ``receipt``
    (a command.ack naming it), ``welcome`` (a session.welcome), ``close`` (an error frame,
    then close ``close``; the session ends), ``too_large`` (an error, then close 1009).
    """

    what: str
    payload: str | bytes
    expect: str
    code: str | None = None
    ref: str | None = None
    close: int | None = None
    message_id: str | None = None
    background: bool = False

    def __repr__(self) -> str:  # hypothesis prints failing examples with this
        shown: Any = self.payload
        if len(shown) > 300:
            shown = (shown[:200], "...", shown[-60:])
        return (f"Step({self.what!r}, expect={self.expect!r}, code={self.code!r}, "
                f"close={self.close!r}, payload={shown!r}, {len(self.payload)} long)")


def _size(payload: str | bytes) -> int:
    return len(payload.encode("utf-8")) if isinstance(payload, str) else len(payload)


def _dumps(frame: Any) -> str:
    return json.dumps(frame, separators=(",", ":"))


def expected(what: str, payload: str | bytes, node_id: str, max_bytes: int) -> Step:
    """What the protocol says the controller answers ``payload`` with, judged by the
    documented rules: the size limit, then parse_frame's verdict, then the type's meaning."""
    if _size(payload) > max_bytes:
        return Step(what, payload, "too_large", code="too_large", close=1009)
    try:
        frame = parse_frame(payload, allowed=NODE_TO_CONTROLLER, storable=True)
    except ProtocolError as e:
        return Step(what, payload, "error", code=e.code, ref=e.message_id)
    kind, data = frame.type, frame.data
    if kind == "node.register":
        if data.nodeId != node_id:
            return Step(what, payload, "close", code="node_mismatch", close=4403)
        if data.protocolVersion != 1:
            return Step(what, payload, "close", code="unsupported_version", close=4400)
        return Step(what, payload, "welcome")
    if kind == "command.result":
        return Step(what, payload, "receipt", message_id=frame.messageId)
    return Step(what, payload, "silent",
                background=kind in ("command.ack", "telemetry.heartbeat", "telemetry.metrics"))


# --- strategies ------------------------------------------------------------------------

SURROGATES = ["\ud800", "a\udfffb", "\udbff\udc00x\udc00"]
HAZARD_SCALARS: list[Any] = [
    2**63, -(2**63) - 1, 10**30, math.nan, math.inf, -math.inf, "\x00", "x" * 300,
    SURROGATES[1], {"__aiwm_error__": {"type": "NotFound", "detail": "injected"}},
    {"__aiwm_error__": 1}, {"$set": {"status": "deleted"}},
]
HAZARD_KEYS = ["\x00", "a\x00b", "__aiwm_error__", "$where", "a.b", "", "_id", SURROGATES[0]]

scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
           | st.sampled_from(HAZARD_SCALARS))
keys = st.text(max_size=8) | st.sampled_from(HAZARD_KEYS)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=10)
json_objects = st.dictionaries(keys, json_values, max_size=4)
# Without lone surrogates or deep nesting, which make any frame malformed_json first.
plain_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=10)
plain_extras = st.one_of(st.just({}), st.dictionaries(st.text(max_size=8), plain_values,
                                                      max_size=3))


def _pick(*options: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """One of ``options``, each as likely: st.one_of leans on its first ones in short runs."""
    return st.integers(0, len(options) - 1).flatmap(lambda i: options[i])


# One hazard at a time (several in one frame mostly hide each other), at the top of the
# extra fields or nested in them.
one_hazard = _pick(
    st.sampled_from(HAZARD_KEYS).map(lambda k: {k: 1}),
    st.sampled_from(HAZARD_SCALARS).map(lambda v: {"x": v}),
).flatmap(lambda h: st.sampled_from([h, {"nested": h}, {"list": [h, 1]}]))
hazardous_objects = _pick(one_hazard, json_objects, plain_extras)
message_ids = st.one_of(st.builds(new_message_id), st.sampled_from(["dup-1", "dup-2", "m"]))
short_text = st.text(min_size=1, max_size=20)
counts = st.integers(min_value=0, max_value=2**40)
# Byte counts a model leaves unbounded: beyond 64 bits, and ones whose sum is.
huge_counts = _pick(counts, st.sampled_from([2**63 - 1, 2**62 + 1, 2**63, 2**64, 10**30]))
timestamps = st.one_of(
    st.just("2025-06-02T09:14:03.120000Z"), st.just(1_700_000_000),
    st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(3000, 1, 1),
                 timezones=st.just(dt.UTC)).map(lambda t: t.isoformat()))


def _envelope(kind: str, data: Any, *, message_id: str, timestamp: Any = None,
              correlation_id: str | None = None, resource: Any = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": kind, "messageId": message_id,
                             "timestamp": timestamp or "2025-06-02T09:14:03Z", "data": data}
    if correlation_id is not None:
        frame["correlationId"] = correlation_id
    if resource is not None:
        frame["resource"] = resource
    return frame


@st.composite
def node_data(draw: st.DrawFn, kind: str, node_id: str, victim_id: str,
              hazards: bool = True) -> dict[str, Any]:
    """``data`` that fits ``kind``'s model, with extra fields: hazardous ones (among them
    the fields a stored record keeps its owner in, naming another node) if ``hazards``."""
    owners = st.sampled_from([
        {"nodeId": victim_id, "orgId": ORG}, {"orgId": "org-b"}, {"_id": "fixed"},
        {"at": "never"}, {"type": "node.online"}, {"resource": {"type": "node", "id": victim_id}},
    ])
    objects = hazardous_objects if hazards else plain_extras
    sizes = huge_counts if hazards else counts
    extra: dict[str, Any] = draw(_pick(plain_extras, owners, json_objects, one_hazard, one_hazard)
                                 if hazards else _pick(plain_extras, owners))
    if kind == "node.register":
        data: dict[str, Any] = {
            # The fixed values the final check expects on the node document.
            "nodeId": draw(st.sampled_from([node_id, node_id, "someone-else"])),
            "agentVersion": "test", "hostname": "raw", "cpuCores": 1, "ramTotal": 1,
            "heartbeatInterval": 60000,
            "protocolVersion": draw(st.sampled_from([1, 1, 1, 2, 0])),
        }
        if draw(st.booleans()):
            data["os"] = draw(objects)
            data["containerRuntime"] = draw(objects)
            data["gpuDevices"] = [{"index": i, "name": "fuzz", "memoryTotal": draw(sizes),
                                   **draw(objects)} for i in range(draw(st.integers(1, 3)))]
        return data | extra
    if kind == "telemetry.heartbeat":
        return {"uptimeSeconds": draw(st.floats(0, 1e9)),
                "runningCommands": draw(st.integers(0, 100))} | extra
    if kind == "telemetry.metrics":
        return {"cpuPercent": draw(st.floats(0, 100)), "ramUsed": draw(sizes),
                "ramTotal": draw(counts), "diskUsed": draw(counts), "diskTotal": draw(sizes),
                "gpus": draw(st.lists(st.builds(
                    lambda u, m, t: {"index": 0, "utilization": u, "memoryUsed": m,
                                     "memoryTotal": m, "temperature": t},
                    st.floats(0, 100), counts,
                    # typed fields without bounds: NaN and Infinity fit them
                    st.none() | (st.floats() if hazards else st.floats(-50, 150))),
                    max_size=2)),
                } | extra
    if kind == "deployment.status":
        return {"deploymentId": draw(short_text),
                "status": draw(st.sampled_from(["running", "exited", "failed", "stopped"])
                               | short_text),
                "message": draw(st.none() | short_text)} | extra
    if kind == "deployment.logs":
        return {"deploymentId": draw(short_text),
                "lines": draw(st.lists(st.text(max_size=30) | st.sampled_from(
                    SURROGATES if hazards else ["line"]), max_size=4))} | extra
    if kind == "model.downloadProgress":
        return {"modelId": draw(short_text), "bytesDone": draw(sizes)} | extra
    if kind == "command.result":
        data = {"success": draw(st.booleans()), "result": draw(objects)}
        if not data["success"]:
            data["error"] = {"code": "fuzz", "message": draw(st.text(max_size=20))}
        return data | extra
    return extra  # command.ack


@st.composite
def valid_frames(draw: st.DrawFn, node_id: str, victim_id: str,
                 kinds: list[str] | None = None, hazards: bool = True) -> dict[str, Any]:
    """A node -> controller frame of a known type (its data may still break a limit)."""
    kind = draw(st.sampled_from(kinds or sorted(NODE_TO_CONTROLLER)))
    correlation = None
    if kind in ("command.ack", "command.result"):  # never a real command: none is sent
        correlation = draw(st.one_of(st.builds(new_message_id), st.just("dup-1"), st.none()))
    resource = draw(st.none() | st.just({"type": "deployment", "id": "dep-fuzz"}))
    return _envelope(kind, draw(node_data(kind, node_id, victim_id, hazards)), message_id=draw(message_ids),
                     timestamp=draw(timestamps), correlation_id=correlation, resource=resource)


def _classified(what: str, node_id: str, max_bytes: int) -> Callable[[str | bytes], Step]:
    return lambda payload: expected(what, payload, node_id, max_bytes)


WRONG: dict[str, list[Any]] = {
    "messageId": [5, None, [], {}, "", "x" * 101, True],
    "timestamp": ["yesterday", [1], {"a": 1}, None, "2025-13-45T00:00:00Z", "", True],
    "resource": ["node", 5, [], {"type": "", "id": "x"}, {"type": "node"}, {"id": "x"},
                 {"type": "n", "id": "x", "more": 1}],
    "correlationId": [5, [], {}, "x" * 101, True],
    "data": [7, "x", [], None, True, 1.5],
}


@st.composite
def wrong_field(draw: st.DrawFn, node_id: str, victim_id: str) -> Step:
    """A valid frame with one envelope field of the wrong type, missing, or one too many."""
    frame = draw(valid_frames(node_id, victim_id, hazards=False))
    how = draw(st.sampled_from(sorted(WRONG) + ["missing", "extra"]))
    if how == "missing":
        field = draw(st.sampled_from(["messageId", "timestamp", "data"]))
        del frame[field]
    elif how == "extra":
        frame[draw(st.sampled_from(["extra", "Type", "message_id", "id"]))] = draw(plain_values)
    else:
        field = how
        frame[field] = draw(st.sampled_from(WRONG[field]))
    message_id = frame.get("messageId")
    ref = message_id if isinstance(message_id, str) else None
    return Step(f"wrong envelope ({how})", _dumps(frame), "error", code="invalid_frame", ref=ref)


@st.composite
def unknown_type(draw: st.DrawFn, node_id: str, victim_id: str) -> Step:
    """A type the node may not send: made up, not a string, or the controller's own."""
    controller_only = sorted(set(CONTROLLER_TO_NODE) - set(NODE_TO_CONTROLLER))
    kind: Any = draw(st.one_of(
        st.sampled_from(controller_only),
        st.text(max_size=30).filter(lambda t: t not in NODE_TO_CONTROLLER),
        st.sampled_from([None, 5, [], {}, True, "", "node.explode", "NODE.REGISTER",
                         "telemetry.heartbeat ", "session.welcome"])))
    frame = draw(valid_frames(node_id, victim_id, hazards=False))
    frame["type"] = kind
    if draw(st.booleans()):
        del frame["type"]
    message_id = frame.get("messageId")
    return Step("unknown type", _dumps(frame), "error", code="unknown_type",
                ref=message_id if isinstance(message_id, str) else None)


def _not_an_object(payload: str) -> Step:
    return Step("not an object", payload, "error", code="invalid_frame")


@st.composite
def deep(draw: st.DrawFn, node_id: str, victim_id: str, max_bytes: int) -> Step:
    """A valid frame with deeply nested JSON in an extra ``data`` field."""
    frame = draw(valid_frames(node_id, victim_id, ["telemetry.heartbeat", "telemetry.metrics",
                                        "command.result", "command.ack", "deployment.status"]))
    depth = draw(st.sampled_from([10, 63, 64, 65, 99, 100, 101, 200, 254, 255, 256, 300, 999,
                                  1000, 1001, 5000]))
    nested = draw(st.sampled_from(["[" * depth + "]" * depth,
                                   '{"a":' * depth + "1" + "}" * depth]))
    frame["data"]["deep"] = "__DEEP__"
    payload = _dumps(frame).replace('"__DEEP__"', nested)
    return expected(f"nested {depth} deep", payload, node_id, max_bytes)


def steps(node_id: str, victim_id: str, max_bytes: int) -> st.SearchStrategy[Step]:
    classified = _classified
    garbage_text = st.one_of(
        st.text(max_size=200),
        st.sampled_from(["{not json", "", " ", "[", "{", "}", "{}", "null", "1", '"x"',
                         "[1, 2]", "true", '{"type":', "NaN", "Infinity", "\x00", "{\"a\":1}}",
                         '{"type": "telemetry.heartbeat"}', "\ufeff{}"])
    ).map(classified("random text", node_id, max_bytes))
    garbage_bytes = st.one_of(
        st.binary(max_size=200),
        # Not UTF-8: bare bytes, a surrogate as CESU-8, UTF-16 and -32 JSON, a BOM.
        st.sampled_from([b"\xff\xfe", b"\x80", b'"\xed\xa0\x80"', b'{"a":"\xed\xb0\x80"}',
                         b"\xc0\xaf", b"{\xff}", "{}".encode("utf-16-le"),
                         "[1]".encode("utf-16"), "{}".encode("utf-32"), b"1\x00",
                         b"\xef\xbb\xbf{}"]),
    ).map(lambda b: _binary_garbage(b, node_id, max_bytes))
    non_objects = st.one_of(
        st.lists(plain_values, max_size=3), st.none(), st.booleans(),
        st.integers(), st.text(max_size=10),
    ).map(lambda v: _not_an_object(_dumps(v)))
    valid = [valid_frames(node_id, victim_id, [kind]).map(
        lambda f: expected(f"valid {f['type']}", _dumps(f), node_id, max_bytes))
        for kind in sorted(NODE_TO_CONTROLLER)]
    garbage_data = st.builds(
        lambda kind, data, mid: _dumps(_envelope(kind, data, message_id=mid)),
        st.sampled_from(sorted(NODE_TO_CONTROLLER)), json_values, message_ids,
    ).map(classified("garbage data", node_id, max_bytes))
    heartbeat = st.builds(lambda: _dumps(make_frame("telemetry.heartbeat", {"uptimeSeconds": 1}))
                          ).map(classified("heartbeat", node_id, max_bytes))
    kinds = [garbage_text, garbage_bytes, non_objects, wrong_field(node_id, victim_id),
             unknown_type(node_id, victim_id), garbage_data, *valid, heartbeat,
             deep(node_id, victim_id, max_bytes)]
    # Drawn by index: st.one_of leans on its first branches in a run this short.
    one = st.integers(0, len(kinds) - 1).flatmap(lambda i: kinds[i])
    return st.tuples(one, st.booleans()).map(lambda sb: _as_binary(sb[0]) if sb[1] else sb[0])


def _as_binary(step: Step) -> Step:
    """The same frame in a binary message (documented as accepted when it is UTF-8 JSON)."""
    if isinstance(step.payload, bytes):
        return step
    return Step(step.what + " (binary)", step.payload.encode("utf-8"), step.expect, step.code,
                step.ref, step.close, step.message_id, step.background)


def _binary_garbage(raw: bytes, node_id: str, max_bytes: int) -> Step:
    """Bytes that are not UTF-8 are malformed; bytes that are, are judged as their text."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Step("random bytes", raw, "error", code="malformed_json")
    step = expected("random bytes", text, node_id, max_bytes)
    return _as_binary(step)


@st.composite
def sized(draw: st.DrawFn, node_id: str, max_bytes: int) -> Step:
    """A heartbeat (or garbage) padded to within a few bytes of the size limit, with
    multi-byte characters so that characters and bytes differ."""
    delta = draw(st.integers(-3, 3))
    char = draw(st.sampled_from(["a", "\u00e9", "\u20ac", "\U0001f600"]))
    target = max_bytes + delta
    if draw(st.integers(0, 3)) == 0:  # not JSON at all
        body = char * (target // len(char.encode()))
        payload = body + "x" * (target - _size(body))
        return expected("garbage near the limit", payload, node_id, max_bytes)
    frame = make_frame("telemetry.heartbeat", {"uptimeSeconds": 1})
    frame["data"]["pad"] = ""
    room = target - _size(json.dumps(frame, separators=(",", ":"), ensure_ascii=False))
    pad = char * (room // len(char.encode()))
    frame["data"]["pad"] = pad + "x" * (room - _size(pad))
    payload = json.dumps(frame, separators=(",", ":"), ensure_ascii=False)
    assert _size(payload) == target
    step = expected(f"heartbeat of {target} bytes ({char!r})", payload, node_id, max_bytes)
    return _as_binary(step) if draw(st.booleans()) else step


def landmarks(node_id: str, victim_id: str, max_bytes: int,
              max_errors: int) -> list[list[Step]]:
    """Scripts that reach every documented end of a session, and the frames of the bugs
    this test found (each was accepted, then failed in the node host, or filed a report
    under another node), whatever the draws do."""
    def frame(kind: str, data: dict[str, Any], **kw: Any) -> Step:
        return expected(kind, _dumps(make_frame(kind, data, **kw)), node_id, max_bytes)

    def unchecked(kind: str, data: dict[str, Any]) -> Step:
        return expected(kind, _dumps(_envelope(kind, data, message_id=new_message_id())),
                        node_id, max_bytes)

    def metrics(**extra: Any) -> Step:
        return unchecked("telemetry.metrics", {"cpuPercent": 1, "ramUsed": 1, "ramTotal": 1,
                                               "diskUsed": 1, "diskTotal": 1} | extra)

    def registration(**data: Any) -> Step:
        return unchecked("node.register", {"nodeId": node_id, "agentVersion": "test",
                                           "hostname": "raw", "cpuCores": 1, "ramTotal": 1,
                                           "heartbeatInterval": 60000} | data)

    garbage = expected("garbage", "garbage", node_id, max_bytes)
    heartbeat = frame("telemetry.heartbeat", {"uptimeSeconds": 1})
    result = frame("command.result", {"success": True}, correlation_id="no-such-command",
                   message_id="dup-result")
    return [
        [garbage] * max_errors,
        [garbage] * (max_errors - 1) + [heartbeat] + [garbage] * (max_errors - 1),
        [heartbeat, registration(nodeId="someone-else")],
        [registration(protocolVersion=2)],
        [registration(os={"system": "Linux"}), result, result,
         frame("command.ack", {}, correlation_id="no-such-command"), heartbeat],
        # The bugs, each followed by a frame that must still be answered.
        [unchecked("deployment.logs", {"deploymentId": "d", "lines": ["\ud800"]}), result],
        [metrics(x={"\x00": 1}), metrics(ramUsed=2**63), heartbeat, result],
        [metrics(x={"__aiwm_error__": 1}), metrics(x={"__aiwm_error__": {"type": "NotFound"}}),
         heartbeat, result],
        [registration(gpuDevices=[{"index": i, "name": "g", "memoryTotal": 2**62 + 1}
                                  for i in range(2)]), result],
        [metrics(nodeId=victim_id, orgId=ORG, at="never", _id="fixed"),
         metrics(nodeId=victim_id, _id="fixed"), heartbeat, result],
        [expected("nested 300 deep", _dumps(make_frame("telemetry.heartbeat", {
            "uptimeSeconds": 1, "deep": "__DEEP__"})).replace('"__DEEP__"', "[" * 300 + "]" * 300),
            node_id, max_bytes), result],
    ]


# --- driving a session -------------------------------------------------------------------


def _recv(ws: ClientConnection, step: Step, sent: list[Step]) -> dict[str, Any]:
    """The next frame from the controller; fails, saying why, on anything but a frame."""
    try:
        raw = ws.recv(timeout=RECV_TIMEOUT)
    except TimeoutError:
        pytest.fail(f"no answer within {RECV_TIMEOUT}s to {step!r} (after {sent[:-1]!r})")
    except ConnectionClosed as e:
        pytest.fail(f"session closed with {_code(e)} ({_reason(e)!r}) instead of answering "
                    f"{step!r} (after {sent[:-1]!r})")
    frame = json.loads(raw)
    parse_frame(raw, allowed=CONTROLLER_TO_NODE)  # what the agent must be able to read
    return frame  # type: ignore[no-any-return]


def _code(e: ConnectionClosed) -> int | None:
    return e.rcvd.code if e.rcvd is not None else None


def _reason(e: ConnectionClosed) -> str | None:
    return e.rcvd.reason if e.rcvd is not None else None


def _expect_close(ws: ClientConnection, code: int, step: Step) -> None:
    try:
        extra = ws.recv(timeout=RECV_TIMEOUT)
    except ConnectionClosed as e:
        assert _code(e) == code, f"closed with {_code(e)} ({_reason(e)!r}), not {code}, after {step!r}"
        return
    except TimeoutError:
        pytest.fail(f"session not closed with {code} after {step!r}")
    pytest.fail(f"expected close {code} after {step!r}, got a frame {extra!r}")


def _probe(ws: ClientConnection, sent: list[Step]) -> None:
    """A result for a command that does not exist: the controller acknowledges it."""
    probe = make_frame("command.result", {"success": True}, correlation_id=new_message_id())
    step = Step("probe", _dumps(probe), "receipt", message_id=probe["messageId"])
    ws.send(step.payload)
    sent.append(step)
    answer = _recv(ws, step, sent)
    assert answer["type"] == "command.ack" and answer["correlationId"] == probe["messageId"], (
        f"probe answered with {answer!r} after {sent!r}")


def _check_answer(answer: dict[str, Any], step: Step) -> None:
    if step.expect in ("error", "too_large", "close"):
        assert answer["type"] == "error", f"{step!r} answered with {answer!r}"
        assert answer["data"]["code"] == step.code, f"{step!r} answered with {answer!r}"
        if step.expect == "error":
            assert answer["data"].get("refMessageId") == step.ref, (
                f"{step!r}: refMessageId {answer['data'].get('refMessageId')!r}")
    elif step.expect == "receipt":
        assert answer["type"] == "command.ack", f"{step!r} answered with {answer!r}"
        assert answer["correlationId"] == step.message_id, answer
    else:
        assert step.expect == "welcome", step
        assert answer["type"] == "session.welcome", f"{step!r} answered with {answer!r}"


def _still_open(ws: ClientConnection, sent: list[Step]) -> None:
    """The session answers a probe, and, if a frame was handed on in the background,
    is not closed a moment later either."""
    _probe(ws, sent)
    if any(step.background for step in sent):
        try:
            extra = ws.recv(timeout=QUIET)
        except TimeoutError:
            return
        except ConnectionClosed as e:
            pytest.fail(f"session closed with {_code(e)} ({_reason(e)!r}) after {sent!r}")
        pytest.fail(f"unexpected frame {extra!r} after {sent!r}")


def _registered(ws_url: str, node: Node) -> ClientConnection:
    ws = raw_socket(ws_url, node.token)
    welcome = register(ws, node.id)
    assert welcome["type"] == "session.welcome", f"a fresh session did not register: {welcome!r}"
    return ws


def run_session(ws_url: str, node: Node, max_errors: int, script: list[Step]) -> str:
    """Play ``script`` on a new session of ``node``, one frame at a time, each answer read
    before the next frame goes; returns how the session ended."""
    with _registered(ws_url, node) as ws:
        errors = 0
        sent: list[Step] = []
        for step in script:
            ws.send(step.payload)
            sent.append(step)
            if step.expect == "silent":
                errors = 0
                continue
            _check_answer(_recv(ws, step, sent), step)
            if step.expect == "error":
                errors += 1
                if errors >= max_errors:
                    _expect_close(ws, 4400, step)
                    return "closed 4400 (bad frames)"
                continue
            errors = 0
            if step.close is not None:
                _expect_close(ws, step.close, step)
                return f"closed {step.close}"
        _still_open(ws, sent)
        return "open"


def run_burst(ws_url: str, node: Node, max_errors: int, script: list[Step]) -> str:
    """Send all of ``script`` at once, then read: the answers come in the order of the
    frames (none of them is a registration, whose welcome comes on its own path)."""
    answered: list[Step] = []
    close: int | None = None
    errors = 0
    for step in script:
        if step.expect == "silent":
            errors = 0
            continue
        answered.append(step)
        errors = errors + 1 if step.expect == "error" else 0
        close = step.close if step.close is not None else 4400 if errors >= max_errors else None
        if close is not None:
            break
    with _registered(ws_url, node) as ws:
        try:
            for step in script:
                ws.send(step.payload)
        except ConnectionClosed:
            pass  # the controller ended the session before the last frame; said below
        for step in answered:
            _check_answer(_recv(ws, step, script), step)
        if close is not None:
            _expect_close(ws, close, answered[-1])
            return f"closed {close}"
        _still_open(ws, script)
        return "open"


# --- checks after the fuzzing ------------------------------------------------------------


def _hosts(settings: Settings) -> list[Any]:
    import ray

    found = []
    for shard in range(settings.node_proxy_shards):
        try:
            found.append(ray.get_actor(f"nodes:{shard}", namespace="aiwm"))
        except ValueError:
            pass  # no node of that shard yet
    return found


def connected_total(settings: Settings) -> int:
    import ray

    census: list[dict[str, Any]] = ray.get([h.census.remote() for h in _hosts(settings)])
    return sum(c["connected"] for c in census)


def proxy_connected(settings: Settings, node_id: str) -> bool:
    import ray

    from actors import node_shard_of

    host = ray.get_actor(f"nodes:{node_shard_of(node_id, settings.node_proxy_shards)}",
                         namespace="aiwm")
    status: dict[str, Any] = ray.get(host.call.remote(node_id, ORG, "status"))
    return bool(status["connected"])


def _strict_json(response: httpx.Response) -> Any:
    """The body as JSON, refusing what JSON does not have (NaN, Infinity)."""
    def refuse(constant: str) -> Any:
        raise AssertionError(f"{response.request.url} answered with {constant} in its JSON")
    return json.loads(response.text, parse_constant=refuse)


def check_node_intact(api: httpx.Client, node: Node, name: str) -> None:
    r = api.get(f"/nodes/{node.id}")
    assert r.status_code == 200, r.text
    doc = _strict_json(r)
    assert doc["name"] == name
    assert (doc["hostname"], doc["agentVersion"], doc["cpuCores"], doc["ramTotal"]) == (
        "raw", "test", 1, 1), doc
    assert doc["gpuSummary"]["count"] == 0 and doc["protocolVersion"] == 1, doc
    assert doc["tokenMetadata"]["revokedAt"] is None, doc
    for path in (f"/nodes/{node.id}/events?limit=500", f"/nodes/{node.id}/metrics?history=1440",
                 f"/nodes/{node.id}/containers"):
        r = api.get(path)
        assert r.status_code in (200, 404), f"{path}: {r.status_code} {r.text[:500]}"
        _strict_json(r)
    assert api.get("/health").status_code == 200


# --- the tests ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws_url(cluster: str) -> str:
    return cluster.replace("http", "ws") + "/ws/node"


@dataclass
class Fuzzed:
    node: Node
    name: str
    victim: Node  # a node that never connects: nothing may ever be recorded for it


@pytest.fixture()
def fuzzed(api: httpx.Client, unique: Callable[[str], str], ws_url: str,
           settings: Settings) -> Iterator[Fuzzed]:
    """One node for a whole test, and a second one that it must not be able to speak for;
    afterwards no session of the first may be left connected, and both are intact."""
    before = connected_total(settings)
    node, victim = make_node(api, unique), make_node(api, unique)
    name = node.get()["name"]
    yield Fuzzed(node, name, victim)
    # Property 2: the node can still come back; property 3: nothing stays connected.
    with raw_socket(ws_url, node.token) as ws:
        assert register(ws, node.id)["type"] == "session.welcome"
    wait_for(lambda: not proxy_connected(settings, node.id), timeout=10,
             what=f"node {node.id}'s proxy to drop its closed session")
    wait_for(lambda: connected_total(settings) <= before, timeout=10,
             what=f"the node hosts' connected count to fall back to {before}")
    check_node_intact(api, node, name)  # property 4
    assert victim.get()["status"] == "pending"
    r = api.get(f"/nodes/{victim.id}/metrics")
    assert r.status_code == 404, f"metrics recorded for a node that never connected: {r.text}"
    assert _strict_json(api.get(f"/nodes/{victim.id}/events"))["data"] == []


def test_random_frames_get_documented_answers_and_the_node_survives(
    fuzzed: Fuzzed, ws_url: str, settings: Settings
) -> None:
    node = fuzzed.node
    endings: list[str] = []

    @FUZZ
    @given(script=st.lists(steps(node.id, fuzzed.victim.id, settings.ws_max_frame_bytes),
                           min_size=1, max_size=10))
    def play(script: list[Step]) -> None:
        note(f"script: {script!r}")
        endings.append(run_session(ws_url, node, settings.ws_max_protocol_errors, script))

    for script in landmarks(node.id, fuzzed.victim.id, settings.ws_max_frame_bytes,
                            settings.ws_max_protocol_errors):
        play = example(script=script)(play)
    play()
    assert {"open", "closed 4400 (bad frames)", "closed 4400", "closed 4403"} <= set(endings), (
        endings)


def test_bursts_of_frames_are_answered_in_order(fuzzed: Fuzzed, ws_url: str,
                                                settings: Settings) -> None:
    node = fuzzed.node
    endings: list[str] = []
    one = steps(node.id, fuzzed.victim.id, settings.ws_max_frame_bytes).filter(
        lambda step: step.expect not in ("welcome", "close"))

    @BURSTS
    @given(script=st.lists(one, min_size=2, max_size=20))
    def play(script: list[Step]) -> None:
        note(f"script: {script!r}")
        endings.append(run_burst(ws_url, node, settings.ws_max_protocol_errors, script))

    play()
    assert "open" in endings and "closed 4400" in endings, endings


def test_frames_at_the_size_limit(fuzzed: Fuzzed, ws_url: str, settings: Settings) -> None:
    node = fuzzed.node
    endings: list[str] = []

    @SIZES
    @given(script=st.lists(sized(node.id, settings.ws_max_frame_bytes), min_size=1, max_size=3))
    def play(script: list[Step]) -> None:
        note(f"script: {script!r}")
        endings.append(run_session(ws_url, node, settings.ws_max_protocol_errors, script))

    at_limit = make_frame("telemetry.heartbeat", {"uptimeSeconds": 1})
    at_limit["data"]["pad"] = ""
    at_limit["data"]["pad"] = "x" * (settings.ws_max_frame_bytes - _size(_dumps(at_limit)))
    for pad in ("", "x"):  # exactly at the limit, and one byte over it
        raw = _dumps(at_limit)[:-3] + pad + '"}}'
        step = expected(f"{_size(raw)} bytes", raw, node.id, settings.ws_max_frame_bytes)
        play = example(script=[step])(play)
    play()
    assert {"open", "closed 1009"} <= set(endings), endings
