"""Object-storage artifact URIs (gs:// on Kubeflow/Vertex), exercised on TensorFlow's `ram://`.

`ram://` is TensorFlow's in-process file system: reached only through tf.io.gfile, like a bucket,
and invisible to Python's own file calls and to other processes (the model server subprocess
included). Code that works here goes through the same tf.io.gfile calls as with gs:// URIs.
"""

import gzip
import itertools
import json
import os
import stat
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2
from tfx.types.experimental.simple_artifacts import File
from tfx.types.standard_artifacts import InfraBlessing, Model

from components.serving_smoke_test import MODEL_SERVER_KEY, ServingSmokeTest
from serving import testing
from serving.process import model_server_binary
from van_tfx import features, storage
from van_tfx.saved_model import mark_classification_signature

NUM_EXAMPLES = 3


def ram_root() -> str:
    """A fresh ram:// directory (the file system lives as long as the test process)."""
    return f"ram://van-tfx-test-{uuid.uuid4().hex}"


def ram_files(root: str) -> set[str]:
    """Every file under `root`, relative to it."""
    paths = (os.path.join(d, name) for d, _, names in tf.io.gfile.walk(root) for name in names)
    # ram:// also lists `assets.extra` under `assets/`, as a `.extra` that does not exist.
    return {path[len(root) + 1 :] for path in paths if tf.io.gfile.exists(path)}


# --------------------------------------------------------------------------- storage helpers


def test_copy_tree_between_ram_and_local_keeps_files_and_empty_dirs(tmp_path):
    source = ram_root()
    tf.io.gfile.makedirs(f"{source}/variables")
    tf.io.gfile.makedirs(f"{source}/assets")  # empty, like a SavedModel's assets/
    tf.io.gfile.makedirs(f"{source}/assets.extra")
    files = {"saved_model.pb": b"pb", "variables/variables.index": b"ix", "assets.extra/w": b"w"}
    for name, data in files.items():
        with tf.io.gfile.GFile(f"{source}/{name}", "wb") as handle:
            handle.write(data)

    local = tmp_path / "copy"
    storage.copy_tree(source, str(local))
    assert (local / "saved_model.pb").read_bytes() == b"pb"
    assert (local / "variables" / "variables.index").read_bytes() == b"ix"
    assert (local / "assets").is_dir() and not list((local / "assets").iterdir())
    assert (local / "assets.extra" / "w").read_bytes() == b"w"

    back = ram_root()
    storage.copy_tree(str(local), back)
    assert ram_files(back) == set(files)
    assert tf.io.gfile.isdir(f"{back}/assets")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        storage.copy_tree(f"{source}/missing", str(tmp_path / "nothing"))


@pytest.mark.parametrize("where", ["local", "ram"])
def test_write_text_replaces_a_file_whole_and_leaves_no_partial_file(tmp_path, where):
    root = str(tmp_path) if where == "local" else ram_root()
    path = f"{root}/records/record.json"
    storage.write_text(path, "first")
    storage.write_text(path, "second, longer")
    with tf.io.gfile.GFile(path) as handle:
        assert handle.read() == "second, longer"
    assert tf.io.gfile.listdir(f"{root}/records") == ["record.json"]


def test_a_failed_local_text_write_keeps_the_old_file_and_names_the_path(tmp_path):
    # One writer for every small local text file (config, synset list, rejected report): a write
    # that fails midway (here past RLIMIT_FSIZE, as a full disk fails it) leaves the old file.
    import subprocess
    import sys

    path = tmp_path / "conf" / "config.yaml"
    storage.write_local_text(path, "old: 1\n")
    script = f"""
import resource, signal, sys
from van_tfx import storage
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    storage.write_local_text({str(path)!r}, "x" * 10_000)
except OSError as exc:
    print(exc.filename, exc.strerror)
"""
    done = subprocess.run(
        [sys.executable, "-B", "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == f"{path} File too large", done.stderr[-2000:]
    assert path.read_text() == "old: 1\n"
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no partial left


def test_local_copy_and_local_output_round_trip_a_remote_file(tmp_path):
    remote = f"{ram_root()}/assets.extra/van.weights.h5"
    with storage.local_output(remote) as local:
        assert not storage.is_remote(local) and local.endswith("van.weights.h5")
        Path(local).write_bytes(b"weights")
    assert not Path(local).exists()  # the temp copy is gone, the upload stays
    with storage.local_copy(remote) as local:
        assert Path(local).read_bytes() == b"weights" and local.endswith("van.weights.h5")
    # Local paths are handed through untouched: no copies on a laptop.
    with storage.local_copy(str(tmp_path / "w.h5")) as local:
        assert local == str(tmp_path / "w.h5")
    failed = f"{ram_root()}/never.h5"
    with pytest.raises(RuntimeError), storage.local_output(failed) as local:
        Path(local).write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert not tf.io.gfile.exists(failed)


# --------------------------------------------------------------------------- ServingSmokeTest
# Which server validates: the real tensorflow_model_server when one is on PATH. A fake stands in
# for it here: an executable on PATH that answers `--version` like it and serves through
# `van-tfx serve`.

FAKE_VERSION = "2.16.1+dev.sha.fake"


def fake_tf_serving(directory, version_output: str = FAKE_VERSION):
    """A `tensorflow_model_server` executable in `directory` that logs its arguments."""
    log = directory / "calls.log"
    script = directory / "tensorflow_model_server"
    version_reply = (
        f'echo "TensorFlow ModelServer: {version_output}"; echo "TensorFlow Library: 2.16.2"; '
        "exit 0"
        if version_output
        else "echo 'error while loading shared libraries: libfoo.so' >&2; exit 127"
    )
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{log}"\n'
        f'if [ "$1" = "--version" ]; then {version_reply}; fi\n'
        f'exec "{sys.executable}" -m van_tfx.cli serve "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return log


@pytest.fixture()
def path_without_tf_serving(monkeypatch):
    """PATH with every directory holding a tensorflow_model_server removed."""
    kept = [
        d for d in os.environ["PATH"].split(os.pathsep)
        if not os.path.exists(os.path.join(d, "tensorflow_model_server"))
    ]  # fmt: skip
    monkeypatch.setenv("PATH", os.pathsep.join(kept))
    return monkeypatch


def export_candidate(model_uri: str, with_classify: bool = True) -> str:
    """The tiny van-tfx-signature model where our Trainer puts it: <model uri>/Format-Serving."""
    module = testing.build_tiny_model()
    path = os.path.join(model_uri, "Format-Serving")
    signatures = {
        features.SERVING_EXAMPLES_SIGNATURE: module.serving_default,
        features.PREDICT_IMAGES_SIGNATURE: module.predict_images,
    }
    if with_classify:
        signatures[features.CLASSIFY_SIGNATURE] = module.classify
    tf.saved_model.save(module, path, signatures=signatures)
    if with_classify:
        mark_classification_signature(path, features.CLASSIFY_SIGNATURE)
    return path


EVAL_PATTERN = "span-{SPAN}/validation-*"


def write_examples(data_root: str, span: int = 3) -> None:
    """A span's validation shards on object storage: tf.Examples (image + feature x), one GZIP'ed
    *.gz shard and one plain shard, as a data root may hold them."""
    for shard, (count, options) in enumerate(((2, "GZIP"), (3, None))):
        suffix = ".gz" if options else ""
        path = f"{data_root}/span-{span}/validation-{shard:05d}-of-00002{suffix}"
        tf.io.gfile.makedirs(os.path.dirname(path))
        with tf.io.TFRecordWriter(path, options=options) as writer:
            for i in range(count):
                example = tf.train.Example()
                rgb = (40 * i, 200 - 30 * i, 90)
                image = testing.encode_image(rgb)
                example.features.feature[features.IMAGE_ENCODED].bytes_list.value.append(image)
                example.features.feature["x"].float_list.value.extend(np.array(rgb) / 255.0)
                writer.write(example.SerializeToString())


def artifacts(root: str, with_classify: bool = True) -> tuple[Model, File, InfraBlessing]:
    model = Model()
    model.uri = f"{root}/Trainer/model/7"
    export_candidate(model.uri, with_classify)
    decision = File()
    decision.uri = f"{root}/NewDataGate/decision/3"
    decision.set_int_custom_property("span", 3)
    decision.set_string_custom_property("input_fingerprint", "split:eval,num_files:2,...")
    write_examples(f"{root}/data")
    blessing = InfraBlessing()
    blessing.uri = f"{root}/ServingSmokeTest/blessing/9"
    return model, decision, blessing


def smoke_test(root: str, model: Model, decision: File, blessing: InfraBlessing) -> None:
    """ServingSmokeTest as the pipeline wires it, on `root`'s data."""
    ServingSmokeTest.test_call(
        model=model,
        decision=decision,
        blessing=blessing,
        input_base=f"{root}/data",
        split_pattern=EVAL_PATTERN,
        num_examples=NUM_EXAMPLES,
    )


def test_smoke_test_serves_a_model_on_object_storage_and_writes_the_stamped_copy_there(
    path_without_tf_serving, tmp_path
):
    # With a tensorflow_model_server on PATH (the van-tfx image), that binary validates.
    log = fake_tf_serving(tmp_path)
    path_without_tf_serving.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    root = ram_root()
    model, decision, blessing = artifacts(root)
    smoke_test(root, model, decision, blessing)

    described = f"tensorflow_model_server {FAKE_VERSION}"
    assert blessing.get_string_custom_property(MODEL_SERVER_KEY) == described
    with tf.io.gfile.GFile(f"{blessing.uri}/INFRA_BLESSED") as handle:
        assert handle.read() == f"{MODEL_SERVER_KEY}: {described}\n"
    calls = log.read_text().splitlines()
    assert calls[0] == "--version"
    served = calls[1].split()  # tensorflow_model_server's own flags, as in production
    assert served[0].startswith("--port=") and "--rest_api_port=0" in served
    assert "--model_name=smoke" in served and any(
        f.startswith("--model_base_path=/") for f in served
    )
    assert blessing.get_int_custom_property("blessed") == 1
    assert blessing.get_int_custom_property("has_model") == 1
    assert tf.io.gfile.exists(f"{blessing.uri}/INFRA_BLESSED")
    stamped = f"{blessing.uri}/stamped_model"
    files = ram_files(stamped)
    candidate = ram_files(f"{model.uri}/Format-Serving")
    assert candidate <= files  # the whole SavedModel, variables included
    assert {"saved_model.pb", "variables/variables.index"} <= files
    assert files - candidate == {
        "assets.extra/tf_serving_warmup_requests",
        "assets.extra/van_training_data.json",
    }
    with tf.io.gfile.GFile(f"{stamped}/saved_model.pb", "rb") as a:
        with tf.io.gfile.GFile(f"{model.uri}/Format-Serving/saved_model.pb", "rb") as b:
            assert a.read() == b.read()

    logs = [
        prediction_log_pb2.PredictionLog.FromString(r.numpy())
        for r in tf.data.TFRecordDataset(f"{stamped}/assets.extra/tf_serving_warmup_requests")
    ]
    assert [log.WhichOneof("log_type") for log in logs] == [
        "predict_log",
        "predict_log",
        "classify_log",
    ]
    images, examples_request = (log.predict_log.request for log in logs[:2])
    assert images.model_spec.signature_name == features.PREDICT_IMAGES_SIGNATURE
    assert len(images.inputs["images"].string_val) == NUM_EXAMPLES
    assert len(examples_request.inputs["examples"].string_val) == NUM_EXAMPLES
    assert len(logs[2].classify_log.request.input.example_list.examples) == NUM_EXAMPLES

    with tf.io.gfile.GFile(f"{stamped}/assets.extra/van_training_data.json") as handle:
        record = json.loads(handle.read())
    assert record == {
        "span": 3,
        "input_fingerprint": "split:eval,num_files:2,...",
        "decision_uri": decision.uri,
    }
    # What was served is readable as a SavedModel where Pusher picks it up.
    served = tf.saved_model.load(stamped)
    assert set(served.signatures) >= {"serving_default", "predict_images", "classify"}


def test_smoke_test_failure_on_object_storage_writes_not_blessed_there(path_without_tf_serving):
    # Without tensorflow_model_server on PATH (laptops, CI), the van-tfx serve stand-in validates.
    root = ram_root()
    model, decision, blessing = artifacts(root, with_classify=False)
    smoke_test(root, model, decision, blessing)
    assert blessing.get_int_custom_property("blessed") == 0
    described = blessing.get_string_custom_property(MODEL_SERVER_KEY)
    assert described.startswith("van-tfx serve ")
    with tf.io.gfile.GFile(f"{blessing.uri}/INFRA_NOT_BLESSED") as handle:
        text = handle.read()
    assert "classify" in text and text.endswith(f"{MODEL_SERVER_KEY}: {described}\n")
    assert not tf.io.gfile.exists(f"{blessing.uri}/stamped_model")


def test_smoke_test_reads_shards_in_order_and_names_a_pattern_with_no_files():
    from components.serving_smoke_test import SmokeTestFailure, read_raw_examples

    root = ram_root()
    write_examples(f"{root}/data")
    xs = [
        tf.train.Example.FromString(r).features.feature["x"].float_list.value[0]
        for r in read_raw_examples(f"{root}/data/span-3/validation-*", 10)
    ]
    # the .gz shard, then the plain one
    assert xs == pytest.approx([0.0, 40 / 255, 0.0, 40 / 255, 80 / 255])
    assert len(read_raw_examples(f"{root}/data/span-3/validation-*", 3)) == 3
    with pytest.raises(SmokeTestFailure, match="no files match .*/span-4/validation-"):
        read_raw_examples(f"{root}/data/span-4/validation-*", 10)


def test_the_stand_in_serves_when_no_tensorflow_model_server_is_on_path(path_without_tf_serving):
    server = model_server_binary()
    assert server.description.startswith("van-tfx serve ") and not server.is_tf_serving
    assert server.command[1:] == ["-m", "van_tfx.cli", "serve"]


def test_a_broken_binary_on_path_fails_the_smoke_test_instead_of_falling_back(
    path_without_tf_serving, tmp_path
):
    fake_tf_serving(tmp_path, version_output="")
    path_without_tf_serving.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    root = ram_root()
    model, decision, blessing = artifacts(root)
    smoke_test(root, model, decision, blessing)
    assert blessing.get_int_custom_property("blessed") == 0
    with tf.io.gfile.GFile(f"{blessing.uri}/INFRA_NOT_BLESSED") as handle:
        text = handle.read()
    assert "--version exited with 127" in text and "libfoo.so" in text
    assert text.endswith(f"{MODEL_SERVER_KEY}: tensorflow_model_server (broken)\n")


# ------------------------------------------------ reading a few records of a shard on GCS


@pytest.fixture
def gcs(monkeypatch):
    """A FakeGcs that google-cloud-storage's client (and so storage.open_ranged) talks to."""
    from gcs_fake import fake_gcs

    with fake_gcs() as server:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
        storage._GCS.clear()
        yield server
    storage._GCS.clear()


def shard_bytes(records: list[bytes], compression: str = "") -> bytes:
    """A TFRecord file of `records`, as TensorFlow writes it."""
    path = f"{ram_root()}/shard"
    with tf.io.TFRecordWriter(path, compression or None) as writer:
        for record in records:
            writer.write(record)
    with tf.io.gfile.GFile(path, "rb") as handle:
        return handle.read()


@pytest.mark.parametrize("name", ["train-00000-of-00001", "train-00000-of-00001.gz"])
def test_a_shards_first_records_on_gcs_cost_the_bytes_they_hold_not_a_block(gcs, name):
    # TF's GCS file system fetches GCS_READ_CACHE_BLOCK_SIZE_MB (64 MiB) on an open's first read:
    # one shard's first record cost up to 64 MiB of a ~113 MB ImageNet shard.
    from components.example_gen import check_first_records
    from van_tfx.tfrecords import read_records

    records = [bytes([n]) * 100_000 for n in range(80)]  # ~8 MB of ImageNet-sized records
    path = f"gs://bucket/data/span-1/{name}"
    gcs.put(path, shard_bytes(records, "GZIP" if name.endswith(".gz") else ""))
    check_first_records({"train": ("span-1/train-*", [path])})
    requests, sent = gcs.served(path)
    assert requests == 2  # its size, then one range from its start
    assert sent < storage.RANGE_BYTES + 1000
    gcs.requests.clear()
    assert list(itertools.islice(read_records(path, ranged=True), 4)) == records[:4]
    assert gcs.served(path)[1] < 2 * storage.RANGE_BYTES + 1000
    assert list(read_records(path, ranged=True)) == records  # and the whole file, when read


def test_a_record_larger_than_a_range_is_fetched_whole_and_no_more(gcs):
    from van_tfx.tfrecords import read_records

    records = [b"a" * (3 << 20), b"b" * (3 << 20)]
    path = "gs://bucket/data/big"
    gcs.put(path, shard_bytes(records))
    assert next(read_records(path, ranged=True)) == records[0]
    requests, sent = gcs.served(path)
    # its size; a range from its start; the rest of the record; a range from the record's CRC on
    assert requests == 4 and sent < (3 << 20) + 2 * storage.RANGE_BYTES + 1000


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda data: data[:50], "it declares 100000 bytes, more than the 34 left"),
        (lambda data: b"label,image\n1,a.jpg\n", "length's checksum does not match"),
        (lambda data: gzip.compress(data), "is GZIP-compressed but its name does not end in .gz"),
    ],
    ids=["truncated", "csv", "gzip-unnamed"],
)
def test_a_shard_on_gcs_bad_from_its_start_is_named_with_its_gcs_path(gcs, damage, says):
    from components.example_gen import check_first_records
    from van_tfx.tfrecords import CorruptShardError

    good, bad = "gs://bucket/d/train-00000-of-00002", "gs://bucket/d/train-00001-of-00002"
    gcs.put(good, shard_bytes([b"x" * 100_000]))
    gcs.put(bad, damage(shard_bytes([b"x" * 100_000])))
    with pytest.raises(CorruptShardError, match=says) as failure:
        check_first_records({"train": ("d/train-*", [good, bad])})
    assert str(failure.value).startswith(f"TFRecord shard {bad} is not a readable TFRecord file")


def test_without_gcs_credentials_a_ranged_read_falls_back_to_tf_io_gfile(monkeypatch):
    # No client can be had (no credentials here): TF's reader, which reads public buckets too.
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/credentials.json")
    storage._GCS.clear()
    try:
        assert storage.open_ranged("gs://bucket/x") is None
    finally:
        storage._GCS.clear()
    assert storage.open_ranged(f"{ram_root()}/x") is None
