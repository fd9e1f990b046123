"""Tensors between wire formats: TensorProto <-> numpy (REST JSON: serving/rest_json.py)."""

from __future__ import annotations

import functools
import math

import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2

from serving.errors import invalid_argument

# Requests carry encoded images and responses a few small tensors. tf.make_ndarray and
# tf.make_tensor_proto are generic (20-30 us a call, more than the rest of a request's Python
# work); these paths do the same conversion for strings and plain numeric arrays directly and
# hand everything else to TensorFlow.


# TensorShape's limits (tensorflow/core/framework/tensor_shape.cc): what Tensor::FromProto accepts.
MAX_RANK = 254
MAX_ELEMENTS = 2**63 - 1
# A decoded string element costs its bytes plus a tstring (24 B) and a NumPy object slot (8 B).
STRING_ELEMENT_OVERHEAD = 32

# The repeated field holding each dtype's values, and how many field entries make one element.
_VALUE_FIELDS = {
    types_pb2.DT_FLOAT: ("float_val", 1),
    types_pb2.DT_DOUBLE: ("double_val", 1),
    types_pb2.DT_INT32: ("int_val", 1),
    types_pb2.DT_UINT8: ("int_val", 1),
    types_pb2.DT_UINT16: ("int_val", 1),
    types_pb2.DT_INT16: ("int_val", 1),
    types_pb2.DT_INT8: ("int_val", 1),
    types_pb2.DT_INT64: ("int64_val", 1),
    types_pb2.DT_UINT32: ("uint32_val", 1),
    types_pb2.DT_UINT64: ("uint64_val", 1),
    types_pb2.DT_BOOL: ("bool_val", 1),
    types_pb2.DT_HALF: ("half_val", 1),
    types_pb2.DT_BFLOAT16: ("half_val", 1),
    types_pb2.DT_COMPLEX64: ("scomplex_val", 2),
    types_pb2.DT_COMPLEX128: ("dcomplex_val", 2),
    types_pb2.DT_STRING: ("string_val", 1),
}


_TYPE_NAMES = {  # tf.DType.name -> DataTypeString, as TF Serving's messages write dtypes
    "float32": "float",
    "float64": "double",
    "int32": "int32",
    "int16": "int16",
    "int8": "int8",
    "uint8": "uint8",
    "int64": "int64",
    "uint32": "uint32",
    "uint64": "uint64",
    "bool": "bool",
    "string": "string",
    "float16": "half",
    "bfloat16": "bfloat16",
}


def data_type_string(name: str) -> str:
    """TensorFlow's DataTypeString for a tf.DType name ("float32" -> "float")."""
    return _TYPE_NAMES.get(name, name)


def tensor_parsing_error(alias: str):
    """TF Serving's answer when Tensor::FromProto rejects an input (GetInputValues)."""
    return invalid_argument(f"tensor parsing error: {alias}")


def from_tensor_proto(proto, alias: str = "") -> np.ndarray:
    """A numpy array from a TensorProto (strings become an object array of bytes).

    TF's rules, with TF Serving's answer for what they reject: fewer values than the shape holds
    repeat the last one, none means zeros, extra values are dropped. Callers bound the size
    first (decoded_nbytes): the shape alone decides how much memory this takes.
    """
    shape = checked_shape(proto, alias)
    count = math.prod(shape)
    if proto.dtype == types_pb2.DT_STRING and not proto.tensor_content:
        values = proto.string_val
        if count and values:
            array = np.empty(count, dtype=object)
            kept = min(len(values), count)
            array[:kept] = list(values[:kept])
            array[kept:] = values[kept - 1]  # one shared bytes object, not copies
            return array.reshape(shape)
    field = _VALUE_FIELDS.get(proto.dtype)
    if not proto.tensor_content and field and len(getattr(proto, field[0])) > count * field[1]:
        trimmed = type(proto)()  # Tensor::FromProto reads the first `count` values only
        trimmed.CopyFrom(proto)
        del getattr(trimmed, field[0])[count * field[1] :]
        proto = trimmed
    import tensorflow as tf

    try:
        return tf.make_ndarray(proto)
    except (TypeError, ValueError):
        raise tensor_parsing_error(alias) from None


def checked_shape(proto, alias: str = "") -> list[int]:
    """The proto's shape, if TensorShape would accept it (known rank, sizes >= 0, in range)."""
    shape = proto.tensor_shape
    dims = [d.size for d in shape.dim]
    if shape.unknown_rank or len(dims) > MAX_RANK or any(d < 0 for d in dims):
        raise tensor_parsing_error(alias)
    if math.prod(dims) > MAX_ELEMENTS:
        raise tensor_parsing_error(alias)
    return dims


def decoded_nbytes(proto, shape: list[int], alias: str = "") -> int:
    """Bytes the decoded tensor takes: its elements, or for strings their bytes plus overhead."""
    count = math.prod(shape)
    if proto.dtype != types_pb2.DT_STRING:
        dtype = _numpy_dtype(proto.dtype)
        if dtype is None:
            raise tensor_parsing_error(alias)
        return count * dtype.itemsize
    if proto.tensor_content:
        return count * STRING_ELEMENT_OVERHEAD + len(proto.tensor_content)
    values = proto.string_val
    kept = values[:count]
    repeated = (count - len(kept)) * len(values[-1]) if values else 0
    return count * STRING_ELEMENT_OVERHEAD + sum(len(v) for v in kept) + repeated


@functools.cache
def _numpy_dtype(enum: int) -> np.dtype | None:
    import tensorflow as tf

    try:
        dtype = tf.dtypes.as_dtype(enum)
        return None if dtype._is_ref_dtype else np.dtype(dtype.as_numpy_dtype)
    except (TypeError, ValueError):
        return None


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
