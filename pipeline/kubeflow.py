"""Compile the pipeline to a KFP v2 PipelineSpec that open-source KFP and Vertex AI both run.

The same `create_pipeline(config, location)` that runs locally is compiled with TFX's
KubeflowV2DagRunner; only the location (object storage, Dataflow/Flink Beam args) and the Trainer's
resources differ. Three choices make the spec runnable on the open-source backend, whose rules
`pipeline/kfp_local.py` replays (docs/kubeflow.md has the table):

- `use_pipeline_spec_2_1=True`: parameters as `runtimeValue.constant` with `parameterType` (the
  open-source driver accepts no other runtime value kind) and `--json_serialized_inputs_spec_args`
  on every container, without which TFX's entrypoint never reads `parameterValues`.
- Every container runs `python -m pipeline.kfp_entrypoint`, TFX's entrypoint behind two repairs for
  what the open-source launcher hands it (input artifact types, the `executor-logs` output).
- No resolver tasks: the baseline is the served model (components/served_model.py).

Compiling reads the config and writes the YAML, nothing else: no data root is read or written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipeline.beam_workers import DATAFLOW_RUNNERS, DIRECT_RUNNERS, with_worker_image
from pipeline.kfp_spec import KubeflowError, parse_pipeline_spec, write_pipeline_spec
from van_tfx import storage
from van_tfx.config import Config

TRAINER_ID = "Trainer"
VERTEX_TRAINER_EXECUTOR = "tfx.extensions.google_cloud_ai_platform.trainer.executor.GenericExecutor"
# The command of every task's container: TFX's KFP v2 entrypoint, wrapped (pipeline/kfp_entrypoint.py).
ENTRYPOINT_COMMAND = ["python", "-m", "pipeline.kfp_entrypoint"]


def beam_args_for_cluster(args: list[str], image: str) -> list[str]:
    """The configured Beam args, naming our image as the workers' environment on Direct and Dataflow."""
    return with_worker_image(args, image, DIRECT_RUNNERS | DATAFLOW_RUNNERS)


def kubeflow_location(config: Config, image: str):
    """Where the pipeline keeps data, artifacts and pushed models on the cluster (object storage)."""
    from pipeline.pipeline import PipelineLocation

    kf = config.kubeflow
    return PipelineLocation(
        data_root=kf.data_root,
        pipeline_root=kf.pipeline_root,
        serving_base_path=kf.serving_base_path,
        beam_args=beam_args_for_cluster(list(kf.beam_args), image),
        metadata_path=None,  # KFP runs use the cluster's ML Metadata service
    )


def trainer_resource_spec(config: Config, gpus: int):
    """The Trainer pod's CPU/memory (requests = limits) and `gpus` accelerators of the configured type."""
    from kfp.pipeline_spec import pipeline_spec_pb2

    kf = config.kubeflow
    resources = pipeline_spec_pb2.PipelineDeploymentConfig.PipelineContainerSpec.ResourceSpec(
        cpu_limit=kf.trainer_cpu,
        memory_limit=kf.trainer_memory_gb,  # GB, as KFP's ResourceSpec defines it
        cpu_request=kf.trainer_cpu,
        memory_request=kf.trainer_memory_gb,
    )
    if gpus > 0:
        resources.accelerator.type = kf.accelerator_type
        resources.accelerator.count = gpus
    return resources


def vertex_training_args(config: Config, image: str, gpus: int) -> dict[str, Any]:
    """Vertex AI CustomJob for the Trainer: a chief pool and a worker pool running `image`."""
    kf = config.kubeflow
    machine: dict[str, Any] = {"machine_type": kf.worker_machine_type}
    if gpus > 0:
        machine.update(accelerator_type=kf.accelerator_type, accelerator_count=gpus)
    # Vertex writes TF_CONFIG into every replica from these pools: pool 0 is the "chief"
    # (the only one that exports the model), pool 1 the "worker"s.
    pools = [{"machine_spec": machine, "replica_count": 1, "container_spec": {"image_uri": image}}]
    if kf.training_workers > 1:
        pools.append(
            {
                "machine_spec": dict(machine),
                "replica_count": kf.training_workers - 1,
                "container_spec": {"image_uri": image},
            }
        )
    return {"project": kf.vertex_project, "job_spec": {"worker_pool_specs": pools}}


def find_component(tfx_pipeline, component_id: str):
    """The component with this id in a TFX pipeline (a clear error when it is missing)."""
    for component in tfx_pipeline.components:
        if component.id == component_id:
            return component
    ids = ", ".join(c.id for c in tfx_pipeline.components)
    raise KubeflowError(f"pipeline has no component {component_id!r} (it has: {ids})")


def configure_trainer(tfx_pipeline, config: Config, image: str, gpus: int, vertex: bool) -> None:
    """Give the Trainer its GPUs/CPU/memory, or turn it into a Vertex AI multi-worker launcher."""
    trainer = find_component(tfx_pipeline, TRAINER_ID)
    if not vertex:
        trainer.with_platform_config(trainer_resource_spec(config, gpus))
        return
    from tfx.dsl.components.base import executor_spec
    from tfx.extensions.google_cloud_ai_platform import constants as vertex_constants
    from tfx.extensions.google_cloud_ai_platform.trainer import executor as vertex_executor
    from tfx.utils import json_utils

    # Same swap as tfx.extensions.google_cloud_ai_platform.Trainer, which only replaces the
    # executor: the pod becomes a launcher and the CustomJob's replicas do the training.
    trainer.executor_spec = executor_spec.ExecutorClassSpec(vertex_executor.GenericExecutor)
    custom_config = json_utils.loads(trainer.exec_properties.get("custom_config") or "{}")
    custom_config.update(
        {
            vertex_executor.TRAINING_ARGS_KEY: vertex_training_args(config, image, gpus),
            vertex_constants.ENABLE_VERTEX_KEY: True,
            vertex_constants.VERTEX_REGION_KEY: config.kubeflow.vertex_region,
        }
    )
    trainer.exec_properties["custom_config"] = json_utils.dumps(custom_config)


def check_schema_path(config: Config) -> None:
    """Refuse a curated schema on this machine's disk: no pod can read it there."""
    path = config.data.schema_path
    if path and not storage.is_remote(path):
        raise KubeflowError(
            f"data.schema_path {path} is a file on this machine the cluster cannot see; leave "
            "it empty (the curated schema ships in the image) or point it at object storage"
        )


def compile_pipeline(
    config: Config,
    output: str | Path,
    *,
    image: str | None = None,
    gpus: int | None = None,
    vertex_training: bool | None = None,
) -> dict[str, Any]:
    """Compile the pipeline into a KFP v2 PipelineSpec YAML at `output`; return the spec as a dict."""
    from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner as v2

    from components.new_data_gate import GATE_ID
    from pipeline.pipeline import create_pipeline

    output = Path(output)
    if output.suffix not in (".yaml", ".yml"):
        raise KubeflowError(f"--output {output} must end in .yaml (a bare KFP PipelineSpec)")
    image = image or config.kubeflow.image
    gpus = config.kubeflow.gpus if gpus is None else gpus
    if gpus < 0:
        raise KubeflowError(f"--gpus must be >= 0, got {gpus}")
    vertex = config.kubeflow.vertex_training if vertex_training is None else vertex_training
    check_schema_path(config)

    tfx_pipeline = create_pipeline(config, kubeflow_location(config, image))
    configure_trainer(tfx_pipeline, config, image, gpus, vertex)
    runner_config = v2.KubeflowV2DagRunnerConfig(
        default_image=image, default_commands=ENTRYPOINT_COMMAND, use_pipeline_spec_2_1=True
    )
    job = v2.KubeflowV2DagRunner(config=runner_config).run(tfx_pipeline, write_out=False)
    spec = job["pipelineSpec"]
    never_cache(spec, GATE_ID)
    name_conditions_by_their_inputs(spec)
    # The runner keeps the pipeline root only in the Vertex job wrapper; a bare YAML needs it in
    # the spec itself or KFP falls back to its cluster-wide default bucket.
    spec["defaultPipelineRoot"] = config.kubeflow.pipeline_root
    parse_pipeline_spec(spec)  # fail here, not on the cluster, if kfp cannot read it
    write_pipeline_spec(spec, output)
    return spec


def never_cache(spec: dict[str, Any], task: str) -> None:
    """Switch KFP's step cache off for one task of the root DAG."""
    # The NewDataGate reads the serving directory, which is not among its inputs: a cached gate
    # would repeat an old decision after a push.
    tasks = spec["root"]["dag"]["tasks"]
    if task not in tasks:
        raise KubeflowError(f"the compiled pipeline has no task {task!r}")
    tasks[task]["cachingOptions"] = {"enableCache": False}


_CONDITION_INPUT = re.compile(r"inputs\.artifacts\['([^']+)'\]")


def name_conditions_by_their_inputs(spec: dict[str, Any]) -> None:
    """Make each task's trigger condition name its inputs as the task does."""
    # TFX 1.16's step builder encodes a Cond's predicate with the channel key a previous encoding
    # left on it: the first gated task it builds gets `inputs.artifacts['_NewDataGate.decision']`
    # even when it takes the decision as an input named `decision`, and the KFP driver then fails
    # evaluating the condition. Such a key (`_<producer>.<output>`) is renamed to the task's input
    # fed by that producer output; a condition naming no input of its task is an error here.
    for name, task in spec["root"]["dag"]["tasks"].items():
        condition = task.get("triggerPolicy", {}).get("condition")
        if not condition:
            continue
        inputs = task.get("inputs", {}).get("artifacts", {})

        def input_named(match: re.Match, name=name, inputs=inputs) -> str:
            key = match.group(1)
            if key in inputs:
                return match.group(0)
            producer, _, output = key.lstrip("_").partition(".")
            for input_name, source in inputs.items():
                fed_by = source.get("taskOutputArtifact", {})
                if fed_by == {"producerTask": producer, "outputArtifactKey": output}:
                    return f"inputs.artifacts['{input_name}']"
            raise KubeflowError(f"task {name!r}: its condition reads input {key!r}, which it lacks")

        task["triggerPolicy"]["condition"] = _CONDITION_INPUT.sub(input_named, condition)
