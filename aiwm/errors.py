"""The one domain exception tree.

The store and the actors raise these; only the API edge (``serve/problems.py``) turns
them into HTTP ``application/problem+json``. Each error carries a stable ``code`` that
clients can switch on, and says whether retrying the same call can help.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class AiwmError(Exception):
    """Base of every error AIWM raises on purpose."""

    code = "internal"
    status = 500
    title = "Internal error"
    retryable = False

    def __init__(self, detail: str, *, extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra or {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep keyword-only state when the error crosses a Ray process boundary.
        return (_rebuild, (type(self), self.detail, self.extra))


def _rebuild(cls: type[AiwmError], detail: str, extra: dict[str, Any]) -> AiwmError:
    return cls(detail, extra=extra)


class NotFound(AiwmError):
    code = "not_found"
    status = 404
    title = "Not found"


class VersionConflict(AiwmError):
    """The caller's version is stale: re-read the document and apply the change again."""

    code = "version_conflict"
    status = 409
    title = "Version conflict"


class AlreadyExists(AiwmError):
    code = "already_exists"
    status = 409
    title = "Already exists"


class InUse(AiwmError):
    """The document is referenced by others; ``extra['usedBy']`` names them."""

    code = "in_use"
    status = 409
    title = "Still in use"


class InvalidReference(AiwmError):
    """A field points at a document that does not exist in the caller's org."""

    code = "invalid_reference"
    status = 422
    title = "Invalid reference"


class ValidationFailed(AiwmError):
    """Input is wrong; ``extra['errors']`` lists every bad field."""

    code = "validation_failed"
    status = 422
    title = "Validation failed"


class Unauthorized(AiwmError):
    code = "unauthorized"
    status = 401
    title = "Unauthorized"


class Forbidden(AiwmError):
    code = "forbidden"
    status = 403
    title = "Forbidden"


class SignatureInvalid(Forbidden):
    """A signed URL was altered (its key, expiry or signature) or lacks its signature.
    Retrying the same URL cannot help; ask the API for a fresh one."""

    code = "signature_invalid"
    title = "Invalid signature"


class SignatureExpired(Forbidden):
    """A signed URL is past its expiry: ask the API for a fresh one. 403 like S3's
    "Request has expired", so a node treats both storage backends alike."""

    code = "signature_expired"
    title = "Signed URL expired"


class PayloadTooLarge(AiwmError):
    code = "payload_too_large"
    status = 413
    title = "Payload too large"


class InsufficientStorage(AiwmError):
    """The server's disk is full: nothing was stored. Retrying once space is freed helps."""

    code = "insufficient_storage"
    status = 507
    title = "Insufficient storage"
    retryable = True


class Unavailable(AiwmError):
    """A dependency (database, actor) is down. Retrying later is expected to work."""

    code = "unavailable"
    status = 503
    title = "Service unavailable"
    retryable = True


class CommandTimeout(AiwmError):
    """A node did not acknowledge or answer a command in time; ``extra['queued']`` says
    whether it is still queued for delivery, ``extra['commandId']`` what to wait on."""

    code = "command_timeout"
    status = 504
    title = "Command timed out"
    retryable = True


class InvalidState(AiwmError):
    """The action does not apply to the resource as it is now (e.g. retrying a running
    execution)."""

    code = "invalid_state"
    status = 409
    title = "Invalid state"


class ChecksumMismatch(AiwmError):
    """A downloaded file's size or sha256 differs from what its source promised. The bad
    bytes are deleted, so trying again downloads the file afresh."""

    code = "checksum_mismatch"
    status = 502
    title = "Checksum mismatch"
    retryable = True


class Cancelled(AiwmError):
    """The work was cancelled before it finished (a node command, an execution step)."""

    code = "cancelled"
    status = 409
    title = "Cancelled"


def field_errors(errors: Sequence[Mapping[str, Any]], location: str = "body") -> list[dict[str, str]]:
    """Pydantic's error list as ``[{field, message, type}]``, the shape of our 422s."""
    out = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        if not loc or loc[0] not in {"body", "query", "path", "header"}:
            loc.insert(0, location)
        out.append({"field": ".".join(loc), "message": str(e.get("msg", "")), "type": e.get("type", "")})
    return out
