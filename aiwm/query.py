"""List queries: ``page``, ``limit``, ``sort``, ``q`` and per-entity filters.

Pure: query parameters in, a MongoDB filter and sort out, or :class:`ValidationFailed`
naming every bad parameter at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiwm.errors import ValidationFailed
from aiwm.models import EntitySpec, FilterField

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
RESERVED = frozenset({"page", "limit", "sort", "q", "populate"})
_TRUE = {"true", "1", "yes", "on"}  # what FastAPI's bool parsing accepts, too
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class ListQuery:
    page: int = 1
    limit: int = DEFAULT_LIMIT
    sort: tuple[tuple[str, int], ...] = (("createdAt", -1),)
    filters: dict[str, Any] = field(default_factory=dict)
    search: str | None = None

    @property
    def skip(self) -> int:
        return (self.page - 1) * self.limit


def _err(errors: list[dict[str, str]], param: str, message: str, kind: str) -> None:
    errors.append({"field": f"query.{param}", "message": message, "type": kind})


def _int(raw: str, param: str, lo: int, hi: int, errors: list[dict[str, str]]) -> int | None:
    try:
        value = int(raw)
    except ValueError:
        _err(errors, param, f"must be an integer, got {raw!r}", "int_parsing")
        return None
    if not lo <= value <= hi:
        _err(errors, param, f"must be between {lo} and {hi}", "out_of_range")
        return None
    return value


def _convert(f: FilterField, raw: str, errors: list[dict[str, str]]) -> Any:
    if f.kind == "bool":
        low = raw.lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        _err(errors, f.name, f"must be true or false, got {raw!r}", "bool_parsing")
        return None
    if f.kind == "int":
        return _int(raw, f.name, -(2**63), 2**63 - 1, errors)
    return raw


def parse_list_query(params: Iterable[tuple[str, str]], spec: EntitySpec) -> ListQuery:
    """Validate raw query parameters against ``spec``; unknown parameters are errors."""
    errors: list[dict[str, str]] = []
    known = {f.name: f for f in spec.filters}
    page, limit, search = 1, DEFAULT_LIMIT, None
    sort: list[tuple[str, int]] = []
    filters: dict[str, Any] = {}
    for name, raw in params:
        if name == "page":
            page = _int(raw, name, 1, 1_000_000, errors) or page
        elif name == "limit":
            limit = _int(raw, name, 1, MAX_LIMIT, errors) or limit
        elif name == "q":
            search = raw.strip()[:200] or None
        elif name == "populate":
            continue  # handled by the router
        elif name == "sort":
            for key in filter(None, (k.strip() for k in raw.split(","))):
                direction = -1 if key.startswith("-") else 1
                key = key.lstrip("+-")
                if key not in spec.sortable:
                    _err(errors, "sort", f"cannot sort by {key!r}; use {', '.join(spec.sortable)}",
                         "invalid_sort")
                else:
                    sort.append((key, direction))
        elif name in known:
            values = [_convert(known[name], v, errors) for v in raw.split(",") if v != ""]
            if values:
                filters[name] = values[0] if len(values) == 1 else {"$in": values}
        else:
            allowed = sorted(RESERVED | known.keys())
            _err(errors, name, f"unknown query parameter; allowed: {', '.join(allowed)}",
                 "extra_forbidden")
    if errors:
        raise ValidationFailed("invalid query parameters", extra={"errors": errors})
    if not any(k == "createdAt" for k, _ in sort):
        sort.append(("createdAt", -1))
    sort.append(("id", 1))  # a total order keeps pages consistent when timestamps tie
    return ListQuery(page=page, limit=limit, sort=tuple(sort), filters=filters, search=search)


def mongo_filter(q: ListQuery, spec: EntitySpec, base: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` (org scope, not deleted) plus the query's filters and search."""
    out: dict[str, Any] = dict(base)
    out.update(q.filters)
    if q.search:
        pattern = {"$regex": re.escape(q.search), "$options": "i"}
        out["$or"] = [{f: pattern} for f in spec.search]
    return out
