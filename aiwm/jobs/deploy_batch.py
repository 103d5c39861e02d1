"""Deploy many models from a YAML file, as a Ray job: ``ray job submit -- python -m
aiwm.jobs.deploy_batch deployments.yaml [--token T] [--timeout S] [--concurrency N]``.

The file has ``defaults:`` (fields merged under every entry) and ``deployments:`` (``POST
/api/deployments`` bodies; ``model: <name>`` and ``node: <name>`` may stand for ``modelId``
and ``nodeId``); see examples/deployments.yaml. Every entry is checked before anything is
created; then each is created and deployed as the API does it, at most ``--concurrency`` in
flight, and followed until it runs, fails, or the batch's ``--timeout`` runs out.

Exit codes: 0 all running; 1 any failed or timed out (or the cluster or database could not
be reached); 2 bad input (file, token), nothing created. Down to :func:`exit_code` the
functions decide and are pure; the rest does the I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bar
from rich.table import Table
from rich.text import Text

from aiwm.auth import Principal, Role, decode_token
from aiwm.errors import AiwmError, Unauthorized, Unavailable
from aiwm.models.catalog import DeploymentIn
from aiwm.settings import Settings, load_settings

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
# A name an entry may give instead of an id: alias -> (id field, collection, what it is).
ALIASES = {"model": ("modelId", "models", "model"), "node": ("nodeId", "nodes", "node")}
TOP_LEVEL = ("defaults", "deployments")
WAIT_CHUNK = 30.0  # s: one orchestrator `wait`; short, so a restarted orchestrator is found again


# --- pure: the file -> bodies ------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One fault in the input: ``index`` is the entry's position (None: the file itself)."""

    index: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = [f"deployments[{self.index}]"] if self.index is not None else []
        return f"{'.'.join([*where, self.field] if self.field else where) or 'file'}: {self.message}"


class BadInput(Exception):
    """The input is wrong and nothing was created; ``problems`` lists every fault found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("; ".join(map(str, problems)))
        self.problems = list(problems)


@dataclass(frozen=True)
class Parsed:
    """The entries merged over the defaults (None: not a mapping), and the faults so far."""

    entries: list[dict[str, Any] | None]
    problems: list[Problem]


def merge_defaults(defaults: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """``entry`` over ``defaults``: mappings (env, resources) merge key by key, anything else
    (lists too) is replaced. An entry that names its model or node either way, by name or
    by id, replaces the default given either way."""
    base = dict(defaults)
    for alias, (field, _, _) in ALIASES.items():
        if alias in entry or field in entry:
            base.pop(alias, None)
            base.pop(field, None)
    return _deep_merge(base, entry)


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        out[key] = _deep_merge(old, value) if isinstance(old, Mapping) and isinstance(
            value, Mapping) else value
    return out


def parse(text: str) -> Parsed:
    """Read the YAML text; :class:`BadInput` only if it is no YAML mapping at all."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise BadInput([Problem(None, "", f"not valid YAML: {e}")]) from None
    if not isinstance(doc, dict):
        raise BadInput([Problem(None, "", "must be a mapping with a 'deployments' list")])
    problems = [Problem(None, str(k), "unknown key; the file has 'defaults' and 'deployments'")
                for k in doc if k not in TOP_LEVEL]
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append(Problem(None, "defaults", "must be a mapping of deployment fields"))
        defaults = {}
    raw = doc.get("deployments")
    if not isinstance(raw, list) or not raw:
        problems.append(Problem(None, "deployments", "must be a non-empty list of deployments"))
        raw = []
    entries: list[dict[str, Any] | None] = []
    for i, entry in enumerate(raw):
        if isinstance(entry, dict):
            entries.append(merge_defaults(defaults, entry))
        else:
            entries.append(None)
            problems.append(Problem(i, "", "must be a mapping of deployment fields"))
    return Parsed(entries, problems)


def wanted(entries: Sequence[dict[str, Any] | None]) -> dict[str, tuple[set[str], set[str]]]:
    """Per collection, the names and the ids that the entries refer to."""
    found = [e for e in entries if e is not None]
    return {collection: ({e[alias] for e in found if isinstance(e.get(alias), str)},
                         {e[field] for e in found if isinstance(e.get(field), str)})
            for alias, (field, collection, _) in ALIASES.items()}


@dataclass(frozen=True)
class Catalog:
    """What the caller's org holds of the models and nodes the file refers to."""

    org_id: str
    ids_by_name: Mapping[str, Mapping[str, str]]  # collection -> name -> id
    ids: Mapping[str, frozenset[str]]  # collection -> ids that exist
    versions: Mapping[str, frozenset[int]] = dataclasses.field(default_factory=dict)  # model id -> numbers


def _resolve(index: int, entry: dict[str, Any],
             catalog: Catalog) -> tuple[dict[str, Any], list[Problem], set[str]]:
    """The entry with names replaced by ids, its reference faults, and the id fields those
    faults already explain (so validation does not report them twice)."""
    body, problems, explained = dict(entry), [], set()
    for alias, (field, collection, what) in ALIASES.items():
        name, fault = body.pop(alias, None), None
        if alias in entry:
            found = catalog.ids_by_name.get(collection, {}).get(name) if isinstance(name, str) else None
            if field in body:
                fault = Problem(index, alias, f"give {alias} (a name) or {field} (an id), not both")
            elif found is None:
                fault = Problem(index, alias, f"no {what} named {name!r} in org {catalog.org_id!r}"
                                if isinstance(name, str) and name else f"must be the name of a {what}")
            else:
                body[field] = found
        elif isinstance(body.get(field), str) and body[field] not in catalog.ids.get(collection, ()):
            fault = Problem(index, field, f"no {what} with id {body[field]!r} in org {catalog.org_id!r}")
        if fault is not None:
            problems.append(fault)
            explained.add(field)
    return body, problems, explained


def _version(index: int, body: dict[str, Any], catalog: Catalog) -> tuple[int | None,
                                                                         list[Problem]]:
    """The entry's ``modelVersion`` (taken out of ``body``), and what is wrong with it: not a
    number, or a version its model does not have."""
    if "modelVersion" not in body:
        return None, []
    version = body.pop("modelVersion")
    if version is None:
        return None, []
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version < 2**31:
        return None, [Problem(index, "modelVersion", "must be a version number (1 or more)")]
    model_id = body.get("modelId")
    if isinstance(model_id, str) and model_id in catalog.ids.get("models", ()) \
            and version not in catalog.versions.get(model_id, ()):
        have = sorted(catalog.versions.get(model_id, ()))
        return None, [Problem(index, "modelVersion", f"model {model_id!r} has no version {version}"
                              f" (it has {', '.join(map(str, have)) if have else 'none'})")]
    return version, []


def build(parsed: Parsed, catalog: Catalog) -> list[dict[str, Any]]:
    """Every entry as a valid ``DeploymentIn`` body (plus ``modelVersion`` when the entry
    names the version to deploy), or :class:`BadInput` naming every fault."""
    problems = list(parsed.problems)
    bodies = []
    for i, entry in enumerate(parsed.entries):
        if entry is None:
            continue
        body, faults, explained = _resolve(i, entry, catalog)
        version, wrong = _version(i, body, catalog)
        problems += faults + wrong
        try:
            valid = DeploymentIn.model_validate(body).model_dump(mode="json")
            bodies.append(valid if version is None else {**valid, "modelVersion": version})
        except ValidationError as e:
            problems += [Problem(i, ".".join(map(str, err["loc"])), err["msg"]) for err in e.errors()
                         if not (err["loc"] and err["loc"][0] in explained)]
    if problems:
        raise BadInput(problems)
    return bodies


# --- pure: outcomes -> report and exit code -------------------------------------------------


class Status(str, Enum):
    running = "running"
    failed = "failed"
    timed_out = "timed out"


@dataclass(frozen=True)
class Outcome:
    name: str
    status: Status
    seconds: float
    deployment_id: str | None = None
    execution_id: str | None = None
    error: str | None = None


def outcome_of(name: str, deployment_id: str | None, execution: Mapping[str, Any] | None,
               seconds: float) -> Outcome:
    """What a deployment came to, from its deploy execution as last seen (None: never started)."""
    ex_id = execution.get("id") if execution else None
    status = execution.get("status") if execution else None
    if status == "completed":
        return Outcome(name, Status.running, seconds, deployment_id, ex_id)
    if status in ("failed", "cancelled"):
        why = (execution or {}).get("error") or {}
        return Outcome(name, Status.failed, seconds, deployment_id, ex_id,
                       str(why.get("message") or f"deploy {status}"))
    why = "still deploying when the timeout ran out" if execution else \
        "not started before the timeout ran out"
    return Outcome(name, Status.timed_out, seconds, deployment_id, ex_id, why)


def describe(error: BaseException) -> str:
    """An error as one line, with the fields a validation error names."""
    if isinstance(error, AiwmError):
        fields = "; ".join(f"{e.get('field')}: {e.get('message')}"
                           for e in error.extra.get("errors") or [])
        return f"{error.detail} ({fields})" if fields and fields not in error.detail else error.detail
    return f"{type(error).__name__}: {error}"


def line(outcome: Outcome) -> str:
    """``<status> <name> <id> <seconds> [error]``, one line even if the error quotes a log."""
    error = " | ".join(filter(None, (p.strip() for p in (outcome.error or "").splitlines())))
    parts = [f"{outcome.status.value:<9}", outcome.name, outcome.deployment_id or "-",
             f"{outcome.seconds:.1f}s", *([error] if error else [])]
    return "  ".join(parts)


def exit_code(outcomes: Sequence[Outcome]) -> int:
    """0 when there is something and all of it runs; 1 otherwise."""
    return EXIT_OK if outcomes and all(o.status is Status.running for o in outcomes) else EXIT_FAILED


# --- I/O -------------------------------------------------------------------------------------


class Caller(Protocol):
    """An actor client (:class:`actors.ActorClient`) or a stand-in for tests."""

    async def call(self, method: str, *args: Any) -> Any: ...


def authenticate(token: str | None, secret: str) -> Principal:
    """The caller, who must be an operator; :class:`AiwmError` (Unauthorized/Forbidden) if not."""
    if not token:
        raise Unauthorized("no token: pass --token or set AIWM_TOKEN "
                           "(make one with `aiwm token create --role operator --org ORG`)")
    principal = decode_token(token.strip(), secret=secret)
    principal.require(Role.operator)
    return principal


async def lookup(settings: Settings, org_id: str,
                 refs: Mapping[str, tuple[set[str], set[str]]]) -> Catalog:
    """The models and nodes the file names, by name or id, in ``org_id``."""
    from aiwm.store import Store

    store = Store.for_settings(settings)
    by_name: dict[str, dict[str, str]] = {}
    ids: dict[str, frozenset[str]] = {}
    try:
        for collection, (names, wanted_ids) in refs.items():
            found = await store.documents(collection).find({
                "orgId": org_id, "deletedAt": None,
                "$or": [{"name": {"$in": sorted(names)}}, {"id": {"$in": sorted(wanted_ids)}}]})
            by_name[collection] = {d["name"]: d["id"] for d in found if d.get("name") in names}
            ids[collection] = frozenset(d["id"] for d in found)
        versions = {model_id: frozenset(v["version"] for v in
                                        await store.model_versions.list(org_id, model_id))
                    for model_id in ids.get("models", ())}
    finally:
        await store.close()
    return Catalog(org_id, by_name, ids, versions)


async def deploy_all(bodies: Sequence[dict[str, Any]], *, principal: Principal, registry: Caller,
                     orchestrator: Caller, concurrency: int, timeout: float,
                     report: Callable[[Outcome], None], clock: Callable[[], float] = time.monotonic,
                     retry_delay: float = 1.0) -> list[Outcome]:
    """Create and deploy every body, at most ``concurrency`` in flight, each followed until
    it ends or ``timeout`` seconds from now; ``report`` hears of each as it finishes."""
    deadline = clock() + timeout
    gate = asyncio.Semaphore(concurrency)

    async def deploy(name: str, body: dict[str, Any], started: float) -> Outcome:
        if started >= deadline:
            return outcome_of(name, None, None, 0.0)
        fields = {k: v for k, v in body.items() if k != "modelVersion"}
        dep_id = (await registry.call("create", principal, "deployments", fields))["id"]
        try:
            execution = await orchestrator.call("run_for_deployment", principal, dep_id, "deploy",
                                                body.get("modelVersion"))
        except AiwmError as e:
            return Outcome(name, Status.failed, clock() - started, dep_id, error=describe(e))
        while execution.get("status") in ("pending", "running") and (left := deadline - clock()) > 0:
            try:
                execution = await orchestrator.call("wait", principal.org_id, execution["id"],
                                                    min(left, WAIT_CHUNK))
            except Unavailable:  # the orchestrator is restarting; it resumes the execution
                await asyncio.sleep(min(retry_delay, left))
        return outcome_of(name, dep_id, execution, clock() - started)

    async def one(body: dict[str, Any]) -> Outcome:
        async with gate:
            started = clock()
            try:
                outcome = await deploy(body["name"], body, started)
            except Exception as e:  # one broken deployment must not sink the batch
                outcome = Outcome(body["name"], Status.failed, clock() - started, error=describe(e))
        report(outcome)
        return outcome

    return list(await asyncio.gather(*(one(b) for b in bodies)))


@contextlib.contextmanager
def progress(console: Console, total: int) -> Iterator[Callable[[Outcome], None]]:
    """The ``report`` of :func:`deploy_all`: on a terminal, a bar of finished/total with a
    line printed above it per finished deployment; plain lines otherwise (a job's log)."""
    if not console.is_terminal:
        yield lambda outcome: print(line(outcome), file=console.file, flush=True)
        return
    colours = {Status.running: "green", Status.failed: "red", Status.timed_out: "yellow"}
    with Bar(TextColumn("deploying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
             console=console) as bar:
        task = bar.add_task("deploying", total=total)

        def report(outcome: Outcome) -> None:
            bar.console.print(Text(line(outcome), style=colours[outcome.status]), soft_wrap=True)
            bar.advance(task)

        yield report


def summary(outcomes: Sequence[Outcome]) -> Table:
    counts = ", ".join(f"{sum(o.status is s for o in outcomes)} {s.value}" for s in Status)
    table = Table(title=f"deploy batch: {counts}")
    for column in ("deployment", "id", "status", "seconds", "execution", "error"):
        table.add_column(column, overflow="fold")
    for o in outcomes:
        table.add_row(o.name, o.deployment_id or "-", o.status.value, f"{o.seconds:.1f}",
                      o.execution_id or "-", o.error or "")
    return table


def join_ray(address: str | None) -> None:
    """Join the cluster, unless this process already has (a test, a driver calling main)."""
    if "ray" not in sys.modules and address and address != "auto":
        # Ray reads this when first imported: a token-auth head (Ray >= 2.59) refuses a
        # client joining by address without it. A `ray job submit` job has it already.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    from actors import NAMESPACE

    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the batch; returns the exit code (argparse exits with 2 on bad arguments)."""
    parser = argparse.ArgumentParser(prog="python -m aiwm.jobs.deploy_batch",
                                     description="Create and deploy the deployments of a YAML file.")
    parser.add_argument("file", type=Path, help="YAML with 'defaults' and 'deployments'")
    parser.add_argument("--token", help="an operator's user token (default: $AIWM_TOKEN)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole batch")
    parser.add_argument("--concurrency", type=int, default=8, help="deployments in flight at once")
    parser.add_argument("--address", help="Ray cluster address (default: auto)")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.timeout <= 0:
        parser.error("--concurrency must be at least 1 and --timeout positive")
    out, err = Console(), Console(stderr=True)
    if not out.is_terminal:
        out.width = max(out.width, 160)  # a job log: room for the summary's error column
    settings = load_settings()
    try:
        principal = authenticate(args.token or os.environ.get("AIWM_TOKEN"), settings.secret())
        parsed = parse(args.file.read_text())
        catalog = asyncio.run(lookup(settings, principal.org_id, wanted(parsed.entries)))
        bodies = build(parsed, catalog)
    except OSError as e:
        err.print(f"[red]✗[/] cannot read {escape(str(args.file))}: {escape(e.strerror or str(e))}")
        return EXIT_BAD_INPUT
    except BadInput as e:
        err.print(f"[red]✗[/] {escape(str(args.file))}: {len(e.problems)} problem(s); "
                  "nothing was created:")
        for problem in e.problems:
            err.print(f"  {problem}", markup=False, highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT
    except AiwmError as e:  # the database is down (1), or the token is no good (2)
        hint = (" (check MONGODB_URI, or AIWM_DB_PORT)" if isinstance(e, Unavailable) else
                " (is JWT_SECRET, or AIWM_HOME, this installation's?)" if "signature" in e.detail else "")
        err.print(f"[red]✗[/] {escape(e.detail)}{hint}")
        return EXIT_FAILED if isinstance(e, Unavailable) else EXIT_BAD_INPUT
    try:
        join_ray(args.address)
        from actors import orchestrator_client, registry_client

        registry, orchestrator = registry_client(), orchestrator_client()
    except Exception as e:  # no cluster there, or AIWM is not running on it
        err.print(f"[red]✗[/] cannot reach AIWM on the Ray cluster at {args.address or 'auto'} "
                  f"(is `aiwm up` done?): {escape(describe(e))}")
        return EXIT_FAILED
    out.print(f"deploying {len(bodies)} deployment(s) in org {principal.org_id}, "
              f"{args.concurrency} at a time, timeout {args.timeout:g}s", highlight=False)
    with progress(out, len(bodies)) as report:
        outcomes = asyncio.run(deploy_all(bodies, principal=principal, registry=registry,
                                          orchestrator=orchestrator, concurrency=args.concurrency,
                                          timeout=args.timeout, report=report))
    out.print(summary(outcomes))
    return exit_code(outcomes)


if __name__ == "__main__":
    sys.exit(main())
