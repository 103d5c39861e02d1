"""The batch deploy job against the real parts: the session's Ray cluster and database, a
real node agent running model servers with the ``process`` runtime.

``main(argv)`` runs in-process (it finds Ray already initialised); one test runs the job
as ``python -m aiwm.jobs.deploy_batch --address <the session's GCS>`` would run on a
cluster, configured through the environment only.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from aiwm.auth import issue_token
from aiwm.jobs.deploy_batch import main
from aiwm.settings import Settings
from tests.integration.nodes_helpers import AgentProcess, Node, make_node, wait_status

ROOT = Path(__file__).resolve().parents[2]
MODEL_SERVER = [sys.executable, str(ROOT / "tests" / "support" / "model_server.py"), "--port", "{port}"]
TIMEOUT = 120  # s for the whole batch; the job itself stops waiting then


def settings_env(settings: Settings) -> dict[str, str]:
    """What `load_settings()` needs to find the session's installation."""
    return {"AIWM_HOME": str(settings.aiwm_home), "AIWM_DB_PORT": str(settings.aiwm_db_port),
            "JWT_SECRET": settings.secret(), "PORT": str(settings.port)}


@pytest.fixture()
def job_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """``main()`` in this process reads the session's settings from the environment."""
    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MONGODB_URI", raising=False)
    monkeypatch.delenv("AIWM_TOKEN", raising=False)


@pytest.fixture()
def agent(api: httpx.Client, unique: Callable[[str], str], cluster: str,
          tmp_path: Path) -> Iterator[Node]:
    node = make_node(api, unique)
    (tmp_path / "node").mkdir()
    process = AgentProcess(ws_url=cluster.replace("http://", "ws://") + "/ws/node", node=node,
                           state_dir=tmp_path / "node").start()
    try:
        wait_status(node, "online")
        yield node
    finally:
        process.kill()
        _kill_servers(tmp_path / "node" / "deployments")


def _kill_servers(state_dir: Path) -> None:
    """Model servers outlive the agent by design: end the ones this test started."""
    for state_file in state_dir.glob("*.json"):
        state = json.loads(state_file.read_text())
        try:
            proc = psutil.Process(state["pid"])
            if proc.cmdline() == state["argv"]:
                proc.kill()
                proc.wait(10)
        except psutil.Error:
            pass


def write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "deployments.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def deployments(api: httpx.Client, tag: str) -> dict[str, dict[str, Any]]:
    r = api.get("/deployments", params={"tags": tag, "limit": 100})
    assert r.status_code == 200, r.text
    return {d["name"]: d for d in r.json()["data"]}


def model(api: httpx.Client, unique: Callable[[str], str]) -> dict[str, Any]:
    r = api.post("/models", json={"name": unique("mdl"), "source": "custom"})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def test_a_batch_of_process_deployments_is_deployed_and_running(
        api: httpx.Client, agent: Node, unique: Callable[[str], str], make_token: Callable[..., str],
        job_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tag, names = unique("batch"), [unique("dep") for _ in range(3)]
    mdl = model(api, unique)
    path = write(tmp_path, {
        "defaults": {"node": agent.get()["name"], "model": mdl["name"], "runtime": "process",
                     "command": MODEL_SERVER, "env": {"MODEL_NAME": "batch"}, "tags": [tag]},
        "deployments": [{"name": n} for n in names[:2]] + [
            {"name": names[2], "env": {"FAIL_HEALTH": "2"}}],  # loads a while, then is ready
    })
    code = main([str(path), "--token", make_token("operator"), "--timeout", str(TIMEOUT),
                 "--concurrency", "2"])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    found = deployments(api, tag)
    assert sorted(found) == sorted(names)
    for name, dep in found.items():
        assert dep["status"] == "running" and dep["modelId"] == mdl["id"], dep
        assert dep["nodeId"] == agent.id and dep["env"]["MODEL_NAME"] == "batch"
        assert f"running    {name}  {dep['id']}  " in out.out  # its line as it finished
    assert found[names[2]]["env"]["FAIL_HEALTH"] == "2"
    assert "3 running, 0 failed, 0 timed out" in out.out
    logs = api.get(f"/deployments/{found[names[0]]['id']}/logs")
    assert logs.status_code == 200 and "GET /health" in json.dumps(logs.json())


def test_a_server_that_cannot_start_fails_the_job_run_as_a_ray_job(
        api: httpx.Client, agent: Node, unique: Callable[[str], str], make_token: Callable[..., str],
        settings: Settings, tmp_path: Path) -> None:
    import ray

    tag, good, bad = unique("batch"), unique("good"), unique("bad")
    mdl = model(api, unique)
    path = write(tmp_path, {
        "defaults": {"node": agent.get()["name"], "model": mdl["name"], "runtime": "process",
                     "tags": [tag]},
        "deployments": [{"name": good, "command": MODEL_SERVER},
                        {"name": bad, "command": ["false"]}],
    })
    env = {**os.environ, **settings_env(settings), "AIWM_TOKEN": make_token("operator")}
    env.pop("MONGODB_URI", None)
    job = subprocess.run(
        [sys.executable, "-m", "aiwm.jobs.deploy_batch", str(path), "--timeout", str(TIMEOUT),
         "--address", ray.get_runtime_context().gcs_address],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT + 60)
    assert job.returncode == 1, job.stdout + job.stderr
    found = deployments(api, tag)
    assert found[good]["status"] == "running", found[good]
    assert found[bad]["status"] == "failed" and found[bad]["error"], found[bad]
    lines = job.stdout.splitlines()
    failed = next(line for line in lines if line.startswith(f"failed     {bad}  "))
    assert found[bad]["id"] in failed and "start" in failed  # the step that failed, and why
    assert any(line.startswith(f"running    {good}  ") for line in lines)
    assert "1 running, 1 failed, 0 timed out" in job.stdout


def test_an_invalid_file_is_refused_whole_and_nothing_is_created(
        api: httpx.Client, unique: Callable[[str], str], make_token: Callable[..., str],
        job_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tag, ghost = unique("batch"), unique("ghost")
    mdl = model(api, unique)
    node = api.post("/nodes", json={"name": unique("n")}).json()
    path = write(tmp_path, {
        "defaults": {"node": node["name"], "runtime": "process", "command": ["srv"], "tags": [tag]},
        "deployments": [
            {"name": unique("ok"), "model": mdl["name"]},
            {"name": unique("bad-field"), "model": mdl["name"], "port": "eighty"},
            {"name": unique("bad-model"), "model": ghost},
        ],
    })
    code = main([str(path), "--token", make_token("operator")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "nothing was created" in err
    assert "deployments[1].port: " in err
    assert f"deployments[2].model: no model named '{ghost}' in org 'org-a'" in err
    assert "deployments[0]" not in err
    assert deployments(api, tag) == {}


@pytest.mark.parametrize(("kind", "expected"), [
    ("viewer", "this action needs the 'operator' role"),
    ("expired", "token expired"),
    ("garbage", "token is invalid"),
    ("missing", "no token: pass --token or set AIWM_TOKEN"),
])
def test_a_caller_who_may_not_deploy_is_refused_before_anything_happens(
        kind: str, expected: str, make_token: Callable[..., str], settings: Settings,
        job_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    an_hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    tokens = {"viewer": make_token("viewer"), "garbage": "not-a-jwt",
              "expired": issue_token(secret=settings.secret(), sub="t", org_id="org-a",
                                     roles=["operator"], expires_in=60, now=lambda: an_hour_ago)[0]}
    path = write(tmp_path, {"deployments": [{"name": "x"}]})
    assert main([str(path), *(["--token", tokens[kind]] if kind in tokens else [])]) == 2
    assert expected in capsys.readouterr().err
