"""Reading gRPC request bytes without holding the GIL for long: a large request is prepared on a
worker thread, but one C call (a protobuf parse, a map's first access, a sort) holds the GIL for
its whole length, so the event loop waits for it just the same.

A PredictRequest of 1M tiny `inputs` entries (13 MiB) took 0.45 s to parse, 1.8 s for the map's
first access (protobuf's C++ map is built from the parsed entries then) and 3 s for dict(): each
one C call. Here the message is parsed in slices of top-level fields (merging the parses of
consecutive slices is parsing the whole: protobuf's merge rule), and Predict's inputs are read
as repeated entries, one Python step each, so the GIL changes hands between them.
"""

from __future__ import annotations

import heapq

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, symbol_database
from tensorflow_serving.apis import predict_pb2

from serving.gc_pause import gc_paused

# The most one C call parses at a time: ~2 ms of GIL at protobuf's worst (~30 ns a byte).
SLICE_BYTES = 64 * 1024
# Each field costs a Python step to find (~1 us): 2M empty output_filter entries (4 MB) took
# 2 s to slice against 0.14 s to parse whole. Past this many, the rest is one C parse.
MAX_SCANNED_FIELDS = 1 << 18
SORT_CHUNK = 16 * 1024  # names sorted per C call before they are merged step by step

_WIRE_PACKAGE = "van_tfx.serving.wire"


def _predict_request_as_repeated():
    # PredictRequest with `inputs` read as `repeated InputsEntry` (the same wire format: a map is
    # sugar for repeated entries), so nothing builds a C++ map in one call.
    proto = descriptor_pb2.FileDescriptorProto()
    predict_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "van_tfx/serving/wire/predict.proto"
    proto.package = _WIRE_PACKAGE
    request = next(m for m in proto.message_type if m.name == "PredictRequest")
    del proto.message_type[:]
    proto.message_type.add().CopyFrom(request)
    request = proto.message_type[0]
    for nested in request.nested_type:
        nested.ClearField("options")  # map_entry: now a plain message
    for field in request.field:
        if field.type_name == ".tensorflow.serving.PredictRequest.InputsEntry":
            field.type_name = f".{_WIRE_PACKAGE}.PredictRequest.InputsEntry"
    del proto.service[:]
    proto.dependency.append(predict_pb2.DESCRIPTOR.name)  # its other messages stay its own
    pool = descriptor_pool.Default()
    pool.Add(proto)
    # The symbol database knows the generated classes (TensorProto, ModelSpec, ...): a plain
    # MessageFactory would make new classes for them, and TensorFlow's isinstance checks fail.
    descriptor = pool.FindMessageTypeByName(f"{_WIRE_PACKAGE}.PredictRequest")
    if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.21 (5 drops GetPrototype)
        return message_factory.GetMessageClass(descriptor)
    return symbol_database.Default().GetPrototype(descriptor)


PredictRequestEntries = _predict_request_as_repeated()


def parse_gently(message_class, raw: bytes):
    """`message_class` parsed from `raw`, at most SLICE_BYTES of top-level fields per C call."""
    message = message_class()
    slices = _top_level_slices(raw) if len(raw) > SLICE_BYTES else None
    if slices is None:  # small, or something only the parser itself can judge
        message.ParseFromString(raw)
        return message
    view = memoryview(raw)
    for start, end in slices:
        message.MergeFromString(view[start:end])
    return message


def _top_level_slices(raw: bytes) -> list[tuple[int, int]] | None:
    """Consecutive ranges of `raw`, each whole top-level fields of about SLICE_BYTES (the rest in
    one once MAX_SCANNED_FIELDS are found), or None when the top level holds a group or is
    malformed (then the whole parse says what is wrong)."""
    slices, start, position, end = [], 0, 0, len(raw)
    for _ in range(MAX_SCANNED_FIELDS):
        if position >= end:
            break
        tag, position = _varint(raw, position)
        if tag is None:
            return None
        wire_type = tag & 7
        if wire_type == 0:
            _, position = _varint(raw, position)
            if position is None:
                return None
        elif wire_type == 1:
            position += 8
        elif wire_type == 2:
            length, position = _varint(raw, position)
            if length is None:
                return None
            position += length
        elif wire_type == 5:
            position += 4
        else:
            return None
        if position > end:
            return None
        if position - start >= SLICE_BYTES:
            slices.append((start, position))
            start = position
    if start < end:
        slices.append((start, end))
    return slices


def _varint(raw: bytes, position: int) -> tuple[int | None, int | None]:
    value, shift = 0, 0
    for index in range(position, min(position + 10, len(raw))):
        byte = raw[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    return None, None


def predict_inputs(request) -> dict:
    """The `inputs` map of a PredictRequest (or PredictRequestEntries), an entry per Python step."""
    # With PredictRequestEntries, later keys win, as in a map.
    if not isinstance(request, PredictRequestEntries):
        return dict(request.inputs)
    with gc_paused():
        return {entry.key: entry.value for entry in request.inputs}


def sorted_gently(names) -> list:
    """sorted(names), sorting SORT_CHUNK at a time and merging them step by step."""
    names = list(names)
    if len(names) <= SORT_CHUNK:
        return sorted(names)
    chunks = [sorted(names[i : i + SORT_CHUNK]) for i in range(0, len(names), SORT_CHUNK)]
    return list(heapq.merge(*chunks))
