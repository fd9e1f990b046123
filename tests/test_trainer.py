"""run_fn end to end on a real Transform output: training, export, no train/serve skew, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from van_tfx.config import Config

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_EVAL = 96, 48
PER_SHARD = 16  # Transform's files: 6 train, 3 eval (enough for two workers to share)


# --------------------------------------------------------------------------- shared fixture code


def tiny_config(**train) -> Config:
    """Tiny VAN at 32 px on the 64 px sample JPEGs: seconds per step on a busy CPU."""
    config = Config.model_validate(
        {
            "data": {"examples_per_shard": PER_SHARD},
            "model": {"variant": "tiny", "image_size": 32, "drop_path_rate": 0.0},
            "train": {
                "epochs": 2,
                "steps_per_epoch": 3,
                "batch_size": 8,
                "base_learning_rate": 0.05,
                "warmup_epochs": 0.5,
                "checkpoint_every_steps": 2,
                "deterministic": True,
                **train,
            },
            # Requests of more than 4 images run in chunks: the export tests below cover both.
            "serving": {"top_k": 3, "inference_chunk_images": 4},
        }
    )
    return config


def _preprocessing_fn():
    from van_trainer.preprocessing import preprocessing_fn

    return preprocessing_fn


def _raw_examples(split_files, limit):
    from van_tfx.data.records import iter_shard

    records = []
    for path in split_files:
        records.extend(iter_shard(path))
    return records[:limit]


def build_transform_output(
    root: Path, config: Config, preprocessing_fn=None, edit_span=None
) -> dict:
    """Run tf.Transform (Beam DirectRunner) over a few digits-sample records, TFX-style layout;
    `edit_span(span_dir)` may rewrite the sample's records first."""
    done = root / "DONE"
    if done.exists():
        return json.loads(done.read_text())
    import apache_beam as beam
    import tensorflow as tf
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import dataset_metadata, metadata_io, schema_utils
    from tfx_bsl.public import tfxio

    from van_tfx import features
    from van_tfx.data.sample import build_sample
    from van_tfx.data.shard_writer import WriteShards
    from van_tfx.data.shards import example_count_path

    span = build_sample(root / "data")
    if edit_span is not None:
        edit_span(span)
    raw_spec = {
        features.IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string),
        features.SYNSET: tf.io.FixedLenFeature([], tf.string),
        features.LABEL: tf.io.FixedLenFeature([], tf.int64),
    }
    raw_metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(raw_spec))
    schema = raw_metadata.schema
    custom_config = {"data": config.data.model_dump(mode="json")}
    preprocessing_fn = preprocessing_fn or _preprocessing_fn()
    splits = {
        "train": _raw_examples(sorted(span.glob("train-*")), N_TRAIN),
        "eval": _raw_examples(sorted(span.glob("validation-*")), N_EVAL),
    }
    transform_dir = root / "transform_graph"
    decoder = tfxio.TFExampleBeamRecord(physical_format="tfrecord", schema=schema)
    with beam.Pipeline() as pipeline, tft_beam.Context(temp_dir=str(root / "tft_tmp")):
        train_raw = (
            pipeline
            | "ReadTrain" >> beam.Create(splits["train"])
            | "DecTrain" >> decoder.BeamSource()
        )
        eval_raw = (
            pipeline | "ReadEval" >> beam.Create(splits["eval"]) | "DecEval" >> decoder.BeamSource()
        )
        train_data = (train_raw, decoder.TensorAdapterConfig())
        (transformed_train, _), transform_fn = train_data | tft_beam.AnalyzeAndTransformDataset(
            lambda inputs: preprocessing_fn(inputs, custom_config), output_record_batches=True
        )
        transformed_eval, _ = ((eval_raw, decoder.TensorAdapterConfig()), transform_fn) | (
            tft_beam.TransformDataset(output_record_batches=True)
        )
        transform_fn | tft_beam.WriteTransformFn(str(transform_dir))
        # Written and counted as the pipeline's Transform does (components/transform_executor.py).
        for name, data in (("train", transformed_train), ("eval", transformed_eval)):
            _ = (
                data
                | f"Encode{name}" >> beam.FlatMapTuple(lambda batch, _: _encode_batch(batch))
                | f"Write{name}"
                >> WriteShards(
                    str(root / "transformed" / f"Split-{name}" / "transformed_examples"),
                    config.data.examples_per_shard,
                    example_count_path(str(transform_dir), name),
                )
            )
    # TFX's Transform also stores the raw schema there; the serving signature parses with it.
    metadata_io.write_metadata(raw_metadata, str(transform_dir / "metadata"))
    paths = {
        "transform_output": str(transform_dir),
        "train_files": [str(root / "transformed" / "Split-train" / "*")],
        "eval_files": [str(root / "transformed" / "Split-eval" / "*")],
        "raw_eval_files": [str(p) for p in sorted(span.glob("validation-*"))],
    }
    done.write_text(json.dumps(paths))
    return paths


def split_class(span: Path, old: str, new: str) -> None:
    """Rewrite a sample span so every other record of class `old` is of a new class `new`
    (labels renumbered in sorted synset order, synsets.txt rewritten): a span that adds a class."""
    import tensorflow as tf

    from van_tfx import features
    from van_tfx.data.records import iter_shard
    from van_tfx.tfrecords import write_records

    synsets = sorted(
        {*(line.split()[0] for line in (span / "synsets.txt").read_text().splitlines()), new}
    )
    seen = 0
    for shard in sorted(span.glob("*-of-*")):
        records = []
        for raw in iter_shard(shard):
            example = tf.train.Example.FromString(raw)
            feature = example.features.feature
            synset = feature[features.SYNSET].bytes_list.value[0].decode()
            if synset == old:
                seen += 1
                synset = new if seen % 2 else old
            feature[features.SYNSET].bytes_list.value[:] = [synset.encode()]
            feature[features.LABEL].int64_list.value[:] = [synsets.index(synset) + 1]
            records.append(example.SerializeToString())
        write_records(str(shard), records)
    (span / "synsets.txt").write_text("".join(f"{s} {s}\n" for s in synsets))


def _encode_batch(batch):
    from tfx_bsl.coders.example_coder import RecordBatchToExamples

    return RecordBatchToExamples(batch)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def transform_paths(tmp_path_factory):
    """Transform output of the digits sample, shared by every trainer test of the session."""
    pytest.importorskip("van_trainer.preprocessing")
    root = tmp_path_factory.getbasetemp() / "trainer_transform"
    root.mkdir(exist_ok=True)
    return build_transform_output(root, tiny_config())


# --------------------------------------------------------------------------- subprocess runs

RUN_SCRIPT = """
import json, sys
import van_tfx
from tfx.components.trainer.fn_args_utils import FnArgs
from van_trainer import train
args = json.loads(sys.argv[1])
train.run_fn(FnArgs(**args))
"""


def fn_args_dict(paths: dict, out: Path, config: Config, **extra) -> dict:
    """The FnArgs fields TFX's GenericExecutor fills, as JSON for a subprocess."""
    from van_trainer.train import custom_config_for

    return {
        "train_files": paths["train_files"],
        "eval_files": paths["eval_files"],
        "transform_graph_path": paths["transform_output"],
        "transform_output": paths["transform_output"],
        "serving_model_dir": str(out / "serving"),
        "model_run_dir": str(out / "model_run"),
        "custom_config": custom_config_for(config),
        **extra,
    }


def subprocess_env(**extra) -> dict:
    """Environment for a child Python: legacy Keras, quiet TF, repo importable."""
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def start_run(args: dict, log_path: Path, script: str = RUN_SCRIPT, **env) -> subprocess.Popen:
    """Start run_fn in a real child process, logging to log_path."""
    log = open(log_path, "ab")  # noqa: SIM115  (closed by the child's exit)
    return subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(args)],
        cwd=REPO,
        env=subprocess_env(**env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float, log_path: Path) -> None:
    """Poll until predicate() holds; fail with the child's log if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"child exited ({proc.returncode}) early:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.05)


RESUME_STEPS_PER_EPOCH, RESUME_EPOCHS, RESUME_EVERY = 6, 2, 3


@pytest.fixture(scope="session")
def resumed_run(transform_paths, tmp_path_factory):
    """run_fn SIGKILLed right after its first checkpoint, then restarted to completion."""
    out = tmp_path_factory.mktemp("resumed_run")
    config = tiny_config(
        steps_per_epoch=RESUME_STEPS_PER_EPOCH,
        epochs=RESUME_EPOCHS,
        checkpoint_every_steps=RESUME_EVERY,
    )
    args = fn_args_dict(transform_paths, out, config)
    log_path = out / "run.log"
    backup = out / "model_run" / "backup"
    first = start_run(args, log_path)
    # CheckpointManager writes its "checkpoint" state file last: then the checkpoint is usable.
    wait_for(lambda: any(backup.rglob("checkpoint")), first, 600, log_path)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_before_export = not (out / "serving" / "saved_model.pb").exists()
    second = start_run(args, log_path)
    assert second.wait(timeout=900) == 0, log_path.read_text()[-4000:]
    report = json.loads((out / "model_run" / "metrics.json").read_text())
    return {
        "out": out,
        "config": config,
        "report": report,
        "first_returncode": first.returncode,
        "killed_before_export": killed_before_export,
    }


# --------------------------------------------------------------------------- tests: run_fn


def test_killed_run_resumes_from_its_checkpoint_and_finishes(resumed_run):
    report = resumed_run["report"]
    assert resumed_run["first_returncode"] == -signal.SIGKILL
    assert resumed_run["killed_before_export"]
    assert report["initial_step"] > 0
    assert report["initial_step"] % RESUME_EVERY == 0
    assert report["final_step"] == RESUME_STEPS_PER_EPOCH * RESUME_EPOCHS


def test_run_writes_tensorboard_logs_curves_and_metrics(resumed_run):
    run_dir = resumed_run["out"] / "model_run"
    report = resumed_run["report"]
    assert list((run_dir / "train").glob("events.out.tfevents.*"))
    assert list((run_dir / "validation").glob("events.out.tfevents.*"))
    png = (run_dir / "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert set(report["final"]) >= {"loss", "accuracy", "top5"}
    assert np.isfinite(report["final"]["loss"])
    assert report["num_classes"] == 10
    # A CPU-only host trains with the C++ depthwise kernels (train.cpu_kernels defaults on).
    assert report["cpu_kernels"] in {"avx512", "avx2", "avx"}
    # Checkpoints are cleaned up after a finished run (a restart must not "resume" a done run).
    assert not list((run_dir / "backup").rglob("*.index"))


@pytest.fixture(scope="session")
def exported(resumed_run):
    import tensorflow as tf

    export_dir = resumed_run["out"] / "serving"
    return tf.saved_model.load(str(export_dir)), export_dir


def test_export_has_the_serving_signatures_and_keras_weights(exported):
    from van_tfx import features
    from van_trainer import export

    model, export_dir = exported
    assert set(model.signatures) == {
        features.SERVING_EXAMPLES_SIGNATURE,
        features.PREDICT_IMAGES_SIGNATURE,
        features.TRANSFORM_FEATURES_SIGNATURE,
        features.CLASSIFY_SIGNATURE,
    }
    assert Path(export.keras_weights_path(str(export_dir))).is_file()


def test_export_has_no_xla_call_or_custom_op_that_stock_tf_serving_would_refuse(exported):
    from tensorflow.core.protobuf import saved_model_pb2

    _, export_dir = exported
    saved = saved_model_pb2.SavedModel.FromString((export_dir / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0].graph_def
    nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
    assert len(nodes) > 100  # the whole model is in there
    must_compile = [n.name for n in nodes if n.attr["_XlaMustCompile"].b]
    assert must_compile == []  # tensorflow_model_server runs XLA:CPU only behind a flag
    # The model trained with van_trainer.kernels' ops; the export must hold stock ops only.
    assert [n.op for n in nodes if n.op.startswith("Van")] == []


def test_an_empty_request_gets_empty_answers_from_every_model_signature(exported):
    import tensorflow as tf

    from van_tfx import features

    model, _ = exported
    examples = model.signatures[features.SERVING_EXAMPLES_SIGNATURE](
        examples=tf.constant([], tf.string)
    )
    assert examples["probabilities"].shape[0] == 0 and examples["classes"].shape[0] == 0
    images = model.signatures[features.PREDICT_IMAGES_SIGNATURE](
        **{features.PREDICT_IMAGES_INPUT: tf.constant([], tf.string)}
    )
    assert images["probabilities"].shape[0] == 0 and images["top_k_synsets"].shape[0] == 0


def test_classify_signature_has_tf_serving_classify_method(exported):
    from tensorflow.core.protobuf import saved_model_pb2

    from van_tfx import features
    from van_tfx.saved_model import CLASSIFY_METHOD_NAME, PREDICT_METHOD_NAME

    _, export_dir = exported
    saved = saved_model_pb2.SavedModel.FromString(
        (Path(export_dir) / "saved_model.pb").read_bytes()
    )
    signatures = saved.meta_graphs[0].signature_def
    classify = signatures[features.CLASSIFY_SIGNATURE]
    assert classify.method_name == CLASSIFY_METHOD_NAME
    assert set(classify.inputs) == {features.CLASSIFY_INPUT}
    assert set(classify.outputs) == {"classes", "scores"}
    assert signatures[features.SERVING_EXAMPLES_SIGNATURE].method_name == PREDICT_METHOD_NAME


def _raw_validation(transform_paths, limit=6):
    import tensorflow as tf

    from van_tfx import features
    from van_tfx.data.records import iter_shard

    records = []
    for path in transform_paths["raw_eval_files"]:
        records.extend(iter_shard(path))
    examples = [tf.train.Example.FromString(r) for r in records[:limit]]
    jpegs = [e.features.feature[features.IMAGE_ENCODED].bytes_list.value[0] for e in examples]
    return records[:limit], jpegs


def test_serving_default_returns_probabilities_per_class(exported, transform_paths):
    import tensorflow as tf

    model, _ = exported
    serialized, _ = _raw_validation(transform_paths, 4)
    out = model.signatures["serving_default"](examples=tf.constant(serialized))
    probabilities = out["probabilities"].numpy()
    assert probabilities.shape == (4, 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert [c.decode() for c in out["classes"].numpy()[0]] == [f"digit_{d}" for d in range(10)]


def test_predict_images_matches_the_model_on_transform_materialised_eval_examples(
    exported, transform_paths, resumed_run, tmp_path
):
    """No train/serve skew: raw JPEG -> predict_images == Keras model on Transform's eval data."""
    import tensorflow as tf

    from van_tfx import features
    from van_trainer import dataset, export, train

    model, export_dir = exported
    config = resumed_run["config"]
    serialized, jpegs = _raw_validation(transform_paths, 6)
    served = model.signatures["predict_images"](images=tf.constant(jpegs))
    # Pair raw records with materialised ones by their stored pixels (Beam may reorder records).
    stored = model.signatures["transform_features"](examples=tf.constant(serialized))
    stored = [b.numpy() for b in stored[features.TRANSFORMED_IMAGE]]
    materialised = {}
    for record in tf.data.TFRecordDataset(dataset.resolve_files(transform_paths["eval_files"])):
        parsed = tf.io.parse_single_example(record, dataset.transformed_feature_spec())
        materialised[parsed[features.TRANSFORMED_IMAGE].numpy()] = record
    assert all(s in materialised for s in stored), "serving Transform differs from materialised"
    # The Trainer's own eval input path over those materialised records.
    subset = tmp_path / "eval-subset.tfrecord"
    with tf.io.TFRecordWriter(str(subset)) as writer:
        for s in stored:
            writer.write(materialised[s].numpy())
    images, _ = next(iter(dataset.eval_dataset([str(subset)], config, 10, batch_size=len(stored))))
    keras_model = train.build_model(config, 10)
    keras_model.load_weights(export.keras_weights_path(str(export_dir)))
    logits = keras_model(images, training=False)
    expected = tf.nn.softmax(logits).numpy()
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)
    top = served["top_k_indices"].numpy()
    assert top.shape == (6, 3)
    np.testing.assert_array_equal(top[:, 0], expected.argmax(axis=1))
    assert served["top_k_synsets"].numpy()[0, 0].decode() == f"digit_{top[0, 0]}"


EIGEN_PREDICT = """
import json, sys
import tensorflow as tf
images = [bytes.fromhex(h) for h in json.loads(sys.stdin.read())]
model = tf.saved_model.load(sys.argv[1])
out = model.signatures["predict_images"](images=tf.constant(images))
print(json.dumps(out["probabilities"].numpy().tolist()))
"""


def test_the_export_answers_the_same_on_the_stock_serving_images_kernels(exported, transform_paths):
    # The stock tensorflow/serving image is built without oneDNN (TF Serving's --config=release):
    # it runs Eigen's kernels, as TensorFlow does with TF_ENABLE_ONEDNN_OPTS=0. The folded graph
    # (dilated convs as space-to-batch, fused convs, the batch in slices) must run there too.
    import tensorflow as tf

    model, export_dir = exported
    _, jpegs = _raw_validation(transform_paths, 5)
    here = model.signatures["predict_images"](images=tf.constant(jpegs))["probabilities"].numpy()
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "TF_USE_LEGACY_KERAS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", EIGEN_PREDICT, str(export_dir)],
        input=json.dumps([j.hex() for j in jpegs]),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    eigen = np.array(json.loads(out.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(eigen, here, atol=1e-5)


def test_predict_images_rejects_bytes_that_are_not_an_image(exported, transform_paths):
    import tensorflow as tf

    model, _ = exported
    _, jpegs = _raw_validation(transform_paths, 1)
    for bad in (b"not an image at all", jpegs[0][: len(jpegs[0]) // 2]):
        with pytest.raises(tf.errors.InvalidArgumentError, match="JPEG or PNG"):
            model.signatures["predict_images"](images=tf.constant([jpegs[0], bad]))


def test_warm_start_loads_the_base_models_weights_only_when_the_head_fits(resumed_run):
    from van_trainer import train

    config = resumed_run["config"]
    base = str(resumed_run["out"] / "serving")
    fitting = train.build_model(config, 10)
    assert train.load_initial_weights(fitting, config, 10, base).endswith("van.weights.h5")
    reference = train.build_model(config, 10)
    reference.load_weights(os.path.join(base, "assets.extra", "van.weights.h5"))
    for a, b in zip(fitting.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    other_head = train.build_model(config, 7)
    before = [w.numpy().copy() for w in other_head.weights]
    assert train.load_initial_weights(other_head, config, 7, base) == ""
    for w, b in zip(other_head.weights, before, strict=True):
        np.testing.assert_array_equal(w.numpy(), b)
    no_warm = config.model_copy(
        update={"train": config.train.model_copy(update={"warm_start": False})}
    )
    assert train.load_initial_weights(train.build_model(config, 10), no_warm, 10, base) == ""


def test_warm_start_keeps_the_classifier_fresh_when_the_class_list_changed(resumed_run, tmp_path):
    # Before, the same count with another order (or a swapped class) loaded every row into
    # the wrong class; another count skipped the warm start altogether.
    import shutil

    from van_trainer import export, train

    config = resumed_run["config"]
    base = str(resumed_run["out"] / "serving")
    classes = export.read_class_list(base)
    assert len(classes) == 10
    reference = train.build_model(config, 10)
    reference.load_weights(export.keras_weights_path(base))
    stored = {layer.name: layer.get_weights() for layer in reference.layers}

    def check(model, classes_now, head_loaded):
        fresh = {layer.name: layer.get_weights() for layer in model.layers}
        assert train.load_initial_weights(model, config, len(classes_now), base, classes_now)
        for layer in model.layers:
            expected = (
                stored[layer.name] if layer.name != "head" or head_loaded else fresh[layer.name]
            )
            for got, want in zip(layer.get_weights(), expected, strict=True):
                np.testing.assert_array_equal(got, want)

    check(train.build_model(config, 10), classes, head_loaded=True)
    check(train.build_model(config, 10), classes[::-1], head_loaded=False)
    check(train.build_model(config, 7), classes[:6] + ["n99999999"], head_loaded=False)
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(base, unlabelled)
    os.remove(unlabelled / export.CLASS_LIST_PATH)
    assert train.load_initial_weights(
        train.build_model(config, 10), config, 10, str(unlabelled), classes
    )
    (unlabelled / export.CLASS_LIST_PATH).write_bytes(b"n01\xff\n")  # damaged: not UTF-8
    with pytest.raises(export.ClassListFileError, match="van.classes.txt is not a class list"):
        export.read_class_list(str(unlabelled))


def test_run_fn_with_every_uri_on_object_storage_writes_there_and_warm_starts_from_it(
    transform_paths, tmp_path
):
    """Kubeflow/Vertex hand run_fn gs:// URIs; ram:// takes the same tf.io.gfile code paths.

    In-process on purpose: ram:// files live in this process only.
    """
    import uuid

    import tensorflow as tf
    from tfx.components.trainer.fn_args_utils import FnArgs

    from van_tfx import storage
    from van_trainer import export, train

    root = f"ram://trainer-{uuid.uuid4().hex}"
    transform_root = os.path.dirname(transform_paths["transform_output"])
    storage.copy_tree(transform_paths["transform_output"], f"{root}/transform_graph")
    storage.copy_tree(f"{transform_root}/transformed", f"{root}/transformed")
    config = tiny_config(epochs=1, steps_per_epoch=2, deterministic=False)
    paths = {
        "transform_output": f"{root}/transform_graph",
        "train_files": [f"{root}/transformed/Split-train/*"],
        "eval_files": [f"{root}/transformed/Split-eval/*"],
    }
    args = fn_args_dict(paths, tmp_path, config)
    args.update(serving_model_dir=f"{root}/serving", model_run_dir=f"{root}/model_run")
    train.run_fn(FnArgs(**args))

    serving, run_dir = f"{root}/serving", f"{root}/model_run"
    weights = export.keras_weights_path(serving)
    assert tf.io.gfile.exists(f"{serving}/saved_model.pb")
    assert tf.io.gfile.stat(weights).length > 0
    assert tf.io.gfile.glob(f"{run_dir}/train/events.out.tfevents.*")
    assert tf.io.gfile.exists(f"{run_dir}/history.csv")
    with tf.io.gfile.GFile(f"{run_dir}/metrics.json") as handle:
        assert json.load(handle)["final_step"] == 2
    with tf.io.gfile.GFile(f"{run_dir}/training_curves.png", "rb") as handle:
        assert handle.read().startswith(b"\x89PNG")
    assert not tf.io.gfile.glob(f"{run_dir}/backup/*/*.index")
    served = tf.saved_model.load(serving)
    _, jpegs = _raw_validation(transform_paths, limit=2)
    probabilities = served.signatures["predict_images"](images=tf.constant(jpegs))["probabilities"]
    np.testing.assert_allclose(probabilities.numpy().sum(axis=1), 1.0, atol=1e-4)

    # The next run warm-starts from that base model on object storage.
    local = tmp_path / "van.weights.h5"
    tf.io.gfile.copy(weights, str(local))
    reference = train.build_model(config, 10)
    reference.load_weights(str(local))
    warm = train.build_model(config, 10)
    assert train.load_initial_weights(warm, config, 10, serving) == weights
    for a, b in zip(warm.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_with_ema_and_clipping_trains_and_exports_float32(
    policy, transform_paths, tmp_path
):
    import tensorflow as tf

    config = tiny_config(
        epochs=1, steps_per_epoch=2, mixed_precision=policy, ema_decay=0.9, clip_grad_norm=1.0
    )
    log = tmp_path / "run.log"
    proc = start_run(fn_args_dict(transform_paths, tmp_path, config), log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    model = tf.saved_model.load(str(tmp_path / "serving"))
    _, jpegs = _raw_validation(transform_paths, limit=3)
    images = tf.constant(jpegs)
    probabilities = model.signatures["predict_images"](images=images)["probabilities"]
    assert probabilities.dtype == tf.float32
    np.testing.assert_allclose(probabilities.numpy().sum(axis=1), 1.0, atol=1e-4)


def test_steps_per_epoch_come_from_the_counts_transform_recorded(transform_paths, tmp_path):
    import tensorflow as tf

    from van_trainer import dataset, train

    config = tiny_config(steps_per_epoch=0, batch_size=8)
    graph = transform_paths["transform_output"]
    files = dataset.resolve_files(transform_paths["train_files"])
    assert sum(1 for _ in tf.data.TFRecordDataset(files)) == N_TRAIN
    # plan_steps is not even given the files: the count comes from the transform graph.
    assert train.plan_steps(config, graph, None) == (2, N_TRAIN // 8)
    assert train.split_size(graph, "eval") == N_EVAL
    # TFX's num_steps, when set, still wins; no count and no steps: an error, not a pass.
    assert train.plan_steps(config, str(tmp_path), 10) == (2, 5)
    with pytest.raises(ValueError, match="records no example count for split 'train'"):
        train.plan_steps(config, str(tmp_path), None)
    # One validation pass, from the per-file counts, without reading the eval files either.
    strategy = tf.distribute.get_strategy()
    eval_files = dataset.resolve_files(transform_paths["eval_files"])
    assert train.eval_plan(strategy, config, graph, eval_files) == train.EvalPlan(N_EVAL // 8, 1)
    # Shortened to 5 steps: 40 slots, all real; 7 steps (more than a pass) stop at the pass.
    assert train.eval_plan(strategy, config, graph, eval_files, 5) == train.EvalPlan(5, 1)
    assert train.eval_plan(strategy, config, graph, eval_files, 7).steps == N_EVAL // 8
    config.train.batch_size = 10  # 48 examples in 5 steps of 10: 50 slots, real weigh 50 / 48
    assert train.eval_plan(strategy, config, graph, eval_files) == train.EvalPlan(5, 50 / 48)
    with pytest.raises(ValueError, match="no example count for eval file .*rerun Transform"):
        train.eval_plan(strategy, config, str(tmp_path), eval_files)


def test_image_signatures_refuse_images_over_the_pixel_budget_before_decoding(
    exported, transform_paths
):
    import tensorflow as tf

    from serving import testing
    from van_tfx import features

    model, _ = exported
    serialized, jpegs = _raw_validation(transform_paths, 1)
    bomb = testing.jpeg_declaring(60000, 60000)  # a complete 16x16 JPEG declaring 3.6 G pixels
    with pytest.raises(tf.errors.InvalidArgumentError, match="more than 25000000 pixels"):
        model.signatures["predict_images"](images=tf.constant([jpegs[0], bomb]))
    example = tf.train.Example.FromString(serialized[0])
    example.features.feature[features.IMAGE_ENCODED].bytes_list.value[0] = bomb
    with pytest.raises(tf.errors.InvalidArgumentError, match="input image/encoded holds an image"):
        model.signatures["serving_default"](examples=tf.constant([example.SerializeToString()]))
    # One request of more images than serving.max_request_images (1000 by default), however small.
    with pytest.raises(tf.errors.InvalidArgumentError, match="more than 1000 images in one reques"):
        model.signatures["predict_images"](images=tf.fill([1001], jpegs[0]))


def test_a_padded_validation_pass_reports_exactly_the_real_examples_metrics(transform_paths):
    import tensorflow as tf

    from van_trainer import dataset, optim, train

    config = tiny_config(batch_size=10)  # 48 eval examples: 5 steps of 10, 2 padding slots
    graph = transform_paths["transform_output"]
    files = dataset.resolve_files(transform_paths["eval_files"])
    classes = 10
    model = train.build_model(config, classes)
    schedule = optim.build_schedule(config.train, steps_per_epoch=1, epochs=1)
    train.compile_model(model, config, schedule, classes)
    strategy = tf.distribute.get_strategy()
    plan = train.eval_plan(strategy, config, graph, files)
    assert plan == train.EvalPlan(5, 50 / 48)
    padded = model.evaluate(
        train.eval_data(strategy, config, files, classes, plan),
        steps=plan.steps,
        return_dict=True,
        verbose=0,
    )
    whole = model.evaluate(
        dataset.eval_dataset(files, config, classes, batch_size=N_EVAL), return_dict=True, verbose=0
    )
    assert padded.keys() == whole.keys() == {"loss", "accuracy", "top5"}
    for name, value in whole.items():
        assert padded[name] == pytest.approx(value, rel=1e-5), name


def test_a_candidate_on_a_new_class_list_is_judged_without_the_served_baseline(
    exported, tmp_path_factory
):
    # A span that added a class: the served model (10 classes) labels the records through its
    # own class list, whose check refused digit_9b, so the Evaluator failed after training and
    # every later run trained again. Now the baseline is dropped and the evaluation says why.
    import shutil

    import tensorflow_model_analysis as tfma
    import tensorflow_transform as tft
    from tfx.types import standard_artifacts
    from tfx.types import standard_component_specs as specs
    from tfx.utils import json_utils, proto_utils

    from components.served_model import BASELINE_DROPPED_KEY, ServedBaselineEvaluator
    from pipeline.evaluation import build_eval_config
    from pipeline.outcome import RunArtifact, summarize
    from van_tfx.config import EvalConfig
    from van_trainer import export, train

    root = tmp_path_factory.mktemp("new_class")
    config = tiny_config()
    paths = build_transform_output(
        root / "transform", config, edit_span=lambda span: split_class(span, "digit_9", "digit_9b")
    )
    candidate_dir = root / "candidate"
    export.export_serving_model(
        train.build_model(config, 11),
        tft.TFTransformOutput(paths["transform_output"]),
        config,
        str(candidate_dir),
    )
    assert len(export.read_class_list(str(candidate_dir))) == 11

    def artifact(kind, name):
        made = kind()
        made.uri = str(root / name)
        os.makedirs(made.uri, exist_ok=True)
        return made

    examples = artifact(standard_artifacts.Examples, "examples")
    examples.split_names = '["eval"]'
    (root / "examples" / "Split-eval").mkdir()
    shutil.copy(paths["raw_eval_files"][0], root / "examples" / "Split-eval" / "data-00000")
    models = {}
    for name, source, version in (("model", candidate_dir, ""), ("base", exported[1], "17")):
        models[name] = artifact(standard_artifacts.Model, name)
        shutil.copytree(source, root / name / "Format-Serving")
        models[name].set_string_custom_property("served_version", version)
    evaluation = artifact(standard_artifacts.ModelEvaluation, "evaluation")
    blessing = artifact(standard_artifacts.ModelBlessing, "blessing")
    eval_config = build_eval_config(EvalConfig(min_top1=0.0, max_top1_drop=0.0))
    ServedBaselineEvaluator().Do(
        {
            specs.EXAMPLES_KEY: [examples],
            specs.MODEL_KEY: [models["model"]],
            specs.BASELINE_MODEL_KEY: [models["base"]],
        },
        {specs.EVALUATION_KEY: [evaluation], specs.BLESSING_KEY: [blessing]},
        {
            specs.EVAL_CONFIG_KEY: proto_utils.proto_to_json(eval_config),
            specs.EXAMPLE_SPLITS_KEY: json_utils.dumps(["eval"]),
        },
    )
    assert blessing.get_int_custom_property("blessed") == 1
    dropped = evaluation.get_string_custom_property(BASELINE_DROPPED_KEY)
    assert dropped == (
        "served version 17 was trained on another class list (10 classes, the candidate 11: "
        "added digit_9b), so its top-1 is not comparable: the candidate is judged by "
        "eval.min_top1 alone"
    )
    result = tfma.load_eval_result(evaluation.uri)
    assert [key for key, _ in result.slicing_metrics if key == ()] == [()]
    outcome = summarize(
        {
            "ModelEvaluation": [
                RunArtifact("ModelEvaluation", evaluation.uri, {BASELINE_DROPPED_KEY: dropped})
            ]
        },
        span=1,
        run_id="r",
    )
    assert f"the change threshold was not applied: {dropped}" in outcome.reasons
