"""``aiwm models upload PATH`` and ``aiwm models import REPO``, with progress bars;
``aiwm models versions MODEL`` and ``aiwm models delete-version MODEL VERSION``.

Both talk to the REST API (``--api``, default this host's; ``--token`` or AIWM_TOKEN). An
upload streams a multipart body built here, file by file, so a 50 GB model never sits
in memory; an import starts the server-side execution and follows its progress.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from aiwm.settings import load_settings

models_app = typer.Typer(help="Model files: upload, import from HuggingFace, list and "
                         "delete versions.",
                         no_args_is_help=True)
out = Console()
CHUNK = 1024 * 1024

Api = Annotated[str | None, typer.Option(help="the API's URL (default: this host's)")]
Token = Annotated[str | None, typer.Option(help="a user token (default: $AIWM_TOKEN)")]


def _client(api: str | None, token: str | None) -> httpx.Client:
    token = token or os.environ.get("AIWM_TOKEN")
    if not token:
        out.print("[red]no token:[/] pass --token or set AIWM_TOKEN "
                  "(aiwm token create --role operator --org ORG)")
        raise typer.Exit(2)
    base = api or f"http://127.0.0.1:{load_settings().port}"
    return httpx.Client(base_url=base.rstrip("/") + "/api", timeout=httpx.Timeout(60, read=None),
                        headers={"Authorization": f"Bearer {token}"})


def _fail(response: httpx.Response) -> typer.Exit:
    try:
        body = response.json()
        detail = body.get("detail") or body
        errors = body.get("errors") or []
    except ValueError:
        detail, errors = response.text[:500], []
    out.print(f"[red]{response.status_code}[/] {detail}")
    for e in errors:
        out.print(f"  {e.get('field')}: {e.get('message')}")
    return typer.Exit(1)


def collect(path: Path) -> list[tuple[str, Path]]:
    """(name in the model, file) for a file, or for every file under a folder."""
    if path.is_file():
        return [(path.name, path)]
    if path.is_dir():
        return sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    raise typer.BadParameter(f"{path} is neither a file nor a folder")


class MultipartBody:
    """A multipart/form-data body streamed from disk, with its exact length."""

    def __init__(self, fields: dict[str, str], files: list[tuple[str, Path]]) -> None:
        self.boundary = f"aiwm-{uuid.uuid4().hex}"
        self.fields, self.files = fields, files
        self.on_bytes = lambda n: None

    def _heads(self) -> Iterator[tuple[bytes, Path | None]]:
        for name, value in self.fields.items():
            yield (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                   f"{value}\r\n").encode(), None
        for name, path in self.files:
            quoted = name.replace("\\", "\\\\").replace('"', '\\"')
            yield (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                   f"filename=\"{quoted}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                   ).encode(), path

    @property
    def length(self) -> int:
        total = len(f"--{self.boundary}--\r\n")
        for head, path in self._heads():
            total += len(head) + (path.stat().st_size + 2 if path else 0)
        return total

    def __iter__(self) -> Iterator[bytes]:
        for head, path in self._heads():
            yield head
            if path is not None:
                with open(path, "rb") as f:
                    while chunk := f.read(CHUNK):
                        self.on_bytes(len(chunk))
                        yield chunk
                yield b"\r\n"
        yield f"--{self.boundary}--\r\n".encode()


def _bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=out)


def upload_target(client: httpx.Client) -> str | None:
    """The upload port's URL, where uploads skip the API's HTTP proxy (GET
    /api/models/upload-url); None when the server has none (or is older than it), and
    when it names another host than the API's or plain HTTP where the API is HTTPS: the
    token goes with the upload, and only where it already goes."""
    r = client.get("/models/upload-url")
    try:
        url = r.json().get("url") if r.status_code == 200 else None
    except (ValueError, AttributeError):
        return None
    if not isinstance(url, str):
        return None
    try:
        target, api = httpx.URL(url), client.base_url
    except httpx.InvalidURL:
        return None
    if target.scheme not in ("http", "https") or target.host != api.host or \
            (api.scheme == "https" and target.scheme != "https"):
        out.print(f"[yellow]not sending to the server's upload URL {url}: it is not on the "
                  f"API's host and scheme ({api.scheme}://{api.host}); uploading through the "
                  "API")
        return None
    return url


@models_app.command("upload")
def upload(path: Path, model: Annotated[str, typer.Option(help="the model's id")],
           api: Api = None, token: Token = None) -> None:
    """Upload a file, or every file under a folder, as a new version of MODEL."""
    files = collect(path)
    body = MultipartBody({"modelId": model}, files)
    total = sum(p.stat().st_size for _, p in files)
    headers = {"Content-Type": f"multipart/form-data; boundary={body.boundary}",
               "Content-Length": str(body.length)}
    with _client(api, token) as client, _bar() as bar:
        task = bar.add_task(f"{len(files)} file(s)", total=total)
        body.on_bytes = lambda n: bar.advance(task, n)
        r = None
        try:
            target = upload_target(client)
            if target is not None:
                # Refused, busy, or cut off (a replica stopping): the API port takes the
                # whole upload again. A cut-off upload makes no version.
                try:
                    r = client.post(target, content=iter(body), headers=headers,
                                    timeout=httpx.Timeout(60, connect=5, read=None))
                    if r.status_code == 503:  # its connections are all taken
                        out.print(f"[yellow]the upload port {target} is busy: uploading "
                                  "through the API instead")
                        r = None
                except httpx.TransportError as e:
                    out.print(f"[yellow]the upload port {target} did not take the upload "
                              f"({type(e).__name__}: {str(e) or 'connection lost'}): uploading "
                              "through the API instead")
                if r is None:
                    bar.reset(task)
            if r is None:
                r = client.post("/models/upload", content=iter(body), headers=headers)
        except httpx.HTTPError as e:
            out.print(f"[red]the upload failed:[/] {type(e).__name__}: {str(e) or 'connection lost'}; "
                      f"see aiwm models versions {model}, and run the command again")
            raise typer.Exit(1) from None
    if r.status_code != 201:
        raise _fail(r)
    doc = r.json()
    out.print(f"[green]✓[/] model {model} version {doc['version']}: {len(doc['files'])} file(s), "
              f"{doc['bytes']} bytes")


@models_app.command("import")
def import_repo(repo: str, model: Annotated[str, typer.Option(help="the model's id")],
                revision: Annotated[str, typer.Option(help="branch, tag or commit")] = "main",
                allow: Annotated[list[str] | None, typer.Option(
                    help="only files matching (repeatable), e.g. '*.safetensors'")] = None,
                api: Api = None, token: Token = None) -> None:
    """Import a HuggingFace repo as a new version of MODEL and follow its progress."""
    with _client(api, token) as client:
        r = client.post("/models/download", json={"modelId": model, "repoId": repo,
                                                   "revision": revision, "allowPatterns": allow})
        if r.status_code != 202:
            raise _fail(r)
        execution_id = r.json()["execution"]["id"]
        out.print(f"import running as execution {execution_id}")
        doc: dict[str, Any] = {}
        with _bar() as bar:
            task = bar.add_task(repo, total=None)
            while True:
                r = client.get(f"/executions/{execution_id}")
                if r.status_code != 200:
                    raise _fail(r)
                doc = r.json()
                progress = doc["steps"][0].get("progress") or {}
                if progress.get("bytesTotal"):
                    bar.update(task, total=progress["bytesTotal"],
                               completed=progress.get("bytesDone", 0),
                               description=f"{repo} ({progress.get('filesDone', 0)}/"
                                           f"{progress.get('filesTotal', '?')} files)")
                if doc["status"] in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.5)
    if doc["status"] != "completed":
        out.print(f"[red]{doc['status']}[/]: {(doc.get('error') or {}).get('message')}")
        raise typer.Exit(1)
    result = doc["steps"][0]["result"]
    if result.get("unchanged"):
        out.print(f"[green]✓[/] model {model} version {result['version']} already holds "
                  f"{repo}@{result['commit'][:12]}: no new version")
        return
    out.print(f"[green]✓[/] model {model} version {result['version']}: {result['files']} "
              f"file(s), {result['bytes']} bytes from {repo}@{result['commit'][:12]}")


@models_app.command("versions")
def versions(model: str, api: Api = None, token: Token = None) -> None:
    """List MODEL's versions, newest first."""
    with _client(api, token) as client:
        r = client.get(f"/models/{model}/versions")
    if r.status_code != 200:
        raise _fail(r)
    data = r.json()["data"]
    if not data:
        out.print(f"model {model} has no version yet: aiwm models upload, or aiwm models import")
        return
    # Plain lines, one a version, never wrapped or cut: easy to read and to grep.
    rows = [("version", "files", "bytes", "created", "by", "source")]
    for v in data:
        origin = f"{v.get('repoId')}@{str(v.get('commit') or '')[:12]}" \
            if v.get("source") == "huggingface" else str(v.get("source", ""))
        rows.append((str(v["version"]), str(len(v["files"])), str(v["bytes"]),
                     str(v.get("createdAt", ""))[:19], str(v.get("createdBy", "")), origin))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
                   + "  " + row[-1])


@models_app.command("delete-version")
def delete_version(model: str, version: int, api: Api = None, token: Token = None) -> None:
    """Delete VERSION of MODEL and its files from the object store."""
    with _client(api, token) as client:
        r = client.delete(f"/models/{model}/versions/{version}")
    if r.status_code != 200:
        raise _fail(r)
    doc = r.json()
    out.print(f"[green]✓[/] model {model} version {version} deleted: {doc['files']} file(s), "
              f"{doc['bytes']} bytes")
    if doc.get("deployments"):
        out.print(f"[yellow]![/] still running it, from their nodes' copies (they cannot deploy "
                  f"it again): {', '.join(doc['deployments'])}")
