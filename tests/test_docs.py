"""Every ```python block in README.md and docs/ runs, as a script of its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks() -> list[tuple[str, str]]:
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for index, match in enumerate(BLOCK.finditer(path.read_text())):
            found.append((f"{path.relative_to(ROOT)}#{index + 1}", match.group(1)))
    return found


def test_there_are_blocks_to_run() -> None:
    assert len(blocks()) >= 10


@pytest.mark.parametrize(("where", "code"), blocks(), ids=[where for where, _ in blocks()])
def test_code_block_runs(where: str, code: str, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(code)
    result = subprocess.run(  # noqa: S603
        [sys.executable, "-W", "error::DeprecationWarning", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
        # A page's suite runs on anyio's plugin; pytest-asyncio, installed for the plugin's
        # own tests, warns at configure time when unconfigured, which -W error would fail.
        env={**os.environ, "PYTEST_ADDOPTS": "-p no:asyncio"},
    )
    assert result.returncode == 0, f"{where} failed:\n{result.stderr[-3000:]}"
