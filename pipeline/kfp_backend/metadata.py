"""How ML Metadata stores a task's outputs and hands them to the next task (backend/src/v2/metadata)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pipeline.kfp_backend import KubeflowError

# pipelinespec.ParameterType_ParameterTypeEnum
PARAMETER_TYPE_NAMES = {
    0: "PARAMETER_TYPE_ENUM_UNSPECIFIED",
    1: "NUMBER_DOUBLE",
    2: "NUMBER_INTEGER",
    3: "STRING",
    4: "BOOLEAN",
    5: "LIST",
    6: "STRUCT",
    7: "TASK_FINAL_STATUS",
}


@dataclass
class StoredArtifact:
    """An output artifact as the launcher records it in ML Metadata (metadata.Client.RecordArtifact)."""

    id: int
    output_name: str
    uri: str
    schema: str  # the instance schema, or "title: <schemaTitle>" (launcher_v2.getArtifactSchema)
    custom_properties: dict[str, tuple[str, Any]] = field(default_factory=dict)

    @property
    def schema_title(self) -> str:
        """The `title:` of the artifact's schema (metadata.SchemaToArtifactType)."""
        for line in self.schema.splitlines():
            if line.startswith("title:"):
                return line.split(":", 1)[1].strip()
        return ""


def struct_value_to_mlmd(name: str, value) -> tuple[str, Any]:
    """metadata.StructValueToMLMDValue: how one metadata value is stored as a custom property."""
    from google.protobuf import json_format

    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return ("string", value.string_value)
    if kind == "number_value":
        return ("double", value.number_value)
    if kind == "bool_value":
        return ("int", int(value.bool_value))
    if kind == "list_value":
        return ("struct", {"list": json_format.MessageToDict(value.list_value)})
    if kind == "struct_value":
        return ("struct", {"struct": json_format.MessageToDict(value.struct_value)})
    # "TODO: support null": the launcher fails to record the artifact.
    kind_type = {"null_value": "*structpb.Value_NullValue"}.get(kind, "<nil>")
    raise KubeflowError(
        f"unable to produce MLMD artifact for output metadata {name!r}: failed to convert "
        f"RuntimeArtifact to MLMD artifact: unknown/unsupported value type {kind_type}"
    )


def runtime_artifact_of(stored: StoredArtifact):
    """What a downstream driver gets back from MLMD (metadata.toRuntimeArtifact, ToRuntimeArtifact)."""
    from google.protobuf import struct_pb2
    from kfp.pipeline_spec import pipeline_spec_pb2

    artifact = pipeline_spec_pb2.RuntimeArtifact(name=str(stored.id), uri=stored.uri)
    artifact.metadata.SetInParent()
    for key, (kind, value) in stored.custom_properties.items():
        if kind in ("double", "int"):
            artifact.metadata.fields[key].number_value = float(value)
        elif kind == "string":
            artifact.metadata.fields[key].string_value = value
        else:
            struct = struct_pb2.Struct()
            struct.update(value)
            artifact.metadata.fields[key].struct_value.CopyFrom(struct)
    # GetOutputArtifactsByExecutionId sets Schema "" ("TODO(Bobgy): figure out how to get
    # schema"); ToRuntimeArtifact turns that into an empty instance schema.
    artifact.type.instance_schema = ""
    return artifact


def value_as_text(value) -> str:
    """metadata.PbValueToText: a parameter value as the text a STRING parameter receives."""
    from google.protobuf import json_format

    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":  # strconv.FormatFloat(v, 'f', -1, 64): shortest, no exponent
        number = value.number_value
        return str(int(number)) if number.is_integer() else format(Decimal(repr(number)), "f")
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind in ("list_value", "struct_value"):  # json.Marshal of the ListValue / Struct
        return go_json(json_format.MessageToDict(getattr(value, kind)))
    return ""


def go_json(python_value, escape_html: bool = True) -> str:
    """encoding/json.Marshal of a decoded JSON value: sorted keys, Go's numbers, HTML escaped."""
    # Go writes 1.0 as 1 (all numbers are float64), sorts object keys, keeps non-ASCII as UTF-8
    # and escapes <, > and & (and U+2028/U+2029) inside strings; protojson does not escape.
    if isinstance(python_value, dict):
        items = sorted(python_value.items())
        return (
            "{"
            + ",".join(f"{go_json(k, escape_html)}:{go_json(v, escape_html)}" for k, v in items)
            + "}"
        )
    if isinstance(python_value, list):
        return "[" + ",".join(go_json(v, escape_html) for v in python_value) + "]"
    if isinstance(python_value, bool) or python_value is None:
        return json.dumps(python_value)
    if isinstance(python_value, int | float):
        return _go_json_number(float(python_value))
    text = json.dumps(python_value, ensure_ascii=False)
    if not escape_html:
        return text
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escape)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def protojson(message) -> str:
    """protojson.Marshal of a message, as the driver and launcher write an ExecutorInput."""
    # Same JSON as Python's json_format, but numbers as Go writes them: a parameter value 6.0
    # is `6` for the component that reads `{{$}}` (json.loads gives it an int, not 6.0).
    from google.protobuf import json_format

    return go_json(json_format.MessageToDict(message), escape_html=False)


def _go_json_number(number: float) -> str:
    """encoding/json's floatEncoder: 'f' format, 'e' below 1e-6 or from 1e21 (e-07 -> e-7)."""
    if number != 0 and (abs(number) < 1e-6 or abs(number) >= 1e21):
        text = go_format_float(number, "e")
        if len(text) >= 4 and text[-4:-1] == "e-0":
            text = text[:-2] + text[-1]
        return text
    return go_format_float(number, "f")


def go_format_float(number: float, fmt: str) -> str:
    """strconv.FormatFloat(number, fmt, -1, 64) for fmt 'f', 'e' or 'g': shortest digits."""
    if number != number:
        return "NaN"
    if number in (float("inf"), float("-inf")):
        return "+Inf" if number > 0 else "-Inf"
    sign, digits, exponent = Decimal(repr(number)).as_tuple()
    digits_text = "".join(map(str, digits)).rstrip("0") or "0"
    exponent += len(digits) - len(digits_text)  # the stripped zeros
    point = len(digits_text) + exponent if digits_text != "0" else 1  # digits before the point
    minus = "-" if sign else ""
    if fmt == "g":
        # %e when the exponent is below -4 or, for shortest digits, at least 6.
        fmt = "f" if -4 <= point - 1 < 6 else "e"
    if fmt == "e":
        mantissa = digits_text[0] + ("." + digits_text[1:] if len(digits_text) > 1 else "")
        power = 0 if digits_text == "0" else point - 1
        return f"{minus}{mantissa}e{'-' if power < 0 else '+'}{abs(power):02d}"
    if point <= 0:
        return f"{minus}0.{'0' * -point}{digits_text}"
    if point >= len(digits_text):
        return minus + digits_text + "0" * (point - len(digits_text))
    return f"{minus}{digits_text[:point]}.{digits_text[point:]}"


class TextConversionError(ValueError):
    """metadata.TextToPbValue's error: the text is not a value of the parameter's type."""


_GO_INT = re.compile(r"[+-]?[0-9]+")  # strconv.ParseInt(s, 10, 0): no underscores in base 10
_GO_DECIMAL_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_GO_HEX_FLOAT = re.compile(r"[+-]?0[xX]([0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)[pP][+-]?[0-9]+")
_GO_SPECIAL_FLOAT = re.compile(r"[+-]?(inf|infinity)|nan", re.IGNORECASE)
# strconv.ParseBool's spellings, nothing else.
_GO_BOOLS = {text: True for text in ("1", "t", "T", "TRUE", "true", "True")}
_GO_BOOLS.update({text: False for text in ("0", "f", "F", "FALSE", "false", "False")})


def text_as_value(text: str, parameter_type: int):
    """metadata.TextToPbValue: an output parameter file's text as a value of its declared type."""
    # Go's strconv, not Python's conversions: an integer parameter refuses "1.0", a boolean takes
    # only ParseBool's spellings ("yes" is an error, "1" is true), and a LIST or STRUCT file must
    # hold a JSON list or object. Each refusal fails the task.
    from google.protobuf import struct_pb2

    kind = PARAMETER_TYPE_NAMES.get(parameter_type, str(parameter_type))

    def refuse(why: str) -> TextConversionError:
        return TextConversionError(
            f"TextToPbValue(text={go_quote(text)}, type={go_quote(kind)}) failed: {why}"
        )

    trimmed = text.strip(" \t\n\r\v\f")  # strings.TrimSpace
    if parameter_type == 3:
        return struct_pb2.Value(string_value=text)
    if parameter_type == 2:
        if not _GO_INT.fullmatch(trimmed):
            raise refuse(f"strconv.ParseInt: parsing {go_quote(trimmed)}: invalid syntax")
        number = int(trimmed)
        if not -(2**63) <= number < 2**63:
            raise refuse(f"strconv.ParseInt: parsing {go_quote(trimmed)}: value out of range")
        return struct_pb2.Value(number_value=float(number))
    if parameter_type == 1:
        return struct_pb2.Value(number_value=_go_parse_float(trimmed, refuse))
    if parameter_type == 4:
        if trimmed not in _GO_BOOLS:
            raise refuse(f"strconv.ParseBool: parsing {go_quote(trimmed)}: invalid syntax")
        return struct_pb2.Value(bool_value=_GO_BOOLS[trimmed])
    if parameter_type in (5, 6):
        try:
            parsed = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        except ValueError as exc:  # protojson: no duplicate keys, no NaN/Infinity literals
            raise refuse(f"proto: syntax error: {exc}") from None
        if not isinstance(parsed, list if parameter_type == 5 else dict):
            raise refuse("unexpected type")
        return value_of(parsed)
    raise refuse(
        "unknown type. Expected STRING, NUMBER_INTEGER, NUMBER_DOUBLE, BOOLEAN, LIST or STRUCT"
    )


def _go_parse_float(text: str, refuse) -> float:
    """strconv.ParseFloat(text, 64): its grammar, and overflow as an error."""
    if _GO_SPECIAL_FLOAT.fullmatch(text):
        return float(text)
    if _GO_HEX_FLOAT.fullmatch(text):
        number = float.fromhex(text)
    elif _GO_DECIMAL_FLOAT.fullmatch(text):
        number = float(text)
    else:
        raise refuse(f"strconv.ParseFloat: parsing {go_quote(text)}: invalid syntax")
    if number in (float("inf"), float("-inf")):
        raise refuse(f"strconv.ParseFloat: parsing {go_quote(text)}: value out of range")
    return number


def _unique_keys(pairs):
    keys = [key for key, _ in pairs]
    duplicate = next((key for key in keys if keys.count(key) > 1), None)
    if duplicate is not None:
        raise ValueError(f"duplicate map key {go_quote(duplicate)}")
    return dict(pairs)


def _no_constant(name):
    raise ValueError(f"invalid value {name}")


def go_quote(text: str) -> str:
    """Go's %q of a string (as JSON quotes it: close enough for the messages quoted here)."""
    return json.dumps(text, ensure_ascii=False)


def value_of(python_value):
    """A Python value as a google.protobuf.Value (JSON rules: numbers become doubles)."""
    from google.protobuf import struct_pb2

    wrapper = struct_pb2.Struct()
    wrapper.update({"v": python_value})
    return wrapper.fields["v"]


_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]{1,20}")


def parameter_from_text(name: str, text: str, parameter_type: int):
    """A `--param NAME=TEXT` as the value of a root parameter of the declared type."""
    # A STRING takes the text as typed (`007` stays `007`); numbers, booleans, lists and structs
    # must read as that type, or the error names the parameter.
    from google.protobuf import struct_pb2

    def refuse(why: str) -> KubeflowError:
        kind = PARAMETER_TYPE_NAMES.get(parameter_type, parameter_type)
        return KubeflowError(f"--param {name}={text[:100]!r}: {name} is a {kind} parameter; {why}")

    if parameter_type == 3:
        return struct_pb2.Value(string_value=text)
    if parameter_type == 2:
        # A protobuf Value holds a double: whole numbers beyond 2**53 would change silently.
        if not _WHOLE_NUMBER.fullmatch(text.strip()) or abs(int(text.strip())) > 2**53:
            raise refuse("give a whole number between -2**53 and 2**53")
        return struct_pb2.Value(number_value=float(int(text.strip())))
    if parameter_type == 1:
        try:
            if "_" in text:  # Python's float() takes 1_000; JSON and Go's ParseFloat don't
                raise ValueError(text)
            number = float(text.strip())
        except ValueError:
            raise refuse("give a number") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise refuse("give a finite number")
        return struct_pb2.Value(number_value=number)
    if parameter_type == 4:
        if text.strip().lower() not in ("true", "false"):
            raise refuse("give true or false")
        return struct_pb2.Value(bool_value=text.strip().lower() == "true")
    if parameter_type in (5, 6):
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise refuse(f"give JSON ({exc})") from None
        if not isinstance(parsed, list if parameter_type == 5 else dict):
            raise refuse("give a JSON " + ("list" if parameter_type == 5 else "object"))
        return value_of(parsed)
    raise refuse("kfp-local cannot set parameters of this type")
