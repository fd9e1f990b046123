"""TF Serving's request semantics on protos, shared by the gRPC and REST front ends and warmup."""

from __future__ import annotations

import numpy as np
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
)

from serving.errors import invalid_argument
from serving.servable import DEFAULT_SIGNATURE, Servable
from serving.tensors import from_tensor_proto, to_tensor_proto

CLASSIFY_METHOD_NAME = "tensorflow/serving/classify"
CLASSIFY_CLASSES = "classes"
CLASSIFY_SCORES = "scores"


def resolve(manager, model_spec) -> Servable:
    """The servable a ModelSpec names (latest, a version, or a label)."""
    which = model_spec.WhichOneof("version_choice")
    version = model_spec.version.value if which == "version" else None
    label = model_spec.version_label if which == "version_label" else None
    return manager.resolve(model_spec.name, version=version, label=label)


def predict(manager, request, timeout: float | None = None):
    """Answer a PredictRequest."""
    return predict_on(resolve(manager, request.model_spec), request, timeout)


async def predict_async(manager, request, executor=None):
    """Answer a PredictRequest from an event loop (the model runs off the loop)."""
    servable = resolve(manager, request.model_spec)
    key, inputs = _predict_inputs(request)
    outputs = await servable.run_async(key, inputs, request.output_filter, executor)
    return _predict_response(servable, key, outputs)


def predict_on(servable: Servable, request, timeout: float | None = None):
    """Run a PredictRequest on one servable."""
    key, inputs = _predict_inputs(request)
    outputs = servable.run(key, inputs, request.output_filter, timeout)
    return _predict_response(servable, key, outputs)


def _predict_inputs(request) -> tuple[str, dict[str, np.ndarray]]:
    inputs = {alias: from_tensor_proto(proto) for alias, proto in request.inputs.items()}
    return request.model_spec.signature_name or DEFAULT_SIGNATURE, inputs


def _predict_response(servable: Servable, key: str, outputs: dict[str, np.ndarray]):
    response = predict_pb2.PredictResponse()
    _fill_spec(response.model_spec, servable, key)
    for alias, value in outputs.items():
        to_tensor_proto(value, into=response.outputs[alias])
    return response


def classify(manager, request, timeout: float | None = None):
    """Answer a ClassificationRequest."""
    return classify_on(resolve(manager, request.model_spec), request, timeout)


async def classify_async(manager, request, executor=None):
    """Answer a ClassificationRequest from an event loop (the model runs off the loop)."""
    servable = resolve(manager, request.model_spec)
    key = request.model_spec.signature_name or DEFAULT_SIGNATURE
    examples = examples_of(request.input)
    feed = classification_feed(servable, key, examples)
    outputs = await servable.run_async(key, feed, (), executor)
    return _classify_response(servable, key, classification_rows(outputs, len(examples)))


def classify_on(servable: Servable, request, timeout: float | None = None):
    """Classify serialized tf.Examples with a signature taking one string tensor."""
    key = request.model_spec.signature_name or DEFAULT_SIGNATURE
    classifications = classify_examples(servable, key, examples_of(request.input), timeout)
    return _classify_response(servable, key, classifications)


def _classify_response(servable: Servable, key: str, classifications: list):
    response = classification_pb2.ClassificationResponse()
    _fill_spec(response.model_spec, servable, key)
    for row in classifications:
        entry = response.result.classifications.add()
        for label, score in row:
            entry.classes.add(label=label, score=score)
    return response


def classify_examples(servable: Servable, key: str, examples: list[bytes], timeout=None):
    """[(label, score), ...] per serialized example, with TF Serving's classify-signature rules."""
    feed = classification_feed(servable, key, examples)
    return classification_rows(servable.run(key, feed, (), timeout), len(examples))


def classification_feed(servable: Servable, key: str, examples: list[bytes]) -> dict:
    """The classify signature's input for serialized examples, after TF Serving's checks."""
    signature = servable.signature_def(key)
    check_classification_signature(signature)
    if not examples:
        raise invalid_argument("Invalid argument: Input is empty.")
    return {next(iter(signature.inputs)): np.array(examples, dtype=object)}


def classification_rows(outputs: dict[str, np.ndarray], count: int) -> list:
    """[(label, score), ...] per example from a classify signature's classes/scores outputs."""
    scores, classes = outputs.get(CLASSIFY_SCORES), outputs.get(CLASSIFY_CLASSES)
    reference = scores if scores is not None else classes
    rows = []
    for i in range(count):
        width = reference[i].size
        labels = [c.decode("utf-8", "replace") for c in classes[i]] if classes is not None else []
        values = [float(v) for v in scores[i]] if scores is not None else []
        # TF Serving leaves the missing half of each (label, score) pair empty.
        rows.append(
            [(labels[j] if labels else "", values[j] if values else 0.0) for j in range(width)]
        )
    return rows


def check_classification_signature(signature) -> None:
    """Reject what TF Serving's classifier rejects (method name, one input, classes/scores)."""
    if signature.method_name != CLASSIFY_METHOD_NAME:
        raise invalid_argument(
            f"Expected classification signature method_name to be {CLASSIFY_METHOD_NAME}. "
            f"Was: {signature.method_name}"
        )
    if len(signature.inputs) != 1:
        raise invalid_argument("Expected one input Tensor.")
    if len(signature.outputs) not in (1, 2):
        raise invalid_argument(
            f"Expected one or two output Tensors, found {len(signature.outputs)}"
        )
    if not {CLASSIFY_CLASSES, CLASSIFY_SCORES} & set(signature.outputs):
        raise invalid_argument(
            f'Expected classification signature outputs to contain at least one of "'
            f'{CLASSIFY_CLASSES}" or "{CLASSIFY_SCORES}"'
        )


def examples_of(input_proto) -> list[bytes]:
    """Serialized tf.Examples of a tensorflow.serving.Input (context merged into each)."""
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        return [e.SerializeToString() for e in input_proto.example_list.examples]
    if kind == "example_list_with_context":
        with_context = input_proto.example_list_with_context
        merged = []
        for example in with_context.examples:
            copy = type(example)()
            copy.CopyFrom(with_context.context)
            copy.MergeFrom(example)
            merged.append(copy.SerializeToString())
        return merged
    raise invalid_argument("Invalid argument: Input is empty.")


def metadata(manager, request):
    """Answer a GetModelMetadataRequest (signature_def only, like TF Serving)."""
    fields = list(request.metadata_field)
    if not fields:
        raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
    for field in fields:
        if field != "signature_def":
            raise invalid_argument(f"Metadata field {field} is not supported")
    servable = resolve(manager, request.model_spec)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature in servable.signature_defs.items():
        signature_map.signature_def[key].CopyFrom(signature)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    response.metadata["signature_def"].Pack(signature_map)
    return response


def status(manager, request):
    """Answer a GetModelStatusRequest."""
    spec = request.model_spec
    which = spec.WhichOneof("version_choice")
    version = spec.version.value if which == "version" else None
    if which == "version_label":
        version = manager.label_version(spec.name, spec.version_label)
    response = get_model_status_pb2.GetModelStatusResponse()
    for entry in manager.status(spec.name, version):
        item = response.model_version_status.add(version=entry.version, state=entry.state)
        item.status.error_code = entry.error_code  # TF Serving always fills status (OK = 0)
        item.status.error_message = entry.error
        item.status.SetInParent()
    return response


def _fill_spec(spec, servable: Servable, key: str) -> None:
    spec.name = servable.name
    spec.version.value = servable.version
    spec.signature_name = key
