"""List queries: validation of page/limit/sort/filters and the MongoDB filter they become."""

from __future__ import annotations

import re

import pytest

from aiwm.errors import ValidationFailed
from aiwm.models import EntitySpec, FilterField, entity
from aiwm.models.catalog import InstructionIn, InstructionOut
from aiwm.query import DEFAULT_LIMIT, MAX_LIMIT, ListQuery, mongo_filter, parse_list_query

INSTRUCTIONS = entity("instructions")  # bool filter isActive, search name+description
NODES = entity("nodes")                # str filters status, role, hostname, tags
MESSAGES = entity("messages")          # sortable only createdAt, updatedAt
TIEBREAK = ("id", 1)


def _errors(params: list[tuple[str, str]], spec: EntitySpec = NODES) -> list[dict[str, str]]:
    with pytest.raises(ValidationFailed) as info:
        parse_list_query(params, spec)
    assert info.value.status == 422
    return info.value.extra["errors"]


def _fields(errors: list[dict[str, str]]) -> list[str]:
    return [e["field"] for e in errors]


# --- page and limit ---------------------------------------------------------------------


def test_defaults() -> None:
    q = parse_list_query([], NODES)
    assert (q.page, q.limit, q.skip, q.filters, q.search) == (1, DEFAULT_LIMIT, 0, {}, None)
    assert q.sort == (("createdAt", -1), TIEBREAK)


def test_page_and_limit_give_skip() -> None:
    q = parse_list_query([("page", "3"), ("limit", "15")], NODES)
    assert (q.page, q.limit, q.skip) == (3, 15, 30)


@pytest.mark.parametrize("limit", ["1", str(MAX_LIMIT)])
def test_limit_bounds_inclusive(limit: str) -> None:
    assert parse_list_query([("limit", limit)], NODES).limit == int(limit)


@pytest.mark.parametrize(
    ("param", "value", "message"),
    [
        ("page", "0", "between 1 and"),
        ("page", "-1", "between 1 and"),
        ("page", "1000001", "between 1 and"),
        ("page", "two", "must be an integer"),
        ("limit", "0", f"between 1 and {MAX_LIMIT}"),
        ("limit", str(MAX_LIMIT + 1), f"between 1 and {MAX_LIMIT}"),
        ("limit", "1.5", "must be an integer"),
        ("limit", "", "must be an integer"),
    ],
)
def test_page_and_limit_out_of_bounds(param: str, value: str, message: str) -> None:
    errors = _errors([(param, value)])
    assert _fields(errors) == [f"query.{param}"]
    assert message in errors[0]["message"]


# --- sort -------------------------------------------------------------------------------


def test_descending_sort_then_default_then_tiebreak() -> None:
    q = parse_list_query([("sort", "-name")], NODES)
    assert q.sort == (("name", -1), ("createdAt", -1), TIEBREAK)


def test_several_sort_keys_and_explicit_plus() -> None:
    q = parse_list_query([("sort", "+name, -updatedAt")], NODES)
    assert q.sort == (("name", 1), ("updatedAt", -1), ("createdAt", -1), TIEBREAK)


def test_sort_by_created_at_is_not_duplicated() -> None:
    q = parse_list_query([("sort", "createdAt")], NODES)
    assert q.sort == (("createdAt", 1), TIEBREAK)


def test_empty_sort_keeps_the_default() -> None:
    assert parse_list_query([("sort", " , ")], NODES).sort == (("createdAt", -1), TIEBREAK)


def test_tiebreak_is_always_last() -> None:
    for params in ([], [("sort", "-lastHeartbeatAt,name")], [("sort", "-createdAt")]):
        sort = parse_list_query(params, NODES).sort
        assert sort[-1] == TIEBREAK
        assert [k for k, _ in sort].count("id") == 1


def test_unknown_sort_field_is_an_error_naming_what_is_allowed() -> None:
    errors = _errors([("sort", "-updatedAt,bogus")], MESSAGES)
    assert _fields(errors) == ["query.sort"]
    assert "'bogus'" in errors[0]["message"]
    for allowed in MESSAGES.sortable:
        assert allowed in errors[0]["message"]


def test_each_bad_sort_key_is_reported() -> None:
    errors = _errors([("sort", "name,bogus")], MESSAGES)  # messages cannot sort by name
    assert _fields(errors) == ["query.sort", "query.sort"]
    assert "'name'" in errors[0]["message"] and "'bogus'" in errors[1]["message"]


def test_id_itself_is_not_a_sort_field() -> None:
    assert _fields(_errors([("sort", "id")])) == ["query.sort"]


# --- filters ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True),
     ("on", True), ("false", False), ("False", False), ("0", False), ("no", False),
     ("off", False)],
)
def test_bool_filter(raw: str, value: bool) -> None:
    q = parse_list_query([("isActive", raw)], INSTRUCTIONS)
    assert q.filters == {"isActive": value}
    assert type(q.filters["isActive"]) is bool


@pytest.mark.parametrize("raw", ["maybe", "2", "onn", "t"])
def test_bool_filter_invalid(raw: str) -> None:
    errors = _errors([("isActive", raw)], INSTRUCTIONS)
    assert _fields(errors) == ["query.isActive"]
    assert "true or false" in errors[0]["message"]


def test_single_value_is_an_exact_match() -> None:
    assert parse_list_query([("status", "online")], NODES).filters == {"status": "online"}


def test_comma_list_becomes_in() -> None:
    q = parse_list_query([("status", "online,offline"), ("tags", "gpu,,a100")], NODES)
    assert q.filters == {"status": {"$in": ["online", "offline"]},
                         "tags": {"$in": ["gpu", "a100"]}}


def test_comma_list_of_bools() -> None:
    q = parse_list_query([("isActive", "true,0")], INSTRUCTIONS)
    assert q.filters == {"isActive": {"$in": [True, False]}}


def test_empty_filter_value_is_ignored() -> None:
    assert parse_list_query([("status", "")], NODES).filters == {}


def test_int_filter() -> None:
    spec = EntitySpec(name="things", singular="thing", id_prefix="thg",
                      create=InstructionIn, read=InstructionOut,
                      filters=(FilterField("n", "int"),))
    assert parse_list_query([("n", "-7")], spec).filters == {"n": -7}
    assert parse_list_query([("n", "1,2")], spec).filters == {"n": {"$in": [1, 2]}}
    errors = _errors([("n", "x")], spec)
    assert _fields(errors) == ["query.n"]


def test_populate_is_left_to_the_router() -> None:
    q = parse_list_query([("populate", "anything")], NODES)
    assert q.filters == {} and q.search is None


def test_unknown_parameters_are_all_reported_at_once() -> None:
    errors = _errors([
        ("colour", "red"), ("page", "0"), ("isActive", "true"),  # isActive: not a node filter
        ("sort", "nope"), ("limit", "500"), ("status", "online"),
    ])
    assert _fields(errors) == [
        "query.colour", "query.page", "query.isActive", "query.sort", "query.limit",
    ]
    unknown = errors[0]["message"]
    assert "unknown query parameter" in unknown
    for allowed in ("page", "limit", "sort", "q", "populate", "status", "role", "hostname",
                    "tags"):
        assert allowed in unknown


def test_filters_of_another_entity_are_unknown() -> None:
    assert _fields(_errors([("conversationId", "c1")], NODES)) == ["query.conversationId"]


# --- search -----------------------------------------------------------------------------


def test_search_is_stripped_truncated_and_blank_is_none() -> None:
    assert parse_list_query([("q", "  llama  ")], NODES).search == "llama"
    assert parse_list_query([("q", "   ")], NODES).search is None
    assert parse_list_query([("q", "x" * 500)], NODES).search == "x" * 200


# --- mongo_filter -----------------------------------------------------------------------

BASE = {"orgId": "org1", "deletedAt": None}


def test_mongo_filter_keeps_the_base_scope_and_adds_filters() -> None:
    q = parse_list_query([("isActive", "false"), ("tags", "a,b")], INSTRUCTIONS)
    base = dict(BASE)
    out = mongo_filter(q, INSTRUCTIONS, base)
    assert out == {"orgId": "org1", "deletedAt": None, "isActive": False,
                   "tags": {"$in": ["a", "b"]}}
    assert base == BASE  # not mutated


def test_mongo_filter_without_search_has_no_or() -> None:
    assert "$or" not in mongo_filter(ListQuery(), INSTRUCTIONS, BASE)


def test_search_escapes_regex_metacharacters() -> None:
    q = parse_list_query([("q", "a.b(")], INSTRUCTIONS)
    out = mongo_filter(q, INSTRUCTIONS, BASE)
    assert out["orgId"] == "org1" and out["deletedAt"] is None
    pattern = {"$regex": r"a\.b\(", "$options": "i"}
    assert out["$or"] == [{"name": pattern}, {"description": pattern}]
    rx = re.compile(out["$or"][0]["name"]["$regex"], re.IGNORECASE)
    assert rx.search("xxA.B(yy")
    assert not rx.search("axb(")  # '.' is literal, not any character


@pytest.mark.parametrize("text", [".*", "^$", "[a-z]+", "a|b", "\\d{3}", "(?i)x"])
def test_search_text_is_matched_literally(text: str) -> None:
    out = mongo_filter(ListQuery(search=text), NODES, BASE)
    rx = re.compile(out["$or"][0]["name"]["$regex"])
    assert rx.fullmatch(text)
    assert out["$or"] == [{"name": {"$regex": re.escape(text), "$options": "i"}}]


def test_search_fields_follow_the_spec() -> None:
    out = mongo_filter(ListQuery(search="hi"), entity("conversations"), BASE)
    assert [list(c) for c in out["$or"]] == [["title"]]
