"""Structured logs: one JSON object per line, with the correlation id of the work in hand.

A correlation id names one piece of work across processes: a REST request (its
``X-Request-Id``, the id Ray Serve also logs), the execution it started, and the node
commands sent for it. It lives in a context variable, so every log record made while the
work runs carries it, whichever module logs; tasks created meanwhile inherit it. The
hops between processes carry it explicitly: actor calls (:func:`traced_methods`), the
NodeHost channel, and the ``traceId`` of node command frames, which the agent copies
into its acknowledgement and result.

Call :func:`configure` once when a process starts (the CLI, each actor, each API
replica, the node agent). A line looks like::

    {"ts": "2026-12-04T02:10:00.123Z", "level": "INFO", "logger": "aiwm.nodes",
     "message": "command sent", "process": "nodes:0", "correlationId": "3f9c...",
     "nodeId": "n1", "commandId": "..."}

Fields given with ``extra={...}`` become top-level keys, so lines can be filtered by
``nodeId``, ``executionId`` or ``commandId`` as well.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import functools
import inspect
import json
import logging
import os
import re
import sys
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

CORRELATION_HEADER = "x-request-id"
CORRELATION_KWARG = "_correlation_id"  # the keyword actor calls carry it in
_VALID = re.compile(r"^[\x20-\x7e]{1,100}$")  # what an HTTP header can hold, bounded

correlation: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "aiwm_correlation_id", default=None)

# The attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "correlationId", "taskName"}


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def valid_correlation_id(value: object) -> str | None:
    """``value`` if it can be used as a correlation id: 1-100 printable ASCII characters."""
    return value if isinstance(value, str) and _VALID.match(value) else None


def current() -> str | None:
    """The correlation id of the work in hand, if any."""
    return correlation.get()


@contextlib.contextmanager
def bound(correlation_id: str | None) -> Iterator[None]:
    """Run the block under ``correlation_id`` (a None leaves the current one in place)."""
    if correlation_id is None:
        yield
        return
    token = correlation.set(correlation_id)
    try:
        yield
    finally:
        correlation.reset(token)


# --- actor calls -------------------------------------------------------------------------

C = TypeVar("C", bound=type)


def traced_methods(cls: C) -> C:
    """A subclass of ``cls`` whose public methods accept ``_correlation_id=`` and run under
    it. Apply it where the class is made an actor, so the dashboard still shows each
    method by its own name; callers pass the keyword only when they have an id."""
    namespace: dict[str, Any] = {"__module__": cls.__module__, "__doc__": cls.__doc__,
                                 "__qualname__": cls.__qualname__}
    for name, method in inspect.getmembers(cls, inspect.isfunction):
        if not name.startswith("_"):
            namespace[name] = _traced(method)
    return type(cls.__name__, (cls,), namespace)  # type: ignore[return-value]


def _traced(method: Callable[..., Any]) -> Callable[..., Any]:
    wrapper: Callable[..., Any]
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            with bound(valid_correlation_id(kwargs.pop(CORRELATION_KWARG, None))):
                return await method(*args, **kwargs)
    else:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with bound(valid_correlation_id(kwargs.pop(CORRELATION_KWARG, None))):
                return method(*args, **kwargs)

    sig = inspect.signature(method)
    params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
    params.append(inspect.Parameter(CORRELATION_KWARG, inspect.Parameter.KEYWORD_ONLY,
                                    default=None))
    params += [p for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD]
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    # Ray unwraps methods to read their signature: it must see the one with the keyword.
    del wrapper.__wrapped__  # type: ignore[attr-defined]
    return wrapper


def call_kwargs() -> dict[str, str]:
    """The keyword arguments that carry the current correlation id over an actor call."""
    cid = correlation.get()
    return {CORRELATION_KWARG: cid} if cid else {}


# --- formatting and output ------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON: ts, level, logger, message, process, correlationId,
    whatever ``extra`` held, and ``exc`` (the traceback) for exceptions."""

    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.process:
            out["process"] = self.process
        cid = getattr(record, "correlationId", None)
        if cid:
            out["correlationId"] = cid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """Plain lines for a terminal; the correlation id in brackets when there is one."""

    def __init__(self, process: str = "") -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(where)s: %(message)s")
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        cid = getattr(record, "correlationId", None)
        record.where = (f" {self.process}" if self.process else "") + (f" [{cid}]" if cid else "")
        return super().format(record)


class AppendHandler(logging.Handler):
    """Appends each record to a file with one ``write`` (O_APPEND), so several processes
    can share the file without splitting each other's lines."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self._fd, (self.format(record) + "\n").encode("utf-8", "replace"))
        except Exception:  # noqa: BLE001 - logging must never take the caller down
            self.handleError(record)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        super().close()


def _stamp_factory(original: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = original(*args, **kwargs)
        record.correlationId = correlation.get()
        return record

    make._aiwm_stamp = True  # type: ignore[attr-defined]
    return make


def configure(*, level: str = "INFO", fmt: str = "json", process: str = "",
              file: Path | None = None) -> None:
    """Send this process's logs to stderr (and to ``file``, appended) in ``fmt`` ("json"
    or "text"), stamped with the correlation id. Calling it again replaces what an
    earlier call set up, so an actor restarted in the same worker does not log twice."""
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "_aiwm_stamp", False):
        logging.setLogRecordFactory(_stamp_factory(factory))
    formatter: logging.Formatter = (TextFormatter(process) if fmt == "text"
                                    else JsonFormatter(process))
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_aiwm", False)]:
        root.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file is not None:
        try:
            handlers.append(AppendHandler(file))
        except OSError as e:
            print(f"aiwm: cannot write the log file {file}: {e}", file=sys.stderr)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._aiwm = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries that narrate every request at INFO would drown ours.
    for noisy in ("httpx", "httpcore", "pymongo", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def configure_for(settings: Any, process: str) -> None:
    """:func:`configure` from the controller's settings (LOG_LEVEL, AIWM_LOG_FORMAT,
    AIWM_LOG_FILE)."""
    configure(level=settings.log_level, fmt=settings.aiwm_log_format, process=process,
              file=settings.log_file())
