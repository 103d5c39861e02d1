"""Expiring HMAC signatures for the local store's download URLs (pure: no clock, no I/O).

A URL carries ``expires`` (unix seconds) and ``sig`` = hex HMAC-SHA256 over
``f"{key}\\n{expires}"``. The HMAC key is derived from the JWT secret with a fixed context
string, so a URL signature can never be replayed as (or be forged from) a token signature.
"""

from __future__ import annotations

import hashlib
import hmac

from aiwm.errors import SignatureExpired, SignatureInvalid

CONTEXT = b"aiwm/objectstore/signed-url/v1"


def signing_key(jwt_secret: str) -> bytes:
    """The URL-signing key derived from the JWT secret."""
    if not jwt_secret:
        raise ValueError("the JWT secret is empty; build Settings with load_settings()")
    return hmac.new(jwt_secret.encode(), CONTEXT, hashlib.sha256).digest()


def sign(key: str, expires: int, secret: bytes) -> str:
    """The hex signature of ``key`` valid until unix time ``expires``."""
    return hmac.new(secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()


def verify(key: str, expires: int, sig: str, secret: bytes, now: float) -> None:
    """Return if ``sig`` signs ``key`` and ``expires`` and ``now`` is not past ``expires``.

    Raises SignatureInvalid for an altered key, expiry or signature (checked first, so
    only a genuine URL is ever told it expired) and SignatureExpired after ``expires``.
    """
    expected = sign(key, expires, secret).encode()
    if not hmac.compare_digest(expected, sig.encode("utf-8", "surrogateescape")):
        raise SignatureInvalid("the URL's signature does not match its key and expiry; "
                               "ask the API for a fresh download URL")
    if now > expires:
        raise SignatureExpired(f"the URL expired at unix time {expires}; "
                               "ask the API for a fresh download URL",
                               extra={"expires": expires})


def verify_query(key: str, expires: str | None, sig: str | None, secret: bytes, now: float) -> None:
    """:func:`verify` for the raw ``expires`` and ``sig`` query parameters of a request."""
    if not expires or not sig:
        raise SignatureInvalid("the URL lacks its 'expires' or 'sig' parameter; "
                               "ask the API for a signed download URL")
    if not (expires.isascii() and expires.isdigit()) or len(expires) > 12:
        raise SignatureInvalid(f"the URL's 'expires' is not a unix time: {expires[:20]!r}")
    verify(key, int(expires), sig, secret, now)
