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
