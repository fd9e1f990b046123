"""What a hostile or broken answer can make `predict`'s client hold: each output's declared size
is bounded before it is decoded (serving.client.answer_outputs), whatever the shape and fill."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2

from serving.client import AnswerTooLarge, ServerUnavailable, answer_outputs

LIMIT = 1 << 20
DTYPES = {
    types_pb2.DT_FLOAT: ("float_val", st.floats(width=32, allow_nan=False)),
    types_pb2.DT_INT32: ("int_val", st.integers(-(2**31), 2**31 - 1)),
    types_pb2.DT_INT64: ("int64_val", st.integers(-(2**63), 2**63 - 1)),
    types_pb2.DT_STRING: ("string_val", st.binary(max_size=64)),
}


@st.composite
def tensor_protos(draw):
    """TensorProtos of any rank-0..4 shape (up to 10**7 a dim, 0 too: then no element but
    maybe 10**14 empty lists) with 0..3 values that TF fills."""
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    field, values = DTYPES[dtype]
    proto = tensor_pb2.TensorProto(dtype=dtype)
    for size in draw(st.lists(st.integers(0, 10**7), max_size=4)):
        proto.tensor_shape.dim.add(size=size)
    getattr(proto, field).extend(draw(st.lists(values, max_size=3)))
    return proto


def overflows(proto) -> bool:
    """Whether TensorShape's running product of the dims passes 2**63 - 1 (before a 0 too), or
    NumPy's bytes of the dims that are not 0 (an 8-byte element at most) do."""
    dims = [d.size for d in proto.tensor_shape.dim]
    running = [math.prod(dims[: i + 1]) for i in range(len(dims))]
    nonzero = 8 * math.prod(d for d in dims if d)
    return max(running, default=1) > 2**63 - 1 or nonzero > 2**63 - 1


def nested_lists(proto) -> int:
    """Python lists in .tolist() of the proto's shape: one a row of each dimension but the last."""
    dims = [d.size for d in proto.tensor_shape.dim]
    return sum(math.prod(dims[:i]) for i in range(len(dims)))


def sizes(value) -> tuple[int, int]:
    """(elements, bytes of the strings among them) of a decoded output."""
    array = np.asarray(value, dtype=object).ravel()
    return array.size, sum(len(v) for v in array if isinstance(v, bytes))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), tensor_protos(), max_size=3))
def test_an_answer_is_decoded_only_within_the_limit(protos):
    response = predict_pb2.PredictResponse()
    for name, proto in protos.items():
        response.outputs[name].CopyFrom(proto)
    declared = [math.prod(d.size for d in p.tensor_shape.dim) for p in protos.values()]
    try:
        outputs = answer_outputs(response, LIMIT)
    except AnswerTooLarge as err:
        assert err.limit == LIMIT
        # Refused only past the limit: an element costs at most 256 + 64 bytes (a string of up
        # to 64 bytes), a list .tolist() would make 64.
        lists = sum(nested_lists(p) for p in protos.values())
        assert sum(declared) * (256 + 64) + lists * 64 > LIMIT, (declared, lists)
        return
    except ServerUnavailable:  # a shape TensorShape or NumPy refuses
        assert any(overflows(p) for p in protos.values()), protos
        return
    assert set(outputs) == set(protos)
    if not outputs:
        return
    elements, string_bytes = map(sum, zip(*(sizes(v) for v in outputs.values()), strict=True))
    assert elements <= LIMIT // 4 and string_bytes <= LIMIT
    for name, count in zip(protos, declared, strict=True):
        assert sizes(outputs[name])[0] == count


def test_an_output_that_is_not_a_tensor_is_not_a_model_servers():
    response = predict_pb2.PredictResponse()
    response.outputs["top_k_scores"].CopyFrom(tensor_pb2.TensorProto(dtype=types_pb2.DT_INVALID))
    with pytest.raises(ServerUnavailable, match="not a model server: an output is not a tensor"):
        answer_outputs(response, LIMIT)
