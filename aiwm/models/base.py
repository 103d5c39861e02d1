"""What every catalog entity shares, and the spec that drives the generic CRUD path."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

Name: Any = Field(min_length=1, max_length=200)
Tags: Any = Field(default_factory=list, max_length=50)


def unstorable(value: Any, at: str = "") -> str | None:
    """Why the database cannot store ``value`` (JSON as a client sent it), or None: BSON
    keys cannot hold a NUL byte, and no string an unpaired surrogate (JSON can carry one
    as an escape, it is not UTF-8). ``at`` is where ``value`` sits in the field."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return f"{at or 'the text'} has an unpaired surrogate (not UTF-8)".lstrip()
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{at}[{ascii(key)}]"
            if isinstance(key, str) and "\x00" in key:
                return f"key {here} has a NUL byte"
            problem = unstorable(key, f"key {here}") or unstorable(item, here)
            if problem:
                return problem
    if isinstance(value, list):
        for index, item in enumerate(value):
            problem = unstorable(item, f"{at}[{index}]")
            if problem:
                return problem
    return None


class Storable(BaseModel):
    """Base for bodies kept as sent: what the database cannot store is a field error
    (422), not a failed write (500). Typed fields are checked by pydantic already; this
    is for the free-form ones (``dict[str, Any]``: metadata, labels, data)."""

    @field_validator("*")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        problem = unstorable(value)
        if problem:
            raise ValueError(problem)
        return value


class Input(Storable):
    """Base for request bodies: unknown fields are errors, so a typo is never ignored."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Document(BaseModel):
    """Fields the store keeps on every document. Clients cannot write them."""

    model_config = ConfigDict(extra="allow")

    id: str
    orgId: str
    createdBy: str
    createdAt: dt.datetime
    updatedAt: dt.datetime
    deletedAt: dt.datetime | None = None
    version: int = Field(description="Send it back as If-Match (or 'version') to update safely")


@dataclass(frozen=True)
class Reference:
    """``field`` of this entity holds the id (or ids) of a ``target`` entity.

    ``populate`` is the name used with ``?populate=``; ``on_delete`` says what deleting
    the target does: ``refuse`` while anything points at it, or ``cascade``.
    """

    field: str
    target: str
    populate: str
    many: bool = False
    required: bool = False
    on_delete: Literal["refuse", "cascade"] = "refuse"


@dataclass(frozen=True)
class FilterField:
    """A query parameter that filters lists by exact value (comma-separated = any of)."""

    name: str
    kind: Literal["str", "bool", "int"] = "str"


@dataclass(frozen=True)
class EntitySpec:
    """Everything the generic CRUD router, the store and the registry need to know."""

    name: str  # collection and URL segment, plural: "instructions"
    singular: str
    id_prefix: str
    create: type[Input]
    read: type[Document]
    update: type[Input] = field(init=False)
    references: tuple[Reference, ...] = ()
    filters: tuple[FilterField, ...] = ()
    sortable: tuple[str, ...] = ("createdAt", "updatedAt", "name")
    search: tuple[str, ...] = ("name",)
    unique: tuple[str, ...] = ()  # fields unique among the org's live documents

    def __post_init__(self) -> None:
        object.__setattr__(self, "update", partial_model(self.create))

    @property
    def writable(self) -> frozenset[str]:
        return frozenset(self.create.model_fields)

    def state_defaults(self) -> dict[str, Any]:
        """Server-managed fields with their initial values, stored at create so that
        lists can filter on them (``?status=pending``)."""
        out = {}
        for name, info in self.read.model_fields.items():
            if name in self.create.model_fields or name in Document.model_fields:
                continue
            default = info.get_default(call_default_factory=True)
            out[name] = default.value if isinstance(default, Enum) else default
        return out


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7396 JSON merge patch: objects merge key by key, ``null`` removes a key."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            current = out.get(key)
            out[key] = merge_patch(current if isinstance(current, dict) else {}, value)
        else:
            out[key] = value
    return out


def partial_model(model: type[Input]) -> type[Input]:
    """The PATCH body of ``model``: the same fields with the same constraints, each
    optional, defaulting to unset. ``null`` removes a field (merge patch), so it resets
    one that has a default and is refused for a required one."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        constrained: Any = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        if not info.is_required():
            constrained = constrained | None
        fields[name] = (constrained, Field(None, description=info.description))
    fields["version"] = (int | None, Field(None, description="Expected current version"))
    partial = create_model(  # type: ignore[call-overload]
        f"{model.__name__}Patch", __base__=Input, **fields
    )
    return partial  # type: ignore[no-any-return]


def read_model(name: str, create: type[Input], **state: Any) -> type[Document]:
    """The response shape: stored fields, writable fields, then server-managed state."""
    fields: dict[str, Any] = {
        n: (info.annotation, info) for n, info in create.model_fields.items()
    }
    fields.update(state)
    return create_model(name, __base__=Document, **fields)  # type: ignore[call-overload, no-any-return]
