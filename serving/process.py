"""Start a model server as a real subprocess and wait until its models are AVAILABLE.

The real `tensorflow_model_server` when it is on PATH (the van-tfx image ships it), else our
stand-in `van-tfx serve`: both take the same flags and answer the stock tensorflow-serving-api
stubs. Used by the pipeline's serving smoke test and by `make demo`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import grpc
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

AVAILABLE = 30  # tensorflow.serving.ModelVersionStatus.State.AVAILABLE
STAND_IN_COMMAND = [sys.executable, "-m", "van_tfx.cli", "serve"]
TF_SERVING_BINARY = "tensorflow_model_server"


@dataclasses.dataclass(frozen=True)
class ModelServerBinary:
    """How to start a model server, and what to call it in blessings and reports."""

    command: list[str]
    description: str  # "tensorflow_model_server 2.16.1+dev.sha.…" or "van-tfx serve 0.1.0"

    @property
    def is_tf_serving(self) -> bool:
        """True for the real tensorflow_model_server."""
        return self.description.startswith(TF_SERVING_BINARY)


def model_server_binary() -> ModelServerBinary:
    """The real tensorflow_model_server when one is on PATH, else the `van-tfx serve` stand-in."""
    # The version comes from `tensorflow_model_server --version` ("TensorFlow ModelServer: X"); a
    # binary that cannot report one is broken, and that is an error, not a reason to fall back.
    path = shutil.which(TF_SERVING_BINARY)
    if path is None:
        from importlib.metadata import version

        return ModelServerBinary(list(STAND_IN_COMMAND), f"van-tfx serve {version('van-tfx')}")
    try:
        result = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServerStartError(f"{path} --version failed: {exc}") from exc
    for line in result.stdout.splitlines():
        if line.startswith("TensorFlow ModelServer:"):
            return ModelServerBinary([path], f"{TF_SERVING_BINARY} {line.split(':', 1)[1].strip()}")
    raise ServerStartError(
        f"{path} --version exited with {result.returncode} without a version: "
        f"{(result.stdout + result.stderr).strip()[-500:]}"
    )


class ServerStartError(RuntimeError):
    """The model server exited or never reported the model AVAILABLE."""


def free_port() -> int:
    """Ask the kernel for a free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_model_server(
    base_path: str,
    model_name: str,
    timeout_seconds: float = 300,
    extra_flags: list[str] = (),
    server_command: list[str] | None = None,
    cwd: str | None = None,
):
    """Run a model server on a free loopback port; yield (grpc channel, port) once AVAILABLE."""
    # The server is `van-tfx serve`, or `server_command`, which takes tensorflow_model_server's
    # flags.
    port = free_port()
    command = [
        *(server_command or STAND_IN_COMMAND),
        f"--port={port}",
        "--rest_api_port=0",
        f"--model_name={model_name}",
        f"--model_base_path={base_path}",
        *extra_flags,
    ]
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            wait_until_available(channel, model_name, process, log, timeout_seconds)
            yield channel, port
        finally:
            channel.close()
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_until_available(channel, model_name, process, log, timeout_seconds) -> None:
    """Poll GetModelStatus until a version is AVAILABLE; fail with the server's output otherwise."""
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model_name
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(f"model server exited with {process.returncode}: {tail(log)}")
        with contextlib.suppress(grpc.RpcError):
            status = stub.GetModelStatus(request, timeout=5)
            if any(v.state == AVAILABLE for v in status.model_version_status):
                return
        time.sleep(0.5)
    raise ServerStartError(
        f"model {model_name!r} not AVAILABLE after {timeout_seconds}s: {tail(log)}"
    )


def tail(log, limit: int = 4000) -> str:
    """Return the end of a server's captured output."""
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-limit:]
