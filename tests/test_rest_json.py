"""Properties of the REST JSON rules (serving/rest_json.py, after TF Serving's json_tensor.cc):
any body gets a ServingError or a value, never another exception; the bulk conversion path
agrees with the element-by-element one that words TF Serving's errors."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import event, given, settings
from hypothesis import strategies as st

from serving import rest_json
from serving.errors import ServingError

DTYPES = ["float32", "float64", "int32", "int8", "uint8", "int64", "uint64", "bool", "string",
          "float16"]  # fmt: skip
leaves = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(max_size=4),
    st.none(),
    st.just({"b64": "aGk="}),
    st.just({"b64": "!!"}),
    st.just({"x": 1}),
)
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4), max_leaves=30)
regular = st.integers(1, 3).flatmap(
    lambda width: st.lists(
        st.lists(st.integers(-300, 300), min_size=width, max_size=width), min_size=1, max_size=4
    )  # fmt: skip
)


def element_wise(value, dtype):
    shape = rest_json.dense_shape(value)
    return rest_json._as_array(rest_json.fill_values(value, shape, dtype), dtype).reshape(shape)


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from(DTYPES))
def test_any_json_value_converts_or_is_refused_and_both_paths_agree(value, dtype):
    try:
        expected = element_wise(value, dtype)
    except ServingError as refusal:
        expected = refusal
    try:
        got = rest_json.to_array(value, dtype)
    except ServingError as refusal:
        assert isinstance(expected, ServingError) and refusal.message == expected.message
        event("refused")
        return
    event("converted")
    assert not isinstance(expected, ServingError), expected.message
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=100, deadline=None)
@given(regular, st.sampled_from(["int32", "int8", "float32", "int64"]))
def test_regular_numeric_lists_take_the_bulk_path_with_the_same_result(rows, dtype):
    assert rest_json._regular_array(rows, rest_json.dense_shape(rows), dtype) is not None
    np.testing.assert_array_equal(rest_json.to_array(rows, dtype), element_wise(rows, dtype))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=64), json_values.map(lambda v: json.dumps(v).encode())))
def test_any_body_parses_or_gets_a_json_parse_error(body):
    try:
        doc = rest_json.parse_json(b'{"instances": ' + body + b"}")
    except ServingError as refusal:
        assert refusal.message.startswith(("JSON Parse error", "JSON Value")), refusal.message
        return
    assert isinstance(doc, dict) and "instances" in doc
