"""Hostile files around the model server: warmup files, config files, manifests (real files,
a real exported SavedModel, no mocks)."""

import os

import grpc
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from serving import testing
from serving.manager import MAX_WARMUP_RECORDS, LoadError, run_warmup
from serving.servable import WARMUP_FILE, Servable
from van_tfx.tfrecords import record_header, write_records

IMAGE = testing.encode_image((10, 200, 30))


@pytest.fixture(scope="module")
def servable(tmp_path_factory):
    """One loaded version whose warmup file each test rewrites (loading costs seconds)."""
    root = tmp_path_factory.mktemp("export")
    path = testing.export(testing.build_tiny_model(), str(root), 1)
    os.makedirs(os.path.join(path, "assets.extra"))
    return Servable("van", 1, path, None)


def predict_log(image: bytes) -> bytes:
    """A serialized PredictionLog asking predict_images about one image."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "van"
    request.model_spec.signature_name = "predict_images"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto([image]))
    log = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    )
    return log.SerializeToString()


GOOD, BAD_IMAGE, NOT_A_LOG = predict_log(IMAGE), predict_log(b"not an image"), b"\xff\xff\xff"


def write_warmup(servable, records, tail=b"") -> str:
    path = os.path.join(servable.path, WARMUP_FILE)
    write_records(path, records)
    with open(path, "ab") as f:
        f.write(tail)
    return path


def test_warmup_stops_reading_at_the_first_failing_record(servable):
    # Record 1 fails; a damaged header comes 20 records later. Reading the whole file up front
    # (as before: 1000 records of 2 MB were 8.8 GB resident) met the damage first: DATA_LOSS.
    path = write_warmup(servable, [BAD_IMAGE] + [GOOD] * 20, record_header(2**36) + b"\0" * 64)
    with pytest.raises(LoadError) as failure:
        run_warmup(servable)
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(failure.value).startswith(f"warmup record 1 of {path} failed: ")


def test_a_warmup_record_that_is_no_prediction_log_fails_with_invalid_argument(servable):
    # saved_model_warmup_util.cc: "Failed to parse warmup record" is INVALID_ARGUMENT; here the
    # protobuf DecodeError escaped and the version reported UNKNOWN.
    path = write_warmup(servable, [GOOD, NOT_A_LOG])
    with pytest.raises(LoadError) as failure:
        run_warmup(servable)
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(failure.value) == (
        f"Failed to parse warmup record 2 (3 bytes) from {path}: not a serialized PredictionLog"
    )


def test_more_warmup_records_than_tf_serving_allows_name_the_file(servable):
    path = write_warmup(servable, [GOOD] * (MAX_WARMUP_RECORDS + 1))
    with pytest.raises(LoadError) as failure:
        run_warmup(servable)
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(failure.value) == (
        f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {path}"
    )


KINDS = {"good": GOOD, "bad image": BAD_IMAGE, "not a log": NOT_A_LOG}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(sorted(KINDS)), max_size=9))
def test_warmup_reports_the_first_bad_record_or_counts_them_all(servable, kinds):
    path = write_warmup(servable, [KINDS[kind] for kind in kinds])
    bad = [number for number, kind in enumerate(kinds, start=1) if kind != "good"]
    if not bad:
        assert run_warmup(servable) == len(kinds)
        return
    with pytest.raises(LoadError) as failure:
        run_warmup(servable)
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # The first bad record is the one reported, whatever runs concurrently behind it.
    assert f"record {bad[0]} " in str(failure.value)
    assert path in str(failure.value)
