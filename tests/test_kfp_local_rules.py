"""kfp-local against the open-source backend's Go source, one rule at a time, on hand-made specs.

Each spec here is the smallest one that shows a rule: its tasks are real subprocesses (`python -c`
scripts) run by `van-tfx kfp-local`, so what is checked is what the replay does end to end, not a
helper in isolation. The Go file each rule comes from is named beside its test
(kubeflow/pipelines `backend/src/v2` at the commit docs/kubeflow.md names).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.kfp_spec import write_pipeline_spec
from van_tfx.cli import main

# Writes its ExecutorInput (the JSON after `--executor-input`) and its argv to <cwd>/seen.json.
RECORD_SCRIPT = (
    "import json, sys; args = sys.argv[1:]; "
    "open('seen.json', 'w').write(json.dumps({'argv': args}))"
)


def container_task(
    name: str, script: str, *, args=None, inputs=None, deps=None, outputs=None, params=None
):
    """One task, its component and its executor: `python -c script args...`."""
    component = {"executorLabel": f"exec-{name}"}
    if outputs:
        component["outputDefinitions"] = outputs
    if params:
        component["inputDefinitions"] = {"parameters": params}
    task = {"taskInfo": {"name": name}, "componentRef": {"name": f"comp-{name}"}}
    if inputs:
        task["inputs"] = inputs
    if deps:
        task["dependentTasks"] = deps
    executor = {"container": {"image": "python:3.10", "command": ["python", "-c", script]}}
    if args:
        executor["container"]["args"] = args
    return task, component, executor


def write_spec(tmp_path: Path, tasks: dict[str, tuple]) -> Path:
    """A bare PipelineSpec YAML of the given container tasks, rooted under tmp_path/root."""
    spec = {
        "pipelineInfo": {"name": "rules"},
        "schemaVersion": "2.1.0",
        "sdkVersion": "hand-made",
        "defaultPipelineRoot": str(tmp_path / "root"),
        "root": {"dag": {"tasks": {}}},
        "components": {},
        "deploymentSpec": {"executors": {}},
    }
    for name, (task, component, executor) in tasks.items():
        spec["root"]["dag"]["tasks"][name] = task
        spec["components"][f"comp-{name}"] = component
        spec["deploymentSpec"]["executors"][f"exec-{name}"] = executor
    path = tmp_path / "rules.yaml"
    write_pipeline_spec(spec, path)
    return path


def replay(path: Path, capsys, *extra: str) -> tuple[int, dict, str]:
    """`van-tfx kfp-local PATH --json --parallelism 1`: exit code, the run record, stderr."""
    code = main(["kfp-local", str(path), "--json", "--parallelism", "1", *extra])
    err = capsys.readouterr().err
    records = list((path.parent / "root" / "rules").glob("*/kfp_local_run.json"))
    record = json.loads(records[0].read_text()) if records else {}
    return code, record, err


def states(record: dict) -> dict[str, str]:
    """Each task's final state in a run record."""
    return {task["name"]: task["state"] for task in record["tasks"]}


ARTIFACT_OUT = {"artifacts": {"out": {"artifactType": {"schemaTitle": "system.Artifact"}}}}


# ------------------------------------------------------------ argocompiler/dag.go: dependencies


def test_a_task_waits_for_the_producer_of_its_input_even_if_dependent_tasks_omits_it(
    tmp_path, capsys
):
    # argocompiler/dag.go addImplicitDependencies (called first in DAG()): every producer of a
    # taskOutputArtifact/taskOutputParameter input becomes a dependency, whatever dependentTasks
    # says. Named so that a replay going by dependentTasks alone starts the consumer first.
    consume = {
        "artifacts": {
            "x": {"taskOutputArtifact": {"producerTask": "z-producer", "outputArtifactKey": "out"}}
        }
    }
    path = write_spec(
        tmp_path,
        {
            "a-consumer": container_task("a-consumer", "pass", inputs=consume),
            "z-producer": container_task("z-producer", "pass", outputs=ARTIFACT_OUT),
        },
    )
    code, record, err = replay(path, capsys)
    assert code == 0, err
    assert [t["name"] for t in record["tasks"]] == ["z-producer", "a-consumer"]
    assert states(record) == {"z-producer": "succeeded", "a-consumer": "succeeded"}


def test_an_input_from_a_task_that_is_not_in_the_dag_is_refused_when_the_run_is_created(
    tmp_path, capsys
):
    consume = {
        "artifacts": {
            "x": {"taskOutputArtifact": {"producerTask": "nowhere", "outputArtifactKey": "out"}}
        }
    }
    path = write_spec(tmp_path, {"a": container_task("a", "pass", inputs=consume)})
    code, record, err = replay(path, capsys)
    assert code == 2 and not record
    assert (
        'Failed to compile job: compiling DAG "root": failed to add implicit deps: unknown '
        'producer task "nowhere" in DAG'
    ) in err
