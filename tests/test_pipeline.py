"""End to end: `van-tfx run` on the bundled sample, its gates, and its retraining semantics.

One session-scoped home is shared: a first run that pushes, an idle rerun, a refused overlapping
run, a run on the same data that gets past the local check and is stopped by the pipeline's
NewDataGate, and a run on a new span whose gate is set out of reach. Each run is the real CLI in a real
subprocess (LocalDagRunner, Beam DirectRunner, SQLite ML Metadata).
"""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pipeline.local import LOCAL_WORKER_ENVIRONMENT, beam_args_for_local_run, home_lock
from van_tfx import features
from van_tfx.data import records as records_lib
from van_tfx.data.sample import build_sample

pytestmark = pytest.mark.slow

# Tiny but real: the sample's 1,797 digits at 32 px, a tiny VAN, few epochs, in-memory Beam.
TINY = [
    "model.variant=tiny",
    "model.image_size=32",
    "model.drop_path_rate=0.0",
    "train.epochs=4",
    "train.batch_size=64",
    "train.base_learning_rate=0.03",
    "train.warmup_epochs=0.5",
    "augment.randaugment=false",
    "augment.random_erasing_prob=0.0",
    "augment.mixup_prob=0.0",
    "eval.min_top1=0.3",
    "eval.max_top1_drop=0.5",
    "beam.args=[--direct_running_mode=in_memory]",
]


def van_tfx(home: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the van-tfx CLI with VAN_TFX_HOME=home (temporary files in home/tmp) in a subprocess."""
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ, VAN_TFX_HOME=str(home), TF_USE_LEGACY_KERAS="1", TMPDIR=str(home / "tmp")
    )
    return subprocess.run(
        [sys.executable, "-m", "van_tfx.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_json(home: Path, *args: str) -> dict:
    """`van-tfx run --json`; fail the test with the CLI's output if it did not exit 0."""
    result = van_tfx(home, "run", "--json", *args)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def versions(home: Path) -> list[str]:
    """Pushed version directories under the home's serving base path."""
    return sorted(p.name for p in (home / "serving" / "van").glob("*") if p.name.isdigit())


def pipeline_runs(home: Path) -> int:
    """Number of pipeline runs ML Metadata recorded."""
    from pipeline.local import open_store

    return len(open_store(str(home / "metadata.sqlite")).get_contexts_by_type("pipeline_run"))


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    """A home with the bundled sample (span 1)."""
    home = tmp_path_factory.mktemp("home")
    build_sample(home / "data")
    return home


@pytest.fixture(scope="session")
def first_run(home) -> dict:
    """The first run on a fresh home: nothing to compare against, so only the value gate."""
    args = [arg for item in TINY for arg in ("--set", item)]
    return run_json(home, *args)


@pytest.fixture(scope="session")
def idle_rerun(home, first_run) -> tuple[dict, list[str], int]:
    """A second run with no new data, plus what existed before it."""
    before = (versions(home), pipeline_runs(home))
    return run_json(home), *before


@pytest.fixture(scope="session")
def same_data_run(home, idle_rerun) -> tuple[dict, list[str], int]:
    """A run that gets past the local no-new-data check, as every scheduled cluster run does."""
    # The local check compares with last_run.json; without it the pipeline starts, and only the
    # in-pipeline NewDataGate (span + fingerprint vs the served model's record) can stop it.
    (home / "last_run.json").unlink()
    before = (versions(home), pipeline_runs(home))
    return run_json(home), *before


@pytest.fixture(scope="session")
def new_span_run(home, same_data_run) -> dict:
    """New data arrives; the gate is set out of reach so this candidate must not be pushed."""
    build_sample(home / "data", new_span=True)
    return run_json(home, "--set", "eval.min_top1=1.0")


def test_first_run_blesses_and_pushes_in_tf_serving_layout(home, first_run):
    assert first_run["pushed"], first_run["reasons"]
    assert first_run["span"] == 1
    assert first_run["metrics"]["sparse_categorical_accuracy"] >= 0.3
    assert "no model is served yet" in " ".join(first_run["reasons"])
    [version] = versions(home)
    assert first_run["pushed_version"] == version
    model_dir = home / "serving" / "van" / version
    files = [p for p in model_dir.rglob("*") if p.is_file()]
    newest = max(files, key=lambda p: p.stat().st_mtime_ns)
    assert newest.stat().st_mtime_ns == (model_dir / "saved_model.pb").stat().st_mtime_ns


def test_beam_components_of_a_local_run_build_no_tfx_sdist(home, first_run):
    # TFX's Beam executors package TFX as a `tfx_ephemeral` sdist in a fresh temporary directory
    # unless the Beam args say the workers have it; the DirectRunner would never stage it.
    assert not list((home / "tmp").rglob("tfx_ephemeral*"))


def test_local_beam_args_say_the_direct_runner_workers_have_tfx():
    from tfx.utils import dependency_utils

    args = beam_args_for_local_run(["--direct_running_mode=in_memory"])
    assert args == ["--direct_running_mode=in_memory", LOCAL_WORKER_ENVIRONMENT]
    # TFX's own check, as its Beam executors call it: nothing to build, the args come back as-is.
    assert dependency_utils.make_beam_dependency_flags(args) == args


@pytest.mark.parametrize(
    "args",
    [
        ["--runner=DataflowRunner", "--project=p"],
        ["--runner", "FlinkRunner"],
        ["--extra_package=/dist/ours.tar.gz"],
        ["--sdk_container_image=gcr.io/p/van-tfx:1"],
    ],
)
def test_local_beam_args_are_kept_for_other_runners_and_given_dependencies(args):
    assert beam_args_for_local_run(args) == args


def test_pushed_model_carries_tf_serving_warmup_requests(home, first_run):
    from tensorflow_serving.apis import prediction_log_pb2

    warmup = home / "serving" / "van" / first_run["pushed_version"] / "assets.extra"
    logs = [
        prediction_log_pb2.PredictionLog.FromString(r.numpy())
        for r in tf.data.TFRecordDataset(str(warmup / "tf_serving_warmup_requests"))
    ]
    kinds = {log.WhichOneof("log_type") for log in logs}
    assert kinds == {"predict_log", "classify_log"}
    signatures = {log.predict_log.request.model_spec.signature_name for log in logs}
    assert signatures >= {features.PREDICT_IMAGES_SIGNATURE, features.SERVING_EXAMPLES_SIGNATURE}
    classify = {log.classify_log.request.model_spec.signature_name for log in logs} - {""}
    assert classify == {features.CLASSIFY_SIGNATURE}


def test_pushed_model_classifies_validation_images(home, first_run):
    model = tf.saved_model.load(str(home / "serving" / "van" / first_run["pushed_version"]))
    predict = model.signatures[features.PREDICT_IMAGES_SIGNATURE]
    shards = sorted(glob.glob(str(home / "data" / "span-1" / "validation-*")))
    examples = list(records_lib.read_examples(shards))[:128]
    images = tf.constant([e[features.IMAGE_ENCODED] for e in examples])
    predicted = predict(images=images)["top_k_synsets"][:, 0].numpy()
    truth = [e[features.SYNSET] for e in examples]
    accuracy = sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
    assert accuracy >= 0.3


def test_run_report_has_metrics_curves_and_confusion_matrix(first_run):
    report = Path(first_run["report_path"]).read_text()
    for heading in ("Decision", "Evaluation", "Training curves", "Confusion matrix", "TFDV"):
        assert heading in report


def test_idle_rerun_trains_and_pushes_nothing(home, idle_rerun):
    outcome, versions_before, runs_before = idle_rerun
    assert not outcome["trained"]
    assert "no new data" in outcome["reasons"][0]
    assert versions(home) == versions_before
    assert pipeline_runs(home) == runs_before


def test_pushed_model_records_the_data_it_was_trained_on(home, first_run):
    model_dir = home / "serving" / "van" / first_run["pushed_version"]
    record = json.loads((model_dir / "assets.extra" / "van_training_data.json").read_text())
    assert record["span"] == 1 and record["input_fingerprint"]
    assert "NewDataGate" in record["decision_uri"]


def test_gate_trains_nothing_on_the_data_of_the_served_model(home, same_data_run):
    outcome, versions_before, runs_before = same_data_run
    assert not outcome["trained"] and not outcome["pushed"]
    assert outcome["reasons"][0].startswith("nothing new to train on: trained nothing")
    assert f"served version {versions_before[-1]}" in outcome["reasons"][0]
    assert versions(home) == versions_before
    assert pipeline_runs(home) == runs_before + 1  # the pipeline ran, up to the gate
    log = Path(outcome["log_path"]).read_text()
    for component in ("ImportExampleGen", "Transform", "Trainer", "Evaluator", "Pusher"):
        assert f"Skipping execution for {component}" in log
    assert "Trained nothing" in Path(outcome["report_path"]).read_text()


def test_overlapping_run_is_refused_without_touching_metadata(home, idle_rerun):
    runs_before = pipeline_runs(home)
    with home_lock(home):
        result = van_tfx(home, "run")
    assert result.returncode == 2
    assert "refusing to start a second one" in result.stderr
    assert pipeline_runs(home) == runs_before


def test_new_span_retrains_against_baseline_and_failing_gate_blocks_push(home, new_span_run):
    assert new_span_run["trained"] and new_span_run["span"] == 2
    assert not new_span_run["pushed"]
    assert len(versions(home)) == 1
    reasons = " ".join(new_span_run["reasons"])
    assert "sparse_categorical_accuracy" in reasons
    assert new_span_run["baseline_metrics"], "the model served by run 1 is the baseline"
    log = Path(new_span_run["log_path"]).read_text()
    assert "warm start" in log.lower()


def write_records(path: Path, examples: list[bytes]) -> None:
    """Write serialized tf.Examples into one TFRecord file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for example in examples:
            writer.write(example)


def test_record_without_label_stops_the_run_naming_the_feature(tmp_path, home):
    shards = sorted(glob.glob(str(home / "data" / "span-1" / "*-0000*")))
    good = [
        tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(shards).take(60)
    ]
    broken = tf.train.Example()
    broken.CopyFrom(good[0])
    del broken.features.feature[features.LABEL]
    serialized = [e.SerializeToString() for e in good]
    data = tmp_path / "home" / "data"
    write_records(data / "train-00000-of-00001", serialized[:40] + [broken.SerializeToString()])
    write_records(data / "validation-00000-of-00001", serialized[40:])
    (data / "synsets.txt").write_text((home / "data" / "span-1" / "synsets.txt").read_text())
    args = [arg for item in [*TINY, "data.layout=plain"] for arg in ("--set", item)]
    result = van_tfx(tmp_path / "home", "run", *args)
    assert result.returncode != 0
    assert features.LABEL in result.stderr
    assert not (tmp_path / "home" / "serving").exists()


@pytest.mark.parametrize(("classes", "texts"), [(10, 10), (1000, 0)])
def test_confusion_matrix_cells_are_labelled_only_for_few_classes(classes, texts):
    from matplotlib import pyplot as plt

    from pipeline.report import confusion_matrix_figure

    figure = confusion_matrix_figure(np.eye(classes) * 7)
    try:
        assert len(figure.axes[0].texts) == texts
    finally:
        plt.close(figure)
