"""Trigger conditions: CEL over a task's ExecutorInput (backend/src/v2/expression/expression.go).

cel-python evaluates; the ExecutorInput is presented the way cel-go's proto adapter presents it
(every field, numbers in `google.protobuf.Value` as doubles). One known difference: cel-go 0.30
(the backend's) compares ints and doubles across types (`1.0 == 1` is true), cel-python raises
"no such overload"; TFX writes `== 1.0`.
"""

from __future__ import annotations

import json

from pipeline.kfp_backend import TaskFailed


def cel_of_struct_value(value):
    """A google.protobuf.Value as CEL sees it (numbers are doubles, as in cel-go)."""
    from celpy import celtypes

    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return celtypes.DoubleType(value.number_value)
    if kind == "string_value":
        return celtypes.StringType(value.string_value)
    if kind == "bool_value":
        return celtypes.BoolType(value.bool_value)
    if kind == "struct_value":
        return cel_of_message(value.struct_value)
    if kind == "list_value":
        return celtypes.ListType([cel_of_struct_value(v) for v in value.list_value.values])
    return None  # null


def cel_of_message(message):
    """A protobuf message as cel-go's proto adapter presents it: every field, set or not."""
    from celpy import celtypes

    name = message.DESCRIPTOR.full_name
    if name == "google.protobuf.Struct":
        return celtypes.MapType(
            {celtypes.StringType(k): cel_of_struct_value(v) for k, v in message.fields.items()}
        )
    if name == "google.protobuf.Value":
        return cel_of_struct_value(message)
    if name == "google.protobuf.ListValue":
        return celtypes.ListType([cel_of_struct_value(v) for v in message.values])
    return celtypes.MapType(
        {celtypes.StringType(f.name): _cel_field(message, f) for f in message.DESCRIPTOR.fields}
    )


def _cel_field(message, descriptor):
    from celpy import celtypes

    value = getattr(message, descriptor.name)
    if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
        value_field = descriptor.message_type.fields_by_name["value"]
        return celtypes.MapType(
            {
                celtypes.StringType(k): _cel_scalar_or_message(v, value_field)
                for k, v in value.items()
            }
        )
    if descriptor.label == descriptor.LABEL_REPEATED:
        return celtypes.ListType([_cel_scalar_or_message(v, descriptor) for v in value])
    return _cel_scalar_or_message(value, descriptor)


def _cel_scalar_or_message(value, descriptor):
    from celpy import celtypes

    if descriptor.message_type is not None:
        return cel_of_message(value)
    kinds = {
        descriptor.TYPE_STRING: celtypes.StringType,
        descriptor.TYPE_BYTES: celtypes.BytesType,
        descriptor.TYPE_BOOL: celtypes.BoolType,
        descriptor.TYPE_DOUBLE: celtypes.DoubleType,
        descriptor.TYPE_FLOAT: celtypes.DoubleType,
        descriptor.TYPE_UINT32: celtypes.UintType,
        descriptor.TYPE_UINT64: celtypes.UintType,
    }
    return kinds.get(descriptor.type, celtypes.IntType)(value)  # ints and enums are CEL ints


def _parse_json(text):
    """CEL's parseJson(string) -> dyn, as expression.celParseJson registers it."""
    import celpy

    return celpy.json_to_cel(json.loads(text))


def evaluate_condition(executor_input, condition: str) -> bool:
    """expression.Expr.Condition: the CEL condition over the ExecutorInput's fields; must be bool."""
    import celpy
    from celpy import celtypes

    environment = celpy.Environment()
    try:
        program = environment.program(
            environment.compile(condition), functions={"parseJson": _parse_json}
        )
        activation = {
            f.name: _cel_field(executor_input, f) for f in executor_input.DESCRIPTOR.fields
        }
        result = program.evaluate(activation)
    except (celpy.CELParseError, celpy.CELEvalError) as exc:
        raise TaskFailed(f"evaluation error: {exc.args[0] if exc.args else exc}") from None
    if isinstance(result, celpy.CELEvalError):
        raise TaskFailed(f"evaluation error: {result}")
    if not isinstance(result, celtypes.BoolType):
        raise TaskFailed(f"evaluation error: return type is not bool, got {result!r}")
    return bool(result)
