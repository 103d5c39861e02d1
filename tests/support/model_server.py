"""A tiny OpenAI-style model server in the standard library only, for the process runtime
and other tests: ``python -m tests.support.model_server --port N`` (or run the file).

- ``GET /health`` → 200 ``{"status": "ok"}``; 503 for the first ``--fail-health N`` calls
  (or ``$FAIL_HEALTH``), to look like a server still loading
- ``GET /v1/models`` → the model list; ``root`` is ``$MODEL_DIR``
- ``POST /v1/chat/completions`` → a completion whose reply echoes the last user message
- ``GET /slow?seconds=N`` → answers after N seconds
- ``GET /big?bytes=N`` → N bytes of ``x``
- ``GET /env/<NAME>`` → ``{"name", "value"}`` from this server's environment

``--ignore-sigterm`` makes it ignore SIGTERM (to test the SIGKILL after the grace period).
It prints ``listening on <port>`` once it accepts connections, and one line per request.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


class Handler(BaseHTTPRequestHandler):
    server_version = "aiwm-test-model-server/1"
    health_failures_left = 0
    lock = threading.Lock()

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/health":
            with Handler.lock:
                failing = Handler.health_failures_left > 0
                Handler.health_failures_left -= int(failing)
            self._json(503 if failing else 200, {"status": "loading" if failing else "ok"})
        elif url.path == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": os.environ.get("MODEL_NAME", "test-model"), "object": "model",
                 "owned_by": "aiwm-test", "root": os.environ.get("MODEL_DIR")}]})
        elif url.path == "/slow":
            time.sleep(float(query.get("seconds", ["1"])[0]))
            self._json(200, {"slept": True})
        elif url.path == "/big":
            size = int(query.get("bytes", ["0"])[0])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = b"x" * 65536
            while size > 0:
                self.wfile.write(chunk[:size])
                size -= len(chunk)
        elif url.path == "/headers":  # what reached the server
            self._json(200, {k.lower(): v for k, v in self.headers.items()})
        elif url.path.startswith("/env/"):
            name = url.path.removeprefix("/env/")
            self._json(200, {"name": name, "value": os.environ.get(name)})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if urlsplit(self.path).path != "/v1/chat/completions":
            self._json(404, {"error": "not found"})
            return
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            self._json(400, {"error": "body is not JSON"})
            return
        users = [m.get("content", "") for m in request.get("messages", []) if m.get("role") == "user"]
        reply = f"echo: {users[-1] if users else ''}"
        self._json(200, {
            "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
            "model": request.get("model") or os.environ.get("MODEL_NAME", "test-model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})

    def log_message(self, format: str, *args: Any) -> None:
        print(f"{self.command} {self.path} {args[1] if len(args) > 1 else ''}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--fail-health", type=int, default=int(os.environ.get("FAIL_HEALTH", "0")))
    parser.add_argument("--ignore-sigterm", action="store_true")
    args = parser.parse_args(argv)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Handler.health_failures_left = args.fail_health
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
