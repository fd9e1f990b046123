"""Distributed training in real processes: 2-worker MultiWorkerMirrored and 2-CPU Mirrored."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from test_trainer import fn_args_dict, start_run, tiny_config, transform_paths  # noqa: F401

pytestmark = pytest.mark.slow

# Runs run_fn and keeps the final weights of the model it trained, for comparison across workers.
WEIGHTS_SCRIPT = """
import json, sys
import van_tfx
import numpy as np
from tfx.components.trainer.fn_args_utils import FnArgs
from van_trainer import train
args = json.loads(sys.argv[1])
weights_path = args.pop("weights_path")
built = []
build_model = train.build_model
def keep_model(*a, **k):
    built.append(build_model(*a, **k))
    return built[-1]
train.build_model = keep_model
train.run_fn(FnArgs(**args))
np.savez(weights_path, *[w.numpy() for w in built[0].weights])
"""

# Splits the CPU before TensorFlow initialises, then trains with MirroredStrategy over both halves.
MIRRORED_SCRIPT = """
import json, sys
import van_tfx
from van_trainer import distribute
distribute.split_cpu(2)
from tfx.components.trainer.fn_args_utils import FnArgs
from van_trainer import train
train.run_fn(FnArgs(**json.loads(sys.argv[1])))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_train_in_lockstep_and_only_the_chief_exports(transform_paths, tmp_path):  # noqa: F811
    config = tiny_config(steps_per_epoch=2, epochs=2, batch_size=8)
    workers = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    procs, logs = [], []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        args = fn_args_dict(transform_paths, tmp_path, config)
        args["weights_path"] = str(tmp_path / f"weights_{index}.npz")
        logs.append(tmp_path / f"worker_{index}.log")
        procs.append(
            start_run(args, logs[-1], script=WEIGHTS_SCRIPT, TF_CONFIG=json.dumps(tf_config))
        )
    for proc, log in zip(procs, logs, strict=True):
        try:
            code = proc.wait(timeout=600)
        finally:
            for other in procs:
                if other.poll() is None and proc.returncode not in (0, None):
                    other.kill()
        assert code == 0, log.read_text()[-4000:]
    chief, worker = (np.load(tmp_path / f"weights_{i}.npz") for i in range(2))
    assert len(chief.files) == len(worker.files) > 10
    for key in chief.files:
        np.testing.assert_array_equal(chief[key], worker[key])
    # Exactly one export, by the chief; the other worker's throwaway copy is gone.
    assert (tmp_path / "serving" / "saved_model.pb").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("workertemp")]
    report = json.loads((tmp_path / "model_run" / "metrics.json").read_text())
    assert report["replicas"] == 2
    assert report["final_step"] == 4


def test_mirrored_strategy_over_two_logical_cpus_trains(transform_paths, tmp_path):  # noqa: F811
    config = tiny_config(steps_per_epoch=2, epochs=1, strategy="mirrored", cpu_devices=2)
    args = fn_args_dict(transform_paths, tmp_path, config)
    log = tmp_path / "mirrored.log"
    proc = start_run(args, log, script=MIRRORED_SCRIPT)
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    report = json.loads((tmp_path / "model_run" / "metrics.json").read_text())
    assert report["replicas"] == 2
    assert report["final_step"] == 2
    assert np.isfinite(report["final"]["loss"])
    assert Path(tmp_path / "serving" / "saved_model.pb").is_file()


# Each of two MultiWorkerMirrored workers iterates the Trainer's own datasets for one epoch of
# training batches and one full eval pass, recording the ids (= labels) it saw.
SHARDS_SCRIPT = """
import json, sys
import van_tfx
import numpy as np
import tensorflow as tf
from van_tfx.config import Config
from van_trainer import dataset, train
args = json.loads(sys.argv[1])
strategy = tf.distribute.MultiWorkerMirroredStrategy()
config = Config.model_validate(args["config"])
classes = args["classes"]
def ids(targets):
    local = [t.numpy() for t in strategy.experimental_local_results(targets)]
    return [int(i) for t in local for i in np.argmax(t, axis=-1)]
seen = {"train": [], "eval": []}
batches = iter(dataset.distributed(strategy, dataset.train_dataset, args["train"], config, classes))
for _ in range(args["steps"]):
    seen["train"] += ids(next(batches)[1])
# The Trainer's validation pass: the same full steps on both workers, padding weighing 0.
plan = train.eval_plan(strategy, config, args["transform"], args["eval"])
batches = iter(train.eval_data(strategy, config, args["eval"], classes, plan))
seen["eval_weights"] = []
for _ in range(plan.steps):
    _, targets, weights = next(batches)
    weights = [w.numpy() for w in strategy.experimental_local_results(weights)]
    real = [i for i, w in zip(ids(targets), np.concatenate(weights)) if w > 0]
    seen["eval"] += real
    seen["eval_weights"] += [float(w) for w in np.concatenate(weights)]
seen["plan"] = [plan.steps, plan.weight]
seen["eval_after_steps"] = bool(batches.get_next_as_optional().has_value())
with open(args["out"], "w") as f:
    json.dump(seen, f)
"""


def _record_shard_examples(transform_dir: Path, split: str, files: list[str], sizes: list[int]):
    """The per-file counts Transform's ShardingTransformExecutor records for a split."""
    from van_tfx.data import shards

    path = Path(shards.example_count_path(str(transform_dir), split))
    path.parent.mkdir(parents=True, exist_ok=True)
    per_file = {Path(f).name: n for f, n in zip(files, sizes, strict=True)}
    counts = {"examples": sum(sizes), "files": len(files), "shard_examples": per_file}
    path.write_text(json.dumps(counts))


def _write_id_shards(directory: Path, sizes: list[int], first_id: int) -> list[str]:
    """GZIP TFRecord files in Transform's layout whose labels are distinct ids."""
    import tensorflow as tf

    from van_tfx import features

    jpeg = tf.io.encode_jpeg(tf.fill([8, 12, 3], tf.constant(90, tf.uint8))).numpy()
    files, next_id = [], first_id
    directory.mkdir(parents=True)
    for index, size in enumerate(sizes):
        path = str(directory / f"transformed_examples-{index:05d}-of-{len(sizes):05d}.gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for example_id in range(next_id, next_id + size):
                feature = {
                    features.TRANSFORMED_IMAGE: tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[jpeg])
                    ),
                    features.TRANSFORMED_LABEL: tf.train.Feature(
                        int64_list=tf.train.Int64List(value=[example_id])
                    ),
                }
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                writer.write(example.SerializeToString())
        files.append(path)
        next_id += size
    return files


def test_two_workers_read_disjoint_files_covering_each_split_once_per_epoch(tmp_path):
    train_files = _write_id_shards(tmp_path / "train", [12, 12, 12, 12], 0)
    eval_files = _write_id_shards(tmp_path / "eval", [12, 12, 5], 48)  # uneven on purpose
    _record_shard_examples(tmp_path / "transform", "eval", eval_files, [12, 12, 5])
    config = tiny_config(batch_size=8)
    config.augment.mixup_prob = 0.0  # one-hot targets: argmax is the example's id
    workers = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    procs, logs = [], []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        args = {
            "config": config.model_dump(mode="json"),
            "classes": 48 + 29,
            "train": train_files,
            "eval": eval_files,
            "transform": str(tmp_path / "transform"),
            "steps": 48 // 8,  # one epoch at global batch 8
            "out": str(tmp_path / f"seen_{index}.json"),
        }
        logs.append(tmp_path / f"worker_{index}.log")
        procs.append(
            start_run(args, logs[-1], script=SHARDS_SCRIPT, TF_CONFIG=json.dumps(tf_config))
        )
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    seen = [json.loads((tmp_path / f"seen_{i}.json").read_text()) for i in range(2)]
    for split, ids in (("train", range(48)), ("eval", range(48, 77))):
        first, second = seen[0][split], seen[1][split]
        assert not set(first) & set(second), f"{split}: both workers read the same examples"
        assert sorted(first + second) == list(ids), f"{split}: not each example exactly once"
    # Worker 0 reads 12 + 5 eval examples at 4 per step, worker 1 reads 12 and pads 8: 5 full
    # steps each; 29 real examples weigh 40 / 29, so the weights sum to the 40 slots.
    for worker in seen:
        assert worker["plan"] == [5, pytest.approx(40 / 29)]
        assert not worker["eval_after_steps"], "the validation pass ended before its data"
    weights = seen[0]["eval_weights"] + seen[1]["eval_weights"]
    assert len(weights) == 40 and sum(weights) == pytest.approx(40)
