"""TF Serving's request semantics on protos, shared by the gRPC and REST front ends and warmup."""

from __future__ import annotations

import numpy as np
from google.protobuf import text_format
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
    regression_pb2,
)

from serving.errors import invalid_argument, missing_model_spec
from serving.grpc_wire import predict_inputs
from serving.servable import (
    DEFAULT_SIGNATURE,
    LIGHT_ELEMENTS,
    Servable,
    is_light,
    off_the_loop_unless,
)
from serving.tensors import check_examples_size, to_tensor_proto

CLASSIFY_METHOD_NAME = "tensorflow/serving/classify"
REGRESS_METHOD_NAME = "tensorflow/serving/regress"
REGRESS_OUTPUTS = "outputs"
CLASSIFY_INPUTS = "inputs"
CLASSIFY_CLASSES = "classes"
CLASSIFY_SCORES = "scores"


def model_spec_of(request):
    """The request's ModelSpec; INVALID_ARGUMENT "Missing ModelSpec" when it has none."""
    if not request.HasField("model_spec"):
        raise missing_model_spec()
    return request.model_spec


def resolve(manager, model_spec) -> Servable:
    """The servable a ModelSpec names (latest, a version, or a label)."""
    if not model_spec.name:  # ServerCore::ServableRequestFromModelSpec
        raise invalid_argument("ModelSpec has no name specified.")
    which = model_spec.WhichOneof("version_choice")
    version = model_spec.version.value if which == "version" else None
    label = model_spec.version_label if which == "version_label" else None
    return manager.resolve(model_spec.name, version=version, label=label)


def predict(manager, request, timeout: float | None = None):
    """Answer a PredictRequest."""
    return predict_on(resolve(manager, model_spec_of(request)), request, timeout)


async def predict_async(manager, request, executor=None, light: bool = True) -> bytes:
    """A serialized PredictResponse from an event loop; the model runs off the loop."""
    # So does everything proportional to the request's size, unless the request is `light`.
    servable = resolve(manager, model_spec_of(request))
    key = request.model_spec.signature_name or DEFAULT_SIGNATURE
    inputs = await off_the_loop_unless(light, executor, predict_inputs, request)
    # The TensorProtos are decoded by the servable, after the checks TF Serving makes first.
    outputs = await servable.run_async(key, inputs, request.output_filter, executor, light)
    light = light and is_light(outputs)
    return await off_the_loop_unless(light, executor, _serialized_predict, servable, key, outputs)


def _serialized_predict(servable: Servable, key: str, outputs: dict) -> bytes:
    return _predict_response(servable, key, outputs).SerializeToString()


def predict_on(servable: Servable, request, timeout: float | None = None):
    """Run a PredictRequest on one servable."""
    key = request.model_spec.signature_name or DEFAULT_SIGNATURE
    outputs = servable.run(key, dict(request.inputs), request.output_filter, timeout)
    return _predict_response(servable, key, outputs)


def _predict_response(servable: Servable, key: str, outputs: dict[str, np.ndarray]):
    response = predict_pb2.PredictResponse()
    _fill_spec(response.model_spec, servable, key)
    for alias, value in outputs.items():
        to_tensor_proto(value, response.outputs[alias], servable.tensor_content)
    return response


def classify(manager, request, timeout: float | None = None):
    """Answer a ClassificationRequest."""
    return classify_on(resolve(manager, model_spec_of(request)), request, timeout)


async def classify_async(manager, request, executor=None, light: bool = True) -> bytes:
    """A serialized ClassificationResponse from an event loop (as predict_async)."""
    servable = resolve(manager, model_spec_of(request))
    key = request.model_spec.signature_name or DEFAULT_SIGNATURE
    signature = classification_signature(servable, key)
    feed = await _examples_async(servable, request.input, executor, light)
    outputs = await servable.run_async(key, feed, (), executor, light)
    light = light and len(feed[CLASSIFY_INPUTS]) <= LIGHT_ELEMENTS
    return await off_the_loop_unless(
        light, executor, _serialized_classify, servable, key, signature, outputs, feed
    )


def _serialized_classify(servable: Servable, key: str, signature, outputs: dict, feed) -> bytes:
    rows = classification_rows(signature, outputs, len(feed[CLASSIFY_INPUTS]))
    return _classify_response(servable, key, rows).SerializeToString()


def classify_on(servable: Servable, request, timeout: float | None = None):
    """Classify serialized tf.Examples with a signature taking one string tensor."""
    key = request.model_spec.signature_name or DEFAULT_SIGNATURE
    examples = examples_of(request.input, servable.limits.max_tensor_bytes)
    classifications = classify_examples(servable, key, examples, timeout)
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
    signature = classification_signature(servable, key)
    outputs = servable.run(key, _classify_feed(examples), (), timeout)
    return classification_rows(signature, outputs, len(examples))


def _classify_feed(examples: list[bytes]) -> dict:
    if not examples:  # InputToSerializedExampleTensor (servables/tensorflow/util.cc)
        raise invalid_argument("Input is empty.")
    return {CLASSIFY_INPUTS: np.array(examples, dtype=object)}


def classification_signature(servable: Servable, key: str):
    """The classify signature `key`, after TF Serving's checks in its order (classifier.cc)."""
    signature = servable.signature_defs.get(key)
    if signature is None:  # GetClassificationSignatureDef: INVALID_ARGUMENT, not as in Predict
        raise invalid_argument(f"No signature was found with the name: {key}")
    check_classification_signature(signature, servable.method_name_check)
    return signature


def check_classification_signature(signature, method_name_check: bool = False) -> None:
    """Reject what TF Serving's PreProcessClassification rejects, in its order."""
    # The method name is checked only with --enable_signature_method_name_check (off by default in
    # TF Serving); then one input named `inputs`, one or two outputs, `classes` and/or `scores`.
    if method_name_check and signature.method_name != CLASSIFY_METHOD_NAME:
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
    if CLASSIFY_INPUTS not in signature.inputs:
        raise invalid_argument(
            f"No classification inputs found in SignatureDef: {_debug_string(signature)}"
        )
    if not {CLASSIFY_CLASSES, CLASSIFY_SCORES} & set(signature.outputs):
        raise invalid_argument(
            "Expected classification signature outputs to contain at least one of "
            f'"{CLASSIFY_CLASSES}" or "{CLASSIFY_SCORES}". Signature was: '
            f"{_debug_string(signature)}"
        )


def _debug_string(message) -> str:
    return text_format.MessageToString(message)


def classification_rows(signature, outputs: dict[str, np.ndarray], count: int) -> list:
    """[(label, score), ...] per example, checked as PostProcessClassificationResult does."""
    classes = outputs.get(CLASSIFY_CLASSES) if CLASSIFY_CLASSES in signature.outputs else None
    scores = outputs.get(CLASSIFY_SCORES) if CLASSIFY_SCORES in signature.outputs else None
    for name, value, dtype in (("classes", classes, "DT_STRING"), ("scores", scores, "DT_FLOAT")):
        if value is None:
            continue
        if value.ndim != 2:
            raise invalid_argument(
                "Expected Tensor shape: [batch_size num_classes] but got "
                f"[{','.join(map(str, value.shape))}]"
            )
        kind_ok = value.dtype == object if dtype == "DT_STRING" else value.dtype == np.float32
        if not kind_ok:
            raise invalid_argument(f"Expected {name} Tensor of {dtype}. Got: {_dtype_name(value)}")
        if value.shape[0] != count:
            raise invalid_argument(
                f"Expected {name} output batch size of {count}. Got: {value.shape[0]}"
            )
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise invalid_argument(
            "Tensors class and score should match in dim_size(1). Got "
            f"{classes.shape[1]} vs. {scores.shape[1]}"
        )
    reference = classes if classes is not None else scores
    width = reference.shape[1] if reference is not None else 0
    rows = []
    for i in range(count):
        # TF Serving leaves the missing half of each (label, score) pair empty.
        labels = [c.decode("utf-8", "replace") for c in classes[i]] if classes is not None else []
        values = [float(v) for v in scores[i]] if scores is not None else []
        rows.append(
            [(labels[j] if labels else "", values[j] if values else 0.0) for j in range(width)]
        )
    return rows


def _dtype_name(value: np.ndarray) -> str:
    """DataType_Name of an output's dtype ("DT_FLOAT")."""
    import tensorflow as tf
    from tensorflow.core.framework import types_pb2

    try:
        return types_pb2.DataType.Name(tf.dtypes.as_dtype(value.dtype).as_datatype_enum)
    except TypeError:
        return str(value.dtype)


def regress(manager, request, timeout: float | None = None):
    """Answer a RegressionRequest."""
    return regress_on(resolve(manager, model_spec_of(request)), request, timeout)


async def regress_async(manager, request, executor=None, light: bool = True) -> bytes:
    """A serialized RegressionResponse from an event loop (as predict_async)."""
    servable = resolve(manager, model_spec_of(request))
    key = request.model_spec.signature_name or DEFAULT_SIGNATURE
    regression_signature(servable, key)
    feed = await _examples_async(servable, request.input, executor, light)
    outputs = await servable.run_async(key, feed, (), executor, light)
    light = light and len(feed[CLASSIFY_INPUTS]) <= LIGHT_ELEMENTS
    return await off_the_loop_unless(
        light, executor, _serialized_regress, servable, key, outputs, feed
    )


def _serialized_regress(servable: Servable, key: str, outputs: dict, feed) -> bytes:
    values = regression_values(outputs, len(feed[CLASSIFY_INPUTS]))
    return _regress_response(servable, key, values).SerializeToString()


def regress_on(servable: Servable, request, timeout: float | None = None):
    """Run a RegressionRequest on one servable."""
    key = request.model_spec.signature_name or DEFAULT_SIGNATURE
    examples = examples_of(request.input, servable.limits.max_tensor_bytes)
    values = regress_examples(servable, key, examples, timeout)
    return _regress_response(servable, key, values)


def regress_examples(servable: Servable, key: str, examples: list[bytes], timeout=None):
    """One float per serialized example, with TF Serving's regression-signature rules."""
    regression_signature(servable, key)
    outputs = servable.run(key, _classify_feed(examples), (), timeout)
    return regression_values(outputs, len(examples))


def regression_signature(servable: Servable, key: str):
    """The regress signature `key`, after the checks of regressor.cc in its order."""
    signature = servable.signature_defs.get(key)
    if signature is None:
        raise invalid_argument(f"No signature was found with the name: {key}")
    if servable.method_name_check and signature.method_name != REGRESS_METHOD_NAME:
        raise invalid_argument(
            f"Expected regression signature method_name to be {REGRESS_METHOD_NAME}. "
            f"Was: {signature.method_name}"
        )
    if len(signature.inputs) != 1:
        raise invalid_argument("Expected one input Tensor.")
    if len(signature.outputs) != 1:
        raise invalid_argument("Expected one output Tensor.")
    for kind, names, name in (("inputs", signature.inputs, CLASSIFY_INPUTS),
                              ("outputs", signature.outputs, REGRESS_OUTPUTS)):  # fmt: skip
        if name not in names:
            raise invalid_argument(
                f"No regression {kind} found in SignatureDef: {_debug_string(signature)}"
            )
    return signature


def regression_values(outputs: dict[str, np.ndarray], count: int) -> list[float]:
    """The regressions, checked as PostProcessRegressionResult does."""
    value = outputs[REGRESS_OUTPUTS]
    if not (value.ndim == 1 or (value.ndim == 2 and value.shape[1] == 1)):
        raise invalid_argument(
            "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got "
            f"[{','.join(map(str, value.shape))}]"
        )
    if value.shape[0] != count:
        raise invalid_argument(
            f"Input batch size did not match output batch size: {count} vs. {value.shape[0]}"
        )
    if value.dtype != np.float32:
        raise invalid_argument(f"Expected output Tensor of DT_FLOAT.  Got: {_dtype_name(value)}")
    return [float(v) for v in value.ravel()]


def _regress_response(servable: Servable, key: str, values: list[float]):
    response = regression_pb2.RegressionResponse()
    _fill_spec(response.model_spec, servable, key)
    for value in values:
        response.result.regressions.add(value=value)
    return response


async def _examples_async(servable: Servable, input_proto, executor, light: bool) -> dict:
    limit = servable.limits.max_tensor_bytes
    return await off_the_loop_unless(light, executor, _examples_feed, input_proto, limit)


def _examples_feed(input_proto, limit: int) -> dict:
    return _classify_feed(examples_of(input_proto, limit))


def examples_of(input_proto, limit: int | None = None) -> list[bytes]:
    """Serialized tf.Examples of a tensorflow.serving.Input (context merged into each)."""
    # Refused when they would decode to more than `limit` bytes (the context is copied into every
    # one).
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        examples, context = input_proto.example_list.examples, None
    elif kind == "example_list_with_context":
        examples = input_proto.example_list_with_context.examples
        context = input_proto.example_list_with_context.context
    else:
        raise invalid_argument("Input is empty.")
    context_size = context.ByteSize() if context is not None else 0
    # The count alone may be too many already: ByteSize walks every example in one C call (GIL).
    check_examples_size(kind, len(examples), context_size, 0, limit)
    check_examples_size(kind, len(examples), context_size, input_proto.ByteSize(), limit)
    if context is None:
        return [e.SerializeToString() for e in examples]
    merged = []
    for example in examples:
        copy = type(example)()
        copy.CopyFrom(context)
        copy.MergeFrom(example)
        merged.append(copy.SerializeToString())
    return merged


def metadata(manager, request):
    """Answer a GetModelMetadataRequest (signature_def only, like TF Serving)."""
    model_spec_of(request)
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
    """Answer a GetModelStatusRequest, reporting all versions."""
    # A version label is ignored, as in get_model_status_impl.cc: all versions are reported.
    spec = model_spec_of(request)
    version = spec.version.value if spec.WhichOneof("version_choice") == "version" else None
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
