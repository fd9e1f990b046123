"""The command of every compiled task: TFX's KFP v2 container entrypoint, after two repairs.

`van-tfx compile` sets each container's command to `python -m pipeline.kfp_entrypoint`; the args
are TFX's own (`--executor_class_path`, `--json_serialized_invocation_args {{$}}`,
`--json_serialized_inputs_spec_args`, Beam args). Before handing them to
`tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor`, this module repairs the
ExecutorInput the open-source KFP backend builds, which stock TFX cannot read:

1. **Input artifact types.** The driver builds a task's input artifacts from ML Metadata with an
   empty type: `metadata.Client.GetOutputArtifactsByExecutionId` sets `Schema: ""` ("TODO(Bobgy):
   figure out how to get schema") and `OutputArtifact.ToRuntimeArtifact` turns it into
   `type: {instanceSchema: ""}`. TFX's `_parse_raw_artifact` imports each artifact's class from
   its type's title, so every task with an input would fail. The type is restored from the
   component's input definitions, which TFX passes as `--json_serialized_inputs_spec_args`.
2. **The `executor-logs` output.** With `PUBLISH_LOGS=true` (the stock manifests' default) the
   driver provisions an extra output `executor-logs` of type `system.Artifact`
   (`driver.provisionOutputs`), and TFX fails with "Could not import system.Artifact". The
   launcher writes that artifact itself (`launcher_v2.getLogWriter` tees the task's output into
   it), so it is removed from what TFX sees.

Vertex AI Pipelines sends typed inputs and no `executor-logs`: there both repairs change nothing.
"""

from __future__ import annotations

import json
import runpy
import sys

import van_tfx  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TFX imports TensorFlow)

TFX_ENTRYPOINT = "tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor"
INVOCATION_FLAG = "--json_serialized_invocation_args"
INPUTS_SPEC_FLAG = "--json_serialized_inputs_spec_args"
LOGS_OUTPUT = "executor-logs"
LOGS_SCHEMA_TITLE = "system.Artifact"


def flag_value(argv: list[str], flag: str) -> int | None:
    """Index in argv of the value of `flag` (given as `flag value`), or None."""
    for index, arg in enumerate(argv[:-1]):
        if arg == flag:
            return index + 1
    return None


def has_no_type(artifact: dict) -> bool:
    """Whether an ExecutorInput artifact came without a usable type (the OSS driver's empty one)."""
    schema = artifact.get("type") or {}
    return not schema.get("schemaTitle") and not schema.get("instanceSchema")


def restore_input_types(executor_input: dict, inputs_spec: dict) -> list[str]:
    """Give untyped input artifacts the type their component declares; return the input names."""
    declared = inputs_spec.get("artifacts", {})
    restored = []
    for name, artifact_list in executor_input.get("inputs", {}).get("artifacts", {}).items():
        for artifact in artifact_list.get("artifacts", []):
            if has_no_type(artifact) and name in declared:
                artifact["type"] = declared[name]["artifactType"]
                restored.append(name)
    return restored


def drop_launcher_logs_output(executor_input: dict) -> bool:
    """Remove the launcher-managed `executor-logs` output; True if there was one."""
    outputs = executor_input.get("outputs", {}).get("artifacts", {})
    logs = outputs.get(LOGS_OUTPUT)
    if not logs:
        return False
    titles = {a.get("type", {}).get("schemaTitle") for a in logs.get("artifacts", [])}
    if titles != {LOGS_SCHEMA_TITLE}:
        return False  # a component's own output of that name: leave it to TFX
    del outputs[LOGS_OUTPUT]
    return True


def repaired_argv(argv: list[str]) -> list[str]:
    """TFX's entrypoint arguments with the ExecutorInput repaired (see the module docstring)."""
    argv = list(argv)
    at = flag_value(argv, INVOCATION_FLAG)
    if at is None:
        return argv
    executor_input = json.loads(argv[at])
    spec_at = flag_value(argv, INPUTS_SPEC_FLAG)
    if spec_at is not None:
        restored = restore_input_types(executor_input, json.loads(argv[spec_at]))
        if restored:
            print(f"kfp_entrypoint: restored the types of inputs {sorted(set(restored))}")
    if drop_launcher_logs_output(executor_input):
        print(f"kfp_entrypoint: {LOGS_OUTPUT} is the launcher's; hidden from TFX")
    argv[at] = json.dumps(executor_input)
    return argv


def main() -> None:
    """Repair the arguments, then run TFX's entrypoint as `python -m` would."""
    sys.argv = [TFX_ENTRYPOINT, *repaired_argv(sys.argv[1:])]
    runpy.run_module(TFX_ENTRYPOINT, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
