"""Client helpers over the stock TF Serving stubs (gRPC) and REST API, for the CLI and demos."""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request

from serving.limits import DEFAULT_MAX_MESSAGE_BYTES

DEFAULT_SIGNATURE = "predict_images"


@dataclasses.dataclass(frozen=True)
class ClassScore:
    """One of an image's top-k classes."""

    index: int
    synset: str
    score: float
    text: str = ""


class ServerUnavailable(ConnectionError):
    """No model server answered at the given address."""

    # Either nothing listens, or what answers is not a model server.


class WrongProtocol(ServerUnavailable):
    """What answered speaks the other API's protocol (HTTP/2 at --rest, HTTP/1 at gRPC)."""

    # Its own type so the CLI can say "the other port" instead of "start a server".


def checked_rest_url(url: str) -> str:
    """`url` if an http(s) URL with a host and valid port, else a ValueError saying why."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number in range)
    except ValueError as exc:
        raise ValueError(f"{url} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url} is not an http:// or https:// URL with a host")
    return url


class PredictionError(RuntimeError):
    """The server answered with an error status (the message is the server's)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AnswerTooLarge(RuntimeError):
    """The server answered with more than the client takes (--max-message-bytes)."""

    def __init__(self, what: str, limit: int):
        super().__init__(f"{what}, over the client's limit of {limit} bytes")
        self.limit = limit


def prediction_stub(target: str, max_answer_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
    """A PredictionServiceStub on an insecure channel to host:port."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    channel = grpc.insecure_channel(target, options=answer_limit_options(max_answer_bytes))
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def answer_limit_options(max_answer_bytes: int) -> list[tuple[str, int]]:
    """gRPC channel options that take answers up to `max_answer_bytes` (gRPC's default: 4 MiB)."""
    # A top-k answer grows with the images sent: at the 4 MiB default a legitimate answer to
    # ~15,000 small images was refused, while the request itself may be --max-message-bytes.
    return [("grpc.max_receive_message_length", max_answer_bytes)]


def predict_images(
    stub_or_target,
    images: list[bytes],
    model_name: str = "van",
    signature: str = DEFAULT_SIGNATURE,
    timeout: float = 30.0,
    max_answer_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[list[ClassScore]]:
    """Top-k classes per encoded image through gRPC Predict, within `timeout` seconds in all."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    request = predict_request(images, model_name, signature)
    started = time.monotonic()
    if isinstance(stub_or_target, str):
        options = answer_limit_options(max_answer_bytes)
        with grpc.insecure_channel(stub_or_target, options=options) as channel:
            # Connect first, on the same budget: a channel that never gets READY never sent the
            # request, so whatever the call would then report, no server answered it.
            connected = wait_for_connection(channel, timeout)
            if connected is None:
                raise ServerUnavailable(
                    f"no gRPC connection within {timeout:g} s: the TCP connection or the HTTP/2 "
                    "handshake never completed"
                )
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            response = _call_predict(stub, request, started, timeout, connected)
    else:  # a caller's stub: its channel's state is not ours to watch
        response = _call_predict(stub_or_target, request, started, timeout, None)
    return top_k_rows_of_answer(answer_outputs(response, max_answer_bytes))


# What a Python list costs, empty: .tolist() makes one for every row of each dimension but the
# last, so [10**7, 10**7, 0] holds no element and would still be 10**14 empty lists.
LIST_BYTES = 64


def nested_lists(shape: list[int]) -> int:
    """How many Python lists .tolist() makes for an array of `shape`."""
    lists = rows = 1 if shape else 0
    for size in shape[:-1]:
        rows *= size
        lists += rows
    return lists


def answer_outputs(response, max_answer_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> dict:
    """A PredictResponse's outputs as nested lists, each tensor's size checked before decoding."""
    from serving.errors import ServingError
    from serving.tensors import checked_shape, decoded_nbytes, from_tensor_proto

    # TF's rule that one value fills any shape lets a 30-byte answer declare [100000, 100000]
    # floats (40 GB once decoded): the declared sizes are bounded, as the server bounds requests.
    decoded, outputs = 0, {}
    try:
        for name, proto in response.outputs.items():
            shape = checked_shape(proto, name)
            decoded += decoded_nbytes(proto, shape, name) + LIST_BYTES * nested_lists(shape)
            if decoded > max_answer_bytes:
                raise AnswerTooLarge(
                    f"the answer's tensors decode to more than {max_answer_bytes} bytes "
                    f"(at output {name!r})",
                    max_answer_bytes,
                )
            outputs[name] = from_tensor_proto(proto, name).tolist()
    except ServingError as err:
        raise ServerUnavailable(f"not a model server: an output is not a tensor ({err})") from None
    return outputs


def _call_predict(stub, request, started: float, timeout: float, connected: bool | None):
    import grpc

    remaining = max(timeout - (time.monotonic() - started), 0.001)
    try:
        return stub.Predict(request, timeout=remaining)
    except grpc.RpcError as err:
        elapsed = time.monotonic() - started
        raise grpc_failure(err.code(), err.details(), elapsed, timeout, connected) from err


def _answer_too_large(details: str) -> AnswerTooLarge | None:
    """The client's own refusal of an answer over its receive limit, if `details` is one."""
    # gRPC 1.85: "Stream removed (CLIENT: Received message larger than max (5242880 vs.
    # 4194304))", code RESOURCE_EXHAUSTED: made up by this client, not sent by the server.
    match = re.search(r"CLIENT: Received message larger than max \((\d+) vs\. (\d+)\)", details)
    if match is None:
        return None
    size, limit = int(match.group(1)), int(match.group(2))
    return AnswerTooLarge(f"the answer is {size} bytes", limit)


def wait_for_connection(channel, timeout: float) -> bool | None:
    """True once `channel` is READY, False if connecting failed, None if neither in `timeout`."""
    import threading

    import grpc

    outcome: list[bool] = []
    settled = threading.Event()

    def on_state(state) -> None:
        # READY means the server's HTTP/2 SETTINGS arrived (gRPC waits for them), not just TCP.
        if state == grpc.ChannelConnectivity.READY:
            outcome.append(True)
            settled.set()
        elif state in (
            grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            grpc.ChannelConnectivity.SHUTDOWN,
        ):
            outcome.append(False)
            settled.set()

    channel.subscribe(on_state, try_to_connect=True)
    try:
        settled.wait(timeout)
    finally:
        channel.unsubscribe(on_state)
    return outcome[0] if outcome else None


# The status texts gRPC (core 1.85, pinned in uv.lock) makes up when no server status arrived.
# gRPC's Python API does not say where a status came from, so these are what we can go by; the
# tests in tests/test_serving_client.py pin each one against real sockets and servers.
# A stream that ended without the server's status (connection closed or reset, GOAWAY,
# RST_STREAM) is reported as "Stream removed (<why>)" (chttp2_transport.cc, removal_error).
STREAM_REMOVED = "Stream removed"
# A call on a channel that cannot connect fails at once with the last connection error.
NO_CONNECTION = "failed to connect to all addresses"
NO_ADDRESS = ("errors resolving", "dns resolution failed", "name resolution")
# gRPC's own timer may fire this much before our clock says the timeout passed (its deadline is
# computed from the wall clock, ours from the monotonic one).
DEADLINE_SLACK_SECONDS = 0.01


def grpc_failure(
    code, details: str | None, elapsed: float, timeout: float, connected: bool | None = None
) -> ServerUnavailable | PredictionError | AnswerTooLarge:
    """The error for a failed gRPC call: ServerUnavailable, AnswerTooLarge or PredictionError."""
    # ServerUnavailable for a gRPC call no server answered, AnswerTooLarge for an answer over the
    # client's limit, else the server's PredictionError.
    # `connected`: whether the channel was READY before the call (None: not known).
    import grpc

    details = details or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and (too_large := _answer_too_large(details)):
        return too_large
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and elapsed >= timeout - DEADLINE_SLACK_SECONDS:
        # Our own deadline. A server that sent this at our deadline was running on the deadline
        # we sent it: either way nothing answered within the timeout. Earlier, gRPC's timer
        # cannot have fired, so an earlier DEADLINE_EXCEEDED is the server's own answer.
        if connected is False:  # it failed to connect, then kept trying until the deadline
            return ServerUnavailable(f"could not connect within {timeout:g} s")
        return ServerUnavailable(f"no answer within {timeout:g} s")
    if details.startswith(STREAM_REMOVED):
        cause = details[len(STREAM_REMOVED) :].strip().removeprefix("(").removesuffix(")")
        if cause.startswith("RST_STREAM"):
            cause = cause.removeprefix("RST_STREAM").strip().removeprefix("(").removesuffix(")")
            return ServerUnavailable(f"the stream was reset before an answer: {cause}")
        return ServerUnavailable(f"the connection was lost before an answer: {cause}")
    lowered = details.lower()
    if code == grpc.StatusCode.UNAVAILABLE and (
        # A channel that failed to connect fails a call at once with UNAVAILABLE; any other
        # status means it connected after all, and that status is the server's.
        connected is False or lowered.startswith(NO_CONNECTION) or lowered.startswith(NO_ADDRESS)
    ):
        failure = _connect_failure(details)
        kind = WrongProtocol if failure.startswith(NOT_GRPC) else ServerUnavailable
        return kind(failure)
    return PredictionError(code.name, details)


NOT_GRPC = "not a gRPC server"


def _connect_failure(details: str) -> str:
    """What a failure to connect comes down to, without the address the CLI names already."""
    lowered = details.lower()
    if lowered.startswith(NO_ADDRESS):
        # "errors resolving h:p: [field:hostname lookup error:... for h:p: Domain name not found]"
        return f"cannot resolve the host: {_cause(details)}"
    cause = _cause(details)
    if "HTTP/2" in cause:  # what answers is not a gRPC server (a REST port, a web server)
        return f"{NOT_GRPC}: {cause}"
    return f"could not connect: {cause}"


def _cause(details: str) -> str:
    """The last reason in a gRPC error text, or the text as it is."""
    # "...; last error: UNKNOWN: ipv4:h:p: Failed to connect to remote host: Connection refused"
    text = details.split("; last error: ")[-1]
    text = re.sub(r"^[A-Z_]+: ", "", text)  # the status code of the last error
    text = re.sub(r"^(ipv4|ipv6|unix|dns):\S+: ", "", text)  # its address
    text = text.removeprefix("Failed to connect to remote host: ")
    if text.startswith(("errors resolving", "DNS resolution failed")):
        text = text.rstrip("]").rsplit(": ", 1)[-1]
    return text.strip() or details or "no reason given"


def predict_request(
    images: list[bytes], model_name: str = "van", signature: str = DEFAULT_SIGNATURE
):
    """A PredictRequest sending encoded images to the `images` input of `signature`."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(list(images), dtype=tf.string))
    return request


def predict_images_rest(
    url: str,
    images: list[bytes],
    model_name: str = "van",
    signature: str = DEFAULT_SIGNATURE,
    timeout: float = 30.0,
    max_answer_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[list[ClassScore]]:
    """Top-k classes per encoded image through REST :predict (columnar form)."""
    body = {
        "signature_name": signature,
        "inputs": {"images": [{"b64": base64.b64encode(i).decode("ascii")} for i in images]},
    }
    checked_rest_url(url)
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v1/models/{model_name}:predict",
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = response.read(max_answer_bytes + 1)  # no more than the limit is kept
    except urllib.error.HTTPError as err:
        raise PredictionError(str(err.code), _rest_error(err, max_answer_bytes)) from err
    except urllib.error.URLError as err:
        raise ServerUnavailable(_reason(err.reason)) from err
    except TimeoutError as err:
        raise ServerUnavailable(f"no answer within {timeout:g} s") from err
    except (http.client.HTTPException, OSError) as err:  # not HTTP (a gRPC port), reset, ...
        failure = _http_failure(err)
        kind = WrongProtocol if failure.startswith(SPEAKS_HTTP2) else ServerUnavailable
        raise kind(f"not an HTTP answer: {failure}") from err
    if len(answer) > max_answer_bytes:
        raise AnswerTooLarge(f"the answer is more than {max_answer_bytes} bytes", max_answer_bytes)
    try:
        outputs = json.loads(answer)["outputs"]
        if not isinstance(outputs, dict):
            raise TypeError("outputs is not an object")
    except (ValueError, KeyError, TypeError, RecursionError) as err:  # nested ~1,000 deep
        raise ServerUnavailable(
            f'not a model server: its answer is not JSON with "outputs" ({_snippet(answer)})'
        ) from err
    return top_k_rows_of_answer(outputs)


def top_k_rows_of_answer(outputs: dict) -> list[list[ClassScore]]:
    """top_k_rows of a server's decoded outputs; ServerUnavailable when they are not top-k."""
    try:
        return top_k_rows(outputs)
    except (TypeError, ValueError, IndexError, AttributeError) as err:
        raise ServerUnavailable(f"not a model server: unexpected outputs ({err})") from err


def _reason(reason) -> str:
    if isinstance(reason, TimeoutError) or str(reason) == "timed out":
        return "no answer in time"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


SPEAKS_HTTP2 = "it speaks HTTP/2"


def _http_failure(err: Exception) -> str:
    """Why an HTTP exchange failed, with a bad status line escaped."""
    # A gRPC port answers with binary HTTP/2 frames: http.client's status line then held NULs and
    # escape bytes that reached the terminal raw. RemoteDisconnected is a BadStatusLine too.
    if isinstance(err, http.client.BadStatusLine) and not isinstance(err, ConnectionError):
        # An HTTP/2 frame header (3-byte length, then type 4, SETTINGS) is how a gRPC server
        # greets: the user pointed --rest at the gRPC port.
        if err.line[:2] == "\x00\x00" and err.line[3:4] == "\x04":
            return f"{SPEAKS_HTTP2}, as a gRPC port does"
        return f"its status line is {_snippet(err.line.encode('latin-1', 'replace'))}"
    return _reason(err)


def _snippet(body: bytes, limit: int = 80) -> str:
    text = body[:limit].decode("utf-8", "replace").replace("\n", " ")
    return repr(text + ("..." if len(body) > limit else ""))


def _rest_error(err, max_answer_bytes: int) -> str:
    """The message of an HTTP error answer: its JSON "error", else its reason and first bytes."""
    try:
        body = err.read(max_answer_bytes + 1)  # an error body is held to the answer's limit
    except (OSError, http.client.HTTPException):
        return str(err.reason)
    try:
        answer = json.loads(body) if len(body) <= max_answer_bytes else None
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            return answer["error"]
    except (ValueError, RecursionError):
        pass
    return f"{err.reason}: {_snippet(body)}" if body else str(err.reason)


def top_k_rows(outputs: dict) -> list[list[ClassScore]]:
    """ClassScores from predict_images outputs (top_k_indices/synsets/scores, optional text)."""
    missing = {"top_k_indices", "top_k_synsets", "top_k_scores"} - set(outputs)
    if missing:
        raise PredictionError("INVALID_ARGUMENT", f"model outputs lack {sorted(missing)}")
    texts = outputs.get("top_k_text") or outputs.get("top_k_texts")
    rows = []
    for i, indices in enumerate(outputs["top_k_indices"]):
        rows.append(
            [
                ClassScore(
                    index=int(index),
                    synset=_text(outputs["top_k_synsets"][i][j]),
                    score=float(outputs["top_k_scores"][i][j]),
                    text=_text(texts[i][j]) if texts else "",
                )
                for j, index in enumerate(indices)
            ]
        )
    return rows


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
