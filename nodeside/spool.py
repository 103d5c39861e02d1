"""Results on disk until the controller acknowledges them, so a restart loses none."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

_SAFE = re.compile(r"[A-Za-z0-9_-]{1,100}")


class Spool:
    """One file per result, named by the command it answers; written atomically."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory / "results"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._by_message: dict[str, str] = {}  # result messageId -> command id

    def _path(self, command_id: str) -> Path:
        if _SAFE.fullmatch(command_id):
            return self._dir / f"{command_id}.json"
        # Any other id gets a name no other id can share.
        return self._dir / f"h-{hashlib.sha256(command_id.encode()).hexdigest()}.json"

    def save(self, command_id: str, frame: dict[str, Any]) -> None:
        path = self._path(command_id)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(frame, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._by_message[frame["messageId"]] = command_id

    def get(self, command_id: str) -> dict[str, Any] | None:
        try:
            frame: dict[str, Any] = json.loads(self._path(command_id).read_text())
        except (FileNotFoundError, ValueError):
            return None
        self._by_message[frame["messageId"]] = command_id
        return frame

    def acknowledged(self, result_message_id: str) -> str | None:
        """The controller has the result: forget it. Returns the command it answered, or
        None if the result was not ours."""
        command_id = self._by_message.pop(result_message_id, None)
        if command_id is None:
            return None
        self._path(command_id).unlink(missing_ok=True)
        return command_id

    def pending(self) -> list[dict[str, Any]]:
        """Every result not yet acknowledged, oldest first."""
        frames = []
        for path in sorted(self._dir.glob("*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name)):
            try:
                frame = json.loads(path.read_text())
            except ValueError:
                path.unlink(missing_ok=True)  # a torn file from a crash mid-write
                continue
            self._by_message[frame["messageId"]] = frame.get("correlationId") or path.stem
            frames.append(frame)
        return frames
