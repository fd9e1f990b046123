"""Hostile gRPC requests, over real gRPC on loopback with the stock tensorflow-serving-api stubs.

Each test names the reviewer's finding it covers; expected codes and messages come from TF
Serving 2.16.1's source (cited per test) or from TensorFlow itself.
"""

from __future__ import annotations

import struct
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving import testing
from serving.images import image_size
from serving.server import ModelServer, ServerOptions

RED = (255, 0, 0)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def server(root):
    config = testing.export_test_models(str(root), 1)
    with ModelServer(ServerOptions(model_config_file=config, port=0, rest_api_port=0)) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def model_stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield model_service_pb2_grpc.ModelServiceStub(channel)


def code_and_message(call, request) -> tuple[grpc.StatusCode, str]:
    """The status of a call expected to fail."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=60)
    return caught.value.code(), caught.value.details()


def images_request(proto, signature="predict_images", alias="images"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "van"
    request.model_spec.signature_name = signature
    request.inputs[alias].CopyFrom(proto)
    return request


def string_proto(dims, values=(), content=b"") -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_content=content)
    for size in dims:
        proto.tensor_shape.dim.add(size=size)
    proto.string_val.extend(values)
    return proto


# 1. JPEG headers are read as libjpeg reads them.


def _segments(jpeg: bytes) -> list[bytes]:
    """SOI, each marker segment up to SOS, then the rest, of a well-formed JPEG."""
    parts, position = [jpeg[:2]], 2
    while jpeg[position + 1] != 0xDA:
        (length,) = struct.unpack(">H", jpeg[position + 2 : position + 4])
        parts.append(jpeg[position : position + 2 + length])
        position += 2 + length
    parts.append(jpeg[position:])
    return parts


_JUNK = st.one_of(
    st.binary(min_size=1, max_size=6).filter(lambda b: 0xFF not in b),  # extraneous bytes
    st.integers(1, 5).map(lambda n: b"\xff" * n),  # fill bytes (before the next marker)
    st.just(b"\xff\x00"),  # stuffed zero: data, not a marker
    st.sampled_from([b"\xff\x01", b"\xff\xd0", b"\xff\xd7"]),  # parameterless markers
    st.builds(  # APPn / COM / DNL segments, lengths 0-300 (below 2: only the length bytes)
        lambda marker, length: bytes([0xFF, marker])
        + struct.pack(">H", length)
        + b"\x00" * max(length - 2, 0),
        st.sampled_from([0xE1, 0xE5, 0xEF, 0xFE, 0xDC]),
        st.integers(0, 300),
    ),  # fmt: skip
    st.sampled_from([b"\xff\xd8", b"\xff\xd9", b"\xff\xc8", b"\xff\x02", b"\xff\xf0"]),  # errors
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 40),
    height=st.integers(1, 40),
    insertions=st.lists(st.tuples(st.integers(0, 10), _JUNK), max_size=4),
)
def test_jpeg_size_is_what_libjpeg_decodes_or_a_refusal(width, height, insertions):
    """Whenever TF can decode the bytes, our header reader reports that size: never "unknown"."""
    parts = _segments(tf.io.encode_jpeg(tf.zeros([height, width, 3], tf.uint8)).numpy())
    for where, junk in insertions:  # between SOI and SOS, anywhere among the header segments
        index = 1 + where % (len(parts) - 1)
        parts.insert(index, junk)
    data = b"".join(parts)
    ours = image_size(data)
    try:
        decoded = tf.io.decode_jpeg(data).shape
    except tf.errors.InvalidArgumentError:
        decoded = None
    try:
        header = tuple(tf.io.extract_jpeg_shape(data).numpy()[:2])  # libjpeg's header parser
    except tf.errors.InvalidArgumentError:
        header = None
    if decoded is not None:
        assert ours is not None and (ours.height, ours.width) == tuple(decoded[:2])
    if header is not None:
        assert ours is not None and (ours.height, ours.width) == header
    if ours is None:
        assert decoded is None and header is None


def test_jpeg_with_stray_bytes_before_its_frame_is_still_sized():
    """A stray byte before a marker, or FF 00 after SOI, used to make the size unknown."""
    big = testing.jpeg_declaring(12000, 12000)
    assert image_size(big[:2] + b"\x00" + big[2:]) == (12000, 12000, 1)
    assert image_size(big[:2] + b"\xff\x00" + big[2:]) == (12000, 12000, 1)
    length = struct.unpack(">H", big[4:6])[0]
    assert image_size(big[: 4 + length] + b"\x00" + big[4 + length :]) == (12000, 12000, 1)


def status_request():
    return get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "van"})


def test_segment_bomb_is_cheap_and_health_checks_answer_meanwhile(server, stub, model_stub):
    """60 copies of a 1 MiB JPEG of 262k tiny APP segments took 11 s of the event loop."""
    bomb = b"\xff\xd8" + b"\xff\xe0\x00\x02" * ((1 << 20) // 4)
    request = images_request(string_proto([60], [bomb]))
    code, message = code_and_message(stub.Predict, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message  # no frame: the decoder refuses it
    assert model_stub.GetModelStatus(status_request(), timeout=10).model_version_status


# 2. Preparing a large request happens off the event loop, and string repeats are bounded.


def test_repeated_string_declaring_millions_of_elements_is_refused(stub):
    """48 bytes declaring [2000000] of one 1-byte string cost 5 s and 440 MB."""
    code, message = code_and_message(stub.Predict, images_request(string_proto([2000000], [b"x"])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("Input images declares shape [2000000]: ") and "bytes once" in message


def test_other_rpcs_are_answered_while_a_large_request_is_prepared(server, stub):
    """GetModelStatus calls on another channel complete while a Predict is still being prepared
    (its images' headers walked, ~2 s here), instead of queueing behind it on the event loop."""
    bombs = [b"\xff\xd8" + b"\xff\xe0\x00\x02" * (1 << 18) + bytes([i]) for i in range(48)]
    request = images_request(string_proto([49], [*bombs, testing.jpeg_declaring(12000, 12000)]))
    events: list[str] = []
    pending = stub.Predict.future(request, timeout=120)
    pending.add_done_callback(lambda _: events.append("predict"))
    with grpc.insecure_channel(server.grpc_target) as channel:
        statuses = model_service_pb2_grpc.ModelServiceStub(channel)
        statuses.GetModelStatus(status_request(), timeout=30)  # connected before we start
        threading.Event().wait(0.5)  # the Predict has arrived and is being prepared
        while not pending.done() and events.count("status") < 3:
            statuses.GetModelStatus(status_request(), timeout=30)
            events.append("status")
    assert pending.exception().code() == grpc.StatusCode.INVALID_ARGUMENT  # the 12000 x 12000
    assert events[:3] == ["status"] * 3, events


# 3. Predict outputs are TF Serving's proto fields by default.


def test_predict_outputs_fill_float_val_like_tf_serving(stub):
    image = testing.encode_image(RED, fmt="JPEG")
    response = stub.Predict(images_request(tf.make_tensor_proto([image])), timeout=30)
    probabilities = response.outputs["probabilities"]
    assert not probabilities.tensor_content and len(probabilities.float_val) == 4
    assert np.isclose(sum(probabilities.float_val), 1.0, atol=1e-5)
    indices = response.outputs["top_k_indices"]
    assert not indices.tensor_content and len(indices.int_val or indices.int64_val) == 2
    assert tf.make_ndarray(probabilities).shape == (1, 4)


def test_serialization_as_tensor_content_flag(root):
    options = ServerOptions(
        model_config_file=str(root / "models.config"),
        port=0,
        rest_api_port=0,
        enable_serialization_as_tensor_content=True,
    )
    image = testing.encode_image(RED, fmt="JPEG")
    with ModelServer(options) as running, grpc.insecure_channel(running.grpc_target) as channel:
        flagged = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = flagged.Predict(images_request(tf.make_tensor_proto([image])), timeout=30)
    probabilities = response.outputs["probabilities"]
    assert len(probabilities.tensor_content) == 16 and not probabilities.float_val


# 4. A context copied into every example counts against the budget.


def test_context_times_examples_is_bounded(stub):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name, request.model_spec.signature_name = "van", "classify"
    context = request.input.example_list_with_context.context
    context.features.feature["pad"].bytes_list.value.append(b"x" * (1 << 20))
    for _ in range(600):
        request.input.example_list_with_context.examples.add()
    code, message = code_and_message(stub.Classify, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("Input example_list_with_context: 600 examples each merged with a ")


# 5-7. Dtypes and protos as Tensor::FromProto and the session treat them.


@pytest.mark.parametrize(
    ("dtype", "name"), [(types_pb2.DT_VARIANT, "variant"), (types_pb2.DT_RESOURCE, "resource")]
)
def test_variant_and_resource_inputs_are_invalid_argument(stub, dtype, name):
    proto = tensor_pb2.TensorProto(dtype=dtype)
    proto.tensor_shape.dim.add(size=1)
    code, message = code_and_message(stub.Predict, images_request(proto))
    assert (code, message) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        f"Expects arg[0] to be string but {name} is provided",
    )


def test_empty_tensor_of_the_wrong_dtype_is_refused(stub):
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    proto.tensor_shape.dim.add(size=0)
    code, message = code_and_message(stub.Predict, images_request(proto))
    assert (code, message) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Expects arg[0] to be string but float is provided",
    )


@pytest.mark.parametrize(
    "dtype", [types_pb2.DT_FLOAT, types_pb2.DT_VARIANT], ids=["float", "variant"]
)
def test_the_output_filter_is_checked_before_the_sessions_dtype_check(stub, dtype):
    # PreProcessPrediction checks the filter; the session checks the feed's dtype when it runs.
    proto = tensor_pb2.TensorProto(dtype=dtype)
    proto.tensor_shape.dim.add(size=0)
    request = images_request(proto)
    request.output_filter.append("no_such_output")
    code, message = code_and_message(stub.Predict, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("output tensor alias not found in signature: no_such_output ")


def _string_list(values: list[bytes]) -> bytes:
    """Tensor::AsProtoTensorContent's DT_STRING encoding: varint lengths, then the bytes."""
    lengths = b""
    for value in values:
        size = len(value)
        while size >= 0x80:
            lengths += bytes([size & 0x7F | 0x80])
            size >>= 7
        lengths += bytes([size])
    return lengths + b"".join(values)


def test_protos_tensor_from_proto_accepts_are_accepted(stub):
    image = testing.encode_image(RED, size=200, fmt="PNG")  # > 127 bytes: a 2-byte varint
    as_content = string_proto([2], content=_string_list([image, image]))
    response = stub.Predict(images_request(as_content), timeout=30)
    assert tf.make_ndarray(response.outputs["probabilities"]).shape == (2, 4)
    unknown_rank = string_proto([1], [image])
    unknown_rank.tensor_shape.unknown_rank = True  # TensorShape::IsValid ignores it
    response = stub.Predict(images_request(unknown_rank), timeout=30)
    assert tf.make_ndarray(response.outputs["probabilities"]).shape == (1, 4)
    bad = string_proto([2], content=_string_list([image, image])[:-1])
    assert code_and_message(stub.Predict, images_request(bad)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor parsing error: images",
    )


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=5))
@settings(max_examples=50, deadline=None)
def test_string_tensor_content_decodes_as_tensorflow_does(values):
    from serving.tensors import from_tensor_proto

    proto = string_proto([len(values)], content=_string_list(values))
    assert from_tensor_proto(proto).tolist() == values
    assert tf.io.parse_tensor(proto.SerializeToString(), tf.string).numpy().tolist() == values


_DTYPES = [
    types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_INT32, types_pb2.DT_UINT8,
    types_pb2.DT_INT16, types_pb2.DT_INT8, types_pb2.DT_INT64, types_pb2.DT_BOOL,
    types_pb2.DT_HALF, types_pb2.DT_BFLOAT16, types_pb2.DT_UINT16, types_pb2.DT_UINT32,
    types_pb2.DT_UINT64, types_pb2.DT_STRING, types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128,
]  # fmt: skip
_FIELD_VALUES = {
    "float_val": st.floats(width=32, allow_nan=False),
    "double_val": st.floats(allow_nan=False),
    "int_val": st.integers(-(2**31), 2**31 - 1),
    "int64_val": st.integers(-(2**63), 2**63 - 1),
    "bool_val": st.booleans(),
    "half_val": st.integers(-(2**31), 2**31 - 1),
    "uint32_val": st.integers(0, 2**32 - 1),
    "uint64_val": st.integers(0, 2**64 - 1),
    "string_val": st.binary(max_size=4),
    "scomplex_val": st.floats(width=32, allow_nan=False),
    "dcomplex_val": st.floats(allow_nan=False),
}


@st.composite
def _string_lists(draw):
    """(count, DT_STRING tensor_content): varint lengths, some in five bytes with bits above 32."""
    values = draw(st.lists(st.binary(max_size=6), max_size=4))
    lengths = b""
    for value in values:
        size = len(value)
        if draw(st.booleans()):
            high = draw(st.integers(0, 7)) << 4  # what a uint32 varint cannot hold
            lengths += bytes([(size >> s) & 0x7F | 0x80 for s in (0, 7, 14, 21)])
            lengths += bytes([(size >> 28) & 0x0F | high])
        else:
            lengths += bytes([size])
    return len(values), lengths + b"".join(values)


@st.composite
def _tensor_protos(draw):
    """Small TensorProtos of any dtype, with content bytes and value fields of any kind."""
    proto = tensor_pb2.TensorProto(dtype=draw(st.sampled_from(_DTYPES)))
    for size in draw(st.lists(st.integers(0, 4), max_size=3)):
        proto.tensor_shape.dim.add(size=size)
    if draw(st.booleans()):
        proto.tensor_content = draw(st.binary(max_size=40))
    elif proto.dtype == types_pb2.DT_STRING and draw(st.booleans()):
        count, proto.tensor_content = draw(_string_lists())
        if draw(st.booleans()):  # a shape holding as many strings as the content
            del proto.tensor_shape.dim[:]
            proto.tensor_shape.dim.add(size=count)
    for field in draw(st.lists(st.sampled_from(sorted(_FIELD_VALUES)), max_size=2, unique=True)):
        getattr(proto, field).extend(draw(st.lists(_FIELD_VALUES[field], max_size=6)))
    return proto


@given(_tensor_protos())
@settings(max_examples=400, deadline=None)
def test_tensor_protos_are_read_as_tensor_from_proto_reads_them(proto):
    # tf.io.parse_tensor is Tensor::FromProto (parse_tensor_op.cc), which GetInputValues runs on
    # every input: refused there is "tensor parsing error", accepted the same values. It took a
    # zero-element string tensor with content (an empty batch) and string lengths whose fifth
    # varint byte sets bits above 32 (it drops them) that this refused, and refused a bool byte
    # other than 0 and 1 that this passed on to the model as True.
    from serving.errors import ServingError
    from serving.tensors import from_tensor_proto

    try:
        theirs = tf.io.parse_tensor(proto.SerializeToString(), tf.dtypes.as_dtype(proto.dtype))
    except tf.errors.InvalidArgumentError:
        theirs = None
    try:
        ours = from_tensor_proto(proto, "a")
    except ServingError as exc:
        assert (exc.code, exc.message) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "tensor parsing error: a",
        )
        ours = None
    assert (ours is None) == (theirs is None)
    if ours is not None:
        theirs = np.asarray(theirs.numpy(), dtype=ours.dtype if ours.dtype == object else None)
        assert (ours.shape, ours.dtype) == (theirs.shape, theirs.dtype)
        assert (
            ours.tolist() == theirs.tolist()
            if ours.dtype == object
            else ours.tobytes() == theirs.tobytes()
        )


@given(_string_lists())
@settings(max_examples=100, deadline=None)
def test_string_lengths_are_read_as_uint32_varints(string_list):
    # DecodeStringList reads each length with GetVarint32Ptr, in uint32: bits a fifth byte sets
    # above 32 are dropped. This refused such lengths ("tensor parsing error").
    from serving.tensors import from_tensor_proto

    count, content = string_list
    proto = string_proto([count], content=content)
    theirs = tf.io.parse_tensor(proto.SerializeToString(), tf.string).numpy().tolist()
    assert from_tensor_proto(proto).tolist() == theirs


def test_tensor_from_proto_answers_over_grpc(stub):
    # An empty batch given as string content is a batch of none; a bool byte 2 is no bool, and
    # FromProto's refusal comes before the session's dtype check.
    empty = string_proto([0], content=b"abc")
    response = stub.Predict(images_request(empty), timeout=30)
    assert tf.make_ndarray(response.outputs["probabilities"]).shape == (0, 4)
    flag = tensor_pb2.TensorProto(dtype=types_pb2.DT_BOOL, tensor_content=b"\x02")
    assert code_and_message(stub.Predict, images_request(flag)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor parsing error: images",
    )


# 8. HandleReloadConfigRequest answers as server_core.cc and model_service_impl.cc do.


def _reload(model_stub, entries):
    request = model_management_pb2.ReloadConfigRequest()
    request.config.model_config_list.SetInParent()
    for name, path in entries:
        request.config.model_config_list.config.add(
            name=name, base_path=path, model_platform="tensorflow"
        )
    return model_stub.HandleReloadConfigRequest(request, timeout=120)


def test_reload_config_errors_are_tf_servings(root, model_stub):
    van = str(root / "van")
    with pytest.raises(grpc.RpcError) as caught:
        _reload(model_stub, [("van", "relative/van")])
    assert (caught.value.code(), caught.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Expected model van to have an absolute path or URI; got base_path()=relative/van",
    )
    with pytest.raises(grpc.RpcError) as caught:
        _reload(model_stub, [("van", van), ("van", van)])
    assert caught.value.details() == "Illegal to list model van multiple times in config list"
    unset = model_management_pb2.ReloadConfigRequest()
    with pytest.raises(grpc.RpcError) as caught:
        model_stub.HandleReloadConfigRequest(unset, timeout=30)
    assert caught.value.details() == (
        "ServerModelConfig type not supported by HandleReloadConfigRequest. "
        "Only ModelConfigList is currently supported"
    )
    numbers = str(root / "numbers")
    response = _reload(model_stub, [("van", van), ("numbers", numbers)])
    assert response.HasField("status") and response.status.error_code == 0


# 9. Long non-ASCII messages still arrive with their own status code.


def test_long_non_ascii_message_keeps_its_status_code(stub):
    request = images_request(tf.make_tensor_proto([b"x"]), signature="€" * 3000)
    code, message = code_and_message(stub.Predict, request)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert message.startswith('Serving signature key "€€€') and "more characters" in message


# 8. Nothing proportional to a request's size runs on the event loop, or holds the GIL for long.


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _raw_call(channel, method: str):
    return channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)


def test_other_rpcs_are_answered_while_a_million_inputs_are_read(server):
    """A Predict of 1M tiny `inputs` entries (13 MiB) ran dict(request.inputs) on the event loop
    (4.5 s of CPU): GetModelStatus went from 1 ms to 6.4 s. TF Serving answers the request
    INVALID_ARGUMENT "input size does not match signature" on its own thread."""
    spec = _field(1, b"numbers")  # ModelSpec.name
    entries = b"".join(_field(2, _field(1, b"%d" % i) + b"\x12\x02\x08\x01") for i in range(10**6))
    raw = _field(1, spec) + entries  # serialized here: the client must not hold our GIL
    with grpc.insecure_channel(server.grpc_target) as channel:
        predict = _raw_call(channel, "/tensorflow.serving.PredictionService/Predict")
        status = _raw_call(channel, "/tensorflow.serving.ModelService/GetModelStatus")
        status_raw = status_request().SerializeToString()

        def latency() -> float:
            start = time.perf_counter()
            status(status_raw, timeout=60)
            return time.perf_counter() - start

        baseline = sorted(latency() for _ in range(20))[10]
        pending = predict.future(raw, timeout=300)
        during = []
        while not pending.done():
            during.append(latency())
            time.sleep(0.02)
    assert pending.exception().code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        pending.exception()
        .details()
        .startswith(
            "input size does not match signature: 1000000!=2 len({0,1,10,100,1000,10000,100000,"
        )
    )
    assert len(during) >= 10, during  # the request took seconds: there was time to ask
    # Generous: before, the slowest took 3-6 s; the loop may still wait for one short C call.
    assert max(during) < 1.0 + 50 * baseline, (baseline, sorted(during)[-5:])


def test_many_inputs_keep_map_semantics_the_last_entry_wins(stub):
    """Large requests read `inputs` as repeated entries; a repeated key keeps its last value, as
    protobuf's map does, and a large request's answer is the same as a small one's."""
    image = testing.encode_image(RED, fmt="JPEG")
    good = tf.make_tensor_proto([image]).SerializeToString()
    bad = tf.make_tensor_proto([1.0]).SerializeToString()
    spec = _field(1, _field(1, b"van") + _field(3, b"predict_images"))
    padding = b"".join(_field(2, _field(1, b"images") + _field(2, bad)) for _ in range(20000))
    for raw in (spec + padding + _field(2, _field(1, b"images") + _field(2, good)),
                spec + _field(2, _field(1, b"images") + _field(2, good))):  # fmt: skip
        request = predict_pb2.PredictRequest.FromString(raw)
        assert len(raw) > 64 * 1024 or len(request.inputs) == 1
        response = stub.Predict(request, timeout=60)
        assert tf.make_ndarray(response.outputs["probabilities"]).shape == (1, 4)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just(1), st.binary(max_size=3)),  # model_spec (merged)
            st.tuples(st.just(2), st.binary(max_size=12)),  # inputs entries (some invalid)
            st.tuples(st.just(3), st.binary(max_size=5)),  # output_filter
            st.tuples(st.integers(4, 40), st.binary(max_size=3)),  # unknown fields
        ),
        max_size=40,
    ),
    st.integers(1, 64),
    st.integers(1, 50),
)
def test_parsing_in_slices_is_parsing_the_whole(fields, slice_bytes, max_fields):
    """A large message parsed a slice of top-level fields at a time parses as the whole does,
    and fails where the whole fails."""
    from serving import grpc_wire

    raw = b"".join(_field(number, payload) for number, payload in fields)
    try:
        whole = grpc_wire.PredictRequestEntries.FromString(raw)
    except Exception:  # noqa: BLE001 - DecodeError: the sliced parse must fail too
        whole = None
    previous = grpc_wire.SLICE_BYTES, grpc_wire.MAX_SCANNED_FIELDS
    grpc_wire.SLICE_BYTES, grpc_wire.MAX_SCANNED_FIELDS = slice_bytes, max_fields
    try:
        sliced = grpc_wire.parse_gently(grpc_wire.PredictRequestEntries, raw)
    except Exception:  # noqa: BLE001
        sliced = None
    finally:
        grpc_wire.SLICE_BYTES, grpc_wire.MAX_SCANNED_FIELDS = previous
    assert (sliced is None) == (whole is None)
    if whole is not None:
        assert sliced == whole
        assert grpc_wire.predict_inputs(sliced) == dict(
            predict_pb2.PredictRequest.FromString(raw).inputs
        )


def test_finding_fields_stops_after_a_bounded_number_and_parses_the_rest_whole():
    # 2M empty output_filter entries (4 MB) took 2 s of Python steps to slice, 0.14 s to parse.
    from serving import grpc_wire

    raw = _field(3, b"") * (grpc_wire.MAX_SCANNED_FIELDS * 2)
    slices = grpc_wire._top_level_slices(raw)  # noqa: SLF001
    assert slices[-1] == (slices[-1][0], len(raw))
    assert slices[-1][0] <= 2 * grpc_wire.MAX_SCANNED_FIELDS  # no field found past the bound
    parsed = grpc_wire.parse_gently(predict_pb2.PredictRequest, raw)
    assert len(parsed.output_filter) == grpc_wire.MAX_SCANNED_FIELDS * 2


# 9. An unparseable request is gRPC's INTERNAL, as gRPC C++ answers before TF Serving sees it.

_SERVICES = {
    "PredictionService": ("Predict", "Classify", "Regress", "GetModelMetadata", "MultiInference"),
    "ModelService": ("GetModelStatus", "HandleReloadConfigRequest"),
}
_UNPARSEABLE = {
    "garbage": b"\xff\xff\xff",
    "truncated": b"\x0a\x05van",
    "invalid UTF-8 name": _field(1, _field(1, b"van\xff")),  # ModelSpec.name (proto3: UTF-8)
    "large garbage": _field(1, b"x" * 100) * 1000 + b"\xff\xff\xff",  # parsed off the loop
}


@pytest.mark.parametrize("kind", sorted(_UNPARSEABLE))
@pytest.mark.parametrize(
    "method", [f"/tensorflow.serving.{s}/{m}" for s, ms in _SERVICES.items() for m in ms]
)
def test_unparseable_requests_are_internal_as_grpc_cpp_answers(server, method, kind):
    """grpc.aio answered UNKNOWN "Unexpected <class 'DecodeError'>: ...". gRPC C++'s
    GenericDeserialize (include/grpcpp/impl/proto_utils.h) answers INTERNAL with the message's
    InitializationErrorString(): empty for proto3 messages, which have no required fields."""
    if kind == "invalid UTF-8 name" and method.endswith("HandleReloadConfigRequest"):
        payload = _field(1, _field(1, _field(1, _field(1, b"van\xff"))))  # config list's name
    else:
        payload = _UNPARSEABLE[kind]
    with grpc.insecure_channel(server.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            _raw_call(channel, method)(payload, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert not caught.value.details()
    # The server goes on serving.
    with grpc.insecure_channel(server.grpc_target) as channel:
        statuses = model_service_pb2_grpc.ModelServiceStub(channel)
        assert statuses.GetModelStatus(status_request(), timeout=30).model_version_status
