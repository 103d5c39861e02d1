"""Pure parts of the node side: backoff, node tokens, token_problem, the result spool,
command dispatch and the health check. No sockets, no Ray cluster, no database.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.node_proxy import token_problem
from aiwm.auth import (
    ALGORITHM,
    NodeIdentity,
    decode_node_token,
    decode_token,
    issue_node_token,
    issue_token,
)
from aiwm.backoff import backoff_delay
from aiwm.errors import Unauthorized
from aiwm.protocol import CONTROLLER_TO_NODE, make_frame, parse_frame
from nodeside import telemetry
from nodeside.handlers import CommandFailed, Commands, SystemHandlers, default_commands
from nodeside.spool import Spool

SECRET = "unit-test-secret-that-is-long-enough-for-hs256"
OTHER = "another-secret-that-is-also-long-enough-for-hs256"
ALMOST_ONE = 0.9999999999


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- backoff ------------------------------------------------------------------------------


def test_backoff_grows_exponentially_from_initial() -> None:
    delays = [backoff_delay(n, initial=0.5, factor=2.0, cap=1000.0, rng=lambda: 0.0)
              for n in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]


def test_backoff_uses_factor() -> None:
    assert [backoff_delay(n, initial=1.0, factor=3.0, cap=1000.0, rng=lambda: 0.0)
            for n in range(4)] == [1.0, 3.0, 9.0, 27.0]


def test_backoff_is_capped() -> None:
    delays = [backoff_delay(n, initial=0.5, cap=30.0, rng=lambda: 0.0) for n in range(12)]
    assert max(delays) == 30.0
    assert delays[6] == 30.0  # 0.5 * 2**6 = 32 > 30
    assert delays[5] == 16.0
    assert all(a <= b for a, b in zip(delays, delays[1:], strict=False))  # never shrinks
    assert backoff_delay(0, initial=50.0, cap=30.0, rng=lambda: 0.0) == 30.0


def test_backoff_defaults() -> None:
    assert backoff_delay(0, rng=lambda: 0.0) == 0.5
    assert backoff_delay(100, rng=lambda: 0.0) == 30.0


def test_jitter_takes_off_at_most_its_fraction() -> None:
    base = 8.0  # attempt 4 from 0.5
    no_jitter = backoff_delay(4, jitter=0.5, rng=lambda: 0.0)
    most_jitter = backoff_delay(4, jitter=0.5, rng=lambda: ALMOST_ONE)
    assert no_jitter == base
    assert base * 0.5 <= most_jitter < base
    assert most_jitter == pytest.approx(base * 0.5, rel=1e-6)
    assert backoff_delay(4, jitter=0.0, rng=lambda: ALMOST_ONE) == base
    assert backoff_delay(4, jitter=0.25, rng=lambda: 0.5) == pytest.approx(base * 0.875)


def test_jitter_applies_to_the_capped_delay() -> None:
    d = backoff_delay(50, cap=30.0, jitter=0.5, rng=lambda: ALMOST_ONE)
    assert 15.0 <= d < 30.0


@pytest.mark.parametrize("attempt", [-1, -100])
def test_negative_attempt_raises(attempt: int) -> None:
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(attempt)


@pytest.mark.parametrize("attempt", [64, 65, 1024, 10**6, 10**18, 10**100])
def test_huge_attempts_do_not_overflow(attempt: int) -> None:
    d = backoff_delay(attempt, cap=30.0, rng=lambda: 0.0)
    assert d == 30.0
    assert math.isfinite(d)


@settings(max_examples=200, deadline=None)
@given(attempt=st.integers(min_value=0, max_value=10**9),
       initial=st.floats(min_value=0.001, max_value=10.0),
       factor=st.floats(min_value=1.0, max_value=4.0),
       cap=st.floats(min_value=0.01, max_value=600.0),
       jitter=st.floats(min_value=0.0, max_value=1.0),
       r=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_backoff_stays_within_bounds(attempt: int, initial: float, factor: float, cap: float,
                                     jitter: float, r: float) -> None:
    base = backoff_delay(attempt, initial=initial, factor=factor, cap=cap, jitter=jitter,
                         rng=lambda: 0.0)
    d = backoff_delay(attempt, initial=initial, factor=factor, cap=cap, jitter=jitter, rng=lambda: r)
    assert base <= cap
    assert math.isfinite(d)
    assert base * (1 - jitter) <= d <= base
    assert d >= 0.0


# --- node tokens --------------------------------------------------------------------------


def test_node_token_round_trip() -> None:
    fixed = _now().replace(microsecond=0)
    token, expires = issue_node_token(secret=SECRET, node_id="node-1", org_id="org-1",
                                      token_id="tok-1", expires_in=3600, now=lambda: fixed)
    assert expires == fixed + dt.timedelta(seconds=3600)
    assert decode_node_token(token, secret=SECRET) == NodeIdentity(
        node_id="node-1", org_id="org-1", token_id="tok-1")
    claims = jwt.decode(token, SECRET, algorithms=[ALGORITHM])
    assert claims["typ"] == "node"
    assert claims["exp"] == int(fixed.timestamp()) + 3600


@pytest.mark.parametrize("expires_in", [0, -5])
def test_node_token_needs_a_positive_lifetime(expires_in: int) -> None:
    with pytest.raises(ValueError, match="expires_in"):
        issue_node_token(secret=SECRET, node_id="n", org_id="o", token_id="t",
                         expires_in=expires_in)


def test_expired_node_token_is_refused() -> None:
    past = _now() - dt.timedelta(hours=2)
    token, expires = issue_node_token(secret=SECRET, node_id="n", org_id="o", token_id="t",
                                      expires_in=60, now=lambda: past)
    assert expires < _now()
    with pytest.raises(Unauthorized, match="expired"):
        decode_node_token(token, secret=SECRET)


def test_node_token_with_wrong_secret_is_refused() -> None:
    token, _ = issue_node_token(secret=OTHER, node_id="n", org_id="o", token_id="t",
                                expires_in=60)
    with pytest.raises(Unauthorized, match="invalid"):
        decode_node_token(token, secret=SECRET)


def test_user_token_cannot_open_a_node_socket() -> None:
    token, _ = issue_token(secret=SECRET, sub="alice", org_id="o", roles=["admin"], expires_in=60)
    with pytest.raises(Unauthorized, match="not a node token"):
        decode_node_token(token, secret=SECRET)


def test_node_token_cannot_call_the_rest_api() -> None:
    token, _ = issue_node_token(secret=SECRET, node_id="n", org_id="o", token_id="t",
                                expires_in=60)
    with pytest.raises(Unauthorized, match="REST API"):
        decode_token(token, secret=SECRET)


@pytest.mark.parametrize("drop", ["orgId", "jti", "sub", "exp"])
def test_node_token_missing_a_claim_is_refused(drop: str) -> None:
    now = int(_now().timestamp())
    claims: dict[str, Any] = {"sub": "n", "orgId": "o", "typ": "node", "jti": "t", "iat": now,
                              "exp": now + 60}
    del claims[drop]
    with pytest.raises(Unauthorized):
        decode_node_token(jwt.encode(claims, SECRET, algorithm=ALGORITHM), secret=SECRET)


def test_garbage_node_token_is_refused() -> None:
    with pytest.raises(Unauthorized):
        decode_node_token("not.a.token", secret=SECRET)


# --- token_problem ------------------------------------------------------------------------


def test_current_token_has_no_problem() -> None:
    node = {"tokenMetadata": {"tokenId": "t2", "revokedAt": None}}
    assert token_problem(node, "t2") is None
    assert token_problem({"tokenMetadata": {"tokenId": "t2"}}, "t2") is None


def test_superseded_token_has_a_problem() -> None:
    problem = token_problem({"tokenMetadata": {"tokenId": "t2"}}, "t1")
    assert problem is not None and "superseded" in problem


def test_revoked_token_has_a_problem() -> None:
    node = {"tokenMetadata": {"tokenId": "t2", "revokedAt": "2025-01-01T00:00:00Z"}}
    problem = token_problem(node, "t2")
    assert problem is not None and "revoked" in problem


@pytest.mark.parametrize("node", [{}, {"tokenMetadata": None}, {"tokenMetadata": {}}])
def test_node_without_token_metadata_refuses_every_token(node: dict[str, Any]) -> None:
    problem = token_problem(node, "t1")
    assert isinstance(problem, str) and problem


# --- spool --------------------------------------------------------------------------------


def _result(command_id: str, **result: Any) -> dict[str, Any]:
    return make_frame("command.result", {"success": True, "result": result},
                      correlation_id=command_id)


def _age(spool_dir: Path, command_id: str, mtime: float) -> None:
    os.utime(spool_dir / "results" / f"{command_id}.json", (mtime, mtime))


def test_spool_save_then_get(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    frame = _result("cmd-1", answer=42)
    spool.save("cmd-1", frame)
    assert spool.get("cmd-1") == frame
    assert spool.get("cmd-2") is None
    assert (tmp_path / "results" / "cmd-1.json").is_file()
    assert not list((tmp_path / "results").glob("*.tmp"))  # written via a temp file, replaced


def test_spool_save_overwrites_the_same_command(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.save("cmd-1", _result("cmd-1", n=1))
    second = _result("cmd-1", n=2)
    spool.save("cmd-1", second)
    assert spool.get("cmd-1") == second
    assert spool.pending() == [second]


def test_spool_pending_is_oldest_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    frames = {cid: _result(cid) for cid in ("c", "a", "b")}
    for cid, frame in frames.items():
        spool.save(cid, frame)
    # mtimes set explicitly (file timestamps are coarse); order differs from name order
    for age, cid in enumerate(("c", "a", "b")):
        _age(tmp_path, cid, 1_000_000 + age)
    assert spool.pending() == [frames["c"], frames["a"], frames["b"]]


def test_spool_acknowledged_deletes_the_result(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    one, two = _result("cmd-1"), _result("cmd-2")
    spool.save("cmd-1", one)
    spool.save("cmd-2", two)
    assert spool.acknowledged(one["messageId"]) == "cmd-1"
    assert not (tmp_path / "results" / "cmd-1.json").exists()
    assert spool.get("cmd-1") is None
    assert spool.pending() == [two]
    assert spool.acknowledged(one["messageId"]) is None  # already gone
    assert spool.acknowledged("never-sent") is None
    assert spool.acknowledged("cmd-2") is None  # a command id is not a result's messageId
    assert spool.pending() == [two]


def test_spool_survives_a_restart(tmp_path: Path) -> None:
    before = Spool(tmp_path)
    one, two = _result("cmd-1"), _result("cmd-2")
    before.save("cmd-1", one)
    before.save("cmd-2", two)
    _age(tmp_path, "cmd-1", 1_000_000)
    _age(tmp_path, "cmd-2", 1_000_001)
    del before

    after = Spool(tmp_path)  # a new agent process over the same state dir
    assert after.pending() == [one, two]
    assert after.acknowledged(two["messageId"]) == "cmd-2"
    assert after.pending() == [one]
    assert Spool(tmp_path).pending() == [one]


def test_spool_get_after_restart_allows_acknowledging(tmp_path: Path) -> None:
    frame = _result("cmd-1")
    Spool(tmp_path).save("cmd-1", frame)
    after = Spool(tmp_path)
    assert after.get("cmd-1") == frame  # a repeated command is answered from disk
    assert after.acknowledged(frame["messageId"]) == "cmd-1"
    assert after.pending() == []


def test_spool_ignores_leftover_tmp_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    frame = _result("cmd-1")
    spool.save("cmd-1", frame)
    leftover = tmp_path / "results" / "cmd-2.tmp"
    leftover.write_text('{"type": "command.res')  # a crash mid-write
    assert spool.pending() == [frame]
    assert spool.get("cmd-2") is None
    assert Spool(tmp_path).pending() == [frame]


def test_spool_drops_a_torn_result_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    torn = tmp_path / "results" / "cmd-9.json"
    torn.write_text('{"type": "comm')
    assert spool.get("cmd-9") is None
    assert spool.pending() == []
    assert not torn.exists()


def test_spooled_result_is_a_valid_frame(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    frame = _result("cmd-1", ok=True)
    spool.save("cmd-1", frame)
    [stored] = Spool(tmp_path).pending()
    parsed = parse_frame(json.dumps(stored), allowed={"command.result": None})
    assert parsed.type == "command.result"
    assert parsed.correlationId == "cmd-1"


# --- commands -----------------------------------------------------------------------------


async def test_registered_handler_runs() -> None:
    seen: list[dict[str, Any]] = []

    async def echo(data: dict[str, Any]) -> dict[str, Any]:
        seen.append(data)
        return {"echo": data["x"]}

    commands = Commands()
    commands.register("model.download", echo)
    assert await commands.run("model.download", {"x": 7}) == {"echo": 7}
    assert seen == [{"x": 7}]


async def test_unknown_command_is_unsupported() -> None:
    async def nothing(data: dict[str, Any]) -> dict[str, Any]:
        return {}

    commands = Commands()
    commands.register("system.restart", nothing)
    commands.register("deployment.create", nothing)
    with pytest.raises(CommandFailed) as info:
        await commands.run("model.delete", {})
    assert info.value.code == "unsupported_command"
    assert "model.delete" in info.value.message
    assert "deployment.create, system.restart" in info.value.message
    assert str(info.value) == info.value.message


async def test_handler_errors_propagate() -> None:
    async def broken(data: dict[str, Any]) -> dict[str, Any]:
        raise CommandFailed("disk_full", "no room")

    commands = Commands()
    commands.register("model.download", broken)
    with pytest.raises(CommandFailed) as info:
        await commands.run("model.download", {})
    assert (info.value.code, info.value.message) == ("disk_full", "no room")


def _system(tmp_path: Path, gpus: telemetry.Gpus, restarts: list[int] | None = None) -> SystemHandlers:
    sink = restarts if restarts is not None else []
    return SystemHandlers(gpus=gpus, docker_socket=str(tmp_path / "no-docker.sock"),
                          state_dir=str(tmp_path), restart=lambda: sink.append(1))


def test_default_commands_cover_the_system_commands(tmp_path: Path) -> None:
    commands = default_commands(_system(tmp_path, telemetry.Gpus(mock=True)))
    assert commands.names() == ["system.healthCheck", "system.restart"]
    assert all(name in CONTROLLER_TO_NODE for name in commands.names())


async def test_restart_command_schedules_a_restart(tmp_path: Path) -> None:
    restarts: list[int] = []
    commands = default_commands(_system(tmp_path, telemetry.Gpus(mock=True), restarts))
    assert await commands.run("system.restart", {}) == {"restarting": True}
    assert restarts == [1]


async def test_health_check_with_mock_gpus_and_no_docker(tmp_path: Path) -> None:
    out = await _system(tmp_path, telemetry.Gpus(mock=True)).health_check({})
    assert out["healthy"] is False
    checks = out["checks"]
    assert set(checks) == {"disk", "docker", "gpus"}
    assert checks["docker"]["ok"] is False
    assert checks["docker"]["available"] is False
    assert "no-docker.sock" in checks["docker"]["error"]
    assert checks["gpus"] == {"ok": True, "count": 2, "mock": True}
    assert checks["disk"]["ok"] is True
    assert checks["disk"]["path"] == str(tmp_path)


async def test_health_check_is_healthy_when_every_check_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telemetry, "docker_runtime",
                        lambda socket_path: {"type": "docker", "available": True, "version": "27"})
    out = await _system(tmp_path, telemetry.Gpus(mock=True)).health_check({})
    assert out["healthy"] is True
    assert out["checks"]["docker"] == {"ok": True, "type": "docker", "available": True,
                                       "version": "27"}


async def test_health_check_without_nvml_reports_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails: no library
    monkeypatch.setattr(telemetry, "docker_runtime",
                        lambda socket_path: {"type": "docker", "available": True})
    gpus = telemetry.Gpus(mock=False)
    out = await _system(tmp_path, gpus).health_check({})
    assert out["healthy"] is False
    gpu = out["checks"]["gpus"]
    assert (gpu["ok"], gpu["count"], gpu["mock"]) == (False, 0, False)
    assert gpu["error"].startswith("NVML unavailable")


async def test_health_check_with_real_gpus_on_a_host_without_a_driver(tmp_path: Path) -> None:
    gpus = telemetry.Gpus(mock=False)
    if gpus.devices():
        pytest.skip("this host has a visible NVIDIA GPU")
    out = await _system(tmp_path, gpus).health_check({})
    gpu = out["checks"]["gpus"]
    assert gpu["ok"] is False
    assert gpu["count"] == 0
    assert gpu["mock"] is False
    assert isinstance(gpu["error"], str) and gpu["error"]
    assert out["healthy"] is False


def test_offline_window_has_a_floor_against_flapping() -> None:
    from actors.node_proxy import offline_after
    from aiwm.settings import Settings

    settings = Settings(jwt_secret="x" * 40, node_missed_heartbeats=3, node_offline_min_seconds=10)
    assert offline_after(1.0, settings) == 10.0  # 3 missed 1 s beats would be only 3 s
    assert offline_after(30.0, settings) == 90.0
    settings.node_offline_min_seconds = 0
    assert offline_after(0.3, settings) == pytest.approx(0.9)
