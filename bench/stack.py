"""The real stack a bench runs against: the embedded database, a local Ray cluster with
AIWM deployed on it (HAProxy ingress when it can be used), and an admin token."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from aiwm import embedded_db
from aiwm.auth import issue_token
from aiwm.settings import Settings, load_settings
from bench.rest import _free_port, wait_green


@dataclass(frozen=True)
class Stack:
    settings: Settings
    url: str  # http://127.0.0.1:PORT
    token: str  # admin of org "bench"
    ingress: str  # how requests get in, in words

    def api(self, **options: Any) -> httpx.Client:
        """A client of ``/api`` with the token (the caller closes it)."""
        return httpx.Client(base_url=f"{self.url}/api",
                            headers={"Authorization": f"Bearer {self.token}"}, **options)


@contextlib.contextmanager
def running_stack(home: Path, *, local_public_url: bool = False) -> Iterator[Stack]:
    """Start everything with its data in ``home``; stop it all on exit (SIGTERM too, when
    the bench turns it into SystemExit). ``local_public_url``: signed URLs point at
    127.0.0.1, for a bench that downloads them on this host."""
    db_port = _free_port()
    embedded_db.start(home, db_port)
    try:
        port = _free_port()
        extra = {"aiwm_public_url": f"http://127.0.0.1:{port}"} if local_public_url else {}
        # One token drives the whole load: the per-token rate limit would measure itself.
        settings = load_settings(aiwm_home=home, aiwm_db_port=db_port, mongodb_uri=None,
                                 aiwm_rate_limit=0, aiwm_upload_port=_free_port(),
                                 port=port, **extra)
        from serve.ingress import ray_environment

        mode = ray_environment()
        import ray

        from serve.ingress import deploy

        ray.init(address="local", namespace="aiwm", include_dashboard=False, log_to_driver=False)
        try:
            deploy(settings)
            url = f"http://127.0.0.1:{port}"
            wait_green(url)
            token, _ = issue_token(secret=settings.secret(), sub="bench", org_id="bench",
                                   roles=["admin"], expires_in=7200)
            yield Stack(settings=settings, url=url, token=token, ingress=mode.describe())
        finally:
            ray.shutdown()
    finally:
        embedded_db.stop(home)


def make_nodes(api: httpx.Client, n: int) -> list[dict[str, str]]:
    """``n`` nodes named sim-000..., each with a node token: ``[{nodeId, token}]``."""
    nodes = []
    for i in range(n):
        node = api.post("/nodes", json={"name": f"sim-{i:03d}"}).json()
        made = api.post(f"/nodes/{node['id']}/token", json={}).json()
        nodes.append({"nodeId": node["id"], "token": made["token"]})
    return nodes
