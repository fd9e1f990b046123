"""TF Serving's REST API (/v1/models/...) on the standard library's http.server.

Routing and answers follow TF Serving 2.16.1: model_servers/http_server.cc (dispatch, status
codes), http_rest_api_util.cc (path regexes, URL decoding, version parsing) and
http_rest_api_handler.cc (the order in which a request is parsed, resolved and run); the JSON
rules are serving/rest_json.py's.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import re
import threading
import time
import urllib.parse

import grpc
from google.protobuf import json_format
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
)

from serving import handlers, http_body, rest_json
from serving.errors import ServingError, invalid_argument
from serving.http_connections import KeepAliveHandler, KeepAliveHTTPServer, TransferPace
from serving.limits import DEFAULT_REST_THREADS, MIN_BYTES_PER_SECOND

log = logging.getLogger(__name__)

# http_rest_api_util.cc: kPredictionApiGegex, kModelStatusApiRegex (RE2 FullMatch, (?i)), and
# http_rest_api_util.h: kHTTPRestApiHandlerPathRegex. The query string is part of the path they
# match, as in EvHTTPRequest::uri_path().
_PREDICTION_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE | re.ASCII,  # RE2's \d is [0-9]
)
_STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:\/(metadata))?",
    re.IGNORECASE | re.ASCII,
)
_API_PATH = re.compile(r"/v1/.*", re.IGNORECASE)
_INT64_MAX = 2**63 - 1
_WRITE_BYTES = 256 << 10  # each write of an answer's body (see _answer)
# libevent's evhttp_send_error page, which TF Serving sends for paths outside /v1/.
_NOT_FOUND_PAGE = "<HTML><HEAD>\n<TITLE>404 Not Found</TITLE>\n</HEAD><BODY>\n<H1>Not Found</H1>\n</BODY></HTML>\n"


class RestApp:
    """Routes REST calls to the shared handlers and formats answers like TF Serving."""

    def __init__(self, manager, metrics, timeout: float, metrics_path: str | None):
        self.manager = manager
        self.metrics = metrics
        self.timeout = timeout
        self.metrics_path = metrics_path
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=64)
        # Turning a body into tensors is CPU and memory bound (up to MAX_JSON_UNITS of Python
        # objects each): one at a time per core, so N concurrent bodies cannot exhaust memory.
        self._parse_slots = threading.BoundedSemaphore(os.cpu_count() or 1)

    def handle(
        self, method: str, target: str, body: bytes | None, headers=None
    ) -> tuple[int, str, str]:
        """(HTTP status, content type, body) for one request; `target` is path[?query]."""
        path = target.split("?", 1)[0].split("#", 1)[0]
        if self.metrics_path and path == self.metrics_path:
            return 200, self.metrics.content_type, self.metrics.render()
        if not _API_PATH.fullmatch(target):
            return 404, "text/html", _NOT_FOUND_PAGE
        if method == "OPTIONS":  # CORS preflight (http_server.cc)
            origin = (headers or {}).get("Origin", "")
            return (200, "text/plain", "") if re.search("https?://", origin) else (400, "", "")
        start, status, seen = time.perf_counter(), "OK", {"name": "", "api": ""}
        try:
            return 200, "application/json", self._dispatch(method, target, body or b"", seen)
        except ServingError as exc:
            status = exc.code.name
            return _error(exc.http_status, exc.message)
        except Exception as exc:  # a bug must answer 500, never take the server down
            log.exception("REST %s %s failed", method, target)
            status = "INTERNAL"
            return _error(500, f"{type(exc).__name__}: {exc}")
        finally:
            seconds = time.perf_counter() - start
            self.metrics.record(seen["name"], seen["api"], "REST", status, seconds)

    def close(self) -> None:
        """Release the request threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _dispatch(self, method: str, target: str, body: bytes, seen: dict) -> str:
        """The answer body; `seen` gets the model name and API for the metrics, once parsed."""
        # HttpRestApiHandler::ProcessRequest: anything that matches neither route is malformed.
        malformed = invalid_argument(f"Malformed request: {method} {target}")
        route = {"POST": _PREDICTION_PATH, "GET": _STATUS_PATH}.get(method)
        match = route.fullmatch(target) if route else None
        if match is None:
            raise malformed
        name, version, label, verb = match.groups()
        seen["name"] = urllib.parse.unquote(name or "")
        spec = _model_spec(name or "", version, label)
        if method == "POST":
            seen["api"] = verb  # http_server.cc records the method it parsed (none for GETs)
            if verb not in ("predict", "classify", "regress"):  # the regex is (?i); this is not
                raise malformed
            run = {"predict": self._predict, "classify": self._classify, "regress": self._regress}
            return self._with_deadline(run[verb], spec, body)
        if not spec.name:
            raise invalid_argument("Missing model name in request.")
        return self._metadata(spec) if verb == "metadata" else self._status(spec)

    def _with_deadline(self, function, *args):
        # --rest_api_timeout_in_ms: answer DEADLINE_EXCEEDED (504) instead of holding the client,
        # and stop the work too: a queued job is cancelled, a running one checks the deadline
        # between its steps (and the model call gets only the time left).
        deadline = time.monotonic() + self.timeout
        future = self._executor.submit(function, *args, deadline)
        try:
            return future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline exceeded") from None

    @contextlib.contextmanager
    def _parsing(self, deadline: float):
        """Hold a body-parsing slot, waited for until `deadline` at most."""
        rest_json.check_deadline(deadline)
        if not self._parse_slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline exceeded")
        try:
            yield
        finally:
            self._parse_slots.release()

    def _status(self, spec) -> str:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.CopyFrom(spec)
        response = handlers.status(self.manager, request)
        return json_format.MessageToJson(
            response, including_default_value_fields=True, preserving_proto_field_name=True
        )

    def _metadata(self, spec) -> str:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.CopyFrom(spec)
        response = handlers.metadata(self.manager, request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        answer = {
            "model_spec": json_format.MessageToDict(
                response.model_spec,
                including_default_value_fields=True,
                preserving_proto_field_name=True,
            ),
            "metadata": {
                "signature_def": json_format.MessageToDict(
                    signature_map,
                    including_default_value_fields=True,
                    preserving_proto_field_name=True,
                )
            },
        }
        return json.dumps(answer, indent=1)

    def _predict(self, spec, body: bytes, deadline: float) -> str:
        # ProcessPredictRequest: parse, then the signature's inputs (GetInfoMap resolves the
        # servable), then the tensors, then Predict.
        with self._parsing(deadline):
            doc = rest_json.parse_json(body, deadline=deadline)
            key = rest_json.signature_name(doc)
            servable = handlers.resolve(self.manager, spec)
            name = key or handlers.DEFAULT_SIGNATURE
            # Text that is not valid Unicode can name no signature (and must not reach protobuf).
            if not rest_json.is_text(name) or name not in servable.signature_defs:
                raise invalid_argument(
                    f'Serving signature name: "{rest_json.display(name)}" not found in '
                    "signature def"
                )
            dtypes = _input_dtypes(servable.signature_defs[name])
            inputs, form = rest_json.predict_inputs(doc, dtypes, key, deadline)
            del doc  # the parsed body can be several times its size: free it before the model
        outputs = servable.run(name, inputs, (), _time_left(deadline))
        return rest_json.predict_json(outputs, form)

    def _classify(self, spec, body: bytes, deadline: float) -> str:
        rows = self._on_examples(spec, body, handlers.classify_examples, deadline)
        return rest_json.classify_json(rows)

    def _regress(self, spec, body: bytes, deadline: float) -> str:
        values = self._on_examples(spec, body, handlers.regress_examples, deadline)
        return rest_json.regress_json(values)

    def _on_examples(self, spec, body: bytes, run, deadline: float):
        # ProcessClassifyRequest / ProcessRegressRequest: the whole body is read into
        # tf.Examples before the servable is looked up.
        with self._parsing(deadline):
            doc = rest_json.parse_json(body, deadline=deadline)
            key = rest_json.signature_name(doc) or handlers.DEFAULT_SIGNATURE
            limit = self.manager.limits.max_tensor_bytes
            examples = rest_json.classify_examples(doc, deadline, limit)
            del doc
        servable = handlers.resolve(self.manager, spec)
        if not rest_json.is_text(
            key
        ):  # no signature has such a name (GetClassificationSignatureDef's message)
            raise invalid_argument(
                f"No signature was found with the name: {rest_json.display(key)}"
            )
        return run(servable, key, examples, _time_left(deadline))


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline exceeded")
    return left


def _version_number(digits: str) -> int:
    """A path's version digits as absl::SimpleAtoi reads them into an int64, or INVALID_ARGUMENT."""
    # Leading zeros count for nothing; more than 19 digits can't fit (and int() of over 4,300
    # digits raises ValueError, which was a 500).
    significant = digits.lstrip("0") or "0"
    if len(significant) > 19 or int(significant) > _INT64_MAX:
        raise invalid_argument(f"Failed to convert version: {digits} to numeric.")
    return int(significant)


def _model_spec(name: str, version: str | None, label: str | None):
    # ParseModelInfo: the name and label are URL-decoded; the version must fit an int64.
    spec = model_pb2.ModelSpec(name=urllib.parse.unquote(name))
    if version is not None:
        spec.version.value = _version_number(version)
    elif label is not None:
        spec.version_label = urllib.parse.unquote(label)
    return spec


def _input_dtypes(signature) -> dict[str, str]:
    import tensorflow as tf

    return {alias: tf.dtypes.as_dtype(info.dtype).name for alias, info in signature.inputs.items()}


def _error(status: int, message: str) -> tuple[int, str, str]:
    # A message may quote request text that is not valid Unicode: it is shown as U+FFFD.
    message = rest_json.display(message)
    return status, "application/json", json.dumps({"error": message}, indent=4)


def make_http_server(
    app: RestApp,
    host: str,
    port: int,
    max_body_bytes: int,
    stall_seconds: float,
    num_threads: int = DEFAULT_REST_THREADS,
    max_idle: int | None = None,
    min_bytes_per_second: float = MIN_BYTES_PER_SECOND,
) -> KeepAliveHTTPServer:
    """An HTTP server answering TF Serving's REST API with `app`."""
    min_rate = min_bytes_per_second  # a class body can't read a parameter of its own name
    TransferPace(stall_seconds, min_rate)  # refuses a pace of 0 now, not on every request

    class Handler(KeepAliveHandler):
        protocol_version = "HTTP/1.1"
        timeout = stall_seconds
        min_bytes_per_second = min_rate
        server_version = "van-tfx-serving"
        # A keep-alive client's next request must not wait for a delayed ACK (Nagle): ~40 ms.
        disable_nagle_algorithm = True

        def _serve(self):
            body = self._read_body()
            if body is not None:
                self._answer(*app.handle(self.command, self.path, body, self.headers))

        # Every method reaches the API, as in TF Serving: those it does not serve get a 400
        # "Malformed request" in JSON there, not http.server's HTML 501.
        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _serve

        def do_HEAD(self):  # noqa: N802 (http.server naming)
            body = self._read_body()
            if body is not None:
                status, content_type, _ = app.handle("HEAD", self.path, body)
                self._answer(status, content_type, "", head=True)

        def _read_body(self) -> bytes | None:
            try:
                length = http_body.declared_length(self.headers, max_body_bytes)
                if length is None:
                    body = http_body.read_chunked(self.rfile, max_body_bytes)
                else:
                    body = self.rfile.read(length)
                if http_body.is_gzip(self.headers):
                    return http_body.gunzip(body, max_body_bytes)
                return body
            except http_body.BodyRefused as refused:
                self._refuse(refused)
                return None

        def handle_expect_100(self) -> bool:
            # curl asks before sending a body over 1 KB: refuse it then, before it is sent.
            try:
                http_body.declared_length(self.headers, max_body_bytes)
            except http_body.BodyRefused as refused:
                self._refuse(refused)
                return False
            return super().handle_expect_100()

        def _refuse(self, refused: http_body.BodyRefused):
            # The rest of the request is not read, so the connection can't carry another one.
            self.close_connection = self._body_left_unread = True
            self._answer(
                *_error(refused.status, refused.message),
                head=self.command == "HEAD",
                headers={"Connection": "close"},
            )

        def finish(self):
            super().finish()
            if getattr(self, "_body_left_unread", False):
                http_body.drop_unread_request_bytes(self.connection, http_body.LINGER_BYTES)

        def _answer(
            self, status: int, content_type: str, text: str, head: bool = False, headers=None
        ):
            payload = text.encode("utf-8")
            self.send_response(int(status))
            if content_type:
                self.send_header("Content-Type", content_type)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            # Headers and body in one write (end_headers() would send the headers alone): one
            # segment for a small answer, not two with the client's delayed ACK between them.
            # A large body goes in pieces: the stall timeout then bounds each write, so a client
            # that keeps reading a large answer slowly gets all of it, if not below the pace.
            body = memoryview(b"" if head else payload)
            pace = self.transfer_pace()
            self._headers_buffer.append(b"\r\n")
            self._headers_buffer.append(body[:_WRITE_BYTES])
            self.connection.settimeout(pace.wait())
            self.flush_headers()
            for start in range(_WRITE_BYTES, len(body), _WRITE_BYTES):
                pace.moved(_WRITE_BYTES)
                self.connection.settimeout(pace.wait())
                self.wfile.write(body[start : start + _WRITE_BYTES])
            self.connection.settimeout(self.timeout)

        def log_message(self, format, *args):  # noqa: A002 (http.server signature)
            log.debug("REST %s", format % args)

    return KeepAliveHTTPServer((host, port), Handler, max_threads=num_threads, max_idle=max_idle)
