"""``aiwm logs``: read this host's AIWM log file (aiwm/logs.py), filtered and readable.

    aiwm logs --id 3f2a...            everything one request (or execution) did
    aiwm logs --node node-... -f      one node's commands, as they happen
    aiwm logs --level warning --json  problems only, as JSON lines for jq
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from aiwm.settings import load_settings

# Keys every line has, printed in the line's head rather than after the message.
HEAD = ("ts", "level", "logger", "message", "process", "correlationId", "exc")


def parse_line(raw: str) -> dict[str, Any] | None:
    """One JSON log line as a dict; None for anything else (a text line, a torn tail)."""
    try:
        line = json.loads(raw)
    except ValueError:
        return None
    return line if isinstance(line, dict) else None


def matches(line: dict[str, Any], *, cid: str | None = None, node: str | None = None,
            execution: str | None = None, level: int = 0) -> bool:
    if cid is not None and line.get("correlationId") != cid:
        return False
    if node is not None and line.get("nodeId") != node and line.get("process") != f"node:{node}":
        return False
    if execution is not None and line.get("executionId") != execution:
        return False
    return logging.getLevelName(str(line.get("level", "INFO"))) >= level if level else True


def render(line: dict[str, Any]) -> str:
    """``ts LEVEL process [correlation id] message key=value ...`` (and the traceback)."""
    cid = f" [{line['correlationId']}]" if line.get("correlationId") else ""
    rest = " ".join(f"{k}={v}" for k, v in line.items() if k not in HEAD)
    text = (f"{line.get('ts', '')} {line.get('level', '')} {line.get('process', '-')}{cid} "
            f"{line.get('message', '')}" + (f"  {rest}" if rest else ""))
    return text + (f"\n{line['exc']}" if line.get("exc") else "")


def _lines(handle: IO[str], follow: bool, poll: float = 0.5) -> Iterator[str]:
    pending = ""
    while True:
        chunk = handle.readline()
        if chunk:
            pending += chunk
            if pending.endswith("\n"):  # a line another process is still writing waits
                yield pending
                pending = ""
            continue
        if not follow:
            if pending:
                yield pending
            return
        time.sleep(poll)


def logs(
    cid: Annotated[str | None, typer.Option("--id", help="a correlation id (X-Request-Id, "
                                            "or an execution's correlationId)")] = None,
    node: Annotated[str | None, typer.Option(help="lines about, or from, this node")] = None,
    execution: Annotated[str | None, typer.Option(help="lines about this execution")] = None,
    level: Annotated[str, typer.Option(help="the lowest level shown")] = "debug",
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON lines as stored")] = False,
    file: Annotated[Path | None, typer.Option(help="default: AIWM_LOG_FILE")] = None,
) -> None:
    """Show this host's AIWM log lines, filtered by correlation id, node or execution."""
    threshold = logging.getLevelName(level.upper())
    if not isinstance(threshold, int):
        raise typer.BadParameter("one of debug, info, warning, error, critical",
                                 param_hint="--level")
    path = file or load_settings().log_file()
    if path is None:
        typer.echo("AIWM_LOG_FILE is off: the logs are only on each process's stderr", err=True)
        raise typer.Exit(1)
    if not path.is_file():
        typer.echo(f"no log file at {path} (has AIWM run on this host?)", err=True)
        raise typer.Exit(1)
    with open(path, encoding="utf-8", errors="replace") as handle:
        try:
            for raw in _lines(handle, follow):
                line = parse_line(raw)
                if line is None or not matches(line, cid=cid, node=node, execution=execution,
                                               level=threshold):
                    continue
                sys.stdout.write(raw if as_json else render(line) + "\n")
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
