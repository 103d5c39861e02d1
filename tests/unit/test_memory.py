"""aiwm.memory.tune_malloc: applied on glibc, left alone where the operator decides."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "from aiwm.memory import tune_malloc; print(tune_malloc())"


def run(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "AIWM_MALLOC_TUNE")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env},
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_applied_on_linux() -> None:
    assert run() == "True"


@pytest.mark.parametrize("env", [{"AIWM_MALLOC_TUNE": "off"},
                                 {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "1"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}])
def test_left_alone_when_the_operator_decides(env: dict[str, str]) -> None:
    assert run(**env) == "False"
