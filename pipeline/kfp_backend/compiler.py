"""What the workflow compiler refuses when a run is created (backend/src/v2/compiler, argocompiler)."""

from __future__ import annotations

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
