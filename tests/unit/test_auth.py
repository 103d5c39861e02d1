"""Bearer tokens: signing, verification, roles and header parsing. Pure: no clock waits."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time

import jwt
import pytest

from aiwm.auth import (
    ALGORITHM,
    Principal,
    Role,
    VerifiedTokens,
    bearer,
    decode_token,
    issue_token,
)
from aiwm.errors import Forbidden, Unauthorized

SECRET = "unit-test-secret-that-is-long-enough-for-hs256"
OTHER = "another-secret-that-is-also-long-enough-for-hs256"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _claims(**over: object) -> dict[str, object]:
    now = int(_now().timestamp())
    claims: dict[str, object] = {
        "sub": "alice", "orgId": "org1", "roles": ["viewer"], "typ": "user",
        "iat": now, "exp": now + 3600,
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(claims: dict[str, object], secret: str = SECRET, alg: str = ALGORITHM) -> str:
    return jwt.encode(claims, secret, algorithm=alg)


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# --- issue / decode ---------------------------------------------------------------------


def test_round_trip_gives_back_the_principal() -> None:
    token, _ = issue_token(
        secret=SECRET, sub="alice", org_id="org1", roles=[Role.operator, "viewer"],
        expires_in=600,
    )
    p = decode_token(token, secret=SECRET)
    assert p == Principal(sub="alice", org_id="org1",
                          roles=frozenset({Role.operator, Role.viewer}))


def test_issue_returns_expiry_relative_to_now_and_writes_claims() -> None:
    fixed = _now().replace(microsecond=0)
    token, expires = issue_token(
        secret=SECRET, sub="bob", org_id="o", roles=["admin", "admin", "viewer"],
        expires_in=90, now=lambda: fixed,
    )
    assert expires == fixed + dt.timedelta(seconds=90)
    claims = jwt.decode(token, SECRET, algorithms=[ALGORITHM])
    assert claims["typ"] == "user"
    assert claims["orgId"] == "o"
    assert claims["roles"] == ["admin", "viewer"]  # deduplicated and sorted
    assert claims["iat"] == int(fixed.timestamp())
    assert claims["exp"] == int(fixed.timestamp()) + 90
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_each_token_gets_its_own_jti() -> None:
    a, _ = issue_token(secret=SECRET, sub="s", org_id="o", roles=["viewer"], expires_in=60)
    b, _ = issue_token(secret=SECRET, sub="s", org_id="o", roles=["viewer"], expires_in=60)
    ja = jwt.decode(a, SECRET, algorithms=[ALGORITHM])["jti"]
    jb = jwt.decode(b, SECRET, algorithms=[ALGORITHM])["jti"]
    assert ja and jb and ja != jb


@pytest.mark.parametrize("expires_in", [0, -1])
def test_issue_refuses_non_positive_lifetime(expires_in: int) -> None:
    with pytest.raises(ValueError, match="expires_in"):
        issue_token(secret=SECRET, sub="s", org_id="o", roles=["viewer"], expires_in=expires_in)


def test_issue_refuses_no_roles_and_unknown_roles() -> None:
    with pytest.raises(ValueError, match="at least one role"):
        issue_token(secret=SECRET, sub="s", org_id="o", roles=[], expires_in=60)
    with pytest.raises(ValueError):
        issue_token(secret=SECRET, sub="s", org_id="o", roles=["root"], expires_in=60)


def test_expired_token_is_refused() -> None:
    two_hours_ago = _now() - dt.timedelta(hours=2)
    token, expires = issue_token(
        secret=SECRET, sub="s", org_id="o", roles=["viewer"], expires_in=3600,
        now=lambda: two_hours_ago,
    )
    assert expires < _now()
    with pytest.raises(Unauthorized, match="expired") as info:
        decode_token(token, secret=SECRET)
    assert info.value.status == 401
    assert info.value.code == "unauthorized"


def test_leeway_accepts_a_recently_expired_token() -> None:
    two_hours_ago = _now() - dt.timedelta(hours=2)
    token, _ = issue_token(
        secret=SECRET, sub="s", org_id="o", roles=["viewer"], expires_in=3600,
        now=lambda: two_hours_ago,
    )
    assert decode_token(token, secret=SECRET, leeway=7200).sub == "s"


def test_token_issued_in_the_future_is_refused() -> None:
    later = _now() + dt.timedelta(hours=1)
    token, _ = issue_token(
        secret=SECRET, sub="s", org_id="o", roles=["viewer"], expires_in=7200, now=lambda: later
    )
    with pytest.raises(Unauthorized):
        decode_token(token, secret=SECRET)


def test_wrong_secret_is_refused() -> None:
    token, _ = issue_token(secret=SECRET, sub="s", org_id="o", roles=["admin"], expires_in=60)
    with pytest.raises(Unauthorized, match="signature"):
        decode_token(token, secret=OTHER)


def test_tampered_payload_is_refused() -> None:
    token, _ = issue_token(secret=SECRET, sub="s", org_id="org1", roles=["viewer"],
                           expires_in=60)
    header, payload, signature = token.split(".")
    claims = jwt.decode(token, SECRET, algorithms=[ALGORITHM])
    claims["roles"] = ["admin"]
    claims["orgId"] = "org2"
    forged = ".".join([header, _b64(claims), signature])
    with pytest.raises(Unauthorized, match="signature"):
        decode_token(forged, secret=SECRET)


def test_tampered_signature_is_refused() -> None:
    token, _ = issue_token(secret=SECRET, sub="s", org_id="o", roles=["viewer"], expires_in=60)
    header, payload, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    with pytest.raises(Unauthorized):
        decode_token(".".join([header, payload, flipped]), secret=SECRET)


@pytest.mark.parametrize("garbage", ["", "not-a-jwt", "a.b.c", "a.b"])
def test_garbage_is_unauthorized_not_a_crash(garbage: str) -> None:
    with pytest.raises(Unauthorized, match="invalid"):
        decode_token(garbage, secret=SECRET)


def test_unsigned_alg_none_token_is_refused() -> None:
    header = _b64({"alg": "none", "typ": "JWT"})
    token = f"{header}.{_b64(_claims(roles=['admin']))}."
    with pytest.raises(Unauthorized):
        decode_token(token, secret=SECRET)


def test_other_hmac_algorithm_is_refused() -> None:
    token = _sign(_claims(), secret=SECRET * 2, alg="HS512")
    with pytest.raises(Unauthorized):
        decode_token(token, secret=SECRET * 2)


def test_unknown_role_is_refused() -> None:
    token = _sign(_claims(roles=["viewer", "root"]))
    with pytest.raises(Unauthorized, match="unknown role"):
        decode_token(token, secret=SECRET)


@pytest.mark.parametrize(
    "over",
    [
        {"orgId": None},           # missing
        {"orgId": ""},             # empty
        {"orgId": 42},             # not a string
        {"roles": None},           # missing
        {"roles": "admin"},        # not a list
    ],
    ids=["no-org", "empty-org", "int-org", "no-roles", "roles-string"],
)
def test_missing_org_or_roles_is_refused(over: dict[str, object]) -> None:
    claims = _claims()
    for k, v in over.items():
        if v is None:
            claims.pop(k)
        else:
            claims[k] = v
    with pytest.raises(Unauthorized, match="orgId or roles"):
        decode_token(_sign(claims), secret=SECRET)


@pytest.mark.parametrize("typ", ["node", "refresh", "USER", ""])
def test_non_user_token_type_is_refused(typ: str) -> None:
    with pytest.raises(Unauthorized, match="cannot call the REST API"):
        decode_token(_sign(_claims(typ=typ)), secret=SECRET)


@pytest.mark.parametrize("missing", ["exp", "sub"])
def test_required_claims(missing: str) -> None:
    claims = _claims()
    claims.pop(missing)
    with pytest.raises(Unauthorized):
        decode_token(_sign(claims), secret=SECRET)


# --- roles ------------------------------------------------------------------------------

ORDER = [Role.viewer, Role.operator, Role.admin]


def _p(*roles: Role) -> Principal:
    return Principal(sub="s", org_id="o", roles=frozenset(roles))


@pytest.mark.parametrize("held", ORDER)
@pytest.mark.parametrize("needed", ORDER)
def test_role_ranking(held: Role, needed: Role) -> None:
    expected = ORDER.index(held) >= ORDER.index(needed)
    p = _p(held)
    assert p.has(needed) is expected
    if expected:
        p.require(needed)
    else:
        with pytest.raises(Forbidden) as info:
            p.require(needed)
        assert info.value.status == 403
        assert f"'{needed.value}'" in info.value.detail
        assert held.value in info.value.detail


def test_highest_of_several_roles_counts() -> None:
    p = _p(Role.viewer, Role.admin)
    assert p.has(Role.admin)
    p.require(Role.operator)


def test_no_roles_has_nothing() -> None:
    p = _p()
    assert not p.has(Role.viewer)
    with pytest.raises(Forbidden, match="has none"):
        p.require(Role.viewer)


# --- the Authorization header -------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("Bearer   abc  ", "abc"),
    ],
)
def test_bearer_extracts_the_token(header: str, token: str) -> None:
    assert bearer(header) == token


@pytest.mark.parametrize("header", [None, ""])
def test_bearer_missing_header(header: str | None) -> None:
    with pytest.raises(Unauthorized, match="missing Authorization header"):
        bearer(header)


@pytest.mark.parametrize(
    "header", ["Bearer", "Bearer ", "Bearer    ", "Basic dXNlcjpwdw==", "Token abc", "abc"]
)
def test_bearer_malformed_header(header: str) -> None:
    with pytest.raises(Unauthorized, match="must be 'Bearer <token>'"):
        bearer(header)


class _Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


def test_verified_tokens_serve_a_known_token_until_it_expires() -> None:
    clock = _Clock()
    tokens = VerifiedTokens(SECRET, clock=clock)
    token, _ = issue_token(secret=SECRET, sub="s", org_id="o", roles=["operator"], expires_in=60)
    first = tokens.principal(token)
    assert tokens.principal(token) is first  # the second call is the kept result
    clock.t += 61
    with pytest.raises(Unauthorized, match="expired"):
        tokens.principal(token)


def test_verified_tokens_keep_refusing_bad_tokens() -> None:
    tokens = VerifiedTokens(SECRET)
    token, _ = issue_token(secret=OTHER, sub="s", org_id="o", roles=["admin"], expires_in=60)
    for _ in range(2):
        with pytest.raises(Unauthorized, match="signature"):
            tokens.principal(token)
    good, _ = issue_token(secret=SECRET, sub="s", org_id="o", roles=["admin"], expires_in=60)
    header, payload, signature = good.split(".")
    claims = jwt.decode(good, SECRET, algorithms=[ALGORITHM])
    claims["orgId"] = "other"
    tokens.principal(good)
    with pytest.raises(Unauthorized):  # a known good token does not vouch for a forged twin
        tokens.principal(".".join([header, _b64(claims), signature]))


def test_verified_tokens_are_bounded() -> None:
    tokens = VerifiedTokens(SECRET, size=3)
    issued = [issue_token(secret=SECRET, sub=f"s{i}", org_id="o", roles=["viewer"],
                          expires_in=60)[0] for i in range(5)]
    for token in issued:
        assert tokens.principal(token).sub.startswith("s")
    assert len(tokens._known) == 3
    assert list(tokens._known) == issued[2:]
