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
# A decoded string element costs its bytes plus a tstring (24 B) and a NumPy object slot (8 B),
# and graphs that map over a string batch (tf.map_fn unstacks it) spend ~220 B more per element:
# a 48-byte request repeating one byte to [2000000] cost 5 s and 440 MB when this counted 32.
STRING_ELEMENT_OVERHEAD = 256


def check_examples_size(kind: str, count: int, context: int, size: int, limit: int | None) -> None:
    """INVALID_ARGUMENT if the examples would decode to more than `limit` bytes."""
    # The examples: `count` of them, each merged with a `context`-byte context, plus `size` bytes of
    # their own.
    # Computed from the counts before anything is built: 600 empty examples with a 1 MiB
    # context are 600 MiB of tensor, and each empty example costs 2 bytes of message.
    decoded = count * (STRING_ELEMENT_OVERHEAD + context) + size
    if limit is not None and decoded > limit:
        with_context = f" each merged with a {context}-byte context" if context else ""
        raise invalid_argument(
            f"Input {kind}: {count} examples{with_context} are {decoded} bytes once decoded, "
            f"more than the {limit} bytes this server decodes per request (--max_message_bytes)"
        )


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
    """A numpy array from a TensorProto (strings become an object array of bytes)."""
    # TF's rules, with TF Serving's answer for what they reject: fewer values than the shape holds
    # repeat the last one, none means zeros, extra values are dropped. Callers bound the size first
    # (decoded_nbytes): the shape alone decides how much memory this takes.
    shape = checked_shape(proto, alias)
    count = math.prod(shape)
    if not count and _numpy_dtype(proto.dtype) is not None:  # FromProto reads no values then
        try:  # not even tensor_content: a string tensor's need not be a string list
            return np.zeros(shape, _numpy_dtype(proto.dtype))
        except ValueError:  # NumPy's own limit on dims ([0, 2**62]): TF's numpy bridge fails too
            raise tensor_parsing_error(alias) from None
    if proto.dtype == types_pb2.DT_BOOL and proto.tensor_content.translate(None, b"\0\1"):
        raise tensor_parsing_error(alias)  # Tensor::FromProto takes only bytes 0 and 1 as bools
    if proto.dtype == types_pb2.DT_STRING and proto.tensor_content:
        return _decode_string_list(proto.tensor_content, count, alias).reshape(shape)
    if proto.dtype == types_pb2.DT_STRING:
        values = proto.string_val
        array = np.empty(count, dtype=object)
        if count and values:
            kept = min(len(values), count)
            array[:kept] = list(values[:kept])
            array[kept:] = values[kept - 1]  # one shared bytes object, not copies
        else:
            array[:] = b""  # no values: empty strings, as FromProto fills them
        try:
            return array.reshape(shape)
        except ValueError:  # NumPy's own limit on dims ([0, 2**62])
            raise tensor_parsing_error(alias) from None
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


def _decode_string_list(content: bytes, count: int, alias: str) -> np.ndarray:
    """DT_STRING tensor_content as Tensor::AsProtoTensorContent writes it (DecodeStringList):
    `count` varint32 lengths, then exactly that many bytes."""
    array = np.empty(count, dtype=object)
    lengths, position = [], 0
    for _ in range(count):
        length, shift = 0, 0
        while True:
            if position >= len(content) or shift > 28:
                raise tensor_parsing_error(alias)
            byte = content[position]
            position += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        # GetVarint32Ptr works in uint32: a fifth byte's bits above 32 are dropped, not refused.
        lengths.append(length & 0xFFFFFFFF)
    if sum(lengths) != len(content) - position:
        raise tensor_parsing_error(alias)
    for index, length in enumerate(lengths):
        array[index] = content[position : position + length]
        position += length
    return array


def checked_shape(proto, alias: str = "") -> list[int]:
    """The proto's shape, if TensorShape would accept it (sizes >= 0, rank and size in range)."""
    # unknown_rank is ignored, as TensorShape::IsValid (not PartialTensorShape's) ignores it: the
    # dims, if any, are the shape.
    shape = proto.tensor_shape
    dims = [d.size for d in shape.dim]
    if len(dims) > MAX_RANK or any(d < 0 for d in dims):
        raise tensor_parsing_error(alias)
    elements = 1
    for size in dims:  # IsValid multiplies in order: an overflow fails even before a 0
        elements *= size
        if elements > MAX_ELEMENTS:
            raise tensor_parsing_error(alias)
    return dims


def decoded_nbytes(proto, shape: list[int], alias: str = "") -> int:
    """Bytes the decoded tensor takes: its elements, or for strings their bytes plus overhead."""
    count = math.prod(shape)
    if proto.dtype in (types_pb2.DT_VARIANT, types_pb2.DT_RESOURCE):
        return count * STRING_ELEMENT_OVERHEAD  # default values, never decoded here
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
    except (TypeError, ValueError, KeyError):  # KeyError: no NumPy dtype (variant, resource)
        return None


def to_tensor_proto(value: np.ndarray, into=None, as_tensor_content: bool = False):
    """A TensorProto from a numpy array (filled in place when `into` is given)."""
    # Values go in the dtype's repeated field (float_val, int_val, ...) as TF Serving's
    # Tensor::AsProtoField writes them by default; `as_tensor_content` packs numbers into
    # tensor_content instead (--enable_serialization_as_tensor_content).
    proto = tensor_pb2.TensorProto() if into is None else into
    enum = _datatype_enum(value.dtype)
    if enum is None:
        import tensorflow as tf

        proto.CopyFrom(tf.make_tensor_proto(value))
        if not as_tensor_content:
            _content_to_field(proto)
        return proto
    proto.dtype = enum
    for size in value.shape:
        proto.tensor_shape.dim.add(size=size)
    if enum == types_pb2.DT_STRING:
        proto.string_val.extend(value.ravel().tolist())
    elif as_tensor_content:
        proto.tensor_content = np.ascontiguousarray(value).tobytes()
    else:
        _fill_field(proto, value)
    return proto


def _fill_field(proto, value: np.ndarray) -> None:
    field = _VALUE_FIELDS.get(proto.dtype)
    if field is None:  # no repeated field for this dtype (float8, int4, ...): TF writes bytes
        proto.tensor_content = np.ascontiguousarray(value).tobytes()
        return
    flat = np.ascontiguousarray(value).ravel()
    if proto.dtype in (types_pb2.DT_HALF, types_pb2.DT_BFLOAT16):
        flat = flat.view(np.uint16)  # half_val holds the 16-bit patterns
    elif proto.dtype in (types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128):
        flat = flat.view(flat.real.dtype)  # real, imaginary, real, ...
    getattr(proto, field[0]).extend(flat.tolist())


def _content_to_field(proto) -> None:
    if proto.tensor_content and proto.dtype in _VALUE_FIELDS:
        import tensorflow as tf

        value = tf.make_ndarray(proto)
        proto.ClearField("tensor_content")
        _fill_field(proto, value)


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
