"""TF Serving's REST JSON <-> tensors: the rules and messages of tensorflow_serving/util/json_tensor.cc
(TF Serving 2.16.1), on NumPy arrays instead of TensorProtos.

Requests: `parse_json` (ParseJson), `predict_inputs` (FillPredictRequestFromJson and its
FillTensorMapFromInstancesList / FillTensorMapFromInputsMap / FillTensorProto / AddValueToTensor),
`classify_examples` (FillClassifyRegressRequestFromJson, MakeExampleFromJsonObject). Responses:
`predict_json` (MakeRowFormatJsonFromTensors / MakeColumnarFormatJsonFromTensors, numbers written
as WriteDecimal writes them) and `classify_json`. Where Python's json module and RapidJSON differ
(parse error wording, nesting depth), docs/serving.md lists the difference.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re

import grpc
import numpy as np

from serving.errors import ServingError, invalid_argument
from serving.tensors import data_type_string

SIGNATURE_KEY = "signature_name"
INSTANCES_KEY = "instances"
INPUTS_KEY = "inputs"
CONTEXT_KEY = "context"
EXAMPLES_KEY = "examples"
B64_KEY = "b64"
BYTES_SUFFIX = "_bytes"
ROW, COLUMNAR = "row", "columnar"
# TensorShape holds at most 254 dimensions; deeper JSON lists cannot be a tensor. Python's parser
# itself stops near 1000 levels (RapidJSON, recursive too, has no limit: TODO in json_tensor.cc).
MAX_TENSOR_DEPTH = 254
_MAX_VALUE_TEXT = 200  # of a JSON value quoted in an error message

_INT_RANGES = {
    "int32": (-(2**31), 2**31 - 1),  # DT_INT32/16/8/UINT8 all require IsInt(): the int32 range
    "int16": (-(2**31), 2**31 - 1),
    "int8": (-(2**31), 2**31 - 1),
    "uint8": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
}
# Python's json messages -> RapidJSON's GetParseError_En wording.
_PARSE_ERRORS = {
    "Expecting value": "Invalid value.",
    "Expecting property name enclosed in double quotes": "Missing a name for object member.",
    "Expecting ':' delimiter": "Missing a colon after a name of object member.",
    "Expecting ',' delimiter": "Missing a comma or ']' after an array element.",
    "Extra data": "The document root must not be followed by other values.",
    "Unterminated string starting at": "Missing a closing quotation mark in string.",
    "Invalid \\escape": "Invalid escape character in string.",
    "Invalid \\uXXXX escape": "Incorrect hex digit after \\u escape in string.",
    "Invalid control character at": "Invalid encoding in string.",
}


class _NumberTooBig(ValueError):
    pass


# Exponents of 100 or more, or 20+ digits: literals that might not fit a double or an int64.
_SUSPECT_NUMBER = re.compile(rb"[eE]\+?0*[1-9]\d{2,}|\d{20,}")


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # RapidJSON: kParseErrorNumberTooBig; Python would say inf
        raise _NumberTooBig(text)
    return value


def _parse_int(text: str) -> int | float:
    # RapidJSON keeps integers in (u)int64 and reads longer ones as doubles; Python would build
    # an int of any length (and refuses more than 4300 digits with a ValueError).
    if len(text) <= 20:
        value = int(text)
        if -(2**63) <= value < 2**64:
            return value
    return _parse_float(text)


def _first_key_wins(pairs: list) -> dict:
    # RapidJSON's FindMember returns the first of duplicate keys; Python's dict keeps the last.
    result: dict = {}
    for key, value in pairs:
        result.setdefault(key, value)
    return result


def parse_json(body: bytes) -> dict:
    """The request object (ParseJson): JSON Parse errors, or `Is not object`."""
    if not body:
        raise invalid_argument("JSON Parse error: The document is empty")
    # RapidJSON does not validate UTF-8 in strings; surrogateescape keeps such bytes as they came.
    text = body.decode("utf-8", "surrogateescape")
    # The number hooks cost a Python call per number (seconds for a large tensor): they are only
    # needed when a literal could overflow a double or a (u)int64.
    hooks = {"parse_float": _parse_float, "parse_int": _parse_int}
    try:
        doc = json.loads(
            text,
            object_pairs_hook=_first_key_wins,
            **(hooks if _SUSPECT_NUMBER.search(body) else {}),
        )
    except _NumberTooBig as exc:
        offset = text.find(str(exc))
        raise invalid_argument(
            f"JSON Parse error: Number too big to be stored in double. at offset: {offset}"
        ) from None
    except json.JSONDecodeError as exc:
        reason = _PARSE_ERRORS.get(exc.msg, exc.msg)
        raise invalid_argument(f"JSON Parse error: {reason} at offset: {exc.pos}") from None
    except RecursionError:
        raise invalid_argument(
            "JSON Parse error: The document is nested too deeply to be a request"
        ) from None
    if not isinstance(doc, dict):
        raise _format_error(doc, "Is not object")
    return doc


def signature_name(doc: dict) -> str:
    """The optional signature_name (FillSignature): a string, else the FormatSignatureError."""
    value = doc.get(SIGNATURE_KEY, "")
    if not isinstance(value, str):
        raise invalid_argument(
            f"JSON Value: {value_text(doc)} not formatted correctly. 'signature_name' key must "
            "be a string value."
        )
    return value


def predict_inputs(doc: dict, input_dtypes: dict[str, str], signature: str):
    """(inputs as arrays, ROW or COLUMNAR) from a predict request, per FillPredictRequestFromJson.

    `input_dtypes` maps the signature's input aliases to NumPy dtype names ('string' for
    DT_STRING); it is TF Serving's tensorinfo_map.
    """
    if not input_dtypes:
        raise invalid_argument(f"Failed to get input map for signature: {signature or 'DEFAULT'}")
    has_instances, has_inputs = INSTANCES_KEY in doc, INPUTS_KEY in doc
    if has_instances and has_inputs:
        raise _format_error(
            doc,
            "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist ",
        )
    if has_instances:
        instances = doc[INSTANCES_KEY]
        if not isinstance(instances, list):
            raise _format_error(doc, "Expecting 'instances' to be an list/array")
        if not instances:
            raise _format_error(doc, "No values in 'instances' array")
        return _from_instances(instances, input_dtypes), ROW
    if has_inputs:
        return _from_inputs(doc[INPUTS_KEY], input_dtypes), COLUMNAR
    raise invalid_argument("Missing 'inputs' or 'instances' key")


def _is_b64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(B64_KEY), str)


def _is_element_object(value) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _from_instances(instances: list, input_dtypes: dict[str, str]) -> dict:
    names = sorted(input_dtypes)
    if not isinstance(instances[0], dict) and len(names) > 1:
        raise invalid_argument(
            "instances is a plain list, but expecting list of objects as multiple input tensors "
            "required as per tensorinfo_map"
        )
    objects = _is_element_object(instances[0])
    columns: dict[str, list] = {}
    shapes: dict[str, list[int]] = {}
    for index, element in enumerate(instances):
        if objects:
            if not _is_element_object(element):
                raise invalid_argument(
                    f"Expecting object but got list at item {index} of input list"
                )
            for name, item in element.items():
                try:
                    _add_instance_item(item, name, input_dtypes, columns, shapes)
                except ServingError as exc:
                    raise invalid_argument(
                        f"Failed to process element: {index} key: {name} of 'instances' list. "
                        f"Error: INVALID_ARGUMENT: {exc.message}"
                    ) from None
            if set(element) != set(names):
                raise invalid_argument(
                    f"Failed to process element: {index} of 'instances' list. JSON object: "
                    f"{value_text(element)} keys must be equal to: {','.join(names)}"
                )
        else:
            if _is_element_object(element):
                raise invalid_argument(
                    f"Expecting value/list but got object at item {index} of input list"
                )
            try:
                _add_instance_item(element, names[0], input_dtypes, columns, shapes)
            except ServingError as exc:
                raise invalid_argument(
                    f"Failed to process element: {index} of 'instances' list. "
                    f"Error: INVALID_ARGUMENT: {exc.message}"
                ) from None
    return {
        name: _stacked(values, shapes[name], input_dtypes[name]) for name, values in columns.items()
    }


def _add_instance_item(item, name, input_dtypes, columns, shapes) -> None:
    if name not in input_dtypes:
        raise invalid_argument(f"JSON object: does not have named input: {name}")
    shape = dense_shape(item)
    values = fill_values(item, shape, input_dtypes[name])
    if name not in shapes:
        shapes[name] = shape
        columns[name] = []
    elif math.prod(shapes[name]) != len(values):
        raise invalid_argument(
            f"Expecting tensor size: {math.prod(shapes[name])} but got: {len(values)}"
        )
    elif shapes[name] != shape:
        raise invalid_argument(
            f"Expecting shape {_shape_text(shapes[name])} but got: {_shape_text(shape)}"
        )
    columns[name].append(values)


def _stacked(rows: list[list], shape: list[int], dtype: str) -> np.ndarray:
    flat = [v for row in rows for v in row]
    return _as_array(flat, dtype).reshape([len(rows), *shape])


def _from_inputs(value, input_dtypes: dict[str, str]) -> dict:
    if not isinstance(value, dict) or _is_b64(value):
        if len(input_dtypes) > 1:
            raise invalid_argument(
                "inputs is a plain value/list, but expecting an object as multiple input tensors "
                "required as per tensorinfo_map"
            )
        name = next(iter(input_dtypes))
        return {name: to_array(value, input_dtypes[name])}
    arrays = {}
    for name in sorted(input_dtypes):
        if name not in value:
            raise invalid_argument(f"Missing named input: {name} in 'inputs' object.")
        arrays[name] = to_array(value[name], input_dtypes[name])
    return arrays


def to_array(value, dtype: str) -> np.ndarray:
    """One JSON value (scalar or nested lists) as an array of `dtype` (FillTensorProto)."""
    shape = dense_shape(value)
    fast = _regular_array(value, shape, dtype)
    if fast is not None:
        return fast
    return _as_array(fill_values(value, shape, dtype), dtype).reshape(shape)


_KINDS = {  # Python types of JSON values each dtype takes without a check per element
    "float32": {int, float},
    "float64": {int, float},
    "bool": {bool},
    "string": {str},
}


def _regular_array(value, shape: list[int], dtype: str) -> np.ndarray | None:
    """The array in bulk when `value` is a regular nesting of acceptable leaves; None to take
    the element-by-element path (which also words the errors)."""
    if not shape or not math.prod(shape):
        return None
    try:
        objects = np.array(value, dtype=object)
    except ValueError:
        return None
    if list(objects.shape) != shape:
        return None  # ragged or deeper than its first elements
    flat = objects.ravel()
    kinds = set(map(type, flat))
    if dtype in _INT_RANGES:
        low, high = _INT_RANGES[dtype]
        if kinds != {int} or min(flat) < low or max(flat) > high:
            return None
    elif dtype not in _KINDS or not kinds <= _KINDS[dtype]:
        return None
    if dtype == "string":
        flat = np.array([utf8(v) for v in flat], dtype=object)
    return _as_array(flat, dtype).reshape(shape)


def dense_shape(value) -> list[int]:
    """GetDenseTensorShape: the sizes along the first element of each nested list."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if len(shape) > MAX_TENSOR_DEPTH:
            raise invalid_argument(
                f"JSON Value: lists nested deeper than {MAX_TENSOR_DEPTH} levels cannot be a tensor"
            )
        if not value:
            break
        value = value[0]
    return shape


def fill_values(value, shape: list[int], dtype: str) -> list:
    """The leaf values in row-major order, checked level by level like FillTensorProto."""
    values: list = []
    innermost = len(shape) - 1
    stack = [(value, 0)]  # iterative: a deep list must not exhaust Python's recursion
    while stack:
        item, level = stack.pop()
        if not isinstance(item, list):
            if level != len(shape):
                raise _level_error(item, level, len(shape))
            values.append(_leaf(item, dtype))
            continue
        if level >= len(shape):
            raise invalid_argument(
                f"Encountered list at unexpected level: {level} expected < {len(shape)}"
            )
        if len(item) != shape[level]:
            raise invalid_argument(
                f"Encountered list at unexpected size: {len(item)} at level: {level} expected "
                f"size: {shape[level]}"
            )
        if level == innermost:  # the bulk of a tensor: leaves, read without a stack entry each
            for leaf in item:
                if isinstance(leaf, list):
                    raise invalid_argument(
                        f"Encountered list at unexpected level: {level + 1} expected < "
                        f"{len(shape)}"
                    )
                values.append(_leaf(leaf, dtype))
            continue
        stack.extend((child, level + 1) for child in reversed(item))
    return values


def _level_error(item, level: int, rank: int) -> ServingError:
    return invalid_argument(
        f"JSON Value: {value_text(item)} found at incorrect level: {level + 1} in the JSON DOM. "
        f"Expected at level: {rank}"
    )


def _leaf(value, dtype: str):
    if isinstance(value, dict):
        if dtype != "string":
            raise _type_error(value, dtype)
        return decode_b64(value)
    if dtype in ("float32", "float64"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(value, dtype)
        return float(value)
    if dtype in _INT_RANGES:
        low, high = _INT_RANGES[dtype]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _type_error(value, dtype)
        return value
    if dtype == "bool":
        if not isinstance(value, bool):
            raise _type_error(value, dtype)
        return value
    if dtype == "string":
        if not isinstance(value, str):
            raise _type_error(value, dtype)
        return utf8(value)
    raise ServingError(
        grpc.StatusCode.UNIMPLEMENTED,
        f"Conversion of JSON Value: {value_text(value)} to type: {data_type_string(dtype)}",
    )


def utf8(text: str) -> bytes:
    """A JSON string's bytes: as sent (undecodable bytes survive parsing as surrogates)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate written as a \u escape
        return text.encode("utf-8", "surrogatepass")


def decode_b64(value) -> bytes:
    """A {"b64": "..."} object's bytes (JsonDecodeBase64Object)."""
    if not _is_b64(value):
        raise invalid_argument(
            f"JSON Value: {value_text(value)} not formatted correctly for base64 data"
        )
    text = value[B64_KEY]
    try:  # absl::Base64Unescape: the standard alphabet, padding optional
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise invalid_argument("Unable to base64 decode") from None


def _as_array(values, dtype: str) -> np.ndarray:
    if dtype == "string" and isinstance(values, np.ndarray):
        return values
    if dtype == "string":
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array
    if dtype.startswith("float"):  # GetFloat(): a double beyond float32 becomes inf
        return np.array(values, dtype=np.float64).astype(dtype)
    if dtype in ("uint64", "bool"):
        return np.array(values, dtype=dtype)
    # Narrow ints wrap, as Tensor::FromProto's int_val -> int8/uint8 conversion does.
    return np.array(values, dtype=np.int64).astype(dtype)


def _type_error(value, dtype: str) -> ServingError:
    return invalid_argument(
        f"JSON Value: {value_text(value)} Type: {_json_type(value)} is not of expected type: "
        f"{data_type_string(dtype)}"
    )


def _json_type(value) -> str:
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def _format_error(value, problem: str) -> ServingError:
    return invalid_argument(f"JSON Value: {value_text(value)} {problem}")


def value_text(value) -> str:
    """JsonValueToString: compact JSON of a request value, cut to a readable length."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if len(text) > _MAX_VALUE_TEXT:
        text = f"{text[:_MAX_VALUE_TEXT]}...({len(text) - _MAX_VALUE_TEXT} more characters)"
    return text


def _shape_text(shape: list[int]) -> str:
    return f"[{','.join(str(d) for d in shape)}]"


# ---- classify: JSON objects -> tf.Examples ----------------------------------------------------


def classify_examples(doc: dict) -> list[bytes]:
    """Serialized tf.Examples (context merged into each) of a classify request body."""
    from tensorflow.core.example import example_pb2

    context = None
    if CONTEXT_KEY in doc:
        context = example_pb2.Example()
        _fill_example(doc[CONTEXT_KEY], context)
    if EXAMPLES_KEY not in doc:
        raise _format_error(
            doc, "When method is classify, key 'examples' is expected and was not found"
        )
    examples = doc[EXAMPLES_KEY]
    if not isinstance(examples, list):
        raise _format_error(doc, "Expecting 'examples' value to be an list/array")
    if not examples:
        raise _format_error(doc, "'examples' value is an empty array")
    serialized = []
    for value in examples:
        example = example_pb2.Example()
        _fill_example(value, example)
        # TF Serving concatenates serialized context + example: protobuf merges them on parse.
        prefix = context.SerializeToString() if context is not None else b""
        serialized.append(prefix + example.SerializeToString())
    return serialized


def _fill_example(value, example) -> None:
    if not isinstance(value, dict):
        raise invalid_argument(f"Example must be JSON object but got JSON {_json_type(value)}")
    for name, content in value.items():
        feature = example.features.feature[name]
        feature.Clear()
        for item in content if isinstance(content, list) else [content]:
            _add_feature_value(item, name, feature)


def _add_feature_value(value, name: str, feature) -> None:
    kind = feature.WhichOneof("kind")
    if value is None or isinstance(value, list) or (isinstance(value, dict) and not _is_b64(value)):
        raise invalid_argument(
            f"Feature: {name} has element with unexpected JSON type: {_json_type(value)}"
        )
    if isinstance(value, bool) or (isinstance(value, int) and -(2**63) <= value < 2**64):
        _check_kind(kind, "int64_list", name)
        if value is not True and value is not False and value >= 2**63:
            raise invalid_argument(
                f"Feature: {name} has uint64_t element. Only int64_t is supported."
            )
        feature.int64_list.value.append(int(value))
    elif isinstance(value, int | float):  # RapidJSON reads integers beyond uint64 as doubles
        _check_kind(kind, "float_list", name)
        feature.float_list.value.append(float(value))
    elif isinstance(value, dict):
        _check_kind(kind, "bytes_list", name)
        feature.bytes_list.value.append(decode_b64(value))
    else:
        _check_kind(kind, "bytes_list", name)
        feature.bytes_list.value.append(utf8(value))


def _check_kind(kind: str | None, wanted: str, name: str) -> None:
    if kind is not None and kind != wanted:
        names = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64"}
        raise invalid_argument(
            f"Unexpected element type in feature: {name} expecting type: {names[kind]}"
        )


# ---- responses --------------------------------------------------------------------------------


def predict_json(outputs: dict[str, np.ndarray], form: str) -> str:
    """The predict response body (MakeJsonFromTensors) in the request's row or columnar form."""
    if not outputs:
        raise invalid_argument("Cannot convert empty tensor map to JSON")
    if form == COLUMNAR:
        if len(outputs) == 1:
            ((name, value),) = outputs.items()
            return f'{{"outputs": {_tensor_json(value, name)}}}'
        body = ", ".join(f"{json.dumps(n)}: {_tensor_json(v, n)}" for n, v in outputs.items())
        return f'{{"outputs": {{{body}}}}}'
    batch = None
    for name, value in outputs.items():
        if value.ndim == 0:
            raise invalid_argument(f"Tensor name: {name} has no shape information ")
        if batch is not None and value.shape[0] != batch:
            raise invalid_argument(
                f"Tensor name: {name} has inconsistent batch size: {value.shape[0]} expecting: "
                f"{batch}"
            )
        batch = value.shape[0]
    texts = {name: [_tensor_json(row, name) for row in value] for name, value in outputs.items()}
    if len(outputs) == 1:
        rows = next(iter(texts.values()))
    else:
        rows = [
            "{" + ", ".join(f"{json.dumps(n)}: {t[i]}" for n, t in texts.items()) + "}"
            for i in range(batch)
        ]
    return f'{{"predictions": [{", ".join(rows)}]}}'


def classify_json(rows: list[list[tuple[str, float]]]) -> str:
    """The classify response body: {"results": [[[label, score], ...], ...]}."""
    if not rows:
        raise invalid_argument("Cannot convert empty ClassificationResults to JSON")
    scores = _decimal_texts(np.array([s for row in rows for _, s in row], dtype=np.float32))
    out, k = [], 0
    for row in rows:
        pairs = []
        for label, _ in row:
            pairs.append(f"[{json.dumps(label, ensure_ascii=False)}, {scores[k]}]")
            k += 1
        out.append(f"[{', '.join(pairs)}]")
    return f'{{"results": [{", ".join(out)}]}}'


def regress_json(values: list[float]) -> str:
    """The regress response body: {"results": [value, ...]} (MakeJsonFromRegressionResult)."""
    if not values:
        raise invalid_argument("Cannot convert empty RegressionResults to JSON")
    return f'{{"results": [{", ".join(_decimal_texts(np.array(values, dtype=np.float32)))}]}}'


def _tensor_json(value: np.ndarray, name: str) -> str:
    """AddTensorValues: nested JSON lists; strings as text, or {"b64"} for `*_bytes` outputs."""
    value = np.asarray(value)
    if value.dtype == object or value.dtype.kind == "S":
        as_b64 = name.endswith(BYTES_SUFFIX)
        flat = [_string_json(v, as_b64) for v in value.ravel().tolist()]
    elif value.dtype.kind == "f" and value.dtype.itemsize in (4, 8):
        flat = _decimal_texts(value.ravel())
    elif value.dtype.kind in "iu":
        flat = [str(v) for v in value.ravel().tolist()]
    elif value.dtype.kind == "b":
        flat = ["true" if v else "false" for v in value.ravel().tolist()]
    else:
        raise invalid_argument(
            f"Failed to write JSON value for tensor type: {data_type_string(value.dtype.name)}"
        )
    return _nest(flat, value.shape)


def _nest(flat: list[str], shape: tuple) -> str:
    if not shape:
        return flat[0]
    step = math.prod(shape[1:])
    parts = [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]
    return f"[{', '.join(parts)}]"


def _string_json(value: bytes, as_b64: bool) -> str:
    if as_b64:
        return f'{{"b64": "{base64.b64encode(value).decode("ascii")}"}}'
    # RapidJSON writes the bytes as they are; JSON text must be Unicode, so invalid UTF-8 is
    # replaced (TF Serving would emit invalid JSON there).
    return json.dumps(value.decode("utf-8", "replace"), ensure_ascii=False)


def _decimal_texts(values: np.ndarray) -> list[str]:
    """WriteDecimal: 6 significant digits if they round-trip, else max_digits10; `.0` on wholes,
    NaN / Infinity / -Infinity as RapidJSON writes them (vectorised: outputs have 1000s)."""
    values = np.asarray(values).ravel()
    if not values.size:
        return []
    wide = values.astype(np.float64)
    texts = np.char.mod("%.6g", wide)
    finite = np.isfinite(wide)
    lossy = finite & (texts.astype(np.float64).astype(values.dtype) != values)
    if lossy.any():
        digits = 9 if values.dtype == np.float32 else 17
        texts = texts.astype(f"<U{digits + 8}")
        texts[lossy] = np.char.mod(f"%.{digits}g", wide[lossy])
    whole = finite & (np.char.find(texts, ".") < 0) & (np.char.find(texts, "e") < 0)
    texts = texts.astype(object)
    texts[whole] = np.char.add(texts[whole].astype(str), ".0")
    texts[np.isnan(wide)] = "NaN"
    texts[np.isposinf(wide)] = "Infinity"
    texts[np.isneginf(wide)] = "-Infinity"
    return texts.tolist()
