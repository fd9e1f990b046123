"""Hostile REST requests against a real server on loopback: bodies that would expand into
gigabytes, deadlines that must stop the work, text that is not valid UTF-8, tensors deeper than
NumPy allows, gzip bodies and bombs, keep-alive connections. Never a 500, always bounded work."""

from __future__ import annotations

import concurrent.futures
import gzip
import http.client
import json
import os
import time

import pytest

from serving import rest_json, testing
from serving.server import ANY_PORT, ModelServer, ServerOptions

LIMIT = 16 << 20  # --max_message_bytes of the test server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = testing.export_test_models(str(tmp_path_factory.mktemp("hostile")))
    options = ServerOptions(model_config_file=config, port=0, rest_api_port=ANY_PORT,
                            max_message_bytes=LIMIT, rest_api_timeout_in_ms=1500)  # fmt: skip
    with ModelServer(options) as running:
        yield running


def post(server, path: str, body: bytes, headers=None) -> tuple[int, dict]:
    """(status, JSON answer) of one POST over a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=60)
    try:
        connection.request("POST", path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


PREDICT = "/v1/models/numbers:predict"
REGRESS = "/v1/models/numbers:regress"


def test_a_body_that_would_expand_past_the_budget_is_refused_before_parsing(server):
    body = b'{"instances": [' + b"[]," * 5_500_000 + b"[]]}"  # 16 MB of empty lists
    started = time.monotonic()
    status, answer = post(server, PREDICT, body)
    assert status == 400 and f"limit of {rest_json.MAX_JSON_UNITS}" in answer["error"]
    assert time.monotonic() - started < 5


def test_examples_sharing_a_context_past_the_budget_are_refused_as_over_grpc(server):
    # A 0.9 MB context in each of 1,000 examples is 0.9 GB of tensor: before, a 200 after the
    # server grew by 1.5 GB (gRPC refused the same request).
    body = json.dumps({"context": {"pad": "x" * 900_000}, "examples": [{}] * 1000}).encode()
    assert len(body) < LIMIT
    status, answer = post(server, REGRESS, body)
    assert status == 400
    assert answer["error"].startswith("Input examples: 1000 examples each merged with a 9000")
    assert answer["error"].endswith(
        f"more than the {LIMIT} bytes this server decodes per request (--max_message_bytes)"
    )


def test_the_deadline_stops_the_work_and_frees_the_parsing_slots(server):
    # Each body is within the budget but takes seconds to convert: the answer is a 504 at the
    # deadline, and the conversion stops between blocks instead of finishing in the background.
    rows = b"[0.5, 0.25]," * 650_000
    body = (
        b'{"instances": [' + b'{"x": [0.5, 0.25], "k": 1},' * 400_000 + b'{"x": [1, 2], "k": 1}]}'
    )
    assert len(rows) and len(body) < LIMIT
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: post(server, PREDICT, body), range(4)))
    assert {status for status, _ in answers} <= {200, 504}, answers
    assert any(status == 504 for status, _ in answers)
    slots = server._rest_app._parse_slots
    deadline = time.monotonic() + 3
    while slots._value != (os.cpu_count() or 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slots._value == (os.cpu_count() or 1), "parsing went on after the deadline"
    status, answer = post(server, PREDICT, b'{"instances": [{"x": [1, 2], "k": 3}]}')
    assert status == 200 and answer == {
        "predictions": [{"total": 6.0, "labels_bytes": {"b64": "Mw=="}}]
    }


@pytest.mark.parametrize("literal", [b"-Inf", b"Inf", b"-NaN"])
def test_a_rapidjson_only_literal_costs_what_the_same_body_costs_without_it(server, literal):
    """One Inf, -Inf or -NaN (RapidJSON accepts them, Python's json does not) sent the rest of a
    13 MB body through a scanner in Python: 30 s and a 504, holding a parse slot. Now the body
    is retried by the C parser with the literal spelled as Python's json spells it."""
    ones = b"1," * 3_000_000  # 6 MB of numbers after the literal, within LIMIT
    plain = b'{"signature_name": "regress", "instances": [1,' + ones + b"1]}"
    spiked = b'{"signature_name": "regress", "instances": [' + literal + b"," + ones + b"1]}"
    timings = {}
    for name, body in (("plain", plain), ("spiked", spiked), ("plain again", plain)):
        started = time.monotonic()
        timings[name] = (post(server, PREDICT, body), time.monotonic() - started)
    (plain_answer, *_), (spiked_answer, spiked_time) = timings["plain"], timings["spiked"]
    assert spiked_answer[0] == plain_answer[0] != 504, timings
    baseline = min(timings["plain"][1], timings["plain again"][1])
    assert spiked_time < 3 * baseline + 0.2, timings  # before: 14 s here (a 504 at 1.5 s)


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b'{"signature_name": "\\ud800", "instances": [1]}', 400,
         "JSON Parse error: The surrogate pair in string is invalid. at offset: 20"),
        (b'{"signature_name": "\xff", "instances": [1]}', 400,
         'Serving signature name: "\ufffd" not found in signature def'),
        (b'{"signature_name": "\\udc80", "instances": [1]}', 400,
         'Serving signature name: "\ufffd" not found in signature def'),
    ],
)  # fmt: skip
def test_text_that_is_not_unicode_never_reaches_a_lookup(server, body, status, error):
    assert post(server, PREDICT, body) == (status, {"error": error})


@pytest.mark.parametrize("name", [b"\\udc80", b"\xff", b"\\ud83d\\ude00", b"\xc3\xa9"])
def test_any_feature_name_is_kept_as_bytes_in_the_example(server, name):
    body = b'{"signature_name": "regress", "examples": [{"x": [1.5, 2.0], "%s": 7}]}' % name
    assert post(server, REGRESS, body) == (200, {"results": [3.5]})


def test_the_last_of_duplicate_feature_names_wins_inside_examples(server):
    body = (b'{"signature_name": "regress", "signature_name": "nope", "context": {"x": [100.0]},'
            b' "examples": [{"x": [1.0], "x": [2.0, 3.5]}, {"y": 1}]}')  # fmt: skip
    assert post(server, REGRESS, body) == (200, {"results": [5.5, 100.0]})


def nested(depth: int, leaf="1.0") -> bytes:
    return b"[" * depth + leaf.encode() + b"]" * depth


@pytest.mark.parametrize(
    ("body", "rank"),
    [(b'{"inputs": {"x": %s, "k": [1]}}' % nested(33), 33),
     (b'{"instances": [{"x": %s, "k": 1}]}' % nested(32), 33),
     (b'{"inputs": {"x": %s, "k": [1]}}' % nested(254), 254),
     (b'{"inputs": {"x": %s, "k": [1]}}' % nested(300), 300)],
)  # fmt: skip
def test_tensors_deeper_than_numpy_allows_get_a_400_naming_the_limit(server, body, rank):
    status, answer = post(server, PREDICT, body)
    assert status == 400 and "at most 32 dimensions" in answer["error"], answer


def test_a_byte_order_mark_is_skipped(server):
    body = b'\xef\xbb\xbf{"instances": [{"x": [1, 2], "k": 3}]}'
    assert post(server, PREDICT, body)[0] == 200


def test_gzip_bodies_are_decompressed_within_the_body_limit(server):
    body = b'{"instances": [{"x": [1, 2], "k": 3}]}'
    gzipped = {"Content-Encoding": "gzip"}
    assert post(server, PREDICT, gzip.compress(body), gzipped)[0] == 200
    bomb = gzip.compress(b" " * (LIMIT + 1) + body, compresslevel=9)  # ~8 KB
    status, answer = post(server, PREDICT, bomb, gzipped)
    assert status == 413 and "once decompressed" in answer["error"]
    # TF Serving reads a body it cannot gunzip as empty.
    assert post(server, PREDICT, body, gzipped) == (
        400, {"error": "JSON Parse error: The document is empty"})  # fmt: skip


def test_keep_alive_requests_are_answered_in_one_write_each(server):
    writes: list[int] = []

    http_server = server._http_server
    base = http_server.RequestHandlerClass

    class Counting(base):
        def setup(self):
            super().setup()
            raw = self.wfile

            class Writer:
                def write(self, data):
                    writes.append(len(data))
                    return raw.write(data)

                def flush(self):
                    raw.flush()

                @property
                def closed(self):
                    return raw.closed

                def close(self):
                    raw.close()

            self.wfile = Writer()

    assert base.disable_nagle_algorithm
    http_server.RequestHandlerClass = Counting
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
        body = b'{"instances": [{"x": [1, 2], "k": 3}]}'
        for _ in range(5):
            connection.request("POST", PREDICT, body=body)
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())["predictions"]
        connection.request("POST", PREDICT, body=b"{")
        response = connection.getresponse()
        assert response.status == 400 and response.read()
        connection.close()
    finally:
        http_server.RequestHandlerClass = base
    assert len(writes) == 6, writes  # headers and body together, once per answer


# An object repeating a key: RapidJSON keeps every member. FindMember (a key looked up) finds the
# first; MemberCount() and iterating the object (GetObject()) see them all (util/json_tensor.cc).
_B64_TWICE = '{"b64": "AQ==", "b64": "Ag=="}'
_B64_TWICE_TEXT = '{\n    "b64": "AQ==",\n    "b64": "Ag=="\n}'


@pytest.mark.parametrize(
    ("body", "status", "answer"),
    [
        # IsValBase64Object wants MemberCount() == 1: an instance object, whose key is no input.
        ('{"signature_name": "regress", "instances": [' + _B64_TWICE + ']}', 400,
         {"error": "Failed to process element: 0 key: b64 of 'instances' list. Error: "
                   "INVALID_ARGUMENT: JSON object: does not have named input: b64"}),
        # FillTensorMapFromInputsMap: an object, not base64, so its inputs are looked up in it.
        ('{"signature_name": "regress", "inputs": ' + _B64_TWICE + '}', 400,
         {"error": "Missing named input: inputs in 'inputs' object."}),
        # A string value that is not base64 (JsonDecodeBase64Object's Base64FormatError).
        ('{"signature_name": "regress", "inputs": [' + _B64_TWICE + ']}', 400,
         {"error": f"JSON Value: {_B64_TWICE_TEXT} not formatted correctly for base64 data"}),
        ('{"signature_name": "regress", "instances": ["AQ==", ' + _B64_TWICE + ']}', 400,
         {"error": "Expecting value/list but got object at item 1 of input list"}),
        # AddValueToFeature: an object that is not base64.
        ('{"signature_name": "regress", "examples": [{"x": [' + _B64_TWICE + ']}]}', 400,
         {"error": "Feature: x has element with unexpected JSON type: Object"}),
        # FillTensorMapFromInstancesList adds every member: x gets 3 rows for 2 instances, and
        # Tensor::FromProto reads the first 2 x 2 values (FromProtoField): [[1,2],[3,4]].
        ('{"instances": [{"x": [1, 2], "k": 1, "x": [3, 4]}, {"x": [5, 6], "k": 2}]}', 200,
         {"predictions": [{"total": 4.0, "labels_bytes": {"b64": "MQ=="}},
                          {"total": 9.0, "labels_bytes": {"b64": "Mg=="}}]}),
        # Each member is checked as an instance item (AddInstanceItem's size check).
        ('{"instances": [{"x": [1, 2], "k": 1, "x": [3, 4, 5]}]}', 400,
         {"error": "Failed to process element: 0 key: x of 'instances' list. Error: "
                   "INVALID_ARGUMENT: Expecting tensor size: 2 but got: 3"}),
        # Top-level keys are looked up (FindMember): the first one counts.
        ('{"instances": [{"x": [1, 2], "k": 1}], "instances": "no"}', 200,
         {"predictions": [{"total": 4.0, "labels_bytes": {"b64": "MQ=="}}]}),
        ('{"signature_name": "nope", "signature_name": "", "instances": [1]}', 400,
         {"error": 'Serving signature name: "nope" not found in signature def'}),
        ('{"instances": [], "instances": [1]}', 400,
         {"error": 'JSON Value: {\n    "instances": [],\n    "instances": [\n        1\n    ]\n}'
                   " No values in 'instances' array"}),
    ],
)  # fmt: skip
def test_repeated_keys_are_read_as_rapidjson_reads_them(server, body, status, answer):
    path = REGRESS if '"examples"' in body else PREDICT
    assert post(server, path, body.encode()) == (status, answer)
