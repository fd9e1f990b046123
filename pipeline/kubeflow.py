"""Kubeflow Pipelines: compile the pipeline to a KFP v2 PipelineSpec, submit runs, schedule retraining.

The same `create_pipeline(config, location)` that runs locally is compiled with TFX's
KubeflowV2DagRunner; only the location (object storage, Dataflow/Flink Beam args) and the Trainer's
resources differ. Submitting and scheduling go through `kfp.Client` (kfp 2.5); every request can be
printed instead of sent (`dry_run`), and an unreachable host fails fast with a one-line error.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from van_tfx import storage
from van_tfx.config import Config

TRAINER_ID = "Trainer"
DEFAULT_TIMEOUT_SECONDS = 30.0
VERTEX_TRAINER_EXECUTOR = "tfx.extensions.google_cloud_ai_platform.trainer.executor.GenericExecutor"
# Where the Dockerfile installs our packages (UV_PROJECT_ENVIRONMENT=/opt/venv, Python 3.10).
IMAGE_SITE_PACKAGES = "/opt/venv/lib/python3.10/site-packages"
OUR_PACKAGES = ("van_tfx", "van_trainer", "pipeline", "components", "serving")
CRON_FIELD = re.compile(r"^[0-9A-Za-z*?/,\-#LW]+$")
CRON_FIELD_NAMES = ("second", "minute", "hour", "day-of-month", "month", "day-of-week")


class KubeflowError(RuntimeError):
    """A Kubeflow request that cannot be made or was refused; the message is one line."""


# --------------------------------------------------------------------------------------- compile


def kubeflow_location(config: Config):
    """Where the pipeline keeps data, artifacts and pushed models on the cluster (object storage)."""
    from pipeline.pipeline import PipelineLocation

    kf = config.kubeflow
    return PipelineLocation(
        data_root=kf.data_root,
        pipeline_root=kf.pipeline_root,
        serving_base_path=kf.serving_base_path,
        beam_args=list(kf.beam_args),
        metadata_path=None,  # KFP runs use the cluster's ML Metadata service
        resolve_baseline=kf.resolve_baseline,
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


def path_in_image(local_path: str) -> str:
    """Where a file shipped inside one of our packages lives in the image (error if it is not)."""
    import importlib.util

    path = Path(local_path).resolve()
    for package in OUR_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            continue
        package_dir = Path(spec.origin).parent
        if path.is_relative_to(package_dir):
            return f"{IMAGE_SITE_PACKAGES}/{package}/{path.relative_to(package_dir).as_posix()}"
    raise KubeflowError(
        f"the pipeline reads {local_path}, a file on this machine the cluster cannot see; "
        "leave data.schema_path empty (the curated schema ships in the image) or point it at "
        "object storage"
    )


def relocate_local_files(tfx_pipeline) -> None:
    """Point file parameters compiled from this checkout (the curated schema) at the image's copy."""
    for component in tfx_pipeline.components:
        path = component.exec_properties.get("schema_file")
        if isinstance(path, str) and path and not storage.is_remote(path):
            component.exec_properties["schema_file"] = path_in_image(path)


def compile_pipeline(
    config: Config,
    output: str | Path,
    *,
    image: str | None = None,
    gpus: int | None = None,
    vertex_training: bool | None = None,
    resolve_baseline: bool | None = None,
) -> dict[str, Any]:
    """Compile the pipeline into a KFP v2 PipelineSpec YAML at `output`; return the spec as a dict."""
    from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner as v2

    from components.new_data_gate import GATE_ID
    from pipeline import ingest
    from pipeline.pipeline import create_pipeline

    output = Path(output)
    if output.suffix not in (".yaml", ".yml"):
        raise KubeflowError(f"--output {output} must end in .yaml (a bare KFP PipelineSpec)")
    image = image or config.kubeflow.image
    gpus = config.kubeflow.gpus if gpus is None else gpus
    if gpus < 0:
        raise KubeflowError(f"--gpus must be >= 0, got {gpus}")
    vertex = config.kubeflow.vertex_training if vertex_training is None else vertex_training
    if resolve_baseline is not None:
        config = config.model_copy(deep=True)
        config.kubeflow.resolve_baseline = resolve_baseline

    try:
        tfx_pipeline = create_pipeline(config, kubeflow_location(config))
    except ingest.DerivedSchemaError as exc:
        raise KubeflowError(str(exc)) from None
    relocate_local_files(tfx_pipeline)
    configure_trainer(tfx_pipeline, config, image, gpus, vertex)
    runner = v2.KubeflowV2DagRunner(config=v2.KubeflowV2DagRunnerConfig(default_image=image))
    job = runner.run(tfx_pipeline, write_out=False)
    spec = job["pipelineSpec"]
    never_cache(spec, GATE_ID)
    # The runner keeps the pipeline root only in the Vertex job wrapper; a bare YAML needs it in
    # the spec itself or KFP falls back to its cluster-wide default bucket.
    spec["defaultPipelineRoot"] = config.kubeflow.pipeline_root
    parse_pipeline_spec(spec)  # fail here, not on the cluster, if kfp cannot read it
    write_pipeline_spec(spec, output)
    return spec


def never_cache(spec: dict[str, Any], task: str) -> None:
    """Switch KFP's step cache off for one task of the root DAG.

    The NewDataGate reads the serving directory, which is not among its inputs: a cached gate
    would repeat an old decision after a push.
    """
    tasks = spec["root"]["dag"]["tasks"]
    if task not in tasks:
        raise KubeflowError(f"the compiled pipeline has no task {task!r}")
    tasks[task]["cachingOptions"] = {"enableCache": False}


def write_pipeline_spec(spec: dict[str, Any], output: Path) -> None:
    """Write a PipelineSpec dict as YAML with a short header saying where it came from."""
    output.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# PIPELINE DEFINITION\n"
        f"# Name: {spec['pipelineInfo']['name']}\n"
        "# Compiled by `van-tfx compile` (TFX KubeflowV2DagRunner); edit the config, not this file.\n"
    )
    output.write_text(header + yaml.safe_dump(spec, sort_keys=True))


def parse_pipeline_spec(spec: dict[str, Any]):
    """Parse a PipelineSpec dict with kfp's own proto (raises on unknown or mistyped fields)."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    return json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())


def load_pipeline_spec(path: str | Path):
    """Load a compiled PipelineSpec YAML into kfp's proto."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise KubeflowError(f"pipeline package not found: {path}") from None
    except yaml.YAMLError as exc:
        raise KubeflowError(f"pipeline package {path} is not valid YAML: {exc}") from None
    if not isinstance(spec, dict) or "pipelineInfo" not in spec:
        raise KubeflowError(f"{path} is not a KFP PipelineSpec (no pipelineInfo)")
    return parse_pipeline_spec(spec)


def resolver_tasks(spec) -> list[str]:
    """Names of executors that are TFX resolvers (open-source KFP 2.x cannot run those)."""
    return sorted(
        label
        for label, executor in spec.deployment_spec["executors"].items()
        if "resolver" in executor
    )


# ------------------------------------------------------------------------------ requests to KFP


def submit_request(
    config: Config,
    package: str | Path,
    *,
    run_name: str | None = None,
    experiment: str | None = None,
    namespace: str | None = None,
    enable_caching: bool | None = None,
) -> list[dict[str, Any]]:
    """The kfp.Client call that creates one run from a compiled package."""
    kf = config.kubeflow
    return [
        {
            "method": "create_run_from_pipeline_package",
            "kwargs": {
                "pipeline_file": str(package),
                "arguments": {},
                "run_name": run_name,
                "experiment_name": experiment or kf.experiment,
                "namespace": namespace,
                "pipeline_root": kf.pipeline_root,
                "enable_caching": enable_caching,
                "service_account": kf.service_account or None,
            },
        }
    ]


def validate_cron(expression: str) -> str:
    """Check a KFP cron expression: 6 fields, seconds first (e.g. `0 0 3 * * *` = 03:00 daily)."""
    fields = expression.split()
    if len(fields) != 6:
        hint = f"; did you mean '0 {expression.strip()}'?" if len(fields) == 5 else ""
        raise KubeflowError(
            f"--cron {expression!r} has {len(fields)} fields; KFP needs 6 "
            f"({' '.join(CRON_FIELD_NAMES)}), e.g. '0 0 3 * * *' for 03:00 daily{hint}"
        )
    for name, field in zip(CRON_FIELD_NAMES, fields, strict=True):
        if not CRON_FIELD.match(field):
            raise KubeflowError(f"--cron {expression!r}: {name} field {field!r} is not valid cron")
    return " ".join(fields)


def schedule_request(
    config: Config,
    package: str | Path,
    *,
    cron: str | None = None,
    interval_seconds: int | None = None,
    job_name: str | None = None,
    experiment: str | None = None,
    namespace: str | None = None,
    enable_caching: bool | None = None,
) -> list[dict[str, Any]]:
    """The kfp.Client calls that create a recurring run (experiment first, for its id)."""
    if (cron is None) == (interval_seconds is None):
        raise KubeflowError("give exactly one of --cron or --interval")
    if interval_seconds is not None and interval_seconds < 1:
        raise KubeflowError(
            f"--interval must be a positive number of seconds, got {interval_seconds}"
        )
    kf = config.kubeflow
    experiment = experiment or kf.experiment
    trigger = (
        {"cron_expression": validate_cron(cron)}
        if cron is not None
        else {"interval_second": int(interval_seconds)}
    )
    return [
        {"method": "create_experiment", "kwargs": {"name": experiment, "namespace": namespace}},
        {
            "method": "create_recurring_run",
            "kwargs": {
                "experiment_id": f"<experiment_id of {experiment}>",
                "job_name": job_name or f"{config.pipeline_name}-retrain",
                **trigger,
                # One run at a time, and no backfill of nights the schedule was paused or the
                # cluster was down: a missed night's data is picked up by the next run anyway.
                "max_concurrency": 1,
                "no_catchup": True,
                "pipeline_package_path": str(package),
                "params": {},
                "pipeline_root": kf.pipeline_root,
                "enable_caching": enable_caching,
                "service_account": kf.service_account or None,
            },
        },
    ]


def describe_request(host: str | None, calls: list[dict[str, Any]]) -> str:
    """The JSON a dry run prints: where it would go and each call with its arguments."""
    return json.dumps({"host": host, "calls": calls}, indent=2)


def check_reachable(host: str, timeout: float) -> None:
    """Open (and close) a TCP connection to the KFP host, so a dead host fails in `timeout` s."""
    parsed = urllib.parse.urlparse(host if "://" in host else f"https://{host}")
    if not parsed.hostname:
        raise KubeflowError(f"--host {host!r} is not a URL like http://HOST:PORT")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise KubeflowError(f"cannot reach Kubeflow Pipelines at {host}: {reason}") from None


@contextlib.contextmanager
def socket_timeout(seconds: float):
    """Bound every blocking socket operation (kfp's HTTP client has no timeout of its own)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def send(
    host: str, calls: list[dict[str, Any]], *, namespace: str | None, timeout: float
) -> list[Any]:
    """Make the calls with kfp.Client; an experiment id from create_experiment feeds later calls."""
    check_reachable(host, timeout)
    results: list[Any] = []
    with socket_timeout(timeout), _kfp_errors(host):
        import kfp

        client = kfp.Client(host=host, namespace=namespace or "kubeflow")
        experiment_id = None
        for call in calls:
            kwargs = dict(call["kwargs"])
            if call["method"] == "create_recurring_run":
                kwargs["experiment_id"] = experiment_id
            result = getattr(client, call["method"])(**kwargs)
            if call["method"] == "create_experiment":
                experiment_id = result.experiment_id
            results.append(result)
    return results


@contextlib.contextmanager
def _kfp_errors(host: str):
    """Turn kfp/urllib3 exceptions into one-line KubeflowErrors naming the host."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as exc:
        body = " ".join(str(exc.body or "").split())[:300]
        raise KubeflowError(
            f"Kubeflow Pipelines at {host} refused the request: {exc.status} {exc.reason} {body}"
        ) from None
    except (urllib3.exceptions.HTTPError, OSError, TimeoutError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise KubeflowError(f"cannot reach Kubeflow Pipelines at {host}: {reason}") from None


def list_schedules(host: str, *, namespace: str | None, timeout: float) -> list[dict[str, Any]]:
    """The recurring runs on the host, as plain dicts (id, name, status, trigger)."""
    check_reachable(host, timeout)
    with socket_timeout(timeout), _kfp_errors(host):
        import kfp

        client = kfp.Client(host=host, namespace=namespace or "kubeflow")
        response = client.list_recurring_runs(page_size=100, namespace=namespace)
    return [_schedule_summary(run) for run in response.recurring_runs or []]


def _schedule_summary(run) -> dict[str, Any]:
    trigger = run.trigger
    cron = getattr(getattr(trigger, "cron_schedule", None), "cron", None)
    interval = getattr(getattr(trigger, "periodic_schedule", None), "interval_second", None)
    return {
        "id": run.recurring_run_id,
        "name": run.display_name,
        "status": run.status,
        "cron": cron,
        "interval_second": interval,
        "max_concurrency": run.max_concurrency,
        "no_catchup": run.no_catchup,
    }


def disable_schedule(host: str, job_id: str, *, namespace: str | None, timeout: float) -> None:
    """Disable one recurring run (it stays listed and can be re-enabled in the KFP UI)."""
    check_reachable(host, timeout)
    with socket_timeout(timeout), _kfp_errors(host):
        import kfp

        client = kfp.Client(host=host, namespace=namespace or "kubeflow")
        client.disable_recurring_run(recurring_run_id=job_id)
