"""The baseline for bench/rest.py: the same FastAPI app, served by plain uvicorn, with the
Registry in-process instead of an actor. `uvicorn --factory bench.plain_app:app`."""

from __future__ import annotations

import gc

from fastapi import FastAPI

from actors import LocalWriter, Registry
from aiwm.settings import load_settings
from serve.app import build_app


def app() -> FastAPI:
    settings = load_settings()
    built = build_app(settings=settings, writer=LocalWriter(Registry(settings=settings)))
    gc.freeze()  # as the Serve replica does, so both sides run the same code
    return built
