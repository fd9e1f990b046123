"""Client helpers over the stock TF Serving stubs (gRPC) and REST API, for the CLI and demos."""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_SIGNATURE = "predict_images"


@dataclasses.dataclass(frozen=True)
class ClassScore:
    """One of an image's top-k classes."""

    index: int
    synset: str
    score: float
    text: str = ""


class ServerUnavailable(ConnectionError):
    """No model server answered at the given address (nothing listens, or what answers is not a
    model server)."""


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


def prediction_stub(target: str):
    """A PredictionServiceStub on an insecure channel to host:port."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    return prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(target))


def predict_images(
    stub_or_target,
    images: list[bytes],
    model_name: str = "van",
    signature: str = DEFAULT_SIGNATURE,
    timeout: float = 30.0,
) -> list[list[ClassScore]]:
    """Top-k classes per encoded image through gRPC Predict."""
    import grpc
    import tensorflow as tf

    stub = prediction_stub(stub_or_target) if isinstance(stub_or_target, str) else stub_or_target
    request = predict_request(images, model_name, signature)
    try:
        response = stub.Predict(request, timeout=timeout)
    except grpc.RpcError as err:
        if _unreachable(err):
            raise ServerUnavailable(err.details()) from err
        raise PredictionError(err.code().name, err.details()) from err
    outputs = {name: tf.make_ndarray(proto).tolist() for name, proto in response.outputs.items()}
    return top_k_rows(outputs)


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
            answer = response.read()
    except urllib.error.HTTPError as err:
        raise PredictionError(str(err.code), _rest_error(err)) from err
    except urllib.error.URLError as err:
        raise ServerUnavailable(_reason(err.reason)) from err
    except TimeoutError as err:
        raise ServerUnavailable(f"no answer within {timeout:g} s") from err
    except (http.client.HTTPException, OSError) as err:  # not HTTP (a gRPC port), reset, ...
        raise ServerUnavailable(f"not an HTTP answer: {_reason(err)}") from err
    try:
        outputs = json.loads(answer)["outputs"]
        if not isinstance(outputs, dict):
            raise TypeError("outputs is not an object")
    except (ValueError, KeyError, TypeError) as err:
        raise ServerUnavailable(
            f'not a model server: its answer is not JSON with "outputs" ({_snippet(answer)})'
        ) from err
    try:
        return top_k_rows(outputs)
    except (TypeError, ValueError, IndexError, AttributeError) as err:
        raise ServerUnavailable(f"not a model server: unexpected outputs ({err})") from err


def _unreachable(err) -> bool:
    """True for a gRPC error made by the client itself: nothing to connect to, or no such host."""
    import grpc

    details = (err.details() or "").lower()
    return err.code() == grpc.StatusCode.UNAVAILABLE and any(
        word in details for word in ("connect", "resolv", "dns")
    )


def _reason(reason) -> str:
    if isinstance(reason, TimeoutError) or str(reason) == "timed out":
        return "no answer in time"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _snippet(body: bytes, limit: int = 80) -> str:
    text = body[:limit].decode("utf-8", "replace").replace("\n", " ")
    return repr(text + ("..." if len(body) > limit else ""))


def _rest_error(err) -> str:
    try:
        body = err.read()
    except (OSError, http.client.HTTPException):
        return str(err.reason)
    try:
        answer = json.loads(body)
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            return answer["error"]
    except ValueError:
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
