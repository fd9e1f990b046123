"""`scripts/find-python`, which `make` uses to build .venv: a PYTHON310 given is used or refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "find-python"


def find_python(python310: str) -> subprocess.CompletedProcess:
    """Run the script with PYTHON310 set."""
    env = {**os.environ, "PYTHON310": python310}
    return subprocess.run([str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)


def test_a_python310_that_works_is_used():
    result = find_python(sys.executable)  # the suite runs on 3.10
    assert result.returncode == 0 and result.stdout.strip() == sys.executable, result.stderr


def test_a_python310_that_does_not_work_is_named_not_replaced(tmp_path):
    # Before: it silently fell through to another Python 3.10 found on the machine.
    for bad in (str(tmp_path / "missing"), "/bin/false"):
        result = find_python(bad)
        assert result.returncode == 1 and result.stdout == "", result.stdout
        assert f"PYTHON310={bad} is not a working Python 3.10" in result.stderr
