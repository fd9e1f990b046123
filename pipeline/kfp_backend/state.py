"""The run-level state the backend keeps in ML Metadata and Argo, held in memory for one replay."""

from __future__ import annotations

import datetime
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from pipeline.kfp_backend import KubeflowError
from pipeline.kfp_backend.compiler import deployment_config
from pipeline.kfp_backend.metadata import StoredArtifact, parameter_from_text


@dataclass
class TaskResult:
    """What happened to one task of the run."""

    name: str
    state: str  # succeeded | skipped (condition false) | omitted (upstream not succeeded) | failed
    seconds: float = 0.0
    reason: str = ""
    log_path: str | None = None
    outputs: dict[str, StoredArtifact] = field(default_factory=dict)
    output_parameters: dict[str, Any] = field(default_factory=dict)


class RunState:
    """One replay of a compiled spec: the backend's run-level state, kept in memory."""

    def __init__(self, spec, pipeline_root: str, params: dict[str, str], publish_logs: bool):
        self.spec = spec
        self.deploy = deployment_config(spec)
        self.created = datetime.datetime.now(datetime.timezone.utc)  # the workflow's creation
        stamp = self.created.astimezone().strftime("%Y%m%d-%H%M%S")
        self.run_id = f"{stamp}-{uuid.uuid4().hex[:8]}"
        # metadata.Client.GetPipeline: the run's root is <pipeline root>/<pipeline name>/<run id>.
        self.run_root = os.path.join(
            pipeline_root.rstrip("/"), spec.pipeline_info.name, self.run_id
        )
        self.root_parameters = root_parameter_values(spec, params)
        self.publish_logs = publish_logs
        self.results: dict[str, TaskResult] = {}
        self._next_id = 1
        self._ids = threading.Lock()  # tasks record their outputs from worker threads

    def new_artifact_id(self) -> int:
        """The next ML Metadata artifact id."""
        with self._ids:
            self._next_id += 1
            return self._next_id


def root_parameter_values(spec, params: dict[str, str]) -> dict[str, Any]:
    """The run's root parameters: given values (text, typed as declared), else defaults."""
    # The defaults are those argocompiler.Compile fills in.
    from google.protobuf import struct_pb2

    definitions = spec.root.input_definitions.parameters
    unknown = sorted(set(params) - set(definitions))
    if unknown:
        raise KubeflowError(f"--param {unknown[0]}: the pipeline has no such parameter")
    values = {}
    for name, definition in definitions.items():
        if name in params:
            values[name] = parameter_from_text(name, params[name], definition.parameter_type)
        elif definition.HasField("default_value"):
            values[name] = definition.default_value
        elif definition.is_optional:
            values[name] = struct_pb2.Value(null_value=0)
        else:
            raise KubeflowError(
                f"pipeline parameter {name!r} has no default: pass --param {name}=..."
            )
    return values
