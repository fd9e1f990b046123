"""Serving smoke test: TFX's InfraValidator, minus Docker, against the real model server.

InfraValidator needs a Docker engine or a KFP-v1 pod to start tensorflow_model_server. This
component starts the server as a subprocess instead: the real `tensorflow_model_server` wherever
it is on PATH (the van-tfx image ships the one of tensorflow/serving:2.16.1, so every Kubeflow run
validates with production's server), else our stand-in `van-tfx serve` (same flags, protos and
status codes; laptops and CI). It loads the candidate, sends real gRPC requests built from
validation examples to every signature clients use, and blesses only if they all succeed. The
examples are the first few records of the validation files of the span the NewDataGate opened
the run for, read from the data root: open-source KFP's launcher downloads every input artifact
into the pod, so taking ExampleGen's Examples would copy the whole dataset to read four records.
Which server validated is recorded: the blessing's `model_server` custom property and the first
line of INFRA_BLESSED / the last of INFRA_NOT_BLESSED ("tensorflow_model_server 2.16.1+..." or
"van-tfx serve 0.1.0").
Like InfraValidator with `make_warmup=True`, the blessing carries a copy of the model with
`assets.extra/tf_serving_warmup_requests`, so Pusher pushes a model TF Serving warms up on load.
The copy also gets `assets.extra/van_training_data.json` (span and input fingerprint from the
gate's decision, and its URI), which the NewDataGate of later runs compares with their data.

Artifact URIs are bucket paths (gs://...) on Kubeflow/Vertex, so every read and write of the
model, the data and the blessing goes through tf.io.gfile. The server is a subprocess that
wants `<base>/<integer version>/`: a local candidate is linked into a temp base dir as before, a
remote one is copied there first (a symlink cannot point into a bucket).
"""

import itertools
import os
import sys
import tempfile

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    input_pb2,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types.experimental.simple_artifacts import File
from tfx.types.standard_artifacts import InfraBlessing, Model
from tfx.utils import path_utils

from components.new_data_gate import VERSION_KEY, decided_data, span_pattern, write_training_data
from serving.process import (
    ModelServerBinary,
    ServerStartError,
    model_server_binary,
    running_model_server,
)
from van_tfx import features, storage
from van_tfx.tfrecords import read_records

_BLESSED_KEY = "blessed"  # the custom properties Pusher reads, as InfraValidator writes them
_HAS_MODEL_KEY = "has_model"
MODEL_SERVER_KEY = "model_server"  # which server validated the model (string custom property)


class SmokeTestFailure(RuntimeError):
    """The candidate model could not be served or answered a request wrongly."""


@component
def ServingSmokeTest(  # noqa: N802  (TFX component names are class-like)
    model: InputArtifact[Model],
    decision: InputArtifact[File],
    blessing: OutputArtifact[InfraBlessing],
    input_base: Parameter[str],
    split_pattern: Parameter[str],
    num_examples: Parameter[int] = 4,
    timeout_seconds: Parameter[int] = 300,
) -> None:
    """Serve the candidate in a real model server, query both signatures, bless and add warmup."""
    # Our Trainer (GenericExecutor) exports to <uri>/Format-Serving; no estimator export/ layout.
    model_dir = path_utils.serving_model_dir(model.uri, path_utils.is_old_model_artifact(model))
    data = decided_data(decision)
    pattern = span_pattern(input_base, split_pattern, data["span"], data[VERSION_KEY])
    records = read_raw_examples(pattern, num_examples)
    try:
        server = model_server_binary()
    except ServerStartError as exc:  # a tensorflow_model_server on PATH that cannot run
        _not_blessed(blessing, ModelServerBinary([], "tensorflow_model_server (broken)"), str(exc))
        return
    blessing.set_string_custom_property(MODEL_SERVER_KEY, server.description)
    print(f"ServingSmokeTest: validating with {server.description}")
    try:
        requests = smoke_test_model(model_dir, records, timeout_seconds, server)
    except SmokeTestFailure as exc:
        _not_blessed(blessing, server, str(exc))
        return
    stamped = path_utils.stamped_model_path(blessing.uri)
    copy_model_with_warmup(model_dir, stamped, requests)
    # What this model was trained on travels with it to the serving dir, for the NewDataGate.
    write_training_data(stamped, decision)
    storage.write_text(
        os.path.join(blessing.uri, "INFRA_BLESSED"), f"{MODEL_SERVER_KEY}: {server.description}\n"
    )
    blessing.set_int_custom_property(_BLESSED_KEY, 1)
    blessing.set_int_custom_property(_HAS_MODEL_KEY, 1)


def _not_blessed(blessing, server: ModelServerBinary, reason: str) -> None:
    print(f"ServingSmokeTest: NOT blessed by {server.description}: {reason}", file=sys.stderr)
    blessing.set_string_custom_property(MODEL_SERVER_KEY, server.description)
    text = f"{reason}\n{MODEL_SERVER_KEY}: {server.description}\n"
    storage.write_text(os.path.join(blessing.uri, "INFRA_NOT_BLESSED"), text)
    blessing.set_int_custom_property(_BLESSED_KEY, 0)


def read_raw_examples(pattern: str, limit: int) -> list[bytes]:
    """Up to `limit` serialized tf.Examples from the first files matching `pattern`."""
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise SmokeTestFailure(f"no files match {pattern}")
    records: list[bytes] = []
    for path in files:  # each with its own compression, as Beam reads them
        # ranged: on GCS the bytes of a few records, not TF's 64 MiB first block of a shard.
        records += itertools.islice(read_records(path, ranged=True), limit - len(records))
        if len(records) == limit:
            break
    return records


def smoke_test_model(
    model_dir: str, records: list[bytes], timeout_seconds: float, server: ModelServerBinary
) -> list:
    """Serve `model_dir` with `server`, check every signature; return the requests sent."""
    requests = build_requests("smoke", records)
    with tempfile.TemporaryDirectory(prefix="smoke-") as base:
        # TF Serving wants <base>/<integer version>/. A local model is linked (no copy); one on
        # object storage is copied to this machine, where the server subprocess can read it.
        version_dir = os.path.join(base, "1")
        if storage.is_remote(model_dir):
            storage.copy_tree(model_dir, version_dir)
        else:
            os.symlink(os.path.abspath(model_dir), version_dir)
        try:
            running = running_model_server(base, "smoke", timeout_seconds, (), server.command)
            with running as (channel, _port):
                check_responses(channel, requests, len(records))
        except ServerStartError as exc:
            raise SmokeTestFailure(str(exc)) from exc
    for request in requests:
        request.model_spec.name = ""  # warmup replays on the servable, whatever it is named
    return requests


def build_requests(model_name: str, records: list[bytes]) -> list:
    """One request per way a client calls our model: images, Predict on examples, Classify."""
    encoded = [
        tf.train.Example.FromString(r).features.feature[features.IMAGE_ENCODED] for r in records
    ]
    images = predict_pb2.PredictRequest()
    images.model_spec.name = model_name
    images.model_spec.signature_name = features.PREDICT_IMAGES_SIGNATURE
    images.inputs[features.PREDICT_IMAGES_INPUT].CopyFrom(
        tf.make_tensor_proto([f.bytes_list.value[0] for f in encoded], dtype=tf.string)
    )
    examples = predict_pb2.PredictRequest()
    examples.model_spec.name = model_name
    examples.model_spec.signature_name = features.SERVING_EXAMPLES_SIGNATURE
    examples.inputs["examples"].CopyFrom(tf.make_tensor_proto(records, dtype=tf.string))
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = model_name
    classify.model_spec.signature_name = features.CLASSIFY_SIGNATURE
    classify.input.CopyFrom(
        input_pb2.Input(
            example_list=input_pb2.ExampleList(
                examples=[tf.train.Example.FromString(r) for r in records]
            )
        )
    )
    return [images, examples, classify]


def check_responses(channel, requests: list, num_records: int) -> None:
    """Send each request over gRPC and check the answers are well-formed probabilities."""
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    for request in requests:
        kind = type(request).__name__
        try:
            if isinstance(request, classification_pb2.ClassificationRequest):
                response = stub.Classify(request, timeout=120)
                scores = np.array(
                    [
                        [c.score for c in result.classes]
                        for result in response.result.classifications
                    ]
                )
            else:
                response = stub.Predict(request, timeout=120)
                scores = tf.make_ndarray(response.outputs["probabilities"])
        except grpc.RpcError as exc:
            raise SmokeTestFailure(
                f"{kind} to {request.model_spec.signature_name}: {exc.code().name} {exc.details()}"
            ) from exc
        check_probabilities(scores, num_records, f"{kind} {request.model_spec.signature_name}")


def check_probabilities(scores: np.ndarray, num_records: int, what: str) -> None:
    """Fail unless `scores` is [num_records, C] of finite probabilities summing to one."""
    if scores.ndim != 2 or scores.shape[0] != num_records:
        raise SmokeTestFailure(f"{what}: expected [{num_records}, C] scores, got {scores.shape}")
    if not np.all(np.isfinite(scores)) or not np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
        raise SmokeTestFailure(f"{what}: scores are not probabilities: {scores[:2]}")


def copy_model_with_warmup(model_dir: str, destination: str, requests: list) -> None:
    """Copy the SavedModel and add assets.extra/tf_serving_warmup_requests (PredictionLogs)."""
    storage.copy_tree(model_dir, destination)
    warmup_path = path_utils.warmup_file_path(destination)
    tf.io.gfile.makedirs(os.path.dirname(warmup_path))
    with tf.io.TFRecordWriter(warmup_path) as writer:
        for request in requests:
            writer.write(as_prediction_log(request).SerializeToString())


def as_prediction_log(request) -> prediction_log_pb2.PredictionLog:
    """Wrap a Predict/Classify request in the PredictionLog TF Serving's warmup replays."""
    if isinstance(request, classification_pb2.ClassificationRequest):
        return prediction_log_pb2.PredictionLog(
            classify_log=prediction_log_pb2.ClassifyLog(request=request)
        )
    return prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    )
