"""What the launcher does around a task's command (backend/src/v2/component/launcher_v2.go)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from pipeline.kfp_backend import LOGS_OUTPUT, NotReplayed, TaskFailed
from pipeline.kfp_backend.driver import PARAMETER_TYPE_NAMES
from pipeline.kfp_backend.metadata import (
    StoredArtifact,
    TextConversionError,
    go_quote,
    protojson,
    struct_value_to_mlmd,
    text_as_value,
    value_as_text,
)
from pipeline.kfp_backend.state import RunState


def with_default_parameters(executor_input, component):
    """launcher_v2.addDefaultParams: a copy with component defaults for missing parameters."""
    from kfp.pipeline_spec import pipeline_spec_pb2

    copy = pipeline_spec_pb2.ExecutorInput()
    copy.CopyFrom(executor_input)
    for name, definition in component.input_definitions.parameters.items():
        if definition.HasField("default_value") and name not in copy.inputs.parameter_values:
            copy.inputs.parameter_values[name].CopyFrom(definition.default_value)
    return copy


def placeholders(executor_input) -> dict[str, str]:
    """launcher_v2.getPlaceholders: artifact URIs and paths, input parameters, output files."""
    values: dict[str, str] = {}
    for name, artifacts in executor_input.inputs.artifacts.items():
        if artifacts.artifacts:
            uri = artifacts.artifacts[0].uri
            values[f"{{{{$.inputs.artifacts['{name}'].uri}}}}"] = uri
            values[f"{{{{$.inputs.artifacts['{name}'].path}}}}"] = uri  # the bucket is local here
    for name, artifacts in executor_input.outputs.artifacts.items():
        if artifacts.artifacts:
            uri = artifacts.artifacts[0].uri
            values[f"{{{{$.outputs.artifacts['{name}'].uri}}}}"] = uri
            values[f"{{{{$.outputs.artifacts['{name}'].path}}}}"] = uri
    for name, value in executor_input.inputs.parameter_values.items():
        values[f"{{{{$.inputs.parameters['{name}']}}}}"] = value_as_text(value)
    for name, parameter in executor_input.outputs.parameters.items():
        values[f"{{{{$.outputs.parameters['{name}'].output_file}}}}"] = parameter.output_file
    return values


def compiled_command(command_and_args: list[str], executor_input) -> list[str]:
    """launcher_v2.compileCmdAndArgs: `{{$}}` (the ExecutorInput JSON) and the placeholders."""
    # command_and_args is what the driver resolved (driver.resolve_container_args); the
    # launcher takes its first element as the command and fills only `{{$}}` into that one
    # (its placeholder loop writes to a variable it never uses), the rest are its args.
    as_json = protojson(executor_input)
    substitutions = placeholders(executor_input)
    for arg in command_and_args:
        if arg.startswith('{"Concat"'):
            raise NotReplayed(f"structured placeholder {arg[:40]}...")
    command, *args = command_and_args
    compiled = [command.replace("{{$}}", as_json)]
    for arg in args:
        arg = arg.replace("{{$}}", as_json)
        for placeholder, value in substitutions.items():
            arg = arg.replace(placeholder, value)
        compiled.append(arg)
    return compiled


def image_environment(container, pod_name: str) -> dict[str, str]:
    """The task's environment: this one (standing in for the image's), the pod's, the spec's."""
    env = dict(os.environ)
    # `python` in the command is the image's interpreter: here, the one running this runner.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    # argocompiler/common.go commonEnvs: every executor pod has its name and uid (field refs);
    # the spec's env is the podSpecPatch's, merged over them by name.
    env["KFP_POD_NAME"] = pod_name
    env["KFP_POD_UID"] = str(uuid.uuid4())
    env.update({item.name: item.value for item in container.env})
    return env


def prepare_output_folders(executor_input) -> None:
    """launcher_v2.prepareOutputFolders: the parent directory of every output file exists."""
    # A container may write `{{$.outputs.parameters['x'].output_file}}` without creating its
    # directory (/tmp/kfp/outputs in the pod): the launcher creates it before the command runs.
    for parameter in executor_input.outputs.parameters.values():
        os.makedirs(os.path.dirname(parameter.output_file), exist_ok=True)
    for artifact_list in executor_input.outputs.artifacts.values():
        for artifact in artifact_list.artifacts:
            os.makedirs(os.path.dirname(artifact.uri), exist_ok=True)


def qualify_executor_logs(executor_input, retry_index: str = "0") -> None:
    """launcher_v2.qualifyExecutorLogsForRetry: `executor-logs` becomes `executor-logs-<attempt>`."""
    # With PUBLISH_LOGS=true the launcher suffixes the log artifact's URI with the Argo retry
    # index (0 without retries) before `{{$}}` is written and before it records the artifact.
    for artifact in executor_input.outputs.artifacts[LOGS_OUTPUT].artifacts:
        if not artifact.uri.endswith(f"-{retry_index}"):
            artifact.uri += f"-{retry_index}"


def run_executor(command: list[str], env: dict[str, str], cwd: str, log_path: str) -> int:
    """exec.Command(...).Run() with stdout and stderr teed to the executor-logs file."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    os.makedirs(cwd, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.run(
            command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    return process.returncode


def read_executor_output(path: str):
    """launcher_v2.getExecutorOutputFile: the ExecutorOutput the task wrote (empty if none)."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    output = pipeline_spec_pb2.ExecutorOutput()
    if not os.path.exists(path):
        return output
    with open(path) as handle:
        text = handle.read()
    try:
        json_format.Parse(text, output)  # protojson.Unmarshal: unknown fields are errors
    except json_format.ParseError as exc:
        raise TaskFailed(f"failed to unmarshall ExecutorOutput in file {path!r}: {exc}") from None
    return output


def collect_output_parameters(executor_input, executor_output, component) -> dict[str, Any]:
    """launcher_v2.collectOutputParameters: values from the output file, else the parameter files."""
    values = dict(executor_output.parameter_values)
    for name, parameter in executor_input.outputs.parameters.items():
        if name in values:
            continue
        definition = component.output_definitions.parameters[name]
        where = (
            f"failed to read output parameter name={go_quote(name)} "
            f"type={go_quote(PARAMETER_TYPE_NAMES.get(definition.parameter_type, ''))} "
            f"path={go_quote(parameter.output_file)}"
        )
        try:
            text = Path(parameter.output_file).read_text()
            values[name] = text_as_value(text, definition.parameter_type)
        except OSError as exc:
            raise TaskFailed(f"{where}: {exc.strerror}") from None
        except TextConversionError as exc:
            raise TaskFailed(f"{where}: {exc}") from None
    return values


def record_outputs(run: RunState, executor_input, executor_output, succeeded: bool):
    """launcher_v2.uploadOutputArtifacts: merge what the executor wrote, record in MLMD."""
    outputs = dict(executor_input.outputs.artifacts)
    if not succeeded:  # only the log artifact is registered for a failed component
        outputs = {k: v for k, v in outputs.items() if k == LOGS_OUTPUT}
    recorded: dict[str, StoredArtifact] = {}
    for name, artifact_list in outputs.items():
        for artifact in artifact_list.artifacts:
            if name != LOGS_OUTPUT and name in executor_output.artifacts:
                written = executor_output.artifacts[name].artifacts
                if written:
                    merge_runtime_artifact(written[0], artifact)
            recorded[name] = stored_artifact(run, name, artifact)
    return recorded


def merge_runtime_artifact(source, destination) -> None:
    """launcher_v2.mergeRuntimeArtifacts: the executor's URI and metadata win."""
    if source.uri:
        destination.uri = source.uri
    for key, value in source.metadata.fields.items():
        destination.metadata.fields[key].CopyFrom(value)


def stored_artifact(run: RunState, name: str, artifact) -> StoredArtifact:
    """metadata.Client.RecordArtifact: custom properties from metadata, display name, session."""
    kind = artifact.type.WhichOneof("kind")
    if kind == "schema_title":
        schema = "title: " + artifact.type.schema_title
    elif kind == "instance_schema":
        schema = artifact.type.instance_schema
    else:
        raise TaskFailed(f"failed to determine schema for output {name!r}: unknown type")
    properties = {k: struct_value_to_mlmd(k, v) for k, v in artifact.metadata.fields.items()}
    properties.setdefault("display_name", ("string", name))
    properties.setdefault("store_session_info", ("string", "{}"))
    return StoredArtifact(run.new_artifact_id(), name, artifact.uri, schema, properties)
