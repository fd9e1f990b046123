"""The van-tfx model server through the stock tensorflow-serving-api gRPC stubs and its REST API."""

import base64
import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving import testing
from serving.server import ANY_PORT, ModelServer, ServerOptions

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("models") / "van"
    testing.export(testing.build_tiny_model(), str(base), 1)
    options = ServerOptions(
        model_name="van", model_base_path=str(base), port=0, rest_api_port=ANY_PORT
    )
    with ModelServer(options) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_target)
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()


def predict_request(images, signature="predict_images", name="van", version=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    return request


def example_bytes(rgb):
    feature = tf.train.Feature(float_list=tf.train.FloatList(value=rgb))
    return tf.train.Example(features=tf.train.Features(feature={"x": feature})).SerializeToString()


def rest(server, path, body=None):
    data = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    try:
        with urllib.request.urlopen(urllib.request.Request(server.rest_url + path, data=data)) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_grpc_predict_images_matches_the_model(stub):
    images = [testing.encode_image(RED), testing.encode_image(BLUE, fmt="JPEG")]
    response = stub.Predict(predict_request(images), timeout=30)
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    expected = testing.expected_probabilities(np.array([[1, 0, 0], [0, 0, 1]]))
    np.testing.assert_allclose(probabilities, expected, atol=0.02)  # JPEG shifts colours slightly
    indices = tf.make_ndarray(response.outputs["top_k_indices"])
    assert indices.dtype == np.int32 and indices.shape == (2, 2)
    synsets = tf.make_ndarray(response.outputs["top_k_synsets"])
    assert [s.decode() for s in synsets[:, 0]] == [testing.SYNSETS[i] for i in indices[:, 0]]
    assert response.model_spec.name == "van" and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "predict_images"


def test_grpc_predict_default_signature_with_output_filter(stub):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "van"
    request.inputs["examples"].CopyFrom(
        tf.make_tensor_proto([example_bytes([0.0, 1.0, 0.0])], dtype=tf.string)
    )
    request.output_filter.append("probabilities")
    response = stub.Predict(request, timeout=30)
    assert set(response.outputs) == {"probabilities"}
    assert response.model_spec.signature_name == "serving_default"
    np.testing.assert_allclose(
        tf.make_ndarray(response.outputs["probabilities"]),
        testing.expected_probabilities(np.array([[0, 1, 0]])),
        rtol=1e-5,
    )


def test_grpc_classify_uses_classes_output_as_labels(stub):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "van"
    request.model_spec.signature_name = "classify"
    for rgb in ([1.0, 0.0, 0.0], [0.0, 0.0, 1.0]):
        request.input.example_list.examples.add().ParseFromString(example_bytes(rgb))
    response = stub.Classify(request, timeout=30)
    rows = response.result.classifications
    assert len(rows) == 2
    assert [c.label for c in rows[0].classes] == list(testing.SYNSETS)
    expected = testing.expected_probabilities(np.array([[1, 0, 0], [0, 0, 1]]))
    np.testing.assert_allclose(
        [[c.score for c in row.classes] for row in rows], expected, rtol=1e-5
    )


def test_grpc_classify_on_a_predict_signature_fails_as_tf_serving_does(stub):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "van"  # no signature name: serving_default, a predict signature
    request.input.example_list.examples.add().ParseFromString(example_bytes([1.0, 0.0, 0.0]))
    with pytest.raises(grpc.RpcError) as error:
        stub.Classify(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # TF Serving checks method names only with --enable_signature_method_name_check (default
    # off); PreProcessClassification then finds no input named "inputs".
    assert error.value.details().startswith(
        'No classification inputs found in SignatureDef: inputs {\n  key: "examples"'
    )


def test_classify_method_name_is_checked_first_when_enabled(server):
    from serving.handlers import check_classification_signature

    signature = server.manager.resolve("van").signature_defs["serving_default"]
    with pytest.raises(Exception, match="Expected classification signature method_name to be "
                       "tensorflow/serving/classify. Was: tensorflow/serving/predict"):  # fmt: skip
        check_classification_signature(signature, method_name_check=True)


def test_grpc_metadata_reports_signature_defs(stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "van"
    response = stub.GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    images = signatures.signature_def["predict_images"]
    assert images.inputs["images"].dtype == tf.string.as_datatype_enum
    assert set(images.outputs) == {
        "probabilities",
        "top_k_indices",
        "top_k_synsets",
        "top_k_scores",
    }
    assert images.outputs["top_k_indices"].dtype == tf.int32.as_datatype_enum
    assert "serving_default" in signatures.signature_def
    assert response.model_spec.version.value == 1

    request.metadata_field[:] = ["graph"]
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelMetadata(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_model_status(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "van"
        status = models.GetModelStatus(request, timeout=30).model_version_status
        assert [(s.version, s.state) for s in status] == [(1, 30)]  # AVAILABLE
        request.model_spec.name = "nope"
        with pytest.raises(grpc.RpcError) as err:
            models.GetModelStatus(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_args", "code", "message"),
    [
        (
            {"name": "nope"},
            grpc.StatusCode.NOT_FOUND,
            "Servable not found for request: Latest(nope)",
        ),
        (
            {"version": 7},
            grpc.StatusCode.NOT_FOUND,
            "Servable not found for request: Specific(van, 7)",
        ),
        (
            {"signature": "x"},
            grpc.StatusCode.FAILED_PRECONDITION,
            'Serving signature key "x" not found.',
        ),
    ],
)
def test_grpc_errors_match_tf_serving(stub, request_args, code, message):
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(predict_request([testing.encode_image(RED)], **request_args), timeout=30)
    assert err.value.code() == code
    assert err.value.details() == message


def test_bad_inputs_are_invalid_argument_and_the_server_keeps_serving(stub):
    bad_requests = [predict_request([b"not an image"])]
    wrong_alias = predict_request([testing.encode_image(RED)])
    wrong_alias.inputs["pixels"].CopyFrom(wrong_alias.inputs.pop("images"))
    wrong_dtype = predict_request([testing.encode_image(RED)])
    wrong_dtype.inputs["images"].CopyFrom(tf.make_tensor_proto([1.0, 2.0]))
    bad_requests += [wrong_alias, wrong_dtype]
    for request in bad_requests:
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "pixels" in _details(stub, wrong_alias)
    response = stub.Predict(predict_request([testing.encode_image(RED)]), timeout=30)
    assert response.outputs["probabilities"].tensor_shape.dim[0].size == 1


def _details(stub, request):
    try:
        stub.Predict(request, timeout=30)
    except grpc.RpcError as err:
        return err.details()
    return ""


def test_rest_predict_row_form_single_output_is_unnamed(server):
    image = base64.b64encode(testing.encode_image(RED)).decode()
    body = {"signature_name": "predict_probabilities", "instances": [{"b64": image}] * 2}
    status, answer = rest(server, "/v1/models/van:predict", body)
    assert status == 200
    expected = testing.expected_probabilities(np.array([[1, 0, 0]] * 2))
    np.testing.assert_allclose(answer["predictions"], expected, atol=1e-5)


def test_rest_predict_row_and_column_forms_with_several_outputs(server):
    image = {"b64": base64.b64encode(testing.encode_image(BLUE)).decode()}
    status, rows = rest(
        server,
        "/v1/models/van/versions/1:predict",
        {"signature_name": "predict_images", "instances": [{"images": image}]},
    )
    assert status == 200
    assert set(rows["predictions"][0]) == {
        "probabilities",
        "top_k_indices",
        "top_k_synsets",
        "top_k_scores",
    }
    assert rows["predictions"][0]["top_k_synsets"][0] in testing.SYNSETS  # strings stay strings
    status, columns = rest(
        server, "/v1/models/van:predict", {"signature_name": "predict_images", "inputs": [image]}
    )
    assert status == 200
    assert columns["outputs"]["top_k_indices"] == [rows["predictions"][0]["top_k_indices"]]


def test_rest_classify(server):
    body = {"signature_name": "classify", "examples": [{"x": [0.0, 1.0, 0.0]}]}
    status, answer = rest(server, "/v1/models/van:classify", body)
    assert status == 200
    labels = [label for label, _ in answer["results"][0]]
    scores = [score for _, score in answer["results"][0]]
    assert labels == list(testing.SYNSETS)
    np.testing.assert_allclose(
        scores, testing.expected_probabilities(np.array([[0, 1, 0]]))[0], rtol=1e-5
    )


def test_rest_status_and_metadata(server):
    status, answer = rest(server, "/v1/models/van")
    assert status == 200
    assert answer == {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    status, meta = rest(server, "/v1/models/van/versions/1/metadata")
    assert status == 200
    assert meta["model_spec"]["version"] == "1"
    signature = meta["metadata"]["signature_def"]["signature_def"]["predict_images"]
    assert signature["inputs"]["images"]["dtype"] == "DT_STRING"


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        (
            "/v1/models/nope:predict",
            {"instances": [1]},
            404,
            "Servable not found for request: Latest(nope)",
        ),
        ("/v1/models/van/versions/9", None, 404, "Could not find version 9 of model van"),
        ("/v1/models/van:predict", b"{not json", 400, "JSON Parse error"),
        ("/v1/models/van:explode", {}, 400, "Malformed request"),
        (
            "/v1/models/van:predict",
            {"signature_name": "predict_images", "instances": [{"b64": "AAAA"}]},
            400,
            "",
        ),
        (
            "/v1/models/van:predict",
            {"signature_name": "nope", "instances": ["x"]},
            400,
            'Serving signature name: "nope" not found in signature def',  # GetInfoMap
        ),
        (
            "/v1/models/van/labels/stable:predict",
            {"instances": ["x"]},
            400,
            "Unrecognized servable version label: stable",
        ),
    ],
)
def test_rest_errors_match_tf_serving(server, path, body, status, message):
    code, answer = rest(server, path, body)
    assert code == status
    assert set(answer) == {"error"} and message in answer["error"]


@pytest.mark.parametrize(
    "value",
    [
        np.array([[0.25, -1.5, 3.0]], dtype=np.float32),
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.array([[True, False]]),
        np.zeros((2, 0), dtype=np.float16),
        np.array([7], dtype=np.uint8),
        np.array([[b"n01440764", b"\xff\x00"]], dtype=object),
        np.array(b"scalar", dtype=object),
    ],
    ids=["float32", "int64", "bool", "empty-float16", "uint8", "bytes", "scalar-bytes"],
)
def test_tensor_conversion_agrees_with_tensorflow(value):
    from serving.tensors import from_tensor_proto, to_tensor_proto

    ours, theirs = to_tensor_proto(value), tf.make_tensor_proto(value)
    assert (ours.dtype, ours.tensor_shape) == (theirs.dtype, theirs.tensor_shape)
    decoded = tf.make_ndarray(ours)
    assert decoded.dtype == tf.make_ndarray(theirs).dtype and np.array_equal(decoded, value)
    read = from_tensor_proto(theirs)
    assert read.shape == value.shape and np.array_equal(read, value)


def test_string_tensor_with_fewer_values_than_its_shape_follows_tensorflow():
    from serving.tensors import from_tensor_proto

    proto = tf.make_tensor_proto([b"x"], dtype=tf.string)
    proto.tensor_shape.dim[0].size = 3  # TF repeats the last value to fill the shape
    assert from_tensor_proto(proto).tolist() == tf.make_ndarray(proto).tolist() == [b"x"] * 3


def test_metrics_keep_tf_serving_names_and_escape_label_values():
    from prometheus_client.parser import text_string_to_metric_families

    from serving.metrics import Metrics

    metrics = Metrics()
    metrics.record("van", "Predict", "GRPC", "OK", 0.002)
    metrics.record('a"b\\c\nd', "predict", "REST", "NOT_FOUND", 0.1)  # before: written unescaped
    text = metrics.render()
    assert "# TYPE :tensorflow:serving:request_count counter" in text
    assert ':tensorflow:serving:request_count{model_name="van",status="OK"} 1.0' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counts = {
        s.labels["model_name"]: s.value
        for s in families[":tensorflow:serving:request_count"].samples
    }
    assert counts == {"van": 1.0, 'a"b\\c\nd': 1.0}  # parsed back exactly
    latency = families[":tensorflow:serving:request_latency"].samples
    assert {s.labels["model_name"] for s in latency} == {"van"}  # only successful requests
    total = next(s for s in latency if s.name.endswith("_sum"))
    assert total.value == pytest.approx(2000.0) and total.labels["API"] == "Predict"
