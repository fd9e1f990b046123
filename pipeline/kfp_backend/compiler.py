"""What the workflow compiler refuses when a run is created (backend/src/v2/compiler, argocompiler)."""

from __future__ import annotations

import re

from pipeline.kfp_backend import BackendRefusal, NotReplayed


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


SCHEMA_VERSION = "2.1.0"  # apiserver/template/template.go SCHEMA_VERSION_2_1_0
# apiserver/template/v2_template.go matches this unanchored (regexp.MatchString): a name passes
# when any part of it does.
_PIPELINE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def check_template(spec) -> None:
    """Refuse what the API server refuses when a run's spec arrives (template.New)."""

    # Before any compiling: TFX's default spec (schema 2.0.0) is refused here, at the request.
    def refuse(message: str) -> BackendRefusal:
        # util.NewInvalidInputErrorWithDetails(ErrorInvalidPipelineSpec, message)
        return BackendRefusal(f"InvalidInputError: {message}: pipeline spec is invalid")

    if not spec.pipeline_info.name or not spec.HasField("root"):
        raise refuse("unknown template format")  # template.go isPipelineSpec
    if spec.schema_version != SCHEMA_VERSION:
        raise refuse(
            f"KFP only supports schema version {SCHEMA_VERSION}, but the pipeline spec has "
            f"version {spec.schema_version}"
        )
    if not _PIPELINE_NAME.search(spec.pipeline_info.name):
        raise refuse(
            "invalid v2 pipeline spec: name should consist of lower case alphanumeric "
            "characters, '-' or '.', and must start and end with an alphanumeric character"
        )


def check_compiles(spec) -> None:
    """Refuse what argocompiler.Compile refuses, and add the dependencies it adds to each task."""
    # Like argocompiler's DAG(), this edits the spec's tasks in place: the drivers then see the
    # dependentTasks the workflow was compiled with (addImplicitDependencies).
    check_template(spec)
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
                name, f'executor(label="{label}") not found in deployment config'
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
            raise _component_error(
                name, f'component ref name is empty for task name="{task.task_info.name}"'
            )
        if ref not in spec.components:
            raise _component_error(name, f'cannot find component ref name="{ref}"')
        _visit_component(ref, spec.components[ref], spec, deploy, visited)
    try:
        add_implicit_dependencies(component.dag)
        _check_dag_tasks(component.dag, spec, deploy)
    except BackendRefusal as exc:
        raise BackendRefusal(f'compiling DAG "{name}": {exc}') from None  # argocompiler DAG()


def add_implicit_dependencies(dag) -> None:
    """argocompiler.addImplicitDependencies: a task depends on every producer of its inputs."""
    # The backend waits for a producer even when dependentTasks leaves it out, and refuses an
    # input whose producer is not a task of the DAG before any task runs.
    for key in sorted(dag.tasks):
        task = dag.tasks[key]
        producers = [
            spec.task_output_parameter.producer_task
            for spec in task.inputs.parameters.values()
            if spec.WhichOneof("kind") == "task_output_parameter"
        ] + [
            spec.task_output_artifact.producer_task
            for spec in task.inputs.artifacts.values()
            if spec.WhichOneof("kind") == "task_output_artifact"
        ]
        for producer in producers:
            if producer not in dag.tasks:
                raise BackendRefusal(
                    f'failed to add implicit deps: unknown producer task "{producer}" in DAG'
                )
            if producer not in task.dependent_tasks:
                task.dependent_tasks.append(producer)
        task.dependent_tasks.sort()  # a set; Go sorts it for a stable workflow


def _component_error(name: str, message: str) -> BackendRefusal:
    return BackendRefusal(f'error processing component name="{name}": {message}')


def _check_dag_tasks(dag, spec, deploy) -> None:
    """argocompiler/dag.go `DAG` and `task`: what they refuse, and what this runner does not replay."""
    for key in sorted(dag.tasks):
        task = dag.tasks[key]
        component = spec.components[task.component_ref.name]
        if task.HasField("artifact_iterator"):
            raise BackendRefusal("artifact iterator not implemented yet")
        if task.HasField("parameter_iterator"):
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
                raise BackendRefusal(
                    f'compiling task "{key}": triggerPolicy.condition on importer task is not '
                    "supported"
                )
            raise NotReplayed(f"task {key!r} is an importer; kfp-local runs container tasks only")
