"""`van-tfx kfp-local`: run a compiled KFP v2 PipelineSpec here, by the open-source backend's rules.

Nothing else runs the compiled spec on this machine, and a cluster is not always at hand, so this
runner replays what open-source Kubeflow Pipelines does with a spec, rule by rule, from its Go
source (`pipeline/kfp_backend`, one module per Go package): it refuses what the workflow compiler
refuses, walks the root DAG in dependency order, builds each task's `ExecutorInput` as the driver
does (parameters only from `runtimeValue.constant`, root inputs or upstream outputs; input
artifacts as ML Metadata returns the upstream outputs; fresh output URIs; `outputFile`; the
launcher's `executor-logs` output), evaluates `triggerPolicy.condition` as CEL over it, runs the
container's command as a subprocess with this project's installed environment standing in for
the image, and records its outputs as the launcher does. No lifecycle hooks run (the backend runs
none) and there is no cache (every task executes).

What it does not reproduce (docs/kubeflow.md has the table): pods, images and resources; the
object store (a local directory stands in for the bucket and its `/gcs/...` mount, so nothing is
downloaded or uploaded); the MLMD service (artifacts live in memory for one run, with the
backend's value conversions); retries; importer,
iterator and nested-DAG tasks (refused with a message that says so).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.kfp_backend import LOGS_OUTPUT, LOGS_SCHEMA_TITLE, TaskFailed
from pipeline.kfp_backend.compiler import check_compiles
from pipeline.kfp_backend.driver import (
    driver_context,
    provision_outputs,
    resolve_container_args,
    resolve_inputs,
    validate_container,
)
from pipeline.kfp_backend.expression import evaluate_condition
from pipeline.kfp_backend.launcher import (
    collect_output_parameters,
    compiled_command,
    image_environment,
    prepare_output_folders,
    qualify_executor_logs,
    read_executor_output,
    record_outputs,
    run_executor,
    with_default_parameters,
)
from pipeline.kfp_backend.state import RunState, TaskResult
from pipeline.kfp_spec import KubeflowError, load_pipeline_spec
from pipeline.outcome import RunArtifact, RunOutcome, summarize, type_name_of_title
from van_tfx import storage

RUN_RECORD = "kfp_local_run.json"
REPORT_FILE = "report.html"


@dataclass
class RunSummary:
    """A finished local replay: where it ran, each task's result, and the outcome."""

    run_id: str
    run_root: str
    tasks: list[TaskResult]
    outcome: RunOutcome | None = None
    failed_task: str | None = None
    error: str | None = None


def task_order(dag) -> list[str]:
    """Tasks in dependency order (ties by name): the order a replay starts them in."""
    remaining = {name: set(task.dependent_tasks) for name, task in dag.tasks.items()}
    order: list[str] = []
    while remaining:
        ready = sorted(name for name, deps in remaining.items() if deps <= set(order))
        if not ready:
            raise KubeflowError(f"the DAG has a cycle among {sorted(remaining)}")
        order.append(ready[0])
        del remaining[ready[0]]
    return order


def upstream_not_succeeded(run: RunState, task) -> str | None:
    """Why a task cannot start: argocompiler's `depends` wants every `X.Succeeded`."""
    for name in sorted(task.dependent_tasks):
        state = run.results[name].state
        if state != "succeeded":
            return f"upstream {name} was {state}"
    return None


def run_task(run: RunState, name: str, task) -> TaskResult:
    """Drive one container task and launch its executor, as driver.Container and LauncherV2 do."""
    from kfp.pipeline_spec import pipeline_spec_pb2

    component = run.spec.components[task.component_ref.name]
    container = run.deploy.executors[component.executor_label].container
    context = driver_context(run, name, task)
    try:
        validate_container(task)
    except TaskFailed as exc:
        raise TaskFailed(f"driver.Container({context}) failed: {exc}") from None
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
    try:
        driven = resolve_container_args(
            container.command, executor_input, "command"
        ) + resolve_container_args(container.args, executor_input, "args")
    except TaskFailed as exc:
        raise TaskFailed(f"driver.Container({context}) failed: {exc}") from None
    # The launcher, from here on.
    prepare_output_folders(executor_input)
    task_root = os.path.dirname(executor_input.outputs.output_file)
    log_path = os.path.join(task_root, LOGS_OUTPUT)
    if run.publish_logs:  # getLogWriter tees into the executor-logs artifact's file
        qualify_executor_logs(executor_input)
        log_path = executor_input.outputs.artifacts[LOGS_OUTPUT].artifacts[0].uri
    command = compiled_command(driven, with_default_parameters(executor_input, component))
    started = time.monotonic()
    pod_name = f"{run.spec.pipeline_info.name}-{run.run_id}-{name}".lower()  # Argo's, roughly
    code = run_executor(command, image_environment(container, pod_name), task_root, log_path)
    seconds = time.monotonic() - started
    if code != 0:
        record_outputs(run, executor_input, pipeline_spec_pb2.ExecutorOutput(), succeeded=False)
        message = f"task {name} failed (exit status {code}):\n{log_tail(log_path)}"
        raise TaskFailed(message, log_path=log_path)
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
    params: dict[str, str] | None = None,
    publish_logs: bool = True,
    parallelism: int | None = None,
    echo=print,
) -> RunSummary:
    """Replay a compiled PipelineSpec here under the open-source backend's rules."""
    spec = load_pipeline_spec(path)
    check_compiles(spec)
    root = local_pipeline_root(spec, pipeline_root)
    run = RunState(spec, root, params or {}, publish_logs)
    order = task_order(spec.root.dag)
    echo(
        f"kfp-local run {run.run_id}: {len(order)} tasks of {spec.pipeline_info.name} -> {run.run_root}"
    )
    summary = RunSummary(run.run_id, run.run_root, [])
    number = {name: index for index, name in enumerate(order, start=1)}
    pending = list(order)
    running: dict[concurrent.futures.Future, str] = {}
    # Argo runs every task whose dependencies are done at once; here at most `parallelism`.
    workers = max(1, parallelism or os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        while pending or running:
            for name in ready_tasks(run, pending):
                pending.remove(name)
                result = verdict_before_start(run, summary, name)
                if result is None:
                    future = pool.submit(start_task, run, summary, name, number, echo)
                    running[future] = name
                else:
                    finish(run, summary, result, number, echo)
            if running:
                done, _ = concurrent.futures.wait(running, return_when="FIRST_COMPLETED")
                for future in sorted(done, key=lambda f: number[running[f]]):
                    result = task_result(future, running.pop(future), summary)
                    finish(run, summary, result, number, echo)
    summary.tasks.sort(key=lambda result: number[result.name])
    summary.outcome = run_outcome(run, summary)
    write_run_record(run, summary)
    return summary


def ready_tasks(run: RunState, pending: list[str]) -> list[str]:
    """Pending tasks whose dependencies have all finished, in dependency order."""
    tasks = run.spec.root.dag.tasks
    return [n for n in pending if all(d in run.results for d in tasks[n].dependent_tasks)]


def start_task(run: RunState, summary: RunSummary, name: str, number, echo) -> TaskResult:
    """Run one task on a worker, unless another failed while it waited for one (failFast)."""
    if summary.failed_task:
        return TaskResult(name, "omitted", reason=f"not started: {summary.failed_task} failed")
    echo(f"{progress_prefix(number, name)} ...")
    return run_task(run, name, run.spec.root.dag.tasks[name])


def verdict_before_start(run: RunState, summary: RunSummary, name: str) -> TaskResult | None:
    """A task's result without running it (omitted), or None when it may start."""
    if summary.failed_task:
        return TaskResult(name, "omitted", reason=f"not started: {summary.failed_task} failed")
    blocked = upstream_not_succeeded(run, run.spec.root.dag.tasks[name])
    return TaskResult(name, "omitted", reason=blocked) if blocked else None


def task_result(future, name: str, summary: RunSummary) -> TaskResult:
    """A started task's result; a failure stops the run from starting more (Argo's failFast)."""
    try:
        return future.result()
    except TaskFailed as exc:
        if summary.failed_task is None:
            summary.failed_task, summary.error = name, str(exc)
        return TaskResult(name, "failed", reason=str(exc), log_path=exc.log_path)


def finish(run: RunState, summary: RunSummary, result: TaskResult, number, echo) -> None:
    """Record a task's result and print its progress line."""
    run.results[result.name] = result
    summary.tasks.append(result)
    echo(f"{progress_prefix(number, result.name)} {describe_result(result)}")


def progress_prefix(number: dict[str, int], name: str) -> str:
    """The `  [ n/N] name` prefix of a task's progress line."""
    return f"  [{number[name]:2d}/{len(number)}] {name}"


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


def run_artifacts(run: RunState) -> dict[str, list[RunArtifact]]:
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


def run_outcome(run: RunState, summary: RunSummary) -> RunOutcome | None:
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


def write_run_record(run: RunState, summary: RunSummary) -> None:
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
