"""The FastAPI application: REST under /api, OpenAPI UI at /api-docs."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

import aiwm
from actors import Writer
from aiwm.models import ENTITIES
from aiwm.settings import Settings
from serve import problems, routes
from serve.crud import crud_router
from serve.deps import AppState
from serve.limits import BodyLimit

DESCRIPTION = """AIWM, the AI Workload Manager: nodes, models, deployments, agents and
their instructions, tools and conversations.

Authenticate with `Authorization: Bearer <token>`; make a token with
`aiwm token create --role admin --org ORG`. Errors are `application/problem+json`
with a stable `code`."""


def build_app(*, settings: Settings, writer: Writer) -> FastAPI:
    """The whole HTTP surface; ``writer`` is the Registry (actor or in-process)."""
    app = FastAPI(
        title="AIWM",
        version=aiwm.__version__,
        description=DESCRIPTION,
        docs_url="/api-docs",
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.aiwm = AppState(settings=settings, writer=writer)
    problems.install(app)
    app.include_router(routes.router, prefix="/api")
    for spec in ENTITIES.values():
        app.include_router(crud_router(spec), prefix="/api")
    app.add_middleware(BodyLimit, max_bytes=settings.aiwm_max_body_bytes)
    if settings.origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    return app
