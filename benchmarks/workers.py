"""Benchmark worker processes (ours: tf_van.py, PyTorch: torch_van.py) and the PyTorch side env.

Each worker is a process started with its own environment (ISA caps, oneDNN switch, threads:
read once when a framework starts) that answers one JSON command at a time, so a benchmark can
alternate rounds between frameworks and settings. `ensure_side_env()` creates `.bench-venv/`
(gitignored) on first use: a Python 3.11 venv with the pinned torch CPU wheel and the last
transformers line that still ships VAN; later runs reuse it. Only benchmarks call this, never
`make test`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIDE_ENV = REPO / ".bench-venv"
# torch 2.13.0 is the CPU wheel these machines carry (an unpinned `torch` pulls a CUDA build);
# transformers 4.57.6 still has models.deprecated.van (later releases removed it).
PINS = ("torch==2.13.0", "transformers==4.57.6")
HERE = Path(__file__).resolve().parent


def find_python311() -> str:
    """A Python 3.11 for the side env: $VAN_TFX_BENCH_PYTHON, pyenv's 3.11.7, or python3.11."""
    candidates = [
        os.environ.get("VAN_TFX_BENCH_PYTHON", ""),
        str(Path.home() / ".pyenv/versions/3.11.7/bin/python"),
        shutil.which("python3.11") or "",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError(
        "no Python 3.11 for the PyTorch side environment; set VAN_TFX_BENCH_PYTHON to one"
    )


def ensure_side_env(echo=print) -> Path:
    """The side env's python, creating the venv and installing PINS when they are not there."""
    python = SIDE_ENV / "bin" / "python"
    marker = SIDE_ENV / ".installed"
    if marker.exists() and marker.read_text().split() == list(PINS):
        return python
    echo(f"creating the PyTorch side environment {SIDE_ENV} ({', '.join(PINS)}) ...")
    if not python.exists():
        subprocess.run([find_python311(), "-m", "venv", str(SIDE_ENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *PINS], check=True)
    marker.write_text("\n".join(PINS) + "\n")
    return python


class Worker:
    """A worker script in a Python of its choice, answering one command at a time."""

    def __init__(self, python: str | Path, script: str, env: dict[str, str] | None = None):
        child_env = {**os.environ, **(env or {})}
        # Framework start-up chatter goes to a file, shown only if the worker dies.
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [str(python), str(HERE / script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=child_env,
            text=True,
        )

    def ask(self, **cmd) -> dict:
        """Send one command, wait for its JSON answer."""
        self.process.stdin.write(json.dumps(cmd) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            self.log.seek(0)
            raise RuntimeError(f"worker exited ({code}) on {cmd}:\n{self.log.read()[-3000:]}")
        return json.loads(line)

    def close(self) -> None:
        """Ask the worker to quit and reap it."""
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def torch_worker(env: dict[str, str] | None = None, echo=print) -> Worker:
    """torch_van.py in the side env (created on first use)."""
    return Worker(ensure_side_env(echo), "torch_van.py", env)


def tf_worker(env: dict[str, str] | None = None) -> Worker:
    """tf_van.py in this interpreter (the project's venv)."""
    return Worker(sys.executable, "tf_van.py", {"TF_USE_LEGACY_KERAS": "1", **(env or {})})


if __name__ == "__main__":
    print(ensure_side_env(), file=sys.stderr)
