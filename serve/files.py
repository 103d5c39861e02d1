"""``GET /api/files/{key}``: the local object store's signed downloads.

No bearer token: the URL's ``expires`` and ``sig`` are the authorisation (made by
:meth:`aiwm.objectstore.LocalStore.url`). Answers:

- 200 with the file, or 206 for ``Range: bytes=N-`` (and other single or multiple
  ranges) so an interrupted node download resumes; 416 for a range past the end;
- 403 ``signature_invalid`` when the key, expiry or signature was altered or is missing;
- 403 ``signature_expired`` for a genuine URL past its expiry (403, like S3's "Request has
  expired", so nodes treat both backends alike: ask the API for fresh URLs);
- 404 ``not_found`` when the signature is good but there is no such object, or when this
  API serves no files (the S3 backend is in use: URLs point at S3 itself).

Wire it with ``app.include_router(files.router, prefix="/api")`` and put the
:class:`LocalStore` on ``app.state.object_store``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response

from aiwm.errors import NotFound
from aiwm.objectstore import LocalStore
from aiwm.objectstore.base import content_disposition, safe_filename

router = APIRouter(tags=["files"])


class ObjectFileResponse(FileResponse):
    chunk_size = 1024 * 1024  # fewer, larger sends for multi-GB model files


def local_store(request: Request) -> LocalStore:
    """The app's object store, if it is the local one (``app.state.object_store``)."""
    store = getattr(request.app.state, "object_store", None)
    if not isinstance(store, LocalStore):
        raise NotFound("this API serves no object files: model files are fetched from the "
                       "object storage directly, through the URLs the API hands out")
    return store


@router.head("/files/{key:path}", response_class=ObjectFileResponse, include_in_schema=False)
@router.get(
    "/files/{key:path}", response_class=ObjectFileResponse,
    summary="Download a stored file through a signed URL",
    responses={206: {"description": "The requested range"},
               403: {"description": "Signature altered (signature_invalid) or expired "
                                    "(signature_expired)"},
               404: {"description": "No such object"}},
)
async def get_file(
    key: str,
    expires: str | None = None,
    sig: str | None = None,
    filename: str | None = None,
    store: LocalStore = Depends(local_store),
) -> Response:
    store.verify(key, expires, sig)
    found = await store.file(key)
    if found is None:
        raise NotFound(f"no stored object {key!r}")
    headers = {"ETag": f'"{found.sha256}"', "Cache-Control": "private, max-age=0"}
    name = safe_filename(filename)
    if name:
        headers["Content-Disposition"] = content_disposition(name)
    return ObjectFileResponse(found.path, stat_result=found.stat, headers=headers,
                              media_type="application/octet-stream")
