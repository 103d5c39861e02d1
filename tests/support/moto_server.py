"""A real HTTP S3 endpoint for tests: moto's server in its own process.

moto serves the S3 API faithfully enough for the ``minio`` client (buckets, versioning,
multipart uploads, metadata, ranges) but does not check presigned URLs: it answers any
altered or expired one. :class:`PresignGateway` stands in front of it for downloads and
checks each presigned GET the way S3 does (SigV4 query signature, computed with
botocore's reference signer, and ``X-Amz-Date + X-Amz-Expires``), then streams moto's
answer through. Point :class:`aiwm.objectstore.S3Store`'s ``public_endpoint`` at it.
"""

from __future__ import annotations

import hmac
import http.client
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

ACCESS_KEY = "moto-test-access"
SECRET_KEY = "moto-test-secret-0123456789"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MotoServer:
    """``moto_server`` on a free port of 127.0.0.1, logging to ``log``."""

    log: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from moto.server import main; main()",
                 "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.process.returncode}; see {self.log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto_server did not answer within {timeout}s; see {self.log}")
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            conn.request("GET", "/moto-api/")
            conn.getresponse().read()
            conn.close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def presign_problem(method: str, url: str, *, host: str, now: datetime,
                    access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> str | None:
    """Why S3 would refuse presigned ``url`` requested with ``Host: host`` at ``now``;
    None if it would accept it."""
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    try:
        signature = params["X-Amz-Signature"]
        credential = params["X-Amz-Credential"].split("/")
        amz_date = params["X-Amz-Date"]
        expires = int(params["X-Amz-Expires"])
        signed_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        if params["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256" or len(credential) != 5:
            return "AuthorizationQueryParametersError"
    except (KeyError, ValueError):
        return "AuthorizationQueryParametersError"
    if credential[0] != access_key:
        return "InvalidAccessKeyId"
    # Rebuild the request from the raw (still percent-encoded) query, as S3 does.
    raw_query = "&".join(p for p in parts.query.split("&") if not p.startswith("X-Amz-Signature="))
    request = AWSRequest(method=method, url=f"http://{host}{parts.path}?{raw_query}",
                         headers={"host": host})
    request.context["timestamp"] = amz_date
    auth = S3SigV4QueryAuth(Credentials(access_key, secret_key), "s3", credential[2], expires=expires)
    expected = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        return "SignatureDoesNotMatch"
    if (now - signed_at).total_seconds() > expires:
        return "Request has expired"
    return None


class _GatewayHandler(BaseHTTPRequestHandler):
    server: _GatewayServer
    protocol_version = "HTTP/1.1"
    _PASSED = ("Content-Type", "Content-Length", "Content-Range", "Content-Disposition", "ETag",
               "Last-Modified", "Accept-Ranges", "x-amz-meta-sha256")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib's name)
        pass

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self._forward()

    def do_HEAD(self) -> None:  # noqa: N802
        self._forward()

    def _forward(self) -> None:
        host = self.headers.get("Host", "")
        problem = presign_problem(self.command, self.path, host=host, now=datetime.now(UTC))
        if problem is not None:
            body = f"<Error><Code>AccessDenied</Code><Message>{problem}</Message></Error>".encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("range", "if-range")}
        conn.request(self.command, self.path, headers=headers)
        answer = conn.getresponse()
        self.send_response(answer.status)
        for name in self._PASSED:
            value = answer.getheader(name)
            if value is not None:
                self.send_header(name, value)
        self.end_headers()
        while chunk := answer.read(1024 * 1024):
            self.wfile.write(chunk)
        conn.close()


class _GatewayServer(ThreadingHTTPServer):
    daemon_threads = True
    upstream_port: int


class PresignGateway:
    """An HTTP server on a free port that checks presigned GET/HEAD URLs like S3 and
    streams the permitted ones from moto."""

    def __init__(self, upstream: MotoServer) -> None:
        self._server = _GatewayServer(("127.0.0.1", 0), _GatewayHandler)
        self._server.upstream_port = upstream.port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="presign-gateway")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
