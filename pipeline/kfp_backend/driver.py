"""What the driver builds for a container task: its inputs, its condition's verdict, its outputs.

Mirrors backend/src/v2/driver (container.go `Container`, resolve.go, driver.go `provisionOutputs`).
"""

from __future__ import annotations

import os
import uuid

from pipeline.kfp_backend import (
    LOGS_OUTPUT,
    LOGS_SCHEMA_TITLE,
    METADATA_FILE,
    NotReplayed,
    TaskFailed,
)
from pipeline.kfp_backend.metadata import (
    PARAMETER_TYPE_NAMES,
    runtime_artifact_of,
    value_as_text,
)
from pipeline.kfp_backend.state import RunState

_RUNTIME_VALUE_TYPES = {  # Go's %T of each ValueOrRuntimeParameter oneof member
    "constant_value": "*pipelinespec.ValueOrRuntimeParameter_ConstantValue",
    "runtime_parameter": "*pipelinespec.ValueOrRuntimeParameter_RuntimeParameter",
    None: "<nil>",
}


def driver_context(run: RunState, name: str, task) -> str:
    """driver.Options.info(): how the driver names a task in its errors."""
    return (
        f"pipelineName={run.spec.pipeline_info.name}, runID={run.run_id}, "
        f'taskDisplayName="{task.task_info.name}", taskName="{name}", '
        f'component="{task.component_ref.name}", componentSpec'
    )


def resolve_parameter(run: RunState, task_name: str, spec):
    """driver.resolveInputParameter: a constant, a root input, or an upstream output."""
    from google.protobuf import text_format

    kind = spec.WhichOneof("kind")
    described = text_format.MessageToString(spec, as_one_line=True)
    if kind == "runtime_value":
        value_kind = spec.runtime_value.WhichOneof("value")
        if value_kind != "constant":
            raise TaskFailed(
                f"resolving input parameter with spec {described}: param runtime value spec of "
                f"type {_RUNTIME_VALUE_TYPES.get(value_kind, value_kind)} not implemented"
            )
        return _with_run_placeholders(run, task_name, spec.runtime_value.constant)
    if kind == "component_input_parameter":
        name = spec.component_input_parameter
        if name not in run.root_parameters:
            raise TaskFailed(
                f"resolving input parameter with spec {described}: parent DAG does not have "
                f"input parameter {name}"
            )
        return run.root_parameters[name]
    if kind == "task_output_parameter":
        producer = spec.task_output_parameter.producer_task
        key = spec.task_output_parameter.output_parameter_key
        result = run.results.get(producer)
        if result is None or key not in result.output_parameters:
            raise TaskFailed(
                f"resolving input parameter with spec {described}: producer task, {producer}, "
                f"has no output parameter {key}"
            )
        return result.output_parameters[key]
    raise NotReplayed(f"input parameter spec {described}: kfp-local does not replay {kind}")


def _with_run_placeholders(run: RunState, task_name: str, constant):
    """The run-level placeholders a constant may be (resolveInputParameter's switch)."""
    from google.protobuf import struct_pb2

    replacements = {
        "{{$.pipeline_job_name}}": run.run_id,
        "{{$.pipeline_job_resource_name}}": run.run_id,
        "{{$.pipeline_job_uuid}}": run.run_id,
        "{{$.pipeline_task_name}}": task_name,
        "{{$.pipeline_task_uuid}}": "1",
    }
    if constant.WhichOneof("kind") == "string_value" and constant.string_value in replacements:
        return struct_pb2.Value(string_value=replacements[constant.string_value])
    return constant


def resolve_artifacts(run: RunState, name: str, spec):
    """driver.resolveInputArtifact: an upstream task's output, as MLMD returns it."""
    from kfp.pipeline_spec import pipeline_spec_pb2

    if spec.WhichOneof("kind") != "task_output_artifact":
        raise NotReplayed(f"input artifact {name!r}: kfp-local replays only upstream outputs")
    producer = spec.task_output_artifact.producer_task
    key = spec.task_output_artifact.output_artifact_key
    result = run.results.get(producer)
    if result is None or key not in result.outputs:
        # resolveUpstreamArtifacts builds this error but drops it; say it instead.
        raise TaskFailed(f'cannot find output artifact key "{key}" in producer task "{producer}"')
    return pipeline_spec_pb2.ArtifactList(artifacts=[runtime_artifact_of(result.outputs[key])])


def validate_parameter_types(inputs, component) -> None:
    """driver.resolveInputs' handleParamTypeValidationAndConversion."""
    from google.protobuf import struct_pb2

    values = inputs.parameter_values
    for name, definition in component.input_definitions.parameters.items():
        if name not in values:
            if not definition.is_optional and not definition.HasField("default_value"):
                raise TaskFailed(
                    f"neither value nor default value provided for non-optional parameter {name!r}"
                )
            continue
        value = values[name]
        kind = value.WhichOneof("kind")
        expected = definition.parameter_type
        if expected == 3:  # STRING: anything converts to its text
            if kind != "string_value":
                values[name].CopyFrom(struct_pb2.Value(string_value=value_as_text(value)))
            continue
        allowed = {
            "null_value": (),
            "string_value": (),
            "number_value": (1, 2),
            "bool_value": (4,),
            "list_value": (5,),
            "struct_value": (6, 7),
        }[kind]
        if kind == "null_value":
            raise TaskFailed(f"got null for input parameter {name!r}")
        if expected not in allowed:
            actual = {"number_value": "number", "bool_value": "bool", "list_value": "list"}
            raise TaskFailed(
                f"input parameter {name!r} type mismatch: expect "
                f"{PARAMETER_TYPE_NAMES.get(expected, expected)}, got "
                f"{actual.get(kind, kind.removesuffix('_value'))}"
            )


def resolve_inputs(run: RunState, task_name: str, task, component):
    """driver.resolveInputs for a root-DAG container task."""
    from kfp.pipeline_spec import pipeline_spec_pb2

    inputs = pipeline_spec_pb2.ExecutorInput.Inputs()
    for name in sorted(task.inputs.parameters):
        spec = task.inputs.parameters[name]
        if spec.parameter_expression_selector:
            raise NotReplayed(f"parameter {name!r} uses a parameterExpressionSelector")
        inputs.parameter_values[name].CopyFrom(resolve_parameter(run, task_name, spec))
    for name in sorted(task.inputs.artifacts):
        inputs.artifacts[name].CopyFrom(resolve_artifacts(run, name, task.inputs.artifacts[name]))
    validate_parameter_types(inputs, component)
    return inputs


def provision_outputs(run: RunState, task_name: str, component):
    """driver.provisionOutputs: fresh output URIs under the task root, plus `executor-logs`."""
    from kfp.pipeline_spec import pipeline_spec_pb2

    outputs = pipeline_spec_pb2.ExecutorInput.Outputs()
    specs = dict(component.output_definitions.artifacts)
    if run.publish_logs:
        logs = pipeline_spec_pb2.ComponentOutputsSpec.ArtifactSpec()
        logs.artifact_type.schema_title = LOGS_SCHEMA_TITLE
        specs[LOGS_OUTPUT] = logs
    task_root = os.path.join(run.run_root, task_name, str(uuid.uuid4()))
    for name, spec in specs.items():
        artifact = outputs.artifacts[name].artifacts.add()
        artifact.name = name
        artifact.uri = os.path.join(task_root, name)
        artifact.type.CopyFrom(spec.artifact_type)
        if spec.HasField("metadata"):
            artifact.metadata.CopyFrom(spec.metadata)
    for name in component.output_definitions.parameters:
        # /tmp/kfp/outputs/<name> in the pod; a task-local file here.
        outputs.parameters[name].output_file = os.path.join(task_root, "parameters", name)
    # The pod's <LocalPathForURI(task root)>/output_metadata.json: the task root itself here.
    outputs.output_file = os.path.join(task_root, METADATA_FILE)
    return outputs
