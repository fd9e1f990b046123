"""What the driver builds for a container task: its inputs, its condition's verdict, its outputs.

Mirrors backend/src/v2/driver (container.go `Container`, resolve.go, driver.go `provisionOutputs`).
"""

from __future__ import annotations

import json
import os
import re
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
    go_format_float,
    go_json,
    runtime_artifact_of,
    value_as_text,
)
from pipeline.kfp_backend.state import RunState

_RUNTIME_VALUE_TYPES = {  # Go's %T of each ValueOrRuntimeParameter oneof member
    "constant_value": "*pipelinespec.ValueOrRuntimeParameter_ConstantValue",
    "runtime_parameter": "*pipelinespec.ValueOrRuntimeParameter_RuntimeParameter",
    None: "<nil>",
}


class ResolvedParameterNull(TaskFailed):
    """driver.ErrResolvedParameterNull: a root input that is optional, left out, with no default."""


def driver_context(run: RunState, name: str, task) -> str:
    """driver.Options.info(): how the driver names a task in its errors."""
    display = f'taskDisplayName="{task.task_info.name}", ' if task.task_info.name else ""
    return (
        f"pipelineName={run.spec.pipeline_info.name}, runID={run.run_id}, {display}"
        f'taskName="{name}", component="{task.component_ref.name}", componentSpec'
    )


def validate_container(task) -> None:
    """driver.validateContainer (validateNonRoot): a task without taskInfo.name fails its driver."""
    if not task.task_info.name:
        raise TaskFailed("invalid container driver args: task spec is required")


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
        value = run.root_parameters[name]
        if value.WhichOneof("kind") == "null_value":  # an optional root input left out
            raise ResolvedParameterNull(f"the resolved input parameter is null: {name}")
        return value
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

    text = constant.string_value if constant.WhichOneof("kind") == "string_value" else ""
    if "{{$.workspace_path}}" in text:
        raise NotReplayed("a parameter names {{$.workspace_path}}: kfp-local mounts no workspace")
    # A manual run's schedule time is its create time (cmd/driver resolvePipelineJobTimes), both
    # the workflow's creation in RFC 3339, UTC; the task uuid is the root DAG's execution id.
    created = run.created.strftime("%Y-%m-%dT%H:%M:%SZ")
    replacements = {
        "{{$.pipeline_job_name}}": run.run_id,
        "{{$.pipeline_job_resource_name}}": run.run_id,
        "{{$.pipeline_job_uuid}}": run.run_id,
        "{{$.pipeline_task_name}}": task_name,
        "{{$.pipeline_task_uuid}}": "1",
        "{{$.pipeline_job_create_time_utc}}": created,
        "{{$.pipeline_job_schedule_time_utc}}": created,
    }
    if text in replacements:
        return struct_pb2.Value(string_value=replacements[text])
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
        try:
            value = resolve_parameter(run, task_name, spec)
        except ResolvedParameterNull:
            # Left out when the component's parameter is optional: the launcher adds its
            # default, or the component resolves it itself. Otherwise the task fails.
            definition = component.input_definitions.parameters.get(name)
            if definition is not None and definition.is_optional:
                continue
            raise
        inputs.parameter_values[name].CopyFrom(value)
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


# driver/util.go fullInputParameterRe: the driver fills these into command and args itself.
_INPUT_PARAMETER = re.compile(r"\{\{\$\.inputs\.parameters\['(.+?)']}}")


def pb_value_to_string(value) -> str:
    """driver/util.go pbValueToString: whole numbers with %d, others with %g; lists as JSON."""
    # Not the launcher's text: 1e-05 stays 1e-05 (the launcher would write 0.00001), and
    # 1234567.5 becomes 1.2345675e+06.
    from google.protobuf import json_format

    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if number == number and -(2**63) <= number < 2**63 and number.is_integer():
            return str(int(number))
        return go_format_float(number, "g")
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "null_value" or kind is None:
        return ""
    return go_json(json_format.MessageToDict(value))


def _resolve_input_parameters(arg: str, executor_input) -> str:
    """driver/util.go resolveInputParameterPlaceholders: every input parameter placeholder."""
    values = executor_input.inputs.parameter_values

    def substitute(match) -> str:
        if match.group(1) not in values:
            raise TaskFailed(f'parameter "{match.group(1)}" not found in executor input')
        return pb_value_to_string(values[match.group(1)])

    return _INPUT_PARAMETER.sub(substitute, arg)


def _if_present(arg: str, executor_input) -> list[str]:
    """driver/util.go resolveCondition: an IfPresent clause's Then or Else, filled in."""
    try:
        clause = json.loads(arg)["IfPresent"]
    except (ValueError, KeyError, TypeError) as exc:
        raise TaskFailed(f"failed to parse IfPresent JSON: {exc}") from None
    value = executor_input.inputs.parameter_values.get(clause.get("InputName", ""))
    # A null value is absent; so is an artifact of that name (only parameters are looked at).
    present = value is not None and value.WhichOneof("kind") != "null_value"
    chosen = clause.get("Then" if present else "Else")
    if chosen is None:
        return []
    items = [chosen] if isinstance(chosen, str) else chosen
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise TaskFailed(f"unexpected type in IfPresent Then/Else: {chosen!r}")
    return [_resolve_input_parameters(item, executor_input) for item in items]


def resolve_container_args(args, executor_input, what: str) -> list[str]:
    """driver/util.go resolveContainerArgs: input parameters and IfPresent, before the launcher."""
    # Runs on the driver's ExecutorInput, before the launcher adds component defaults: a
    # placeholder of a parameter that only has a default fails the task here.
    resolved: list[str] = []
    for arg in args:
        if "$.outputs" in arg:  # left whole to the launcher, input placeholders included
            resolved.append(arg)
            continue
        try:
            if arg.strip().startswith('{"IfPresent":'):
                resolved.extend(_if_present(arg, executor_input))
            else:
                resolved.append(_resolve_input_parameters(arg, executor_input))
        except TaskFailed as exc:
            step = "condition" if arg.strip().startswith('{"IfPresent":') else "input parameters"
            raise TaskFailed(
                f"failed to resolve container {what}: failed to resolve {step}: {exc}"
            ) from None
    return resolved
