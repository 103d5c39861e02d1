"""Catalog schemas and specs, populate parsing, and the error tree's picklability."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from aiwm import errors as errors_module
from aiwm.catalog import populate_refs
from aiwm.errors import AiwmError, ValidationFailed
from aiwm.models import ENTITIES, Document, EntitySpec, Input, entity, referrers
from aiwm.models.base import partial_model
from aiwm.models.catalog import ModelIn

SPECS = list(ENTITIES.values())
SPEC_IDS = [s.name for s in SPECS]
SERVER_FIELDS = {"createdAt", "updatedAt", "createdBy"}

# A minimal valid create body per entity.
VALID: dict[str, dict[str, Any]] = {
    "nodes": {"name": "gpu-1"},
    "models": {"name": "llama-3.1-8b"},
    "deployments": {"name": "d", "modelId": "mdl_1", "nodeId": "node_1"},
    "instructions": {"name": "i", "systemPrompt": "be brief"},
    "tools": {"name": "t"},
    "agents": {"name": "a"},
    "conversations": {"title": "c"},
    "messages": {"conversationId": "conv_1", "role": "user"},
}


def test_every_entity_has_a_valid_sample() -> None:
    assert set(VALID) == set(ENTITIES)


def test_entity_lookup() -> None:
    assert entity("agents").singular == "agent"
    with pytest.raises(KeyError, match="unknown entity 'bogus'"):
        entity("bogus")


# --- create and PATCH bodies --------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_create_model_accepts_a_valid_body(spec: EntitySpec) -> None:
    spec.create.model_validate(VALID[spec.name])


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_create_model_forbids_extra_fields(spec: EntitySpec) -> None:
    with pytest.raises(ValidationError) as info:
        spec.create.model_validate({**VALID[spec.name], "bogus": 1})
    assert [(e["type"], e["loc"]) for e in info.value.errors()] == [
        ("extra_forbidden", ("bogus",))
    ]


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_create_model_refuses_server_fields(spec: EntitySpec) -> None:
    with pytest.raises(ValidationError):
        spec.create.model_validate({**VALID[spec.name], "orgId": "someone-else"})


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_patch_model_makes_every_field_optional(spec: EntitySpec) -> None:
    patch = spec.update
    assert issubclass(patch, Input)
    assert set(patch.model_fields) == set(spec.create.model_fields) | {"version"}
    assert all(not f.is_required() for f in patch.model_fields.values())
    empty = patch.model_validate({})
    assert empty.model_dump(exclude_unset=True) == {}
    assert all(v is None for v in empty.model_dump().values())


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_patch_model_forbids_unknown_fields(spec: EntitySpec) -> None:
    with pytest.raises(ValidationError) as info:
        spec.update.model_validate({"bogus": 1})
    assert [e["type"] for e in info.value.errors()] == ["extra_forbidden"]
    with pytest.raises(ValidationError):
        spec.update.model_validate({"id": "x"})


def test_patch_keeps_types_and_only_what_was_sent() -> None:
    patch = entity("instructions").update
    body = patch.model_validate({"isActive": False, "version": 3})
    assert body.model_dump(exclude_unset=True) == {"isActive": False, "version": 3}
    with pytest.raises(ValidationError):
        patch.model_validate({"isActive": "not-a-bool"})
    with pytest.raises(ValidationError):
        patch.model_validate({"version": "three"})


def test_patch_of_a_required_field_is_optional() -> None:
    patch = entity("deployments").update
    assert entity("deployments").create.model_fields["modelId"].is_required()
    assert patch.model_validate({"name": "renamed"}).model_dump(exclude_unset=True) == {
        "name": "renamed"
    }


def test_partial_model_name_and_writable() -> None:
    spec = entity("models")
    assert partial_model(ModelIn).__name__ == "ModelInPatch"
    assert spec.writable == frozenset(ModelIn.model_fields)
    assert "version" not in spec.writable


# --- ModelIn ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "Llama-3.1-8B", "a", "0x", "m_1.2-b", "  padded  "])
def test_model_name_pattern_accepts(name: str) -> None:
    assert ModelIn(name=name).name == name.strip()


@pytest.mark.parametrize(
    "name", ["", "-leading", ".hidden", "_x", "has space", "org/repo", "x!", "ü", "a" * 201]
)
def test_model_name_pattern_refuses(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        ModelIn(name=name)
    assert info.value.errors()[0]["loc"] == ("name",)


def test_model_defaults() -> None:
    m = ModelIn(name="x")
    assert m.type.value == "llm" and m.source.value == "huggingface" and m.revision == "main"
    assert m.tags == [] and m.metadata == {}


# --- references and specs -------------------------------------------------------------------


def test_referrers_of_instructions_is_agents_instruction_id() -> None:
    found = referrers("instructions")
    assert [(s.name, r.field, r.populate) for s, r in found] == [
        ("agents", "instructionId", "instruction")
    ]


def test_referrers_of_models_and_conversations() -> None:
    assert sorted((s.name, r.field) for s, r in referrers("models")) == [
        ("agents", "modelId"), ("deployments", "modelId")
    ]
    [(src, ref)] = referrers("conversations")
    assert (src.name, ref.field, ref.on_delete) == ("messages", "conversationId", "cascade")
    assert referrers("messages") == []


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_references_point_at_real_entities_and_fields(spec: EntitySpec) -> None:
    for ref in spec.references:
        assert ref.target in ENTITIES
        assert ref.field in spec.create.model_fields
        annotation = str(spec.create.model_fields[ref.field].annotation)
        assert ("list" in annotation) is ref.many


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_filters_and_sortable_name_real_read_fields(spec: EntitySpec) -> None:
    fields = set(spec.read.model_fields)
    allowed = fields | SERVER_FIELDS
    assert issubclass(spec.read, Document)
    for f in spec.filters:
        assert f.name in allowed, f"{spec.name} filters on unknown field {f.name!r}"
    for s in spec.sortable:
        assert s in allowed, f"{spec.name} sorts by unknown field {s!r}"
    for s in spec.search:
        assert s in fields, f"{spec.name} searches unknown field {s!r}"
    for u in spec.unique:
        assert u in spec.create.model_fields


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_bool_filters_are_bool_fields(spec: EntitySpec) -> None:
    for f in spec.filters:
        if f.kind == "bool":
            assert spec.read.model_fields[f.name].annotation is bool


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_read_model_has_stored_and_writable_fields(spec: EntitySpec) -> None:
    fields = set(spec.read.model_fields)
    assert set(Document.model_fields) <= fields
    assert set(spec.create.model_fields) <= fields


# --- populate_refs ---------------------------------------------------------------------------


def test_populate_refs_accepts_known_names_in_order() -> None:
    spec = entity("agents")
    refs = populate_refs(spec, "tools, instruction")
    assert [(r.field, r.populate) for r in refs] == [("toolIds", "tools"),
                                                      ("instructionId", "instruction")]


@pytest.mark.parametrize("raw", [None, "", " , "])
def test_populate_refs_nothing_asked(raw: str | None) -> None:
    assert populate_refs(entity("agents"), raw) == []


def test_populate_refs_refuses_unknown_names() -> None:
    with pytest.raises(ValidationFailed) as info:
        populate_refs(entity("deployments"), "model,owner,nodes")
    e = info.value
    assert e.status == 422 and e.code == "validation_failed"
    assert "owner" in e.detail and "nodes" in e.detail
    [err] = e.extra["errors"]
    assert err["field"] == "query.populate"
    assert err["type"] == "invalid_populate"
    assert "owner, nodes" in err["message"]
    assert "model, node" in err["message"]  # what is allowed


def test_populate_refs_on_an_entity_without_references() -> None:
    with pytest.raises(ValidationFailed, match="it can populate nothing"):
        populate_refs(entity("nodes"), "anything")


# --- errors cross process boundaries ---------------------------------------------------------


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


ERRORS = [AiwmError, *_subclasses(AiwmError)]


def test_every_error_class_in_the_module_is_covered() -> None:
    in_module = {
        v for v in vars(errors_module).values()
        if isinstance(v, type) and issubclass(v, AiwmError)
    }
    assert in_module <= set(ERRORS)
    assert len(in_module) >= 10


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_error_survives_pickle(cls: type[AiwmError]) -> None:
    extra = {"errors": [{"field": "body.name", "message": "bad"}], "usedBy": [{"n": 1}]}
    e = cls("something went wrong", extra=extra)
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls
    assert back.detail == "something went wrong"
    assert back.extra == extra
    assert str(back) == "something went wrong"
    assert back.args == ("something went wrong",)
    assert (back.code, back.status, back.title, back.retryable) == (
        cls.code, cls.status, cls.title, cls.retryable
    )


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_error_without_extra_survives_pickle(cls: type[AiwmError]) -> None:
    back = pickle.loads(pickle.dumps(cls("x")))
    assert type(back) is cls and back.extra == {} and back.detail == "x"


def test_error_codes_are_unique_and_statuses_http() -> None:
    codes = [c.code for c in ERRORS]
    assert len(codes) == len(set(codes))
    assert all(400 <= c.status < 600 for c in ERRORS)
    assert sorted(c.__name__ for c in ERRORS if c.retryable) == [
        "ChecksumMismatch", "CommandTimeout", "InsufficientStorage", "Unavailable"]


def test_models_are_pydantic() -> None:
    assert all(issubclass(s.create, BaseModel) for s in SPECS)
