"""The upload port (AIWM_UPLOAD_PORT): the API replicas take POST /api/models/upload there
too, past Serve's HTTP ingress, with the same authentication and answers; the CLI uses
it and falls back to the API port when it cannot reach it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import aiwm.cli_models
from aiwm.cli_models import MultipartBody
from aiwm.settings import Settings

WEIGHTS = os.urandom(3 * 2**20 + 17)  # several 1 MiB batches and a tail


@pytest.fixture()
def model(api: httpx.Client, unique: Callable[[str], str]) -> dict[str, Any]:
    r = api.post("/models", json={"name": unique("bulk"), "source": "upload"})
    assert r.status_code == 201, r.text
    return r.json()


def post(url: str, model_id: str, files: list[tuple[str, Path]], token: str | None,
         **headers: str) -> httpx.Response:
    body = MultipartBody({"modelId": model_id}, files)
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(url, content=b"".join(body), timeout=60, headers={
        **auth, **headers, "Content-Type": f"multipart/form-data; boundary={body.boundary}"})


def test_the_upload_port_takes_uploads_as_the_api_does(
        api: httpx.Client, model: dict[str, Any], settings: Settings,
        make_token: Callable[..., str], tmp_path: Path) -> None:
    target = api.get("/models/upload-url").json()
    url = f"http://127.0.0.1:{settings.aiwm_upload_port}/api/models/upload"
    assert target == {"url": url, "reason": None}
    source = tmp_path / "weights.bin"
    source.write_bytes(WEIGHTS)
    done = post(url, model["id"], [("weights.bin", source)], make_token("operator"),
                **{"X-Request-Id": "bulk-upload-1"})
    assert done.status_code == 201, done.text
    assert done.headers["x-request-id"] == "bulk-upload-1"
    stored = done.json()["files"][0]
    assert (stored["size"], stored["sha256"]) == (len(WEIGHTS), hashlib.sha256(WEIGHTS).hexdigest())
    assert [v["version"] for v in api.get(f"/models/{model['id']}/versions").json()["data"]] == [1]
    signed = api.get(f"/models/{model['id']}/download-url").json()["files"][0]["url"]
    assert httpx.get(signed, timeout=30).content == WEIGHTS

    # The same checks as on the API port: a token, the operator role, the model's org.
    refused = post(url, model["id"], [("weights.bin", source)], None)
    assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
    assert refused.headers["content-type"].startswith("application/problem+json")
    viewer = post(url, model["id"], [("weights.bin", source)], make_token("viewer"))
    assert viewer.status_code == 403
    other_org = post(url, model["id"], [("weights.bin", source)], make_token("admin", "org-b"))
    assert other_org.status_code == 404
    traversal = post(url, model["id"], [("../x.bin", source)], make_token("operator"))
    assert traversal.status_code == 422 and "leaves its folder" in traversal.json()["detail"]
    assert [v["version"] for v in api.get(f"/models/{model['id']}/versions").json()["data"]] == [1]

    # Only the upload route is there.
    token = make_token("admin")
    for method, path in (("GET", "/api/models"), ("GET", "/api/health"),
                         ("GET", "/api/models/upload-url"), ("POST", "/api/models/download")):
        other = httpx.request(method, f"http://127.0.0.1:{settings.aiwm_upload_port}{path}",
                              headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert other.status_code == 404, (path, other.text)
        assert other.json()["code"] == "not_found" and "upload port" in other.json()["detail"]
    # Other methods on the upload path get what the API port gives them.
    for method in ("GET", "PUT"):
        here = httpx.request(method, url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        there = httpx.request(method, f"{api.base_url}models/upload", timeout=10,
                              headers={"Authorization": f"Bearer {token}"})
        assert (here.status_code, here.json()["code"]) == (there.status_code, there.json()["code"])


def test_viewers_are_not_told_the_upload_port(client_for: Callable[..., httpx.Client]) -> None:
    assert client_for("viewer").get("/models/upload-url").status_code == 403


def test_the_cli_sends_through_the_upload_port_and_falls_back_when_it_is_unreachable(
        api: httpx.Client, model: dict[str, Any], cluster: str, settings: Settings,
        make_token: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "weights.bin"
    source.write_bytes(WEIGHTS)
    asked: list[str | None] = []
    real = aiwm.cli_models.upload_target

    def spy(client: httpx.Client) -> str | None:
        asked.append(real(client))
        return asked[-1]

    monkeypatch.setattr(aiwm.cli_models, "upload_target", spy)
    runner = CliRunner()
    args = ["models", "upload", str(source), "--model", model["id"], "--api", cluster,
            "--token", make_token("operator")]
    from aiwm.cli import app

    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert asked == [f"http://127.0.0.1:{settings.aiwm_upload_port}/api/models/upload"]
    assert "version 1: 1 file(s)" in done.output and "did not take" not in done.output

    # A port nothing listens on (a firewall, a replica that could not bind it): the CLI
    # says so and uploads through the API port.
    monkeypatch.setattr(aiwm.cli_models, "upload_target",
                        lambda client: "http://127.0.0.1:9/api/models/upload")
    fallback = runner.invoke(app, args)
    assert fallback.exit_code == 0, fallback.output
    assert "ConnectError" in fallback.output and "version 2: 1 file(s)" in fallback.output
    # One that takes part of the upload, then breaks the connection (a replica stopping):
    # the CLI sends the whole upload again through the API port.
    with cutting_server() as cut_url:
        monkeypatch.setattr(aiwm.cli_models, "upload_target", lambda client: cut_url)
        broken = runner.invoke(app, args)
    assert broken.exit_code == 0, broken.output
    assert "did not take the upload" in broken.output and "version 3: 1 file(s)" in broken.output
    versions = api.get(f"/models/{model['id']}/versions").json()["data"]
    assert [v["files"][0]["sha256"] for v in versions] == [hashlib.sha256(WEIGHTS).hexdigest()] * 3


@contextlib.contextmanager
def cutting_server() -> Iterator[str]:
    """A port that reads the first 64 KiB of each request, then resets the connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/api/models/upload"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_no_upload_url_over_plain_http_for_an_api_reached_over_https(
        api: httpx.Client, cluster: str, make_token: Callable[..., str]) -> None:
    behind_tls = api.get("/models/upload-url", headers={"X-Forwarded-Proto": "https"}).json()
    assert behind_tls["url"] is None and "HTTPS" in behind_tls["reason"]
    # The CLI sends its token only to the API's own host: a URL naming another one (here
    # made by a Host header a proxy rewrote) is passed over.
    token = make_token("operator")
    with httpx.Client(base_url=f"{cluster}/api", headers={
            "Authorization": f"Bearer {token}", "Host": "elsewhere.example"}) as client:
        assert client.get("/models/upload-url").json()["url"].startswith(
            "http://elsewhere.example:")
        assert aiwm.cli_models.upload_target(client) is None
    with httpx.Client(base_url=f"{cluster}/api",
                      headers={"Authorization": f"Bearer {token}"}) as client:
        assert aiwm.cli_models.upload_target(client) is not None
