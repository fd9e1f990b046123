"""Properties of the REST JSON rules (serving/rest_json.py, after TF Serving's json_tensor.cc):
any body gets a ServingError or a value, never another exception; the bulk conversion path
agrees with the element-by-element one that words TF Serving's errors."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from hypothesis import assume, event, given, settings
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


def absl_base64_unescape(text: str) -> bytes | None:
    """absl::Base64Unescape, character by character as escaping.cc describes it."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    bits, count, out, pads, padding = 0, 0, bytearray(), 0, False
    for char in text:
        if char in " \t\n\v\f\r":
            continue  # skipped anywhere
        if char in "=.":
            padding, pads = True, pads + 1
            continue
        if padding or char not in alphabet:
            return None  # data after padding, or outside the alphabet
        bits, count = bits << 6 | alphabet.index(char), count + 1
        if count % 4 == 0:
            out += bits.to_bytes(3, "big")
            bits = 0
    left = count % 4
    if left == 1:
        return None
    expected = {0: 0, 2: 2, 3: 1}[left]
    if pads and pads != expected:
        return None  # padding is optional, but if present it must be exact
    if left == 2:
        out.append(bits >> 4)
    elif left == 3:
        out += (bits >> 2).to_bytes(2, "big")
    return bytes(out)


b64_text = st.one_of(
    st.binary(max_size=12).map(lambda b: base64.b64encode(b).decode()),
    st.text(alphabet="QUJDaGk+/=. \n\t\r\v\f-_!é", max_size=16),
)


@settings(max_examples=1000, deadline=None)
@given(b64_text, st.binary(max_size=9))
def test_base64_follows_absl_rules(text, data):
    assert rest_json.base64_unescape(text) == absl_base64_unescape(text)
    wrapped = base64.encodebytes(data).decode()  # MIME line breaks
    assert rest_json.base64_unescape(wrapped) == data
    assert rest_json.base64_unescape(base64.b64encode(data).decode().rstrip("=")) == data


@pytest.mark.parametrize(
    ("text", "ok"),
    [("QQ==", True), ("QQ", True), ("QQ=", False), ("QQ..", True), ("QUI=", True), ("QUI", True),
     ("QUJD", True), ("QUJD=", False), ("Q", False), ("Q Q\n==", True), ("QQ==QQ==", False),
     ("QQ=\n=", True), ("-_", False)],
)  # fmt: skip
def test_base64_examples(text, ok):
    assert (rest_json.base64_unescape(text) is not None) == ok


# Answers of RapidJSON v1.1.0 (json_tensor.cc's ParseJson: kParseNanAndInfFlag, UTF-8 BOM skip).
RAPIDJSON_ERRORS = {
    b'{"a":1': "Missing a comma or '}' after an object member. at offset: 6",
    b"[1,2": "Missing a comma or ']' after an array element. at offset: 4",
    b"1.": "Miss fraction part in number. at offset: 2",
    b"1e": "Miss exponent in number. at offset: 2",
    b"   ": "The document is empty. at offset: 3",
    b"\xef\xbb": "The document is empty. at offset: 2",
    b"tru": "Invalid value. at offset: 3",
    b'"abc': "Missing a closing quotation mark in string. at offset: 4",
    b'"\\u12"': "Incorrect hex digit after \\u escape in string. at offset: 1",
    b'{"a":"\\ud800"}': "The surrogate pair in string is invalid. at offset: 6",
    b'{"a":"\\ud800\\u0041"}': "The surrogate pair in string is invalid. at offset: 6",
    b'{"a":Infin}': "Invalid value. at offset: 10",
    b'{"a" 1}': "Missing a colon after a name of object member. at offset: 5",
    b"{1:2}": "Missing a name for object member. at offset: 1",
    b'{"a":1,}': "Missing a name for object member. at offset: 7",
    b"[1,]": "Invalid value. at offset: 3",
    b'"\\x"': "Invalid escape character in string. at offset: 1",
    b"[1,1e400]": "Number too big to be stored in double. at offset: 3",
    b"[0e400]": "Number too big to be stored in double. at offset: 1",
    b"[1,0.0e400]": "Number too big to be stored in double. at offset: 3",
    b"[-0e4000000000000000000000]": "Number too big to be stored in double. at offset: 1",
    b"[2" + b"0" * 308 + b"]": "Number too big to be stored in double. at offset: 1",
    b'{"a":"1e400","b":1e400}': "Number too big to be stored in double. at offset: 17",
    b"[-]": "Invalid value. at offset: 2",
    b"01": "The document root must not be followed by other values. at offset: 1",
    b'"a\tb"': "Invalid escape character in string. at offset: 2",
    b'"a\x00b"': "Missing a closing quotation mark in string. at offset: 2",
    b'\xef\xbb\xbf{"a":1': "Missing a comma or '}' after an object member. at offset: 9",
    b'{"a":[{"b":1} 2]}': "Missing a comma or ']' after an array element. at offset: 14",
    b'{"x":"[,{\\"", "y":[1,2,}': "Invalid value. at offset: 23",
}
RAPIDJSON_ACCEPTS = [b'{"a":"\\udc80"}', b'{"a":[Infinity,-Infinity,Inf,-Inf,NaN,-NaN]}',
                     b'{"a":1}\x00xx', b'\xef\xbb\xbf{"a":1}', b"\xbf{}", b'{"a":[0.0e309, 2e308, 1e-400]}',
                     b'{"a":1' + b"0" * 308 + b"}"]  # fmt: skip


@pytest.mark.parametrize(("body", "error"), RAPIDJSON_ERRORS.items())
def test_parse_errors_are_rapidjsons(body, error):
    with pytest.raises(ServingError) as refusal:
        rest_json.parse_json(body)
    assert refusal.value.message == f"JSON Parse error: {error}"


@pytest.mark.parametrize("body", RAPIDJSON_ACCEPTS)
def test_what_rapidjson_accepts_parses(body):
    rest_json.parse_json(body)


# RapidJSON v1.1.0's own answers (reader.h compiled with json_tensor.cc's flags, 2026-12-05):
# "too big" depends on the digits it counts, not on the value. The rule also agreed with it on
# 60,000 random literals.
RAPIDJSON_TOO_BIG = [
    ("0e400", True), ("0E+400", True), ("-0e309", True), ("0e308", False), ("0.0e309", False),
    ("0.0e310", True), ("0.00e310", False), ("1e308", False), ("1e309", True), ("9e308", False),
    ("2e308", False), ("1.5e308", False), ("1.0e309", False), ("1.00000000000000000e325", False),
    ("1.000000000000000000e326", True), ("0.00000000000000000001e328", False),
    ("0.00000000000000000001e329", True), ("123456789012345678901e300", False),
    ("123456789012345678901.5e308", False), ("123456789012345678901.5e309", True),
    ("-18446744073709551616e308", False), ("1e0309", True), ("1e00000000000000000308", False),
    ("1e-400", False), ("1e-99999999999", False), ("0.1e309", False), ("0.1e310", True),
    ("12345678901234567.8e309", False), ("1234567890123456.78e310", False),
    ("1234567890123456.78e311", True), ("2" + "0" * 308, True), ("1" + "0" * 308, False),
]  # fmt: skip


@pytest.mark.parametrize(("literal", "too_big"), RAPIDJSON_TOO_BIG)
def test_too_big_numbers_are_rapidjsons(literal, too_big):
    assert rest_json._too_big(literal) == too_big


def test_a_number_rapidjson_reads_as_infinite_is_infinite():
    assert rest_json.parse_json(b'{"a": [2e308, -1.0e309]}')["a"] == [np.inf, -np.inf]


number_literals = st.builds(
    lambda sign, integer, zeros, digits, exponent: sign + integer
    + (f".{'0' * zeros}{digits}" if zeros or digits else "") + exponent,
    st.sampled_from(["", "-"]),
    st.one_of(st.just("0"), st.integers(1, 10**25).map(str),
              st.integers(300, 320).map(lambda n: "1797693134862315" + "7" * (n - 16))),
    st.sampled_from([0, 0, 1, 17, 30, 400]),
    st.one_of(st.just(""), st.integers(0, 10**25).map(str)),
    st.one_of(st.just(""), st.builds(lambda e, sign, pad: f"e{sign}{str(e).zfill(pad)}",
                                     st.integers(0, 10**6), st.sampled_from(["", "+", "-"]),
                                     st.sampled_from([0, 8])))
)  # fmt: skip


@settings(max_examples=300)
@given(number_literals)
def test_a_number_is_refused_as_too_big_exactly_when_rapidjson_would(literal):
    # Through every path of parse_json: the scan for suspect literals, the value gate in
    # _parse_float, and the error offset.
    body = b'{"a": [' + literal.encode() + b"]}"
    if rest_json._too_big(literal):
        with pytest.raises(
            ServingError, match="Number too big to be stored in double. at offset: 7$"
        ):
            rest_json.parse_json(body)
    else:
        (value,) = rest_json.parse_json(body)["a"]
        assert value == (int(literal) if isinstance(value, int) else float(literal))


# RapidJSON's Inf, -Inf and -NaN anywhere a number may be: the C parser retries the body with
# them spelled as Python's json spells them, and agrees with the scanner (RapidJSON's reader,
# in Python: 30 s for a 13 MB body, the path taken before) on what it accepts and where it fails.
_SPECIAL = {b"Inf": np.inf, b"-Inf": -np.inf, b"-NaN": np.nan, b"NaN": np.nan,
            b"Infinity": np.inf, b"-Infinity": -np.inf}  # fmt: skip
_special_leaves = st.one_of(
    st.sampled_from(sorted(_SPECIAL)).map(lambda token: (token, _SPECIAL[token])),
    st.integers(-(10**6), 10**6).map(lambda n: (str(n).encode(), n)),
    st.sampled_from(["Inf", "-NaN", 'x"-Inf', "\\-Inf", "a,-Inf]"]).map(
        lambda text: (json.dumps(text).encode(), text)  # the same words inside strings
    ),
)
_special_docs = st.recursive(
    _special_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(
            lambda items: (b"[" + b",".join(t for t, _ in items) + b"]", [v for _, v in items])
        ),
        st.dictionaries(st.sampled_from(["a", "Inf", "-NaN"]), inner, max_size=3).map(
            lambda members: (
                b"{"
                + b",".join(json.dumps(k).encode() + b":" + t for k, (t, _) in members.items())
                + b"}",
                {k: v for k, (_, v) in members.items()},
            )  # fmt: skip
        ),
    ),
    max_leaves=12,
)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a):
        return bool(np.isnan(b))
    if isinstance(a, list | dict) or isinstance(b, list | dict):
        if type(a) is not type(b) or len(a) != len(b):
            return False
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b and type(a) is type(b)


@settings(max_examples=300, deadline=None)
@given(
    _special_docs,
    st.one_of(
        st.none(),
        st.tuples(st.sampled_from(["cut", "nul", "byte"]), st.integers(0, 10**6), st.binary(
            min_size=1, max_size=1)),
    ),
)  # fmt: skip
def test_rapidjson_literals_parse_as_the_scanner_reads_them(doc, mutation):
    text, value = doc
    body = b'{"instances":' + text + b"}"
    if mutation is not None:
        kind, at, byte = mutation
        at %= len(body) + 1
        body = {"cut": body[:at], "nul": body[:at] + b"\0" + body[at:],
                "byte": body[:at] + byte + body[at:]}[kind]  # fmt: skip
    assume(body)  # an empty body has TF Serving's own message (test_rest_hostile)
    expected = rest_json._scan(body, 0, from_start=True)  # RapidJSON's answer, token by token
    if expected is not None:
        with pytest.raises(ServingError) as refusal:
            rest_json.parse_json(body)
        reason, offset = expected
        assert refusal.value.message == f"JSON Parse error: {reason} at offset: {offset}"
        return
    try:
        parsed = rest_json.parse_json(body)
    except ServingError as refusal:  # accepted JSON that is not an object
        assert "Is not object" in refusal.message
        return
    if mutation is None:
        assert _same(parsed["instances"], value)


def test_the_scanner_stops_at_the_deadline():
    """What still scans in Python (locating an error) checks the REST deadline as it goes."""
    import time

    body = b'{"instances": [' + b"1," * 200_000 + b"1]}"
    assert rest_json._scan(body, 0, from_start=True) is None
    with pytest.raises(ServingError) as stopped:
        rest_json._scan(body, 0, from_start=True, deadline=time.monotonic() - 1)
    assert stopped.value.code.name == "DEADLINE_EXCEEDED"


# Row format with repeated keys: every member's values are added, in document order, and the
# tensor is the first count x shape of them (FillTensorMapFromInstancesList, FromProtoField).
_members = st.lists(
    st.one_of(
        st.tuples(st.just("x"), st.lists(st.integers(-9, 9), min_size=2, max_size=2)),
        st.tuples(st.just("k"), st.integers(-9, 9)),
    ),
    max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_members, min_size=1, max_size=4), st.integers(0, 1100))
def test_repeated_instance_keys_add_every_member(elements, plain):
    rows = [[("x", [1, 2]), ("k", 3), *extra] for extra in elements]
    rows += [[("k", 4), ("x", [5, 6])]] * plain  # past a block of 1024: read in bulk
    text = ",".join(
        "{" + ",".join(f'"{name}": {json.dumps(value)}' for name, value in row) + "}"
        for row in rows
    )
    doc = rest_json.parse_json(b'{"instances": [' + text.encode() + b"]}")
    arrays, _ = rest_json.predict_inputs(doc, {"x": "float32", "k": "int64"}, "")
    flat_x = [v for row in rows for name, value in row if name == "x" for v in value]
    flat_k = [value for row in rows for name, value in row if name == "k"]
    count = len(rows)
    assert (
        arrays["x"].tolist() == np.array(flat_x[: 2 * count], np.float32).reshape(count, 2).tolist()
    )
    assert arrays["k"].tolist() == flat_k[:count]
