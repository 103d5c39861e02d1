"""The FastAPI application: REST under /api, OpenAPI UI at /api-docs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

import aiwm
from actors import Writer
from aiwm.models import ENTITIES
from aiwm.objectstore import object_store_for
from aiwm.settings import Settings
from serve import (
    deployments,
    executions,
    files,
    gateway,
    model_files,
    nodes,
    problems,
    relay,
    routes,
)
from serve.correlation import Correlation
from serve.crud import crud_router
from serve.deps import AppState
from serve.limits import BodyLimit, RequestLimits
from serve.upload_port import UploadPort

DESCRIPTION = """AIWM, the AI Workload Manager: nodes, models, deployments, agents and
their instructions, tools and conversations.

Authenticate with `Authorization: Bearer <token>`; make a token with
`aiwm token create --role admin --org ORG`. Errors are `application/problem+json`
with a stable `code`."""


# Routes that wait as long as their caller asks (within their own caps), or stream a body
# at the client's pace: AIWM_REQUEST_TIMEOUT does not cut them off.
UNTIMED = (
    r"/api/executions/[^/]+/wait",
    r"/api/nodes/[^/]+/commands(/[^/]+)?",
    "/api/models/upload",
    r"/api/models/[^/]+/invoke/.*",
    r"/v1/.*",
)


def build_app(*, settings: Settings, writer: Writer,
              node_host_check: Callable[[float], Awaitable[None]] | None = None,
              orchestrator: Writer | None = None, in_serve: bool = False) -> FastAPI:
    """The whole HTTP surface; ``writer`` is the Registry (actor or in-process),
    ``orchestrator`` the ExecutionOrchestrator (without it, executions answer 503).
    ``in_serve``: Ray Serve wraps the app (and returns X-Request-Id itself); the replica
    then also takes uploads on AIWM_UPLOAD_PORT (serve/upload_port.py) while it runs."""
    upload_port: UploadPort | None = None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if upload_port is not None:
            await upload_port.start()
        try:
            yield
        finally:
            if upload_port is not None:
                await upload_port.stop()

    app = FastAPI(
        lifespan=lifespan,
        title="AIWM",
        version=aiwm.__version__,
        description=DESCRIPTION,
        docs_url=None,  # served below from local files, so it works without Internet
        redoc_url=None,
        openapi_url="/api/openapi.json",
        responses={
            429: {"description": "Too many requests for this token (AIWM_RATE_LIMIT); "
                                 "see Retry-After"},
            504: {"description": "No answer within AIWM_REQUEST_TIMEOUT"},
        },
    )
    app.state.aiwm = AppState(settings=settings, writer=writer, node_host_check=node_host_check,
                              orchestrator=orchestrator)
    _api_docs(app)
    problems.install(app)
    app.include_router(routes.router, prefix="/api")
    app.include_router(nodes.router, prefix="/api")
    app.state.object_store = object_store_for(settings, public_url=settings.public_url())
    app.include_router(files.router, prefix="/api")
    app.include_router(model_files.router, prefix="/api")
    app.include_router(executions.router, prefix="/api")
    app.include_router(deployments.router, prefix="/api")
    app.include_router(relay.router)
    app.include_router(gateway.router)
    own_actions = {"deployments": frozenset({"create", "delete"}),
                   "models": frozenset({"delete"})}  # serve/model_files.py: frees the files
    for spec in ENTITIES.values():
        app.include_router(crud_router(spec, skip=own_actions.get(spec.name, frozenset())),
                           prefix="/api")
    app.add_middleware(BodyLimit, max_bytes=settings.aiwm_max_body_bytes,
                       streaming=(model_files.UPLOAD_PATH,))
    app.add_middleware(RequestLimits, rate=settings.aiwm_rate_limit,
                       burst=settings.aiwm_rate_burst, timeout=settings.aiwm_request_timeout,
                       untimed=UNTIMED)
    if settings.origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-Id"],
        )
    # Outermost: even a 413, 429 or 504 from the limits carries the correlation id.
    app.add_middleware(Correlation, access_log=settings.aiwm_access_log, echo=not in_serve)
    if in_serve and settings.aiwm_upload_port:
        upload_port = UploadPort(app, host=settings.host, port=settings.aiwm_upload_port)
    app.state.upload_port = upload_port
    return app


def _api_docs(app: FastAPI) -> None:
    """Swagger UI at /api-docs with its assets served locally (GPU sites are often offline)."""
    app.mount("/api-docs/assets", StaticFiles(directory=str(swagger_ui_path)), name="api-docs")

    @app.get("/api-docs", include_in_schema=False)
    async def api_docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/api/openapi.json",
            title="AIWM API",
            swagger_js_url="/api-docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/api-docs/assets/swagger-ui.css",
            swagger_favicon_url="/api-docs/assets/favicon-32x32.png",
        )
