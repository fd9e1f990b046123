"""Tensors between wire formats: TensorProto <-> numpy, and TF Serving's REST JSON <-> numpy."""

from __future__ import annotations

import base64
import binascii
import functools
import math

import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2

from serving.errors import invalid_argument

# Requests carry encoded images and responses a few small tensors. tf.make_ndarray and
# tf.make_tensor_proto are generic (20-30 us a call, more than the rest of a request's Python
# work); these paths do the same conversion for strings and plain numeric arrays directly and
# hand everything else to TensorFlow.


def from_tensor_proto(proto) -> np.ndarray:
    """A numpy array from a TensorProto (strings become an object array of bytes)."""
    import tensorflow as tf

    if proto.dtype == types_pb2.DT_STRING and not proto.tensor_content:
        shape = [d.size for d in proto.tensor_shape.dim]
        if len(proto.string_val) == math.prod(shape):  # else: TF's rules (e.g. broadcasting)
            array = np.empty(len(proto.string_val), dtype=object)
            array[:] = list(proto.string_val)
            return array.reshape(shape)
    try:
        return tf.make_ndarray(proto)
    except (TypeError, ValueError) as exc:
        raise invalid_argument(f"Invalid tensor proto: {exc}") from exc


def to_tensor_proto(value: np.ndarray, into=None):
    """A TensorProto from a numpy array (filled in place when `into` is given)."""
    proto = tensor_pb2.TensorProto() if into is None else into
    enum = _datatype_enum(value.dtype)
    if enum is None:
        import tensorflow as tf

        proto.CopyFrom(tf.make_tensor_proto(value))
        return proto
    proto.dtype = enum
    for size in value.shape:
        proto.tensor_shape.dim.add(size=size)
    if enum == types_pb2.DT_STRING:
        proto.string_val.extend(value.ravel().tolist())
    else:
        proto.tensor_content = np.ascontiguousarray(value).tobytes()
    return proto


@functools.cache
def _datatype_enum(dtype: np.dtype) -> int | None:
    """The DataType of plain numeric and byte-string arrays; None for the rest (TF converts)."""
    if dtype.kind in "OS":
        return types_pb2.DT_STRING
    if dtype.kind not in "biuf" or dtype.byteorder == ">":
        return None
    import tensorflow as tf

    try:
        return tf.dtypes.as_dtype(dtype).as_datatype_enum
    except TypeError:
        return None


def json_to_array(value, dtype, name: str) -> np.ndarray:
    """A numpy array of `dtype` (a tf.DType) from a JSON value with {"b64": ...} binaries."""
    import tensorflow as tf

    decoded = _decode_binaries(value, name)
    if dtype == tf.string:
        array = np.array(decoded, dtype=object)
        if array.size and not all(isinstance(v, bytes) for v in array.flat):
            raise invalid_argument(f'Input {name} expects strings or {{"b64": ...}} values')
        return array
    try:
        return np.array(decoded, dtype=dtype.as_numpy_dtype)
    except (TypeError, ValueError) as exc:
        raise invalid_argument(f"Input {name} cannot be read as {dtype.name}: {exc}") from exc


def _decode_binaries(value, name: str):
    if isinstance(value, dict):
        if set(value) != {"b64"}:
            raise invalid_argument(f'Input {name}: objects must be {{"b64": ...}}')
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, TypeError) as exc:
            raise invalid_argument(f"Input {name}: invalid base64 ({exc})") from exc
    if isinstance(value, list):
        return [_decode_binaries(v, name) for v in value]
    if isinstance(value, str):
        return value.encode("utf-8")
    return value


def array_to_json(value: np.ndarray, name: str):
    """JSON for an output tensor as TF Serving writes it (`*_bytes` outputs as {"b64": ...})."""
    if value.dtype == object or value.dtype.kind == "S":
        as_b64 = name.endswith("_bytes")
        return _strings_to_json(value.tolist(), as_b64)
    return value.tolist()


def _strings_to_json(value, as_b64: bool):
    if isinstance(value, list):
        return [_strings_to_json(v, as_b64) for v in value]
    if not as_b64:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            pass  # not text: fall back to base64 rather than corrupting it
    return {"b64": base64.b64encode(value).decode("ascii")}


def json_to_example(features: dict, name: str = "examples"):
    """A tf.train.Example from REST classify JSON ({"feature": value | [values] | {"b64": ...}})."""
    import tensorflow as tf

    if not isinstance(features, dict):
        raise invalid_argument(f"{name}: each example must be a JSON object")
    example = tf.train.Example()
    for key, raw in features.items():
        values = raw if isinstance(raw, list) else [raw]
        values = [_decode_binaries(v, f"{name}.{key}") for v in values]
        feature = example.features.feature[key]
        if all(isinstance(v, bytes) for v in values):
            feature.bytes_list.value.extend(values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            feature.int64_list.value.extend(values)
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            feature.float_list.value.extend(values)
        else:
            raise invalid_argument(f"{name}.{key}: values must be all numbers or all strings")
    return example
