"""Staging folders planted in AIWM_HOME before the test stack starts, for the test
that the orchestrator's first sweep removes the abandoned ones (and only those)."""

from __future__ import annotations

import os
import time
from pathlib import Path

STALE_IMPORT = Path("imports") / "planted-stale"  # a failed import nobody retried for 30 days
FRESH_IMPORT = Path("imports") / "planted-fresh"  # a failed import a retry may still resume
STALE_UPLOAD = Path("tmp") / "upload-planted"  # an upload whose replica was killed 2 h ago
OLD = 30 * 86400


def plant(home: Path) -> None:
    now = time.time()
    for rel, age in ((STALE_IMPORT, OLD), (FRESH_IMPORT, 0), (STALE_UPLOAD, 7200)):
        folder = home / rel
        (folder / "weights").mkdir(parents=True, exist_ok=True)
        (folder / "weights" / "part.bin").write_bytes(b"x" * 1000)
        for path in (folder / "weights" / "part.bin", folder / "weights", folder):
            os.utime(path, (now - age, now - age))
