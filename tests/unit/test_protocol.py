"""The node protocol: frames made by one side parse on the other; bad input is a ProtocolError.

Pure: no sockets, no Ray, no database.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from aiwm.protocol import (
    COMMANDS,
    CONTROLLER_TO_NODE,
    NODE_TO_CONTROLLER,
    Frame,
    ProtocolError,
    error_frame,
    make_frame,
    parse_frame,
)

# The least data each type accepts. A type added to the protocol must be added here, or
# test_every_type_has_minimal_data fails.
MINIMAL: dict[str, dict[str, Any]] = {
    "node.register": {"nodeId": "n1", "agentVersion": "0.1.0", "hostname": "gpu-1",
                      "cpuCores": 8, "ramTotal": 1024},
    "telemetry.heartbeat": {"uptimeSeconds": 1.5},
    "telemetry.metrics": {"cpuPercent": 12.5, "ramUsed": 1, "ramTotal": 2, "diskUsed": 3,
                          "diskTotal": 4},
    "deployment.status": {"deploymentId": "d1", "status": "running"},
    "deployment.logs": {"deploymentId": "d1", "lines": ["hello"]},
    "model.downloadProgress": {"modelId": "m1", "bytesDone": 0},
    "command.ack": {},
    "command.result": {"success": True},
    "deployment.create": {"deploymentId": "d1", "image": "srv:1"},
    "deployment.stop": {"deploymentId": "d1"},
    "deployment.restart": {"deploymentId": "d1", "image": "srv:1"},
    "deployment.getLogs": {"deploymentId": "d1"},
    "deployment.getStats": {"deploymentId": "d1"},
    "deployment.request": {"deploymentId": "d1", "path": "/health"},
    "model.download": {"modelId": "m1"},
    "model.delete": {"modelId": "m1"},
    "model.prune": {"modelId": "m1", "keep": [2]},
    "system.healthCheck": {},
    "system.restart": {},
    "command.cancel": {},
    "session.welcome": {"protocolVersion": 1, "sessionId": "s1", "heartbeatInterval": 30000,
                        "metricsInterval": 60000},
    "error": {"code": "bad", "message": "something was wrong"},
}

DIRECTIONS = [
    pytest.param(NODE_TO_CONTROLLER, id="node_to_controller"),
    pytest.param(CONTROLLER_TO_NODE, id="controller_to_node"),
]
ALL_TYPES = sorted(set(NODE_TO_CONTROLLER) | set(CONTROLLER_TO_NODE))
CASES = [pytest.param(kind, NODE_TO_CONTROLLER, id=f"n2c:{kind}") for kind in NODE_TO_CONTROLLER] + [
    pytest.param(kind, CONTROLLER_TO_NODE, id=f"c2n:{kind}") for kind in CONTROLLER_TO_NODE
]
NOW = "2025-01-02T03:04:05Z"


def _raw(**fields: Any) -> str:
    frame: dict[str, Any] = {"type": "telemetry.heartbeat", "messageId": "m-1", "timestamp": NOW,
                             "data": {"uptimeSeconds": 1}}
    frame.update(fields)
    return json.dumps({k: v for k, v in frame.items() if v is not ...})


def _error(raw: str | bytes, allowed: Mapping[str, Any] = NODE_TO_CONTROLLER) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_frame(raw, allowed=allowed)
    return info.value


# --- round trip ------------------------------------------------------------------------


def test_every_type_has_minimal_data() -> None:
    assert set(MINIMAL) == set(ALL_TYPES)


@pytest.mark.parametrize(("kind", "allowed"), CASES)
def test_round_trip(kind: str, allowed: Mapping[str, Any]) -> None:
    made = make_frame(kind, MINIMAL[kind], correlation_id="c-9")
    assert made["type"] == kind
    assert made["correlationId"] == "c-9"
    frame = parse_frame(json.dumps(made), allowed=allowed)
    assert isinstance(frame, Frame)
    assert frame.type == kind
    assert frame.messageId == made["messageId"]
    assert frame.correlationId == "c-9"
    assert frame.model_dump(mode="json", exclude_none=True) == made


@pytest.mark.parametrize(("kind", "allowed"), CASES)
def test_round_trip_from_bytes(kind: str, allowed: Mapping[str, Any]) -> None:
    made = make_frame(kind, MINIMAL[kind], message_id="fixed-id")
    frame = parse_frame(json.dumps(made).encode(), allowed=allowed)
    assert (frame.type, frame.messageId) == (kind, "fixed-id")


def test_make_frame_keeps_resource_and_time_and_drops_nones() -> None:
    now = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    made = make_frame("deployment.stop", {"deploymentId": "d1"},
                      resource={"type": "deployment", "id": "d1"}, message_id="m", now=now)
    assert made == {"type": "deployment.stop", "messageId": "m", "timestamp": "2025-01-02T03:04:05Z",
                    "resource": {"type": "deployment", "id": "d1"},
                    "data": {"deploymentId": "d1"}}  # extra data kept; no correlationId: None
    frame = parse_frame(json.dumps(made), allowed=CONTROLLER_TO_NODE)
    assert frame.resource is not None and frame.resource.id == "d1"
    assert frame.timestamp == now


def test_make_frame_gives_each_frame_its_own_id() -> None:
    a = make_frame("command.ack")
    b = make_frame("command.ack")
    assert a["messageId"] and b["messageId"] and a["messageId"] != b["messageId"]


def test_error_frame_names_the_refused_message() -> None:
    made = error_frame("unknown_type", "no such type", "m-7")
    frame = parse_frame(json.dumps(made), allowed=CONTROLLER_TO_NODE)
    assert frame.type == "error"
    assert frame.data.code == "unknown_type"
    assert frame.data.refMessageId == "m-7"


def test_parsed_data_is_typed_and_keeps_unknown_fields() -> None:
    raw = _raw(data={"uptimeSeconds": 3, "runningCommands": 2, "newerField": "x"})
    frame = parse_frame(raw, allowed=NODE_TO_CONTROLLER)
    assert frame.data.uptimeSeconds == 3.0
    assert frame.data.runningCommands == 2
    assert frame.data.model_dump()["newerField"] == "x"


# --- make_frame refusals ----------------------------------------------------------------


def test_make_frame_refuses_an_unknown_type() -> None:
    with pytest.raises(ValueError, match="unknown message type"):
        make_frame("telemetry.nonsense", {})


def test_make_frame_validates_data() -> None:
    with pytest.raises(ValidationError):
        make_frame("telemetry.heartbeat", {"uptimeSeconds": -1})
    with pytest.raises(ValidationError):
        make_frame("telemetry.heartbeat", {})  # uptimeSeconds is required
    with pytest.raises(ValidationError):
        make_frame("telemetry.metrics", {**MINIMAL["telemetry.metrics"], "cpuPercent": 101})


# --- parse_frame errors -----------------------------------------------------------------


@pytest.mark.parametrize("raw", ["", "{", "not json", "{'type': 'x'}", b"\xff\xfe\x00garbage",
                                 b"\x80\x81"])
def test_malformed_json(raw: str | bytes) -> None:
    e = _error(raw)
    assert e.code == "malformed_json"
    assert e.message_id is None


@pytest.mark.parametrize("raw", ["[]", "null", "1", '"a string"', "true", '[{"type": "command.ack"}]'])
def test_a_frame_must_be_an_object(raw: str) -> None:
    assert _error(raw).code == "invalid_frame"


def test_missing_message_id_is_invalid() -> None:
    e = _error(_raw(messageId=...))
    assert e.code == "invalid_frame"
    assert "messageId" in e.message
    assert e.message_id is None


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"messageId": 5}, "messageId"),
        ({"messageId": ""}, "messageId"),
        ({"messageId": "x" * 101}, "messageId"),
        ({"timestamp": "yesterday"}, "timestamp"),
        ({"timestamp": ...}, "timestamp"),
        ({"data": "not an object"}, "data"),
        ({"data": {"uptimeSeconds": "soon"}}, "uptimeSeconds"),
        ({"data": {"uptimeSeconds": -1}}, "uptimeSeconds"),
        ({"data": ...}, "data"),
        ({"resource": {"type": "deployment"}}, "resource"),
        ({"correlationId": 7}, "correlationId"),
        ({"surprise": 1}, "surprise"),  # extra top-level field
    ],
)
def test_invalid_frames(fields: dict[str, Any], where: str) -> None:
    e = _error(_raw(**fields))
    assert e.code == "invalid_frame"
    assert where in e.message
    assert "telemetry.heartbeat" in e.message


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_extra_top_level_field_is_refused_for_every_type(kind: str) -> None:
    made = make_frame(kind, MINIMAL[kind], message_id="m-x")
    made["version"] = 2
    allowed = NODE_TO_CONTROLLER if kind in NODE_TO_CONTROLLER else CONTROLLER_TO_NODE
    e = _error(json.dumps(made), allowed)
    assert (e.code, e.message_id) == ("invalid_frame", "m-x")


def test_invalid_frame_carries_the_message_id() -> None:
    e = _error(_raw(messageId="m-42", data={"uptimeSeconds": -5}))
    assert (e.code, e.message_id) == ("invalid_frame", "m-42")


def test_non_string_message_id_is_not_carried() -> None:
    e = _error(_raw(type="no.such", messageId=42))
    assert (e.code, e.message_id) == ("unknown_type", None)


@pytest.mark.parametrize("kind", ["no.such", "", "NODE.REGISTER", 5, None, ["node.register"],
                                  {"t": 1}, ...])
def test_unknown_type(kind: Any) -> None:
    e = _error(_raw(type=kind, messageId="m-3"))
    assert e.code == "unknown_type"
    assert e.message_id == "m-3"
    assert "node.register" in e.message  # lists what is expected


@pytest.mark.parametrize("kind", [*COMMANDS, "session.welcome", "error"])
def test_controller_types_are_unknown_from_a_node(kind: str) -> None:
    made = make_frame(kind, MINIMAL[kind], message_id="m-c")
    e = _error(json.dumps(made), NODE_TO_CONTROLLER)
    assert (e.code, e.message_id) == ("unknown_type", "m-c")


@pytest.mark.parametrize("kind", [k for k in NODE_TO_CONTROLLER if k not in CONTROLLER_TO_NODE])
def test_node_types_are_unknown_from_the_controller(kind: str) -> None:
    made = make_frame(kind, MINIMAL[kind], message_id="m-n")
    e = _error(json.dumps(made), CONTROLLER_TO_NODE)
    assert (e.code, e.message_id) == ("unknown_type", "m-n")


def test_health_check_sent_to_the_controller_is_unknown() -> None:
    raw = json.dumps({"type": "system.healthCheck", "messageId": "h1", "timestamp": NOW, "data": {}})
    e = _error(raw, NODE_TO_CONTROLLER)
    assert (e.code, e.message_id) == ("unknown_type", "h1")
    assert parse_frame(raw, allowed=CONTROLLER_TO_NODE).type == "system.healthCheck"


@pytest.mark.parametrize("raw", ["[" * 100_000, '{"a":' * 100_000])
def test_deeply_nested_json_is_a_protocol_error(raw: str) -> None:
    assert _error(raw).code in {"malformed_json", "invalid_frame"}


# --- fuzz ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)
timestamps = st.one_of(st.just(NOW), st.datetimes().map(lambda d: d.isoformat()), json_values)
framish = st.fixed_dictionaries(
    {"type": st.sampled_from(ALL_TYPES)},
    optional={
        "messageId": st.text(max_size=120) | json_values,
        "timestamp": timestamps,
        "data": st.dictionaries(st.sampled_from(["uptimeSeconds", "success", "code", "message",
                                                 "nodeId", "lines", "deploymentId", "cpuPercent"]),
                                json_values, max_size=6) | json_values,
        "resource": st.fixed_dictionaries({"type": st.text(max_size=60), "id": st.text()})
        | json_values,
        "correlationId": st.text(max_size=120) | json_values,
        "extra": json_values,
    },
)
directions = st.sampled_from([NODE_TO_CONTROLLER, CONTROLLER_TO_NODE])


def _parses_or_refuses(raw: str | bytes, allowed: Mapping[str, Any]) -> None:
    try:
        frame = parse_frame(raw, allowed=allowed)
    except ProtocolError as e:
        assert e.code in {"malformed_json", "invalid_frame", "unknown_type"}
        assert e.message_id is None or isinstance(e.message_id, str)
    else:
        assert isinstance(frame, Frame)
        assert frame.type in allowed


@settings(max_examples=300, deadline=None)
@given(raw=st.text(), allowed=directions)
def test_fuzz_text(raw: str, allowed: Mapping[str, Any]) -> None:
    _parses_or_refuses(raw, allowed)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(), allowed=directions)
def test_fuzz_bytes(raw: bytes, allowed: Mapping[str, Any]) -> None:
    _parses_or_refuses(raw, allowed)


@settings(max_examples=300, deadline=None)
@given(value=json_values, allowed=directions)
def test_fuzz_json_values(value: Any, allowed: Mapping[str, Any]) -> None:
    _parses_or_refuses(json.dumps(value), allowed)


@settings(max_examples=300, deadline=None)
@given(value=framish, allowed=directions, as_bytes=st.booleans())
def test_fuzz_frames_with_a_valid_type(value: dict[str, Any], allowed: Mapping[str, Any],
                                      as_bytes: bool) -> None:
    raw = json.dumps(value)
    _parses_or_refuses(raw.encode() if as_bytes else raw, allowed)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(ALL_TYPES), extra=st.dictionaries(st.text(max_size=10), json_values,
                                                               max_size=4))
def test_fuzz_valid_frames_with_extra_data_fields(kind: str, extra: dict[str, Any]) -> None:
    # Data models allow unknown fields, so adding fresh ones never breaks a valid frame.
    fresh = {f"x_{k}": v for k, v in extra.items()}
    made = make_frame(kind, MINIMAL[kind])
    made["data"] = {**made["data"], **fresh}
    allowed = NODE_TO_CONTROLLER if kind in NODE_TO_CONTROLLER else CONTROLLER_TO_NODE
    frame = parse_frame(json.dumps(made), allowed=allowed)
    assert frame.type == kind and frame.messageId == made["messageId"]
