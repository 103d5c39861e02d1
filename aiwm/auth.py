"""Bearer tokens: HS256 JWTs signed with JWT_SECRET.

A user token carries ``sub``, ``orgId`` and ``roles``. Roles are ordered:
``viewer`` reads, ``operator`` also writes, ``admin`` also manages tokens.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

import jwt

from aiwm.errors import Forbidden, Unauthorized

ALGORITHM = "HS256"
USER_TOKEN = "user"


class Role(str, Enum):
    viewer = "viewer"
    operator = "operator"
    admin = "admin"


_RANK = {Role.viewer: 0, Role.operator: 1, Role.admin: 2}


@dataclass(frozen=True)
class Principal:
    """Who is calling: every store and registry call is scoped by ``org_id``."""

    sub: str
    org_id: str
    roles: frozenset[Role]

    def has(self, needed: Role) -> bool:
        return any(_RANK[r] >= _RANK[needed] for r in self.roles)

    def require(self, needed: Role) -> None:
        if not self.has(needed):
            held = ", ".join(sorted(r.value for r in self.roles)) or "none"
            raise Forbidden(f"this action needs the '{needed.value}' role; the token has {held}")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def issue_token(
    *,
    secret: str,
    sub: str,
    org_id: str,
    roles: Iterable[Role | str],
    expires_in: int,
    now: Callable[[], dt.datetime] = _utcnow,
) -> tuple[str, dt.datetime]:
    """Sign a user token; returns the token and when it expires."""
    if expires_in <= 0:
        raise ValueError("expires_in must be positive")
    role_names = sorted({Role(r).value for r in roles})
    if not role_names:
        raise ValueError("a token needs at least one role")
    issued = now()
    expires = issued + dt.timedelta(seconds=expires_in)
    claims = {
        "sub": sub,
        "orgId": org_id,
        "roles": role_names,
        "typ": USER_TOKEN,
        "jti": uuid.uuid4().hex,
        "iat": int(issued.timestamp()),
        "exp": int(expires.timestamp()),
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM), expires


def decode_token(token: str, *, secret: str, leeway: int = 0) -> Principal:
    """Verify a user token and return its principal, or raise :class:`Unauthorized`."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "sub"]},
            leeway=leeway,
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized("token expired") from None
    except jwt.InvalidSignatureError:
        raise Unauthorized("token signature is invalid") from None
    except jwt.PyJWTError as e:
        raise Unauthorized(f"token is invalid: {e}") from None
    if claims.get("typ", USER_TOKEN) != USER_TOKEN:
        raise Unauthorized("this token cannot call the REST API")
    org = claims.get("orgId")
    roles = claims.get("roles")
    if not isinstance(org, str) or not org or not isinstance(roles, list):
        raise Unauthorized("token lacks orgId or roles")
    try:
        parsed = frozenset(Role(r) for r in roles)
    except ValueError:
        raise Unauthorized(f"token has an unknown role in {roles!r}") from None
    return Principal(sub=str(claims["sub"]), org_id=org, roles=parsed)


class VerifiedTokens:
    """User tokens already verified, so a request with a known token skips HMAC and parsing.

    A token's signature and claims never change, so the result of :func:`decode_token`
    is kept per token string, bounded to ``size`` entries (oldest dropped first), until
    the token's ``exp``: an expired token is refused exactly as :func:`decode_token` would.
    Failures are not kept; a bad token costs a full check every time.
    """

    def __init__(self, secret: str, *, size: int = 4096,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self._secret = secret
        self._size = size
        self._clock = clock or time.time
        self._known: dict[str, tuple[Principal, float]] = {}

    def principal(self, token: str) -> Principal:
        hit = self._known.get(token)
        if hit is not None:
            if self._clock() < hit[1]:
                return hit[0]
            del self._known[token]
            raise Unauthorized("token expired")
        found = decode_token(token, secret=self._secret)
        exp = jwt.decode(token, options={"verify_signature": False})["exp"]
        if len(self._known) >= self._size:
            del self._known[next(iter(self._known))]
        self._known[token] = (found, float(exp))
        return found


def bearer(header: str | None) -> str:
    """Extract the token from an ``Authorization: Bearer ...`` header."""
    if not header:
        raise Unauthorized("missing Authorization header; send 'Authorization: Bearer <token>'")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization header must be 'Bearer <token>'")
    return token.strip()


NODE_TOKEN = "node"


@dataclass(frozen=True)
class NodeIdentity:
    """Who is on the other end of a node socket."""

    node_id: str
    org_id: str
    token_id: str


def issue_node_token(
    *,
    secret: str,
    node_id: str,
    org_id: str,
    token_id: str,
    expires_in: int,
    now: Callable[[], dt.datetime] = _utcnow,
) -> tuple[str, dt.datetime]:
    """Sign a node token: it opens /ws/node for ``node_id`` only and never calls /api."""
    if expires_in <= 0:
        raise ValueError("expires_in must be positive")
    issued = now()
    expires = issued + dt.timedelta(seconds=expires_in)
    claims = {"sub": node_id, "orgId": org_id, "typ": NODE_TOKEN, "jti": token_id,
              "iat": int(issued.timestamp()), "exp": int(expires.timestamp())}
    return jwt.encode(claims, secret, algorithm=ALGORITHM), expires


def decode_node_token(token: str, *, secret: str) -> NodeIdentity:
    """Verify a node token's signature, expiry and kind. Whether it is still the node's
    current, unrevoked token is checked against the node document by the caller."""
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM],
                            options={"require": ["exp", "sub", "jti"]})
    except jwt.ExpiredSignatureError:
        raise Unauthorized("node token expired") from None
    except jwt.PyJWTError as e:
        raise Unauthorized(f"node token is invalid: {e}") from None
    if claims.get("typ") != NODE_TOKEN:
        raise Unauthorized("not a node token: make one with POST /api/nodes/{id}/token")
    org = claims.get("orgId")
    if not isinstance(org, str) or not org:
        raise Unauthorized("node token lacks orgId")
    return NodeIdentity(node_id=str(claims["sub"]), org_id=org, token_id=str(claims["jti"]))
