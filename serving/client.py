"""Client helpers over the stock TF Serving stubs (gRPC) and REST API, for the CLI and demos."""

from __future__ import annotations

import base64
import dataclasses
import json
import urllib.error
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
    """No model server answered at the given address."""


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
        if err.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (err.details() or "").lower():
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
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v1/models/{model_name}:predict",
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            outputs = json.loads(response.read())["outputs"]
    except urllib.error.HTTPError as err:
        raise PredictionError(str(err.code), _rest_error(err)) from err
    except urllib.error.URLError as err:
        raise ServerUnavailable(str(err.reason)) from err
    return top_k_rows(outputs)


def _rest_error(err) -> str:
    try:
        return json.loads(err.read())["error"]
    except (ValueError, KeyError):
        return err.reason


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
