"""Process environment set by `import van_tfx`: the dependency warnings nobody can act on."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _stderr_of(code: str) -> str:
    # As a user's shell runs it: the Makefile's PYTHONWARNINGS=ignore::FutureWarning (which
    # `make test` passes on) would hide every warning these tests look for.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stderr


def test_google_clients_warn_about_python_3_10_without_van_tfx():
    # The control: the locked google-api-core really prints it (else the next test proves nothing).
    assert "non-supported Python version" in _stderr_of("import google.cloud.storage")


def test_import_van_tfx_silences_the_python_version_warning_and_keeps_other_future_warnings():
    # TFX 1.16 runs on Python 3.10 only; "upgrade to Python 3.11" printed a dozen times per
    # command told users to break their install. Other FutureWarnings still reach them.
    stderr = _stderr_of(
        "import van_tfx, warnings, google.cloud.storage\n"
        "warnings.warn('another deprecation', FutureWarning)\n"
    )
    assert "non-supported Python version" not in stderr
    assert "another deprecation" in stderr
