"""`aiwm up` / `status` / `token create` / `down` as an operator runs them.

These start their own Ray head and SecantusDB with `aiwm up`; conftest orders them
before the session cluster exists, because `aiwm down` runs `ray stop`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import free_port


def aiwm(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aiwm.cli", *args], env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_up_token_down_up_keeps_data(tmp_path: Path) -> None:
    port, upload_port = free_port(), free_port()
    env = {**os.environ, "AIWM_HOME": str(tmp_path / "home"), "PORT": str(port),
           "AIWM_UPLOAD_PORT": str(upload_port),
           "AIWM_DB_PORT": str(free_port()), "AIWM_RAY_PORT": str(free_port()),
           "AIWM_DASHBOARD_PORT": str(free_port())}
    env.pop("MONGODB_URI", None)
    env.pop("JWT_SECRET", None)
    api = f"http://127.0.0.1:{port}/api"
    try:
        up = aiwm(env, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"http://127.0.0.1:{port}/api-docs" in up.stdout and "Ingress" in up.stdout
        assert f"http://127.0.0.1:{upload_port}/api/models/upload" in up.stdout
        assert httpx.get(f"{api}/health").json()["status"] == "ok"
        secret_file = tmp_path / "home" / "jwt_secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600

        made = aiwm(env, "token", "create", "--role", "operator", "--org", "acme")
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip().splitlines()[-1]
        headers = {"Authorization": f"Bearer {token}"}
        created = httpx.post(f"{api}/models", headers=headers, json={"name": "whisper-v3"})
        assert created.status_code == 201, created.text
        assert secret_file.read_text().strip() not in up.stdout + up.stderr + made.stderr

        status = aiwm(env, "status")
        assert status.returncode == 0 and "database" in status.stdout and "registry" in status.stdout
        upload_row = next(line for line in status.stdout.splitlines() if "upload port" in line)
        assert "up" in upload_row and str(upload_port) in upload_row, status.stdout

        down = aiwm(env, "down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert "embedded database stopped" in down.stdout
        assert _refused(f"{api}/health")
        assert _refused(f"http://127.0.0.1:{upload_port}/api/models/upload")

        again = aiwm(env, "up")
        assert again.returncode == 0, again.stdout + again.stderr
        kept = httpx.get(f"{api}/models/{created.json()['id']}", headers=headers)
        assert kept.status_code == 200 and kept.json()["name"] == "whisper-v3"
    finally:
        aiwm(env, "down")


def _refused(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return True
    return False
