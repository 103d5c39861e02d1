"""The batch deploy job's decisions, without Ray or a database: the file, defaults, name
resolution, validation, and what the outcomes add up to; the deploy loop with stand-ins."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from aiwm.auth import Principal, Role
from aiwm.errors import InvalidReference, Unavailable
from aiwm.jobs.deploy_batch import (
    EXIT_FAILED,
    EXIT_OK,
    BadInput,
    Catalog,
    Outcome,
    Status,
    build,
    deploy_all,
    exit_code,
    line,
    merge_defaults,
    outcome_of,
    parse,
    progress,
    summary,
    wanted,
)

ROOT = Path(__file__).resolve().parents[2]
CATALOG = Catalog(
    org_id="org-a",
    ids_by_name={"models": {"llama": "mdl-1", "whisper": "mdl-2"}, "nodes": {"gpu-1": "node-1"}},
    ids={"models": frozenset({"mdl-1", "mdl-2"}), "nodes": frozenset({"node-1", "node-9"})},
    versions={"mdl-1": frozenset({1, 3}), "mdl-2": frozenset()},
)


def bodies(text: str) -> list[dict[str, Any]]:
    return build(parse(text), CATALOG)


def problems(text: str) -> list[str]:
    with pytest.raises(BadInput) as caught:
        bodies(text)
    return [str(p) for p in caught.value.problems]


# --- defaults -------------------------------------------------------------------------------


def test_entries_override_defaults_and_mappings_merge_key_by_key() -> None:
    merged = merge_defaults(
        {"runtime": "process", "env": {"A": "1", "B": "2"}, "resources": {"gpus": 1},
         "tags": ["batch"], "port": 9000},
        {"env": {"B": "3"}, "resources": {"memoryMb": 100}, "tags": ["x"], "port": 8001})
    assert merged == {"runtime": "process", "env": {"A": "1", "B": "3"},
                      "resources": {"gpus": 1, "memoryMb": 100}, "tags": ["x"], "port": 8001}


@pytest.mark.parametrize("entry", [{"node": "other"}, {"nodeId": "node-9"}])
def test_an_entry_naming_its_node_either_way_replaces_the_default_given_either_way(
        entry: dict[str, str]) -> None:
    for default in ({"node": "gpu-1"}, {"nodeId": "node-1"}):
        assert merge_defaults(default, entry) == entry


def test_defaults_are_merged_under_every_entry_and_bodies_get_defaults_of_their_own() -> None:
    out = bodies("""
defaults: {node: gpu-1, runtime: process, env: {LOG: info}}
deployments:
  - {name: a, model: llama, command: [srv, "{port}"]}
  - {name: b, model: whisper, env: {X: "1"}, nodeId: node-9}
""")
    assert [(b["name"], b["modelId"], b["nodeId"], b["runtime"], b["env"]) for b in out] == [
        ("a", "mdl-1", "node-1", "process", {"LOG": "info"}),
        ("b", "mdl-2", "node-9", "process", {"LOG": "info", "X": "1"})]
    assert out[0]["command"] == ["srv", "{port}"] and out[0]["healthPath"] == "/health"
    assert "model" not in out[0] and "node" not in out[0]


# --- names -> ids ---------------------------------------------------------------------------


def test_wanted_collects_the_names_and_ids_to_look_up() -> None:
    parsed = parse("""
defaults: {node: gpu-1}
deployments:
  - {name: a, model: llama}
  - {name: b, modelId: mdl-7, nodeId: node-3}
  - not a mapping
""")
    assert wanted(parsed.entries) == {"models": ({"llama"}, {"mdl-7"}),
                                      "nodes": ({"gpu-1"}, {"node-3"})}


def test_unknown_names_and_ids_are_each_reported_once_by_index_and_field() -> None:
    found = problems("""
deployments:
  - {name: a, model: nope, node: gpu-1}
  - {name: b, model: llama, nodeId: node-404}
  - {name: c, model: llama, modelId: mdl-1, node: gpu-1}
  - {name: d, model: 7, node: gpu-1}
""")
    assert found == [
        "deployments[0].model: no model named 'nope' in org 'org-a'",
        "deployments[1].nodeId: no node with id 'node-404' in org 'org-a'",
        "deployments[2].model: give model (a name) or modelId (an id), not both",
        "deployments[3].model: must be the name of a model",
    ]


def test_an_entry_may_name_the_model_version_to_deploy() -> None:
    made = bodies("""
defaults: {node: gpu-1, modelVersion: 3}
deployments:
  - {name: pinned, model: llama}
  - {name: latest, model: llama, modelVersion: null}
""")
    assert [b.get("modelVersion") for b in made] == [3, None]
    assert "modelVersion" not in made[1]
    assert problems("""
deployments:
  - {name: a, model: llama, node: gpu-1, modelVersion: 2}
  - {name: b, model: whisper, node: gpu-1, modelVersion: 1}
  - {name: c, model: llama, node: gpu-1, modelVersion: "3"}
  - {name: d, model: llama, node: gpu-1, modelVersion: 0}
  - {name: e, model: llama, node: gpu-1, modelVersion: true}
""") == [
        "deployments[0].modelVersion: model 'mdl-1' has no version 2 (it has 1, 3)",
        "deployments[1].modelVersion: model 'mdl-2' has no version 1 (it has none)",
        *[f"deployments[{i}].modelVersion: must be a version number (1 or more)"
          for i in (2, 3, 4)],
    ]


# --- validation -----------------------------------------------------------------------------


def test_every_bad_entry_is_listed_with_its_index_and_field() -> None:
    found = problems("""
bogus: 1
defaults: {node: gpu-1, model: llama}
deployments:
  - {name: good}
  - {name: bad-port, port: 70000}
  - {name: typo, replicas: 2, resources: {gpus: -1}}
  - just a string
  - {model: ghost}
""")
    assert found[0] == "bogus: unknown key; the file has 'defaults' and 'deployments'"
    assert found[1] == "deployments[3]: must be a mapping of deployment fields"
    rest = found[2:]
    assert any(p.startswith("deployments[1].port: ") for p in rest)
    assert any(p.startswith("deployments[2].replicas: Extra inputs") for p in rest)
    assert any(p.startswith("deployments[2].resources.gpus: ") for p in rest)
    assert "deployments[4].model: no model named 'ghost' in org 'org-a'" in rest
    assert any(p.startswith("deployments[4].name: Field required") for p in rest)
    assert not any(p.startswith("deployments[0]") for p in found)
    assert not any("modelId" in p for p in found)  # the unknown name explains it


@pytest.mark.parametrize(("text", "expected"), [
    ("deployments: [", "file: not valid YAML"),
    ("- a\n- b\n", "file: must be a mapping"),
    ("defaults: {}\n", "deployments: must be a non-empty list"),
    ("deployments: []\n", "deployments: must be a non-empty list"),
    ("defaults: [1]\ndeployments: [{name: a, model: llama, node: gpu-1}]\n",
     "defaults: must be a mapping"),
])
def test_malformed_files_are_refused(text: str, expected: str) -> None:
    assert problems(text)[0].startswith(expected)


def test_the_example_file_is_valid() -> None:
    catalog = Catalog(org_id="org-a", ids_by_name={
        "models": {"llama-3-8b-instruct": "m1", "qwen3-embedding": "m2", "whisper-large-v3": "m3"},
        "nodes": {"gpu-node-1": "n1", "cpu-node-2": "n2"}}, ids={})
    out = build(parse((ROOT / "examples" / "deployments.yaml").read_text()), catalog)
    assert [b["nodeId"] for b in out] == ["n1", "n1", "n2"]
    assert out[0]["resources"] == {"gpus": 1, "memoryMb": 24000, "cpus": None}
    assert out[2]["runtime"] == "process" and out[2]["resources"]["gpus"] == 0


# --- outcomes -------------------------------------------------------------------------------


def test_outcomes_follow_the_deploy_execution() -> None:
    ok = outcome_of("a", "dep-1", {"id": "exe-1", "status": "completed"}, 2.0)
    failed = outcome_of("b", "dep-2", {"id": "exe-2", "status": "failed",
                                       "error": {"message": "step 'start' failed: boom"}}, 3.0)
    cancelled = outcome_of("c", "dep-3", {"id": "exe-3", "status": "cancelled", "error": None}, 1.0)
    late = outcome_of("d", "dep-4", {"id": "exe-4", "status": "running"}, 9.0)
    never = outcome_of("e", None, None, 0.0)
    assert (ok.status, ok.execution_id, ok.error) == (Status.running, "exe-1", None)
    assert (failed.status, failed.error) == (Status.failed, "step 'start' failed: boom")
    assert (cancelled.status, cancelled.error) == (Status.failed, "deploy cancelled")
    assert late.status is Status.timed_out and "still deploying" in (late.error or "")
    assert never.status is Status.timed_out and "not started" in (never.error or "")


def test_exit_code_is_zero_only_when_everything_runs() -> None:
    run = Outcome("a", Status.running, 1.0)
    assert exit_code([run, run]) == EXIT_OK
    assert exit_code([run, Outcome("b", Status.failed, 1.0)]) == EXIT_FAILED
    assert exit_code([run, Outcome("c", Status.timed_out, 1.0)]) == EXIT_FAILED
    assert exit_code([]) == EXIT_FAILED
    assert summary([run, Outcome("b", Status.failed, 1.0)]).title == \
        "deploy batch: 1 running, 1 failed, 0 timed out"


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_prints_a_line_per_finished_deployment(terminal: bool) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=terminal, width=200)
    failed = Outcome("b", Status.failed, 2.5, "dep-2", "exe-2", "step 'start' failed:\nlog line")
    with progress(console, 2) as report:
        report(Outcome("a", Status.running, 1.0, "dep-1", "exe-1"))
        report(failed)
    assert line(failed) == "failed     b  dep-2  2.5s  step 'start' failed: | log line"
    text = buffer.getvalue()
    assert "running    a  dep-1  1.0s" in text and line(failed) in text
    assert ("2/2" in text) is terminal  # the bar


# --- the deploy loop, with stand-ins for the actors -------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeActors:
    """Registry and orchestrator in one: executions end as ``fate`` says, once allowed."""

    def __init__(self, clock: FakeClock, fate: dict[str, str]) -> None:
        self.clock, self.fate = clock, fate
        self.in_flight = self.most_in_flight = 0
        self.release = asyncio.Event()
        self.created: list[str] = []
        self.versions: dict[str, int | None] = {}  # deployment id -> version asked for

    async def call(self, method: str, *args: Any) -> Any:
        if method == "create":
            body = args[2]
            assert "modelVersion" not in body  # not a field of the deployment
            if self.fate[body["name"]] == "refused":
                raise InvalidReference("no node 'node-x'", extra={"errors": [
                    {"field": "body.nodeId", "message": "no node 'node-x'"}]})
            self.created.append(body["name"])
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            return {"id": f"dep-{body['name']}"}
        if method == "run_for_deployment":
            self.versions[args[1]] = args[3]
            return {"id": f"exe-{args[1]}", "status": "pending"}
        assert method == "wait"
        name = args[1].removeprefix("exe-dep-")
        if self.fate[name] == "unavailable":
            self.fate[name] = "completed"
            raise Unavailable("orchestrator actor unavailable")
        if self.fate[name] == "hang":
            self.clock.now += args[2]  # the wait's whole timeout passes
            return {"id": args[1], "status": "running"}
        await self.release.wait()
        self.in_flight -= 1
        return {"id": args[1], "status": self.fate[name],
                "error": {"message": "boom"} if self.fate[name] == "failed" else None}


PRINCIPAL = Principal(sub="t", org_id="org-a", roles=frozenset({Role.operator}))


async def test_deploy_all_keeps_to_the_concurrency_and_reports_each_outcome() -> None:
    clock = FakeClock()
    fate = {f"d{i}": "completed" for i in range(5)} | {"bad": "failed", "refused": "refused"}
    actors = FakeActors(clock, fate)
    seen: list[Outcome] = []
    task = asyncio.create_task(deploy_all(
        [{"name": n} for n in fate], principal=PRINCIPAL, registry=actors, orchestrator=actors,
        concurrency=2, timeout=100, report=seen.append, clock=clock))
    while actors.in_flight < 2:
        await asyncio.sleep(0)
    for _ in range(20):  # give any third one every chance to start (none may)
        await asyncio.sleep(0)
    assert actors.most_in_flight == 2 and len(actors.created) == 2 and not seen
    actors.release.set()
    outcomes = await task
    assert actors.most_in_flight == 2 and len(seen) == len(fate)
    by_name = {o.name: o for o in outcomes}
    assert by_name["d0"].status is Status.running and by_name["d0"].deployment_id == "dep-d0"
    assert (by_name["bad"].status, by_name["bad"].error) == (Status.failed, "boom")
    assert by_name["refused"].status is Status.failed
    assert by_name["refused"].error == "no node 'node-x' (body.nodeId: no node 'node-x')"
    assert actors.versions["dep-d0"] is None  # the model's latest
    assert exit_code(outcomes) == EXIT_FAILED


async def test_deploy_all_asks_for_the_version_an_entry_names() -> None:
    actors = FakeActors(FakeClock(), {"pinned": "completed"})
    actors.release.set()
    [outcome] = await deploy_all(
        [{"name": "pinned", "modelVersion": 3}], principal=PRINCIPAL, registry=actors,
        orchestrator=actors, concurrency=1, timeout=100, report=lambda _: None,
        clock=FakeClock())
    assert outcome.status is Status.running and actors.versions == {"dep-pinned": 3}


async def test_deploy_all_times_out_hung_ones_and_never_starts_the_rest() -> None:
    clock = FakeClock()
    actors = FakeActors(clock, {"hung": "hang", "queued": "completed", "flaky": "unavailable"})
    actors.release.set()
    outcomes = await deploy_all(
        [{"name": "flaky"}, {"name": "hung"}, {"name": "queued"}], principal=PRINCIPAL,
        registry=actors, orchestrator=actors, concurrency=1, timeout=45, report=lambda o: None,
        clock=clock, retry_delay=0)
    flaky, hung, queued = outcomes
    assert flaky.status is Status.running  # the orchestrator came back
    assert hung.status is Status.timed_out and hung.execution_id == "exe-dep-hung"
    assert queued.status is Status.timed_out and queued.deployment_id is None
    assert actors.created == ["flaky", "hung"]
