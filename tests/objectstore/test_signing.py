"""Pure: signing and checking the local store's download URLs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiwm.errors import Forbidden, SignatureExpired, SignatureInvalid
from aiwm.objectstore.signing import sign, signing_key, verify, verify_query

SECRET = signing_key("jwt-secret-for-tests")
KEY = "models/org/m/v1/model.safetensors"
NOW = 1_800_000_000


def test_a_fresh_signature_verifies() -> None:
    sig = sign(KEY, NOW + 60, SECRET)
    verify(KEY, NOW + 60, sig, SECRET, now=NOW)
    verify(KEY, NOW + 60, sig, SECRET, now=NOW + 60)  # valid through its last second
    verify_query(KEY, str(NOW + 60), sig, SECRET, now=NOW)


def test_the_key_is_derived_not_the_jwt_secret() -> None:
    assert SECRET != b"jwt-secret-for-tests"
    assert len(SECRET) == 32
    assert signing_key("jwt-secret-for-tests") == SECRET
    assert signing_key("another") != SECRET
    with pytest.raises(ValueError):
        signing_key("")


def test_expired() -> None:
    sig = sign(KEY, NOW, SECRET)
    with pytest.raises(SignatureExpired) as e:
        verify(KEY, NOW, sig, SECRET, now=NOW + 1)
    assert (e.value.status, e.value.code) == (403, "signature_expired")
    assert isinstance(e.value, Forbidden)


@pytest.mark.parametrize("tamper", ["key", "expires", "sig", "secret"])
def test_tampered(tamper: str) -> None:
    key, expires, sig, secret = KEY, NOW + 60, sign(KEY, NOW + 60, SECRET), SECRET
    if tamper == "key":
        key = KEY.replace("v1", "v2")
    elif tamper == "expires":
        expires += 3600
    elif tamper == "sig":
        sig = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    else:
        secret = signing_key("other")
    with pytest.raises(SignatureInvalid) as e:
        verify(key, expires, sig, secret, now=NOW)
    assert (e.value.status, e.value.code) == (403, "signature_invalid")


def test_a_forged_expired_url_is_told_invalid_not_expired() -> None:
    with pytest.raises(SignatureInvalid):
        verify(KEY, NOW - 10, "00" * 32, SECRET, now=NOW)


@pytest.mark.parametrize(("expires", "sig"), [
    (None, "ab"), ("", "ab"), (str(NOW), None), (str(NOW), ""), ("12a", "ab"), ("-5", "ab"),
    ("1e9", "ab"), ("9" * 40, "ab"), ("١٢٣", "ab"),  # Arabic-Indic digits are not ASCII
])
def test_malformed_query_is_invalid(expires: str | None, sig: str | None) -> None:
    with pytest.raises(SignatureInvalid):
        verify_query(KEY, expires, sig, SECRET, now=NOW)


@given(st.text(max_size=80))
def test_any_wrong_signature_is_refused_cleanly(sig: str) -> None:
    expected = sign(KEY, NOW + 60, SECRET)
    if sig == expected:
        return
    with pytest.raises(SignatureInvalid):  # never TypeError, whatever the characters
        verify(KEY, NOW + 60, sig, SECRET, now=NOW)
