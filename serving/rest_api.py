"""TF Serving's REST API (/v1/models/...) on the standard library's ThreadingHTTPServer."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf import json_format
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
)

from serving import handlers
from serving.errors import ServingError, invalid_argument
from serving.tensors import array_to_json, json_to_array, json_to_example

log = logging.getLogger(__name__)

_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?::(?P<verb>predict|classify|regress)|(?P<metadata>/metadata))?$"
)


class RestApp:
    """Routes REST calls to the shared handlers and formats answers like TF Serving."""

    def __init__(self, manager, metrics, timeout: float, metrics_path: str | None):
        self.manager = manager
        self.metrics = metrics
        self.timeout = timeout
        self.metrics_path = metrics_path
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=64)

    def handle(self, method: str, path: str, body: bytes | None) -> tuple[int, str, str]:
        """(HTTP status, content type, body) for one request."""
        if method == "GET" and self.metrics_path and path == self.metrics_path:
            return 200, "text/plain; version=0.0.4", self.metrics.render()
        match = _PATH.match(path)
        if not match or (method == "GET") != (match["verb"] is None):
            return _error(400, f"Malformed request: {method} {path}")
        spec = _model_spec(match)
        start, status = time.perf_counter(), "OK"
        try:
            if method == "GET":
                answer = self._metadata(spec) if match["metadata"] else self._status(spec)
            else:
                answer = self._with_deadline(self._post, match["verb"], spec, _parse_json(body))
            return 200, "application/json", json.dumps(answer)
        except ServingError as exc:
            status = exc.code.name
            return _error(exc.http_status, exc.message)
        except Exception as exc:  # a bug must answer 500, never take the server down
            log.exception("REST %s %s failed", method, path)
            status = "INTERNAL"
            return _error(500, f"{type(exc).__name__}: {exc}")
        finally:
            api = match["verb"] or ("metadata" if match["metadata"] else "status")
            self.metrics.record(spec.name, api, "REST", status, time.perf_counter() - start)

    def close(self) -> None:
        """Release the request threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _with_deadline(self, function, *args):
        # --rest_api_timeout_in_ms: answer DEADLINE_EXCEEDED (504) instead of holding the client;
        # the computation itself cannot be interrupted and finishes in the background.
        future = self._executor.submit(function, *args)
        try:
            return future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline exceeded") from None

    def _status(self, spec) -> dict:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.CopyFrom(spec)
        response = handlers.status(self.manager, request)
        return json_format.MessageToDict(
            response, including_default_value_fields=True, preserving_proto_field_name=True
        )

    def _metadata(self, spec) -> dict:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.CopyFrom(spec)
        response = handlers.metadata(self.manager, request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return {
            "model_spec": json_format.MessageToDict(
                response.model_spec,
                including_default_value_fields=True,
                preserving_proto_field_name=True,
            ),
            "metadata": {
                "signature_def": json_format.MessageToDict(
                    signature_map, preserving_proto_field_name=True
                )
            },
        }

    def _post(self, verb: str, spec, body: dict) -> dict:
        if verb == "regress":
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED, "Regress is not supported by van-tfx")
        servable = handlers.resolve(self.manager, spec)
        key = body.get("signature_name") or handlers.DEFAULT_SIGNATURE
        if not isinstance(key, str):
            raise invalid_argument("signature_name must be a string")
        if verb == "classify":
            return self._classify(servable, key, body)
        return self._predict(servable, key, body)

    def _predict(self, servable, key: str, body: dict) -> dict:
        signature = servable.signature_def(key)
        row_format = "instances" in body
        if row_format == ("inputs" in body):
            raise invalid_argument(
                "Missing 'inputs' or 'instances' key"
                if not row_format
                else "Not both 'inputs' and 'instances' keys may be set"
            )
        dtypes = _input_dtypes(signature)
        if row_format:
            inputs = _rows_to_inputs(body["instances"], dtypes)
        else:
            inputs = _columns_to_inputs(body["inputs"], dtypes)
        outputs = servable.run(key, inputs, (), self.timeout)
        if row_format:
            return {"predictions": _outputs_to_rows(outputs)}
        named = {name: array_to_json(value, name) for name, value in outputs.items()}
        return {"outputs": next(iter(named.values())) if len(named) == 1 else named}

    def _classify(self, servable, key: str, body: dict) -> dict:
        examples = body.get("examples")
        if not isinstance(examples, list):
            raise invalid_argument("'examples' must be a list of JSON objects")
        context = json_to_example(body.get("context", {}), "context")
        serialized = []
        for example in examples:
            merged = type(context)()
            merged.CopyFrom(context)
            merged.MergeFrom(json_to_example(example))
            serialized.append(merged.SerializeToString())
        rows = handlers.classify_examples(servable, key, serialized, self.timeout)
        return {"results": [[[label, score] for label, score in row] for row in rows]}


def _model_spec(match):
    spec = model_pb2.ModelSpec(name=match["name"])
    if match["version"] is not None:
        spec.version.value = int(match["version"])
    elif match["label"] is not None:
        spec.version_label = match["label"]
    return spec


def _parse_json(body: bytes | None) -> dict:
    try:
        parsed = json.loads(body or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid_argument(f"JSON Parse error: {exc}") from exc
    if not isinstance(parsed, dict):
        raise invalid_argument("JSON Value: request body must be a JSON object")
    return parsed


def _input_dtypes(signature) -> dict:
    import tensorflow as tf

    return {alias: tf.dtypes.as_dtype(info.dtype) for alias, info in signature.inputs.items()}


def _rows_to_inputs(instances, dtypes: dict) -> dict:
    if not isinstance(instances, list) or not instances:
        raise invalid_argument("'instances' must be a non-empty list")
    named = [isinstance(row, dict) and set(row) != {"b64"} for row in instances]
    if any(named) != all(named):
        raise invalid_argument("Instances must all be objects or all be values")
    if not named[0]:
        if len(dtypes) != 1:
            raise invalid_argument(f"Instances must be objects naming the inputs {sorted(dtypes)}")
        alias = next(iter(dtypes))
        return {alias: json_to_array(instances, dtypes[alias], alias)}
    columns = {}
    for alias in {k for row in instances for k in row}:
        if any(alias not in row for row in instances):
            raise invalid_argument(f"Every instance must set input {alias}")
        if alias not in dtypes:
            return {alias: None}  # let the signature check name the unknown alias
        columns[alias] = json_to_array([row[alias] for row in instances], dtypes[alias], alias)
    return columns


def _columns_to_inputs(inputs, dtypes: dict) -> dict:
    if isinstance(inputs, dict) and set(inputs) != {"b64"}:
        return {
            alias: json_to_array(value, dtypes[alias], alias) if alias in dtypes else None
            for alias, value in inputs.items()
        }
    if len(dtypes) != 1:
        raise invalid_argument(f"'inputs' must be an object naming the inputs {sorted(dtypes)}")
    alias = next(iter(dtypes))
    return {alias: json_to_array(inputs, dtypes[alias], alias)}


def _outputs_to_rows(outputs: dict) -> list:
    columns = {name: array_to_json(value, name) for name, value in outputs.items()}
    sizes = {len(v) if isinstance(v, list) else -1 for v in columns.values()}
    if len(sizes) != 1 or -1 in sizes:
        raise invalid_argument(
            "Tensor name: outputs have different 0th dimensions; use the 'inputs' (columnar) format"
        )
    if len(columns) == 1:
        return next(iter(columns.values()))
    rows = sizes.pop()
    return [{name: value[i] for name, value in columns.items()} for i in range(rows)]


def _error(status: int, message: str) -> tuple[int, str, str]:
    return status, "application/json", json.dumps({"error": message})


def make_http_server(
    app: RestApp, host: str, port: int, max_body_bytes: int
) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer answering TF Serving's REST API with `app`."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "van-tfx-serving"

        def do_GET(self):  # noqa: N802 (http.server naming)
            self._answer(*app.handle("GET", self.path.split("?")[0], None))

        def do_POST(self):  # noqa: N802
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if length < 0 or length > max_body_bytes:
                self.close_connection = True
                self._answer(
                    *_error(
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length > 0 else 400,
                        f"Request body must be 0..{max_body_bytes} bytes",
                    )
                )
                return
            body = self.rfile.read(length)
            self._answer(*app.handle("POST", self.path.split("?")[0], body))

        def _answer(self, status: int, content_type: str, text: str):
            payload = text.encode("utf-8")
            self.send_response(int(status))
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format, *args):  # noqa: A002 (http.server signature)
            log.debug("REST %s", format % args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server
