"""A local test image of a tiny OpenAI-style model server, built with ``docker import``.

No registry is reachable from the tests, so the image is a rootfs tarball made here: the
host's static busybox plus two shell scripts. ``busybox nc -ll -e`` accepts connections and
runs the handler script once per connection; the handler speaks just enough HTTP/1.1:

- ``GET /health`` → 200 ``{"status":"ok"}``
- ``GET /v1/models`` → ``{"object":"list","data":[{"id":$MODEL_NAME,...}]}``
- ``POST /v1/chat/completions`` → a chat completion whose reply is ``echo: <last content>``
- anything else → 404

It listens on ``$PORT`` (default 8000) and logs one line per request to stderr, which is
the container's log. Use :func:`ensure_model_server_image`; it builds once per content.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import docker
import docker.errors

MODEL_SERVER_IMAGE = "aiwm-test/model-server:1"
DIGEST_LABEL = "aiwm.test.digest"
BUSYBOX_PATHS = ("/usr/bin/busybox", "/bin/busybox")
APPLETS = ("sh", "nc", "head", "tail", "tr", "sed", "wc", "printf", "cat", "echo", "sleep",
           "ls", "env", "kill", "ps", "grep", "cut", "true", "false", "date", "id", "mkdir")

SERVE = """#!/bin/sh
# Started as the image's CMD: one persistent listener, one handler process per connection.
port="${PORT:-8000}"
echo "model server listening on port $port (model ${MODEL_NAME:-test-model})"
exec nc -ll -p "$port" -e /srv/handler
"""

HANDLER = r"""#!/bin/sh
# One HTTP exchange on stdin/stdout (the connection); stderr is the container's log.
cr=$(printf '\r')
read -r method target version || exit 0
path="${target%%\?*}"
length=0
while IFS= read -r line; do
  line="${line%"$cr"}"
  [ -z "$line" ] && break
  case "$line" in
    [Cc]ontent-[Ll]ength:*) length=$(printf '%s' "${line#*:}" | tr -d ' ') ;;
  esac
done
body=""
if [ "$length" -gt 0 ] 2>/dev/null; then body=$(head -c "$length"); fi

respond() {  # status, body (JSON)
  printf 'HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %s\r\n' \
    "$1" "$(printf '%s' "$2" | wc -c)"
  printf 'Connection: close\r\n\r\n%s' "$2"
  echo "$method $path ${1%% *}" >&2
}

model="${MODEL_NAME:-test-model}"
models='{"object":"list","data":[{"id":"%s","object":"model","owned_by":"aiwm-test"}]}'
chat='{"id":"chatcmpl-test","object":"chat.completion","created":0,"model":"%s",'
chat="$chat"'"choices":[{"index":0,"message":{"role":"assistant","content":"echo: %s"},'
chat="$chat"'"finish_reason":"stop"}],"usage":{"prompt_tokens":0,"completion_tokens":0,'
chat="$chat"'"total_tokens":0}}'
last_content='s/.*"content"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p'  # greedy: the last one
case "$method $path" in
  "GET /health") respond "200 OK" '{"status":"ok"}' ;;
  "GET /v1/models") respond "200 OK" "$(printf "$models" "$model")" ;;
  "POST /v1/chat/completions")
    last=$(printf '%s\n' "$body" | sed -n "$last_content" | tail -n 1)
    respond "200 OK" "$(printf "$chat" "$model" "$last")" ;;
  *) respond "404 Not Found" '{"error":"not found"}' ;;
esac
"""


def busybox_path() -> Path:
    for candidate in BUSYBOX_PATHS:
        if Path(candidate).is_file():
            return Path(candidate)
    found = shutil.which("busybox")
    if found is None:
        raise RuntimeError("the test image needs a static busybox: apt-get install busybox-static")
    return Path(found)


def rootfs_tar() -> bytes:
    """The image's root filesystem; the same bytes for the same inputs (fixed mtimes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        def add(name: str, *, data: bytes | None = None, mode: int = 0o755,
                link: str | None = None) -> None:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = mode, 0
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
            elif data is None:
                info.type = tarfile.DIRTYPE
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)

        for directory in ("bin", "usr", "usr/bin", "srv", "etc", "proc", "sys", "dev", "models"):
            add(directory)
        add("tmp", mode=0o1777)
        add("bin/busybox", data=busybox_path().read_bytes())
        add("usr/bin/busybox", link="/bin/busybox")
        for applet in APPLETS:
            add(f"bin/{applet}", link="busybox")
        add("etc/passwd", data=b"root:x:0:0:root:/:/bin/sh\n", mode=0o644)
        add("srv/serve.sh", data=SERVE.encode())
        add("srv/handler", data=HANDLER.encode())
    return buffer.getvalue()


def ensure_model_server_image(socket_path: str, tag: str = MODEL_SERVER_IMAGE) -> str:
    """Import the model-server image into the dockerd at ``socket_path`` unless an image
    with the same content is already tagged there; returns the tag."""
    data = rootfs_tar()
    digest = hashlib.sha256(data).hexdigest()[:16]
    client = docker.DockerClient(base_url=f"unix://{socket_path}", timeout=120)
    try:
        try:
            if client.images.get(tag).labels.get(DIGEST_LABEL) == digest:
                return tag
        except docker.errors.ImageNotFound:
            pass
        repository, _, version = tag.rpartition(":")
        client.api.import_image_from_data(data, repository=repository, tag=version, changes=[
            'CMD ["/bin/sh", "/srv/serve.sh"]', "ENV PORT=8000", "EXPOSE 8000",
            f"LABEL {DIGEST_LABEL}={digest}"])
        return tag
    finally:
        client.close()
