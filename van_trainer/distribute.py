"""Distribution strategy selection and the chief-only write rule for multi-worker training."""

from __future__ import annotations

import json
import logging
import os
import shutil

import tensorflow as tf

from van_tfx import storage
from van_tfx.config import TrainConfig

log = logging.getLogger(__name__)


def tf_config() -> dict:
    """The parsed TF_CONFIG environment variable ({} when unset)."""
    raw = os.environ.get("TF_CONFIG", "")
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"TF_CONFIG is not valid JSON: {exc}") from exc


def cluster_size(config: dict | None = None) -> int:
    """Number of chief + worker tasks TF_CONFIG names (1 without a cluster)."""
    cluster = (tf_config() if config is None else config).get("cluster", {})
    return max(1, sum(len(cluster.get(role, [])) for role in ("chief", "worker")))


def split_cpu(num_devices: int) -> None:
    """Expose the CPU as `num_devices` logical devices; only possible before TF initialises."""
    if num_devices <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current and len(current) == num_devices:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)]
        )
    except RuntimeError as exc:
        log.warning(
            "cannot split the CPU into %d devices (TF already initialised): %s", num_devices, exc
        )


def choose_strategy(train: TrainConfig) -> tf.distribute.Strategy:
    """MultiWorkerMirrored when TF_CONFIG names >1 task; Mirrored over >1 GPU (or CPU devices)."""
    kind = train.strategy
    if kind == "auto":
        if cluster_size() > 1:
            kind = "multi_worker"
        elif len(tf.config.list_physical_devices("GPU")) > 1 or train.cpu_devices > 1:
            kind = "mirrored"
        else:
            kind = "default"
    if kind == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif kind == "mirrored":
        strategy = tf.distribute.MirroredStrategy(devices=_mirrored_devices(train.cpu_devices))
    else:
        strategy = tf.distribute.get_strategy()
    log.info("strategy %s with %d replicas", type(strategy).__name__, strategy.num_replicas_in_sync)
    return strategy


def input_pipelines(strategy: tf.distribute.Strategy) -> int:
    """How many input pipelines distribute_datasets_from_function builds: one per worker."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return cluster_size()
    return 1


def _mirrored_devices(cpu_devices: int) -> list[str] | None:
    if tf.config.list_logical_devices("GPU"):
        return None  # MirroredStrategy's default: every local GPU
    split_cpu(cpu_devices)
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether this task writes the shared outputs (always true outside multi-worker training)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def write_dir(path: str, strategy: tf.distribute.Strategy | None = None) -> str:
    """`path` for the chief; a per-worker temp dir beside it for the others (delete it after)."""
    if is_chief(strategy):
        return path
    resolver = strategy.cluster_resolver
    return os.path.join(
        os.path.dirname(path.rstrip("/")), f"workertemp_{resolver.task_type}_{resolver.task_id}"
    )


def remove_worker_dir(path: str, final_path: str) -> None:
    """Delete a non-chief worker's throwaway copy (no-op on the chief)."""
    if path != final_path and tf.io.gfile.exists(path):
        if storage.is_remote(path):
            tf.io.gfile.rmtree(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
