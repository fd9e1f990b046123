"""`van-tfx kfp-local`: run a compiled KFP v2 PipelineSpec here, by the open-source backend's rules.

Nothing else runs the compiled spec on this machine, and a cluster is not always at hand, so this
runner replays what open-source Kubeflow Pipelines does with a spec, rule by rule, from its Go
source (kubeflow/pipelines `backend/src/v2`, master at commit 7b70c7b95f, 2026-08-21; each
function names the Go function it mirrors). It reads the YAML, refuses what the workflow compiler
refuses, walks the DAG, builds each task's `ExecutorInput` as the driver does (parameters only from
`runtimeValue.constant`, root inputs or upstream outputs; input artifacts from upstream outputs with
the metadata their executor wrote, as ML Metadata returns them; fresh output URIs; `outputFile`;
the launcher's `executor-logs` output), evaluates `triggerPolicy.condition` as CEL over that
ExecutorInput, substitutes the placeholders of the container's command and args, and runs it as a
subprocess, with this project's installed environment standing in for the image. No lifecycle
hooks run (the backend runs none) and there is no cache (every task executes).

What it does not reproduce (docs/kubeflow.md has the table): pods, images and resources; the
object store (a local directory stands in for the bucket and its `/gcs/...` mount, so nothing is
downloaded or uploaded); the MLMD service (artifacts live in memory for one run, with the
backend's value conversions); parallel branches (tasks run one at a time, in dependency order);
retries; importer, iterator and nested-DAG tasks (refused with a message that says so).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from pipeline.kfp_spec import KubeflowError, load_pipeline_spec
from pipeline.outcome import RunArtifact, RunOutcome, summarize, type_name_of_title
from van_tfx import storage

LOGS_OUTPUT = "executor-logs"  # driver.provisionOutputs
LOGS_SCHEMA_TITLE = "system.Artifact"
METADATA_FILE = "output_metadata.json"  # launcher_v2: <task root>/output_metadata.json
RUN_RECORD = "kfp_local_run.json"
REPORT_FILE = "report.html"
_SKIPPED_STATES = ("skipped", "omitted")


class BackendRefusal(KubeflowError):
    """What the open-source backend refuses, with the backend's own message."""


class NotReplayed(KubeflowError):
    """A spec feature the backend runs but this runner does not replay; the message says which."""


class TaskFailed(KubeflowError):
    """A task's driver or executor failed; the run stops, as Argo's DAG does (failFast)."""


# ------------------------------------------------------------- the workflow compiler's refusals


def deployment_config(spec):
    """The spec's deploymentSpec as a PipelineDeploymentConfig (compiler.GetDeploymentConfig)."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    # protojson.UnmarshalOptions{DiscardUnknown: true}, like the Go code.
    return json_format.ParseDict(
        json_format.MessageToDict(spec.deployment_spec),
        pipeline_spec_pb2.PipelineDeploymentConfig(),
        ignore_unknown_fields=True,
    )


def check_compiles(spec) -> None:
    """Refuse what argocompiler.Compile refuses, with its message as the API server wraps it."""
    try:
        if not spec.pipeline_info.name:
            raise BackendRefusal("pipelineInfo.name is empty")  # argocompiler.Compile
        _visit_component("root", spec.root, spec, deployment_config(spec), set())
    except BackendRefusal as exc:
        # apiserver/template/v2_template.go: util.Wrap(err, "Failed to compile job")
        raise BackendRefusal(f"Failed to compile job: {exc}") from None


def _visit_component(name: str, component, spec, deploy, visited: set[str]) -> None:
    """compiler.pipelineDFS.dfs: leaf executors first, then the DAG that uses them."""
    if name in visited:
        return
    visited.add(name)
    if component.executor_label:
        label = component.executor_label
        if label not in deploy.executors:
            raise _component_error(
                name, f"executor(label={label!r}) not found in deployment config"
            )
        kind = deploy.executors[label].WhichOneof("spec")
        if kind not in ("container", "importer"):
            raise _component_error(
                name,
                f'executor(label="{label}"): non-container and non-importer executor not '
                "implemented",
            )
        return
    if not component.HasField("dag"):
        raise _component_error(name, "unknown component implementation")
    for key in sorted(component.dag.tasks):
        task = component.dag.tasks[key]
        ref = task.component_ref.name
        if not ref:
            raise _component_error(name, f"component ref name is empty for task name={key!r}")
        if ref not in spec.components:
            raise _component_error(name, f'cannot find component ref name="{ref}"')
        _visit_component(ref, spec.components[ref], spec, deploy, visited)
    _check_dag_tasks(name, component.dag, spec, deploy)


def _component_error(name: str, message: str) -> BackendRefusal:
    return BackendRefusal(f'error processing component name="{name}": {message}')


def _check_dag_tasks(name: str, dag, spec, deploy) -> None:
    """argocompiler/dag.go `task`: what it refuses, and what this runner does not replay."""
    for key in sorted(dag.tasks):
        task = dag.tasks[key]
        component = spec.components[task.component_ref.name]
        if task.HasField("parameter_iterator") or task.HasField("artifact_iterator"):
            raise NotReplayed(f"task {key!r} is a ParallelFor iterator; kfp-local runs none")
        if task.trigger_policy.strategy:
            raise NotReplayed(f"task {key!r} is an exit handler; kfp-local runs none")
        if component.HasField("dag"):
            raise NotReplayed(
                f"task {key!r} is a nested pipeline; kfp-local runs only the root DAG"
            )
        kind = deploy.executors[component.executor_label].WhichOneof("spec")
        if kind == "importer":
            if task.trigger_policy.condition:
                raise BackendRefusal("triggerPolicy.condition on importer task is not supported")
            raise NotReplayed(f"task {key!r} is an importer; kfp-local runs container tasks only")


# ----------------------------------------------------------- what ML Metadata keeps of artifacts


@dataclass
class StoredArtifact:
    """An output artifact as the launcher records it in ML Metadata (metadata.Client.RecordArtifact)."""

    id: int
    output_name: str
    uri: str
    schema: str  # the instance schema, or "title: <schemaTitle>" (launcher_v2.getArtifactSchema)
    custom_properties: dict[str, tuple[str, Any]] = field(default_factory=dict)

    @property
    def schema_title(self) -> str:
        """The `title:` of the artifact's schema (metadata.SchemaToArtifactType)."""
        for line in self.schema.splitlines():
            if line.startswith("title:"):
                return line.split(":", 1)[1].strip()
        return ""


def struct_value_to_mlmd(name: str, value) -> tuple[str, Any]:
    """metadata.StructValueToMLMDValue: how one metadata value is stored as a custom property."""
    from google.protobuf import json_format

    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return ("string", value.string_value)
    if kind == "number_value":
        return ("double", value.number_value)
    if kind == "bool_value":
        return ("int", int(value.bool_value))
    if kind == "list_value":
        return ("struct", {"list": json_format.MessageToDict(value.list_value)})
    if kind == "struct_value":
        return ("struct", {"struct": json_format.MessageToDict(value.struct_value)})
    # "TODO: support null": the launcher fails to record the artifact.
    kind_type = {"null_value": "*structpb.Value_NullValue"}.get(kind, "<nil>")
    raise KubeflowError(
        f"unable to produce MLMD artifact for output metadata {name!r}: failed to convert "
        f"RuntimeArtifact to MLMD artifact: unknown/unsupported value type {kind_type}"
    )


def runtime_artifact_of(stored: StoredArtifact):
    """What a downstream driver gets back from MLMD (metadata.toRuntimeArtifact, ToRuntimeArtifact)."""
    from google.protobuf import struct_pb2
    from kfp.pipeline_spec import pipeline_spec_pb2

    artifact = pipeline_spec_pb2.RuntimeArtifact(name=str(stored.id), uri=stored.uri)
    artifact.metadata.SetInParent()
    for key, (kind, value) in stored.custom_properties.items():
        if kind in ("double", "int"):
            artifact.metadata.fields[key].number_value = float(value)
        elif kind == "string":
            artifact.metadata.fields[key].string_value = value
        else:
            struct = struct_pb2.Struct()
            struct.update(value)
            artifact.metadata.fields[key].struct_value.CopyFrom(struct)
    # GetOutputArtifactsByExecutionId sets Schema "" ("TODO(Bobgy): figure out how to get
    # schema"); ToRuntimeArtifact turns that into an empty instance schema.
    artifact.type.instance_schema = ""
    return artifact


# ------------------------------------------------------------------------------ CEL conditions


def cel_of_struct_value(value):
    """A google.protobuf.Value as CEL sees it (numbers are doubles, as in cel-go)."""
    from celpy import celtypes

    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return celtypes.DoubleType(value.number_value)
    if kind == "string_value":
        return celtypes.StringType(value.string_value)
    if kind == "bool_value":
        return celtypes.BoolType(value.bool_value)
    if kind == "struct_value":
        return cel_of_message(value.struct_value)
    if kind == "list_value":
        return celtypes.ListType([cel_of_struct_value(v) for v in value.list_value.values])
    return None  # null


def cel_of_message(message):
    """A protobuf message as cel-go's proto adapter presents it: every field, set or not."""
    from celpy import celtypes

    name = message.DESCRIPTOR.full_name
    if name == "google.protobuf.Struct":
        return celtypes.MapType(
            {celtypes.StringType(k): cel_of_struct_value(v) for k, v in message.fields.items()}
        )
    if name == "google.protobuf.Value":
        return cel_of_struct_value(message)
    if name == "google.protobuf.ListValue":
        return celtypes.ListType([cel_of_struct_value(v) for v in message.values])
    return celtypes.MapType(
        {celtypes.StringType(f.name): _cel_field(message, f) for f in message.DESCRIPTOR.fields}
    )


def _cel_field(message, descriptor):
    from celpy import celtypes

    value = getattr(message, descriptor.name)
    if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
        value_field = descriptor.message_type.fields_by_name["value"]
        return celtypes.MapType(
            {
                celtypes.StringType(k): _cel_scalar_or_message(v, value_field)
                for k, v in value.items()
            }
        )
    if descriptor.label == descriptor.LABEL_REPEATED:
        return celtypes.ListType([_cel_scalar_or_message(v, descriptor) for v in value])
    return _cel_scalar_or_message(value, descriptor)


def _cel_scalar_or_message(value, descriptor):
    from celpy import celtypes

    if descriptor.message_type is not None:
        return cel_of_message(value)
    kinds = {
        descriptor.TYPE_STRING: celtypes.StringType,
        descriptor.TYPE_BYTES: celtypes.BytesType,
        descriptor.TYPE_BOOL: celtypes.BoolType,
        descriptor.TYPE_DOUBLE: celtypes.DoubleType,
        descriptor.TYPE_FLOAT: celtypes.DoubleType,
        descriptor.TYPE_UINT32: celtypes.UintType,
        descriptor.TYPE_UINT64: celtypes.UintType,
    }
    return kinds.get(descriptor.type, celtypes.IntType)(value)  # ints and enums are CEL ints


def _parse_json(text):
    """CEL's parseJson(string) -> dyn, as expression.celParseJson registers it."""
    import celpy

    return celpy.json_to_cel(json.loads(text))


def evaluate_condition(executor_input, condition: str) -> bool:
    """expression.Expr.Condition: the CEL condition over the ExecutorInput's fields; must be bool."""
    import celpy
    from celpy import celtypes

    environment = celpy.Environment()
    try:
        program = environment.program(
            environment.compile(condition), functions={"parseJson": _parse_json}
        )
        activation = {
            f.name: _cel_field(executor_input, f) for f in executor_input.DESCRIPTOR.fields
        }
        result = program.evaluate(activation)
    except (celpy.CELParseError, celpy.CELEvalError) as exc:
        raise TaskFailed(f"evaluation error: {exc.args[0] if exc.args else exc}") from None
    if isinstance(result, celpy.CELEvalError):
        raise TaskFailed(f"evaluation error: {result}")
    if not isinstance(result, celtypes.BoolType):
        raise TaskFailed(f"evaluation error: return type is not bool, got {result!r}")
    return bool(result)


# ------------------------------------------------------------------------------------ the run


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


@dataclass
class RunSummary:
    """A finished local replay: where it ran, each task's result, and the outcome."""

    run_id: str
    run_root: str
    tasks: list[TaskResult]
    outcome: RunOutcome | None = None
    failed_task: str | None = None
    error: str | None = None


class LocalRun:
    """One replay of a compiled spec: the backend's run-level state, kept in memory."""

    def __init__(self, spec, pipeline_root: str, params: dict[str, Any], publish_logs: bool):
        self.spec = spec
        self.deploy = deployment_config(spec)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.run_id = f"{stamp}-{uuid.uuid4().hex[:8]}"
        # metadata.Client.GetPipeline: the run's root is <pipeline root>/<pipeline name>/<run id>.
        self.run_root = os.path.join(
            pipeline_root.rstrip("/"), spec.pipeline_info.name, self.run_id
        )
        self.root_parameters = root_parameter_values(spec, params)
        self.publish_logs = publish_logs
        self.results: dict[str, TaskResult] = {}
        self._next_id = 1

    def new_artifact_id(self) -> int:
        """The next ML Metadata artifact id."""
        self._next_id += 1
        return self._next_id


def root_parameter_values(spec, params: dict[str, Any]) -> dict[str, Any]:
    """The run's root parameters: given values, else defaults (argocompiler.Compile fills them)."""
    from google.protobuf import struct_pb2

    definitions = spec.root.input_definitions.parameters
    unknown = sorted(set(params) - set(definitions))
    if unknown:
        raise KubeflowError(f"--param {unknown[0]}: the pipeline has no such parameter")
    values = {}
    for name, definition in definitions.items():
        if name in params:
            values[name] = _value_of(params[name])
        elif definition.HasField("default_value"):
            values[name] = definition.default_value
        elif definition.is_optional:
            values[name] = struct_pb2.Value(null_value=0)
        else:
            raise KubeflowError(
                f"pipeline parameter {name!r} has no default: pass --param {name}=..."
            )
    return values


def _value_of(python_value):
    from google.protobuf import struct_pb2

    wrapper = struct_pb2.Struct()
    wrapper.update({"v": python_value})
    return wrapper.fields["v"]


# ----------------------------------------------------------------------------------- the driver

_RUNTIME_VALUE_TYPES = {  # Go's %T of each ValueOrRuntimeParameter oneof member
    "constant_value": "*pipelinespec.ValueOrRuntimeParameter_ConstantValue",
    "runtime_parameter": "*pipelinespec.ValueOrRuntimeParameter_RuntimeParameter",
    None: "<nil>",
}
_PARAMETER_TYPE_NAMES = {
    0: "PARAMETER_TYPE_ENUM_UNSPECIFIED",
    1: "NUMBER_DOUBLE",
    2: "NUMBER_INTEGER",
    3: "STRING",
    4: "BOOLEAN",
    5: "LIST",
    6: "STRUCT",
    7: "TASK_FINAL_STATUS",
}


def driver_context(run: LocalRun, name: str, task) -> str:
    """driver.Options.info(): how the driver names a task in its errors."""
    return (
        f"pipelineName={run.spec.pipeline_info.name}, runID={run.run_id}, "
        f'taskDisplayName="{task.task_info.name}", taskName="{name}", '
        f'component="{task.component_ref.name}", componentSpec'
    )


def resolve_parameter(run: LocalRun, task_name: str, spec):
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


def _with_run_placeholders(run: LocalRun, task_name: str, constant):
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


def resolve_artifacts(run: LocalRun, name: str, spec):
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
                f"{_PARAMETER_TYPE_NAMES.get(expected, expected)}, got "
                f"{actual.get(kind, kind.removesuffix('_value'))}"
            )


def value_as_text(value) -> str:
    """metadata.PbValueToText: a parameter value as the text a STRING parameter receives."""
    from google.protobuf import json_format

    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":  # strconv.FormatFloat(v, 'f', -1, 64): shortest, no exponent
        number = value.number_value
        return str(int(number)) if number.is_integer() else format(Decimal(repr(number)), "f")
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind in ("list_value", "struct_value"):
        return json.dumps(json_format.MessageToDict(getattr(value, kind)), separators=(",", ":"))
    return ""


def resolve_inputs(run: LocalRun, task_name: str, task, component):
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


def provision_outputs(run: LocalRun, task_name: str, component):
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


# --------------------------------------------------------------------------------- the launcher


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
    """launcher_v2.getPlaceholders (and the driver's input-parameter substitution)."""
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


def compiled_command(container, executor_input) -> list[str]:
    """The container's command + args with `{{$}}` (the ExecutorInput JSON) and placeholders."""
    from google.protobuf import json_format

    as_json = json_format.MessageToJson(executor_input, indent=None)
    substitutions = placeholders(executor_input)
    command = []
    for arg in [*container.command, *container.args]:
        if arg.startswith('{"IfPresent"') or arg.startswith('{"Concat"'):
            raise NotReplayed(f"structured placeholder {arg[:40]}...")
        arg = arg.replace("{{$}}", as_json)
        for placeholder, value in substitutions.items():
            arg = arg.replace(placeholder, value)
        command.append(arg)
    return command


def image_environment(container) -> dict[str, str]:
    """The task's environment: this one (standing in for the image's), plus the spec's `env`."""
    env = dict(os.environ)
    # `python` in the command is the image's interpreter: here, the one running this runner.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.update({item.name: item.value for item in container.env})
    return env


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
        try:
            text = Path(parameter.output_file).read_text()
        except OSError as exc:
            raise TaskFailed(
                f"failed to read output parameter name={name!r} "
                f"type={_PARAMETER_TYPE_NAMES.get(definition.parameter_type)!r} "
                f"path={parameter.output_file!r}: {exc.strerror}"
            ) from None
        values[name] = text_as_value(text, definition.parameter_type)
    return values


def text_as_value(text: str, parameter_type: int):
    """metadata.TextToPbValue: an output parameter file's text as a typed value."""
    from google.protobuf import struct_pb2

    if parameter_type == 3:
        return struct_pb2.Value(string_value=text)
    if parameter_type in (1, 2):
        return struct_pb2.Value(number_value=float(text))
    if parameter_type == 4:
        return struct_pb2.Value(bool_value=text.strip().lower() == "true")
    return _value_of(json.loads(text))


def record_outputs(run: LocalRun, executor_input, executor_output, succeeded: bool):
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


def stored_artifact(run: LocalRun, name: str, artifact) -> StoredArtifact:
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


# ---------------------------------------------------------------------------------- the DAG


def task_order(dag) -> list[str]:
    """Tasks in dependency order (Argo runs independent ones in parallel; here one at a time)."""
    remaining = {name: set(task.dependent_tasks) for name, task in dag.tasks.items()}
    order: list[str] = []
    while remaining:
        ready = sorted(name for name, deps in remaining.items() if deps <= set(order))
        if not ready:
            raise KubeflowError(f"the DAG has a cycle among {sorted(remaining)}")
        order.append(ready[0])
        del remaining[ready[0]]
    return order


def upstream_not_succeeded(run: LocalRun, task) -> str | None:
    """Why a task cannot start: argocompiler's `depends` wants every `X.Succeeded`."""
    for name in sorted(task.dependent_tasks):
        state = run.results[name].state
        if state != "succeeded":
            return f"upstream {name} was {state}"
    return None


def run_task(run: LocalRun, name: str, task) -> TaskResult:
    """Drive one container task and launch its executor, as driver.Container and LauncherV2 do."""
    from kfp.pipeline_spec import pipeline_spec_pb2

    component = run.spec.components[task.component_ref.name]
    container = run.deploy.executors[component.executor_label].container
    context = driver_context(run, name, task)
    try:
        inputs = resolve_inputs(run, name, task, component)
    except TaskFailed as exc:
        raise TaskFailed(
            f"driver.Container({context}) failed: failed to resolve inputs: {exc}"
        ) from None
    executor_input = pipeline_spec_pb2.ExecutorInput(inputs=inputs)
    condition = task.trigger_policy.condition
    if condition:
        try:
            triggered = evaluate_condition(executor_input, condition)
        except TaskFailed as exc:
            raise TaskFailed(f"driver.Container({context}) failed: {exc}") from None
        if not triggered:
            return TaskResult(name, "skipped", reason=f"condition is false: {condition}")
    executor_input.outputs.CopyFrom(provision_outputs(run, name, component))
    task_root = os.path.dirname(executor_input.outputs.output_file)
    log_path = os.path.join(task_root, LOGS_OUTPUT)
    if run.publish_logs:  # getLogWriter tees into the executor-logs artifact's file
        log_path = executor_input.outputs.artifacts[LOGS_OUTPUT].artifacts[0].uri
    command = compiled_command(container, with_default_parameters(executor_input, component))
    started = time.monotonic()
    code = run_executor(command, image_environment(container), task_root, log_path)
    seconds = time.monotonic() - started
    if code != 0:
        record_outputs(run, executor_input, pipeline_spec_pb2.ExecutorOutput(), succeeded=False)
        raise TaskFailed(f"task {name} failed (exit status {code}):\n{log_tail(log_path)}")
    executor_output = read_executor_output(executor_input.outputs.output_file)
    result = TaskResult(name, "succeeded", seconds=seconds, log_path=log_path)
    result.output_parameters = collect_output_parameters(executor_input, executor_output, component)
    result.outputs = record_outputs(run, executor_input, executor_output, succeeded=True)
    return result


def log_tail(path: str, lines: int = 25) -> str:
    """The last lines of a task's log, for the error that stops the run."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def run_pipeline_spec(
    path: str | Path,
    *,
    pipeline_root: str | None = None,
    params: dict[str, Any] | None = None,
    publish_logs: bool = True,
    echo=print,
) -> RunSummary:
    """Replay a compiled PipelineSpec here under the open-source backend's rules."""
    spec = load_pipeline_spec(path)
    check_compiles(spec)
    root = local_pipeline_root(spec, pipeline_root)
    run = LocalRun(spec, root, params or {}, publish_logs)
    order = task_order(spec.root.dag)
    echo(
        f"kfp-local run {run.run_id}: {len(order)} tasks of {spec.pipeline_info.name} -> {run.run_root}"
    )
    summary = RunSummary(run.run_id, run.run_root, [])
    for index, name in enumerate(order, start=1):
        task = spec.root.dag.tasks[name]
        prefix = f"  [{index:2d}/{len(order)}] {name}"
        if summary.failed_task:
            result = TaskResult(
                name, "omitted", reason=f"not started: {summary.failed_task} failed"
            )
        elif (blocked := upstream_not_succeeded(run, task)) is not None:
            result = TaskResult(name, "omitted", reason=blocked)
        else:
            echo(f"{prefix} ...")
            try:
                result = run_task(run, name, task)
            except TaskFailed as exc:
                result = TaskResult(name, "failed", reason=str(exc))
                summary.failed_task, summary.error = name, str(exc)
        run.results[name] = result
        summary.tasks.append(result)
        echo(f"{prefix} {describe_result(result)}")
    summary.outcome = run_outcome(run, summary)
    write_run_record(run, summary)
    return summary


def describe_result(result: TaskResult) -> str:
    """One progress line's verdict for a task."""
    if result.state == "succeeded":
        return f"done in {result.seconds:.0f}s"
    if result.state == "failed":
        return "FAILED"
    return f"{result.state}: {result.reason}"


def local_pipeline_root(spec, override: str | None) -> str:
    """Where this replay writes artifacts: --pipeline-root, else the spec's local default."""
    root = override or spec.default_pipeline_root
    if not root:
        raise KubeflowError("the spec has no defaultPipelineRoot: pass --pipeline-root DIR")
    if storage.is_remote(root):
        raise KubeflowError(
            f"the spec's pipeline root is {root}; kfp-local writes to a local directory "
            "standing in for the bucket: pass --pipeline-root DIR"
        )
    return str(Path(root).resolve())


def run_artifacts(run: LocalRun) -> dict[str, list[RunArtifact]]:
    """Every recorded output artifact of the run, by TFX type name, for the shared outcome code."""
    outputs: dict[str, list[RunArtifact]] = {}
    for result in run.results.values():
        for stored in result.outputs.values():
            if stored.schema_title == LOGS_SCHEMA_TITLE:
                continue
            properties = {k: v for k, (_kind, v) in stored.custom_properties.items()}
            record = RunArtifact(type_name_of_title(stored.schema_title), stored.uri, properties)
            outputs.setdefault(record.type_name, []).append(record)
    return outputs


def run_outcome(run: LocalRun, summary: RunSummary) -> RunOutcome | None:
    """Pushed or not, and why (the outcome `van-tfx run` prints), plus the HTML report."""
    from pipeline.outcome import gate_decision, int_property
    from pipeline.report import write_report

    outputs = run_artifacts(run)
    decision = gate_decision(outputs)
    span = int_property(decision, "span") if decision is not None else None
    outcome = summarize(outputs, span, run.run_id)
    if summary.failed_task:
        outcome.reasons.insert(0, f"the run failed at {summary.failed_task}")
    outcome.report_path = write_report(Path(run.run_root) / REPORT_FILE, outputs, outcome)
    return outcome


def write_run_record(run: LocalRun, summary: RunSummary) -> None:
    """<run root>/kfp_local_run.json: each task's state and recorded artifacts (for people, tests)."""
    tasks = []
    for result in summary.tasks:
        artifacts = {
            name: {
                "id": a.id,
                "uri": a.uri,
                "schema_title": a.schema_title,
                "custom_properties": {k: v for k, (_kind, v) in a.custom_properties.items()},
            }
            for name, a in result.outputs.items()
        }
        tasks.append(
            {
                "name": result.name,
                "state": result.state,
                "reason": result.reason,
                "seconds": round(result.seconds, 1),
                "log": result.log_path,
                "outputs": artifacts,
            }
        )
    record = {"run_id": run.run_id, "failed_task": summary.failed_task, "tasks": tasks}
    Path(run.run_root).mkdir(parents=True, exist_ok=True)
    (Path(run.run_root) / RUN_RECORD).write_text(json.dumps(record, indent=2))
