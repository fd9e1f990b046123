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
import codecs
import decimal
import json
import math
import re
import time

import grpc
import numpy as np

from serving.errors import ServingError, invalid_argument
from serving.gc_pause import gc_paused
from serving.tensors import check_examples_size, data_type_string

SIGNATURE_KEY = "signature_name"
INSTANCES_KEY = "instances"
INPUTS_KEY = "inputs"
CONTEXT_KEY = "context"
EXAMPLES_KEY = "examples"
B64_KEY = "b64"
BYTES_SUFFIX = "_bytes"
ROW, COLUMNAR = "row", "columnar"
# TensorShape holds at most 254 dimensions, NumPy arrays 32 (NPY_MAXDIMS): deeper lists get a 400
# naming the limit. Python's parser itself stops near 1000 levels of nesting (RapidJSON, recursive
# too, has no limit: TODO in json_tensor.cc).
TF_MAX_TENSOR_RANK = 254
MAX_TENSOR_RANK = 32
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
    "Invalid control character at": "Invalid escape character in string.",
}


class _NumberTooBig(ValueError):
    pass


# Exponents of 100 or more, or 20+ digits: the only literals RapidJSON may call too big.
_SUSPECT_NUMBER = re.compile(rb"[eE]\+?0*[1-9]\d{2,}|\d{20,}")
_NUMBER_PARTS = re.compile(r"-?(\d+)(?:\.(\d+))?(?:[eE]([+-]?)(\d+))?")
_DBL_MAX_OVER_10 = 1.7976931348623157e307


def _too_big(literal: str) -> bool:
    """Whether RapidJSON 1.1.0 (reader.h ParseNumber) refuses this number literal as "too big to
    be stored in double": an integer part it accumulates past DBL_MAX / 10, or a positive
    exponent past 308 plus the fraction digits it counted. Whatever the value: 0e400 is refused,
    2e308 is read as inf."""
    parts = _NUMBER_PARTS.fullmatch(literal)
    if parts is None:
        return False
    integer, fraction, exponent_sign, exponent = parts.groups()
    limit = 2**63 if literal.startswith("-") else 2**64 - 1
    value, counted, double = 0, 0, None  # i64, significandDigit, d once it is a double
    for index, digit in enumerate(map(int, integer)):
        if double is not None:
            if double >= _DBL_MAX_OVER_10:
                return True
            double = double * 10 + digit
        elif value * 10 + digit > limit:
            double = float(value) * 10 + digit
        else:
            value = value * 10 + digit
            counted += index > 0  # the first digit is not counted
    fraction_digits = 0  # -expFrac
    if fraction:
        if double is None and value == 0:  # leading zeros: counted as places, not digits
            zeros = len(fraction) - len(fraction.lstrip("0"))
            fraction_digits, fraction = zeros, fraction[zeros:]
        for digit in map(int, fraction[:40]):  # past 17 significant digits, none count
            if double is None and value <= 2**53 - 1:
                value = value * 10 + digit
                fraction_digits += 1
                counted += value != 0
                continue
            if double is None:
                double = float(value)
            if counted < 17:
                double = double * 10 + digit
                fraction_digits += 1
                counted += double > 0
    if exponent and exponent_sign != "-":
        exponent, limit = exponent.lstrip("0"), str(308 + fraction_digits)
        # Checked from the second digit on, so a one-digit exponent never is; leading zeros
        # never pass. Compared as digit strings: int() refuses more than 4,300 digits.
        return len(exponent) > 1 and (len(exponent), exponent) > (len(limit), limit)
    return False


def _parse_float(text: str) -> float:
    value = float(text)
    # Refused literals read as 0 or inf here, or have a 309-digit integer part.
    if (value == 0.0 or math.isinf(value) or len(text) > 300) and _too_big(text):
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


# ---- parsing: Python's json module, with RapidJSON's (v1.1.0, as TF Serving pins) answers ------

# What a parsed body may expand into: Python holds every JSON value as an object (a float is
# 24 bytes plus an 8-byte slot, an empty list 72 + 8), so 60 MB of `[],` would take gigabytes and
# a minute of CPU. A value costs 1 unit and a list or object 3 more; at most 2^24 units (~0.5 GiB
# of Python objects), which still admits a batch of 32 224x224x3 images written as float lists.
MAX_JSON_UNITS = 1 << 24
CONTAINER_UNITS = 3
_BOM = (0xEF, 0xBB, 0xBF)
_WHITESPACE = b" \t\n\r"
# A high-surrogate \u escape not followed by a low-surrogate one (an odd run of backslashes
# before it would make it literal text, which the even-run prefix excludes).
_BAD_SURROGATE = re.compile(
    rb"(?<!\\)(?:\\\\)*(\\u[dD][89abAB][0-9a-fA-F]{2})(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
)
# RapidJSON's kParseNanAndInfFlag takes Inf, -Inf and -NaN too; Python's json does not.
_EXTRA_LITERAL = re.compile(rb"(?<![\w.+-])(-?Inf(?!inity)|-NaN)")
_STRING_STOP = re.compile(rb'["\\\\\x00-\x1f]')
_NUMBER_TOKEN = re.compile(rb"(?<![\w.+-])-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")


class JsonObject(dict):
    """A JSON object with duplicate keys: lookups see the first (RapidJSON's FindMember)."""

    # `pairs` keeps them all in order (for what iterates members, like MakeExampleFromJsonObject).

    __slots__ = ("pairs",)


def _object_hook(pairs: list):
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    first = JsonObject()
    for key, value in pairs:
        first.setdefault(key, value)
    first.pairs = pairs
    return first


def members(value: dict) -> list:
    """An object's (key, value) pairs in document order, duplicates included."""
    return value.pairs if isinstance(value, JsonObject) else list(value.items())


def _bom_length(body: bytes) -> int:
    # EncodedInputStream<UTF8<>, MemoryStream> skips 0xEF, then 0xBB, then 0xBF, each if present.
    skip = 0
    for byte in _BOM:
        if skip < len(body) and body[skip] == byte:
            skip += 1
    return skip


def json_units(body: bytes) -> int:
    """An upper bound on the budget units the parsed `body` takes (see MAX_JSON_UNITS)."""
    # Every value but the first follows a ',' or a ':' or opens a list/object; quoted text can
    # only over-count. bytes.count runs at memory speed.
    containers = body.count(b"[") + body.count(b"{")
    return 1 + body.count(b",") + body.count(b":") + containers * (1 + CONTAINER_UNITS)


def parse_json(body: bytes, max_units: int = MAX_JSON_UNITS, deadline=None) -> dict:
    """The request object (ParseJson), or the error TF Serving would answer."""
    # JSON Parse errors as RapidJSON words them, or `Is not object`; a 400 naming MAX_JSON_UNITS if
    # the body would expand past it; DEADLINE_EXCEEDED if locating an error takes past `deadline`
    # (time.monotonic()).
    if not body:
        raise invalid_argument("JSON Parse error: The document is empty")
    units = json_units(body)
    if units > max_units:
        raise invalid_argument(
            f"JSON request too large: its values and lists/objects need about {units} units, over "
            f"this server's limit of {max_units} (each value counts 1, a list or object "
            f"{1 + CONTAINER_UNITS})"
        )
    start = _bom_length(body)
    text = body[start:].decode("utf-8", "surrogateescape")
    try:
        doc = _loads(text, body)
    except json.JSONDecodeError as exc:
        doc = _retry_or_raise(body, start, text, exc, deadline)
    except _NumberTooBig:
        offset = _too_big_offset(body, start)
        raise _parse_error("Number too big to be stored in double.", offset) from None
    except RecursionError:
        raise invalid_argument(
            "JSON Parse error: The document is nested too deeply to be a request"
        ) from None
    surrogate = _bad_surrogate(body, start)
    if surrogate is not None:  # Python decodes a lone high surrogate; RapidJSON refuses it
        raise _parse_error("The surrogate pair in string is invalid.", surrogate)
    if not isinstance(doc, dict):
        raise _format_error(doc, "Is not object")
    return doc


def _loads(text: str, body: bytes):
    # The number hooks cost a Python call per number (seconds for a large tensor): they are only
    # needed when a literal could overflow a double or a (u)int64.
    hooks = {"parse_float": _parse_float, "parse_int": _parse_int}
    with gc_paused():
        return json.loads(
            text, object_pairs_hook=_object_hook, **(hooks if _SUSPECT_NUMBER.search(body) else {})
        )


def _parse_error(reason: str, offset: int) -> ServingError:
    return invalid_argument(f"JSON Parse error: {reason} at offset: {offset}")


def _retry_or_raise(body: bytes, start: int, text: str, exc: json.JSONDecodeError, deadline=None):
    """The document if only RapidJSON's extra literals (Inf, -NaN) or a NUL end it early; else
    raise RapidJSON's error for the first place the text stops being JSON."""
    position = start + len(text[: exc.pos].encode("utf-8", "surrogateescape"))
    rewritten = _rewritten(body, start, deadline)
    if rewritten is not None:  # retried by the C parser: scanning in Python took 30 s a 13 MB
        fixed, edits = rewritten
        try:
            return _loads(fixed.decode("utf-8", "surrogateescape"), body)
        except json.JSONDecodeError as again:
            # RapidJSON's error is where the rewritten text's is, back in the body's offsets.
            exc = again
            offset = len(again.doc[: again.pos].encode("utf-8", "surrogateescape"))
            position = _original_offset(edits, start, offset)
        except _NumberTooBig:
            raise _parse_error(
                "Number too big to be stored in double.", _too_big_offset(body, start)
            ) from None
    found = _scan(body, position, deadline=deadline)
    if found is None:  # unreachable when both parsers are right: a 400, never a 500
        found = (_PARSE_ERRORS.get(exc.msg, exc.msg), position)
    surrogate = _bad_surrogate(body, start)
    if surrogate is not None and surrogate < found[1]:
        found = ("The surrogate pair in string is invalid.", surrogate)
    raise _parse_error(*found) from None


def _rewritten(body: bytes, start: int, deadline=None):
    """(body[start:] with RapidJSON's extra literals outside strings as Python's json spells them
    and cut at the first NUL, where MemoryStream ends; the edits as (offset, old and new length)),
    or None
    when there is nothing to rewrite."""
    matches = [(m.start(), m.group(1)) for m in _EXTRA_LITERAL.finditer(body, start)]
    outside = _outside_strings(body, [m[0] for m in matches]) == 0 if matches else []
    nul = body.find(b"\0", start)
    edits = [match for match, keep in zip(matches, outside, strict=True) if keep]
    if not edits and nul < 0:
        return None
    pieces, previous, growth = [], start, []
    for index, (offset, token) in enumerate(edits):
        if index % 65536 == 65535:
            check_deadline(deadline)
        pieces += (body[previous:offset], b"NaN" if token == b"-NaN" else token + b"inity")
        growth.append((offset, len(token), len(pieces[-1])))
        previous = offset + len(token)
    pieces.append(body[previous:])
    fixed = b"".join(pieces)
    end = fixed.find(b"\0")
    return (fixed[:end] if end >= 0 else fixed), growth


def _original_offset(edits: list, start: int, offset: int) -> int:
    """The body offset of byte `offset` of the rewritten text (a rewritten literal's own bytes
    map to its start)."""
    shift = 0
    for original, old, new in edits:
        new_start = original - start + shift
        if offset < new_start:
            break
        if offset < new_start + new:
            return original
        shift += new - old
    return start + offset - shift


def _bad_surrogate(body: bytes, start: int) -> int | None:
    """The offset of the first high-surrogate \\u escape in a string without its low half."""
    if b"\\u" not in body:
        return None
    for match in _BAD_SURROGATE.finditer(body, start):
        if _outside_strings(body, [match.start(1)])[0] == 1:
            return match.start(1)
    return None


def _too_big_offset(body: bytes, start: int) -> int:
    # The first number literal outside strings that a double cannot hold (RapidJSON reports the
    # number's start; an identical string earlier in the body must not be taken for it).
    starts, tokens = [], []
    for match in _NUMBER_TOKEN.finditer(body, start):
        if _SUSPECT_NUMBER.search(match.group()) and _too_big(match.group().decode()):
            starts.append(match.start())
            tokens.append(match.group())
    if starts:
        outside = _outside_strings(body, starts)
        for offset, parity in zip(starts, outside, strict=True):
            if parity == 0:
                return offset
    return start


def _real_quotes(body: bytes, end: int) -> np.ndarray:
    """Offsets of the '"' in body[:end] that open or close strings (not escaped)."""
    data = np.frombuffer(body, np.uint8, count=end)
    quotes = np.flatnonzero(data == 34)
    if not quotes.size:
        return quotes
    slashes = np.concatenate(([0], (data == 92).view(np.int8), [0]))
    edges = np.flatnonzero(np.diff(slashes))  # starts and ends of backslash runs
    run_starts, run_ends = edges[::2], edges[1::2]
    odd = ((run_ends - run_starts) % 2 == 1) & (run_ends < end)
    escaped = run_ends[odd]
    return quotes[~np.isin(quotes, escaped)]


def _outside_strings(body: bytes, offsets) -> np.ndarray:
    """Per offset, 0 if it lies outside strings (an even number of real quotes before it)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    end = int(offsets.max()) if offsets.size else 0
    return np.searchsorted(_real_quotes(body, end), offsets) % 2


def _context(body: bytes, position: int) -> tuple[int, list[bytes]]:
    """(where to resume scanning, the open lists/objects there) for an error Python saw at
    `position`: just after the last bracket, ',' or ':' outside strings before it."""
    start = _bom_length(body)
    data = np.frombuffer(body, np.uint8, count=min(position, len(body)))
    structural = np.flatnonzero(np.isin(data, (91, 123, 44, 58, 93, 125)))
    structural = structural[structural >= start]
    if structural.size:
        structural = structural[np.searchsorted(_real_quotes(body, position), structural) % 2 == 0]
    if not structural.size:
        return start, []
    at = int(structural[-1])
    brackets = structural[structural <= at]
    kinds = data[brackets]
    depth = np.cumsum(np.where((kinds == 91) | (kinds == 123), 1, 0)
                      - np.where((kinds == 93) | (kinds == 125), 1, 0))  # fmt: skip
    openers = (kinds == 91) | (kinds == 123)
    levels, types = depth[openers], kinds[openers]
    # The innermost open container at each level is the last opener seen at that level.
    unique, first = np.unique(levels[::-1], return_index=True)
    last = dict(zip(unique.tolist(), types[::-1][first].tolist(), strict=True))
    final = int(depth[-1]) if depth.size else 0
    stack = [bytes([last[level]]) for level in range(1, final + 1)]
    state = {91: "value0", 123: "name0", 44: "sep", 58: "value", 93: "after", 125: "after"}
    return at + 1, [*stack, state[int(data[at])]]


def _scan(body: bytes, position: int, from_start: bool = False, deadline=None):
    """(RapidJSON's reason, offset) for the first error in `body`, scanning from just before
    `position` (where Python's parser stopped); None if RapidJSON would accept the document."""
    if from_start:
        at, stack = _bom_length(body), ["root"]
    else:
        at, context = _context(body, position)
        stack = ["root", *context] if context else ["root"]
    return _Scanner(body, deadline).run(at, stack)


class _Scanner:
    """RapidJSON's GenericReader (kParseNanAndInfFlag) for locating errors: iterative, one
    token per step, started anywhere with the stack of open lists/objects."""

    def __init__(self, body: bytes, deadline=None):
        self.body = body
        self.deadline = deadline  # time.monotonic(): a step in Python per token is slow

    def peek(self, at: int) -> int:
        return self.body[at] if at < len(self.body) else 0  # MemoryStream: NUL at the end

    def skip(self, at: int) -> int:
        body = self.body
        while at < len(body) and body[at] in _WHITESPACE:
            at += 1
        return at

    def run(self, at: int, stack: list):
        # stack: "root", then b"[" / b"{" per open container, then the state on top:
        # value0/name0 (just opened), sep (after ','), value (after ':'), after (after a value).
        state = stack.pop() if stack[-1] != "root" else "value"
        if stack == ["root"] and state == "value":
            at = self.skip(at)
            if self.peek(at) == 0:
                return "The document is empty.", at
        steps = 0
        while True:
            steps += 1
            if not steps % 65536:
                check_deadline(self.deadline)
            at = self.skip(at)
            top = stack[-1]
            c = self.peek(at)
            if state == "sep":
                state = "name" if top == b"{" else "value"
            if state == "value0" and c == 93:
                at, state = at + 1, "after"
                stack.pop()
                continue
            if state == "name0":
                if c == 125:
                    at, state = at + 1, "after"
                    stack.pop()
                    continue
                state = "name"
            if state == "name":
                if c != 34:
                    return "Missing a name for object member.", at
                at, error = self.string(at)
                if error:
                    return error
                at = self.skip(at)
                if self.peek(at) != 58:
                    return "Missing a colon after a name of object member.", at
                at, state = at + 1, "value"
                continue
            if state in ("value", "value0"):
                if c in (91, 123):
                    stack.append(bytes([c]))
                    at, state = at + 1, "value0" if c == 91 else "name0"
                    continue
                at, error = self.scalar(at, c)
                if error:
                    return error
                state = "after"
                continue
            # after a value
            if top == "root":
                return None if c == 0 else (
                    "The document root must not be followed by other values.", at)  # fmt: skip
            closer = 93 if top == b"[" else 125
            if c == 44:
                at, state = at + 1, "sep"
            elif c == closer:
                at = at + 1
                stack.pop()
            elif top == b"[":
                return "Missing a comma or ']' after an array element.", at
            else:
                return "Missing a comma or '}' after an object member.", at

    def literal(self, at: int, word: bytes):
        for byte in word:
            if self.peek(at) != byte:
                return at, ("Invalid value.", at)
            at += 1
        return at, None

    def scalar(self, at: int, c: int):
        if c == 34:
            return self.string(at)
        if c == 110:
            return self.literal(at, b"null")
        if c == 116:
            return self.literal(at, b"true")
        if c == 102:
            return self.literal(at, b"false")
        return self.number(at)

    def number(self, at: int):
        begin, peek = at, self.peek
        if peek(at) == 45:
            at += 1
        if peek(at) in (73, 78):  # Inf[inity] / NaN
            if peek(at) == 78:
                return self.literal(at, b"NaN")
            at, error = self.literal(at, b"Inf")
            if error or peek(at) != 105:
                return at, error
            return self.literal(at, b"inity")
        if peek(at) == 48:
            at += 1
        elif 49 <= peek(at) <= 57:
            while 48 <= peek(at) <= 57:
                at += 1
        else:
            return at, ("Invalid value.", at)
        if peek(at) == 46:
            at += 1
            if not 48 <= peek(at) <= 57:
                return at, ("Miss fraction part in number.", at)
            while 48 <= peek(at) <= 57:
                at += 1
        if peek(at) in (69, 101):
            at += 1
            if peek(at) in (43, 45):
                at += 1
            if not 48 <= peek(at) <= 57:
                return at, ("Miss exponent in number.", at)
            while 48 <= peek(at) <= 57:
                at += 1
        if _SUSPECT_NUMBER.search(self.body[begin:at]) and _too_big(self.body[begin:at].decode()):
            return at, ("Number too big to be stored in double.", begin)
        return at, None

    def string(self, at: int):
        body, peek = self.body, self.peek
        at += 1
        while True:
            stop = _STRING_STOP.search(body, at)
            at = stop.start() if stop else len(body)
            c = peek(at)
            if c == 34:
                return at + 1, None
            if c == 0:
                return at, ("Missing a closing quotation mark in string.", at)
            if c < 0x20:
                return at, ("Invalid escape character in string.", at)
            escape = at
            kind = peek(at + 1)
            if kind in b'"\\/bfnrt':
                at += 2
                continue
            if kind != 117:
                return at, ("Invalid escape character in string.", escape)
            code = _hex4(body, at + 2)
            if code is None:
                return at, ("Incorrect hex digit after \\u escape in string.", escape)
            at += 6
            if 0xD800 <= code <= 0xDBFF:
                if body[at : at + 2] != b"\\u":
                    return at, ("The surrogate pair in string is invalid.", escape)
                low = _hex4(body, at + 2)
                if low is None:
                    return at, ("Incorrect hex digit after \\u escape in string.", escape)
                if not 0xDC00 <= low <= 0xDFFF:
                    return at, ("The surrogate pair in string is invalid.", escape)
                at += 6


def _hex4(body: bytes, at: int) -> int | None:
    digits = body[at : at + 4]
    if len(digits) == 4 and all(chr(d) in "0123456789abcdefABCDEF" for d in digits):
        return int(digits, 16)
    return None


def signature_name(doc: dict) -> str:
    """The optional signature_name (FillSignature): a string, else the FormatSignatureError."""
    value = doc.get(SIGNATURE_KEY, "")
    if not isinstance(value, str):
        raise invalid_argument(
            f"JSON Value: {value_text(doc)} not formatted correctly. 'signature_name' key must "
            "be a string value."
        )
    return value


def is_text(value: str) -> bool:
    """Whether `value` is valid Unicode text (no bytes kept from bad UTF-8, no lone surrogate)."""
    # Only such text can name a signature or go into a protobuf string.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def display(value: str) -> str:
    """`value` for a message: what is not valid text becomes U+FFFD."""
    return utf8(value).decode("utf-8", "replace")


def check_deadline(deadline: float | None) -> None:
    """DEADLINE_EXCEEDED once time.monotonic() passes `deadline` (None: no deadline)."""
    if deadline is not None and time.monotonic() > deadline:
        raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline exceeded")


def predict_inputs(doc: dict, input_dtypes: dict[str, str], signature: str, deadline=None):
    """(inputs as arrays, ROW or COLUMNAR) of a predict request, per FillPredictRequestFromJson."""
    # `input_dtypes` maps the signature's input aliases to NumPy dtype names ('string' for
    # DT_STRING); it is TF Serving's tensorinfo_map. `deadline` (time.monotonic()) stops the work.
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
        return _from_instances(instances, input_dtypes, deadline), ROW
    if has_inputs:
        return _from_inputs(doc[INPUTS_KEY], input_dtypes, deadline), COLUMNAR
    raise invalid_argument("Missing 'inputs' or 'instances' key")


def _is_b64(value) -> bool:
    # IsValBase64Object: MemberCount() == 1 counts every member, so {"b64": .., "b64": ..} (a
    # JsonObject: duplicate keys) is not one.
    return (
        isinstance(value, dict)
        and not isinstance(value, JsonObject)
        and len(value) == 1
        and isinstance(value.get(B64_KEY), str)
    )


def _is_element_object(value) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


# Instances are converted this many at a time in bulk (NumPy, C loops); only a block that fails
# is gone through element by element, for TF Serving's error wording: the Python work per
# instance stays small, and the deadline is checked between blocks.
_BLOCK = 1024


def _from_instances(instances: list, input_dtypes: dict[str, str], deadline=None) -> dict:
    names = sorted(input_dtypes)
    if not isinstance(instances[0], dict) and len(names) > 1:
        raise invalid_argument(
            "instances is a plain list, but expecting list of objects as multiple input tensors "
            "required as per tensorinfo_map"
        )
    objects = _is_element_object(instances[0])
    if objects:
        shapes = {name: _instance_shape(instances[0].get(name)) for name in names}
    else:
        shapes = {names[0]: _instance_shape(instances[0])}
    blocks: dict[str, list[np.ndarray]] = {name: [] for name in shapes}
    for begin in range(0, len(instances), _BLOCK):
        check_deadline(deadline)
        chunk = instances[begin : begin + _BLOCK]
        bulk = _bulk_block(chunk, objects, names, shapes, input_dtypes)
        if bulk is None:
            bulk = _block_one_by_one(chunk, begin, objects, names, shapes, input_dtypes)
        for name, array in bulk.items():
            blocks[name].append(array.reshape(-1))
    arrays = {}
    for name, parts in blocks.items():
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
        # An object repeating a key adds each member's values (json_tensor.cc iterates them
        # all), and Tensor::FromProto reads the first count x shape of them (FromProtoField).
        shape = [len(instances), *shapes[name]]
        arrays[name] = flat[: math.prod(shape)].reshape(shape)
    return arrays


def _instance_shape(item) -> list[int] | None:
    try:
        return dense_shape(item, MAX_TENSOR_RANK - 1)  # the batch dimension comes on top
    except ServingError:
        return None  # words its error when the element is gone through


def _bulk_block(chunk, objects, names, shapes, input_dtypes) -> dict | None:
    """The block's tensors if every element is well formed and like the first; else None."""
    if objects:
        wanted = set(names)
        for element in chunk:
            if not _is_element_object(element) or isinstance(element, JsonObject):
                return None
            if element.keys() != wanted:
                return None
        columns = {name: [element[name] for element in chunk] for name in names}
    else:
        columns = {names[0]: chunk}
    arrays = {}
    for name, column in columns.items():
        if shapes[name] is None or (not objects and any(map(_is_element_object, column))):
            return None
        array = _regular_array(column, [len(column), *shapes[name]], input_dtypes[name])
        if array is None:
            return None
        arrays[name] = array
    return arrays


def _block_one_by_one(chunk, begin, objects, names, shapes, input_dtypes) -> dict:
    """FillTensorMapFromInstancesList element by element: its checks and messages, in order."""
    columns: dict[str, list] = {name: [] for name in shapes}
    for index, element in enumerate(chunk, begin):
        if objects:
            if not _is_element_object(element):
                raise invalid_argument(
                    f"Expecting object but got list at item {index} of input list"
                )
            for name, item in members(element):  # every member, a repeated key's too
                try:
                    # The item first: it words an unknown input ("does not have named input").
                    value = _instance_item(item, name, input_dtypes, shapes)
                except ServingError as exc:
                    raise invalid_argument(
                        f"Failed to process element: {index} key: {name} of 'instances' list. "
                        f"Error: INVALID_ARGUMENT: {exc.message}"
                    ) from None
                columns[name].append(value)
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
                columns[names[0]].append(_instance_item(element, names[0], input_dtypes, shapes))
            except ServingError as exc:
                raise invalid_argument(
                    f"Failed to process element: {index} of 'instances' list. "
                    f"Error: INVALID_ARGUMENT: {exc.message}"
                ) from None
    # Flat: a repeated key's values come on top of the block's rows (_from_instances cuts them).
    return {
        name: _as_array([v for row in rows for v in row], input_dtypes[name]).reshape(-1)
        for name, rows in columns.items()
    }


def _instance_item(item, name, input_dtypes, shapes) -> list:
    """AddInstanceItem: the element's values, checked against the first element's shape."""
    if name not in input_dtypes:
        raise invalid_argument(f"JSON object: does not have named input: {name}")
    shape = dense_shape(item, MAX_TENSOR_RANK - 1)
    values = fill_values(item, shape, input_dtypes[name])
    expected = shapes[name]
    if math.prod(expected) != len(values):
        raise invalid_argument(
            f"Expecting tensor size: {math.prod(expected)} but got: {len(values)}"
        )
    if expected != shape:
        raise invalid_argument(
            f"Expecting shape {_shape_text(expected)} but got: {_shape_text(shape)}"
        )
    return values


def _from_inputs(value, input_dtypes: dict[str, str], deadline=None) -> dict:
    if not isinstance(value, dict) or _is_b64(value):
        if len(input_dtypes) > 1:
            raise invalid_argument(
                "inputs is a plain value/list, but expecting an object as multiple input tensors "
                "required as per tensorinfo_map"
            )
        name = next(iter(input_dtypes))
        return {name: to_array(value, input_dtypes[name], deadline)}
    arrays = {}
    for name in sorted(input_dtypes):
        if name not in value:
            raise invalid_argument(f"Missing named input: {name} in 'inputs' object.")
        check_deadline(deadline)
        arrays[name] = to_array(value[name], input_dtypes[name], deadline)
    return arrays


def to_array(value, dtype: str, deadline=None) -> np.ndarray:
    """One JSON value (scalar or nested lists) as an array of `dtype` (FillTensorProto)."""
    shape = dense_shape(value)
    fast = _regular_array(value, shape, dtype)
    if fast is not None:
        return fast
    return _as_array(fill_values(value, shape, dtype, deadline), dtype).reshape(shape)


_KINDS = {  # Python types of JSON values each dtype takes without a check per element
    "float32": {int, float},
    "float64": {int, float},
    "bool": {bool},
    "string": {str, dict, JsonObject},
}


def _regular_array(value, shape: list[int], dtype: str) -> np.ndarray | None:
    """The array in bulk when `value` is a regular nesting of acceptable leaves; None to take
    the element-by-element path (which also words the errors)."""
    if not shape:
        return None
    try:
        objects = np.array(value, dtype=object)
    except ValueError:
        return None
    if list(objects.shape) != shape:
        return None  # ragged or deeper than its first elements
    if not objects.size:  # only lists, all empty: nothing to check per element
        return np.empty(shape, dtype=object if dtype == "string" else dtype)
    flat = objects.ravel()
    kinds = set(map(type, flat))
    if dtype in _INT_RANGES:
        low, high = _INT_RANGES[dtype]
        if kinds != {int} or min(flat) < low or max(flat) > high:
            return None
    elif dtype not in _KINDS or not kinds <= _KINDS[dtype]:
        return None
    if dtype == "string":
        if kinds == {str}:
            flat = np.array([utf8(v) for v in flat], dtype=object)
        elif not all(map(_is_b64, (v for v in flat if type(v) is not str))):
            return None
        else:
            flat = np.array([utf8(v) if type(v) is str else decode_b64(v) for v in flat], object)
    return _as_array(flat, dtype).reshape(shape)


def dense_shape(value, max_rank: int | None = None) -> list[int]:
    """GetDenseTensorShape: the sizes along the first element of each nested list."""
    max_rank = MAX_TENSOR_RANK if max_rank is None else max_rank
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if len(shape) > max_rank:
            raise invalid_argument(
                f"JSON Value: lists nested {len(shape)}+ levels deep cannot be a tensor: this "
                f"server's tensors have at most {MAX_TENSOR_RANK} dimensions (TF Serving's "
                f"{TF_MAX_TENSOR_RANK}), the batch dimension of 'instances' included"
            )
        if not value:
            break
        value = value[0]
    return shape


_ACCEPTED = {  # leaf types that need no further check, per dtype
    "float32": (int, float),
    "float64": (int, float),
    "bool": (bool,),
    "string": (str,),
}


def fill_values(value, shape: list[int], dtype: str, deadline=None) -> list:
    """The leaf values in row-major order, checked level by level like FillTensorProto."""
    values: list = []
    innermost = len(shape) - 1
    accepted = set(_ACCEPTED.get(dtype, ()))
    stack = [(value, 0)]  # iterative: a deep list must not exhaust Python's recursion
    steps = 0
    while stack:
        steps += 1
        if not steps % 4096:
            check_deadline(deadline)
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
        if level == innermost:  # the bulk of a tensor: its leaves in one go when all are fine
            kinds = set(map(type, item))
            if kinds <= accepted and dtype != "string":
                values.extend(float(v) for v in item) if dtype.startswith("float") else (
                    values.extend(item))  # fmt: skip
                continue
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


def _as_bytes(error: UnicodeEncodeError):
    # Surrogates U+DC80..U+DCFF are bytes of invalid UTF-8 kept by surrogateescape; any other
    # (a lone low surrogate escape, which RapidJSON accepts) becomes its 3-byte form, as there.
    text = error.object[error.start : error.end]
    out = bytearray()
    for char in text:
        code = ord(char)
        out += bytes([code - 0xDC00]) if 0xDC80 <= code <= 0xDCFF else char.encode(
            "utf-8", "surrogatepass")  # fmt: skip
    return bytes(out), error.end


codecs.register_error("van_tfx_json_bytes", _as_bytes)


def utf8(text: str) -> bytes:
    """A JSON string's bytes: as sent (undecodable bytes survive parsing as surrogates)."""
    return text.encode("utf-8", "van_tfx_json_bytes")


_B64_SPACE = str.maketrans("", "", " \t\n\v\f\r")  # absl::ascii_isspace
_B64_TEXT = re.compile(r"([A-Za-z0-9+/]*)([=.]*)")


def base64_unescape(text: str) -> bytes | None:
    """absl::Base64Unescape of `text`; None if it is not base64."""
    # The standard alphabet; whitespace anywhere is skipped; the end is no padding or exactly the
    # right padding, of '=' and/or '.'.
    if not text.isascii():
        return None
    match = _B64_TEXT.fullmatch(text.translate(_B64_SPACE))
    if match is None:
        return None
    data, padding = match.groups()
    expected = {0: 0, 2: 2, 3: 1}.get(len(data) % 4)
    if expected is None or (padding and len(padding) != expected):
        return None  # one leftover character, or padding of the wrong length
    return binascii.a2b_base64(data + "=" * expected)


def decode_b64(value) -> bytes:
    """A {"b64": "..."} object's bytes (JsonDecodeBase64Object)."""
    if not _is_b64(value):
        raise invalid_argument(
            f"JSON Value: {value_text(value)} not formatted correctly for base64 data"
        )
    decoded = base64_unescape(value[B64_KEY])
    if decoded is None:
        raise invalid_argument("Unable to base64 decode")
    return decoded


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


# RapidJSON's Writer::WriteString escapes: the short forms, else \u00XX (upper-case hex) below
# 0x20; everything else as it is.
_ESCAPES = {i: f"\\u{i:04X}" for i in range(0x20)} | {
    0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r", 0x22: '\\"', 0x5C: "\\\\",
}  # fmt: skip


def _string_text(value: str) -> str:
    return '"' + display(value).translate(_ESCAPES) + '"'


def _double_text(value: float) -> str | None:
    """Writer::Double (Grisu2 + Prettify): shortest digits; None for NaN/Inf, which it refuses."""
    if not math.isfinite(value):
        return None
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return f"{sign}0.0"
    _, digits, k = decimal.Decimal(repr(abs(value))).normalize().as_tuple()
    mantissa, length = "".join(map(str, digits)), len(digits)
    kk = length + k  # 10^(kk-1) <= value < 10^kk
    if 0 <= k and kk <= 21:
        text = mantissa + "0" * k + ".0"
    elif 0 < kk <= 21:
        text = f"{mantissa[:kk]}.{mantissa[kk:]}"
    elif -6 < kk <= 0:
        text = "0." + "0" * -kk + mantissa
    elif length == 1:
        text = f"{mantissa}e{kk - 1}"
    else:
        text = f"{mantissa[0]}.{mantissa[1:]}e{kk - 1}"
    return sign + text


class _Full(Exception):
    pass


def value_text(value) -> str:
    """JsonValueToString: the value as RapidJSON's PrettyWriter writes it, cut to a short length."""
    # PrettyWriter: 4-space indent, `"key": value`.
    if isinstance(value, float):  # written by WriteDecimal, as a float when it fits one
        if abs(value) <= 3.4028234e38 or not math.isfinite(value):
            return _decimal_texts(np.array([value], dtype=np.float32))[0]
        return _decimal_texts(np.array([value], dtype=np.float64))[0]
    parts: list[str] = []
    size = 0

    def write(text: str) -> None:
        nonlocal size
        parts.append(text)
        size += len(text)
        if size > _MAX_VALUE_TEXT:
            raise _Full

    # Iterative (a deep value must not exhaust Python's recursion), stopping once long enough.
    stack: list = [(value, 0)]
    try:
        while stack:
            item, indent = stack.pop()
            if isinstance(item, str) and indent < 0:  # a literal piece queued below
                write(item)
                continue
            if isinstance(item, list | dict) and not item:
                write("[]" if isinstance(item, list) else "{}")
                continue
            if isinstance(item, list | dict):
                pad = "\n" + " " * 4 * (indent + 1)
                entries = members(item) if isinstance(item, dict) else [(None, v) for v in item]
                pieces: list = [("[" if isinstance(item, list) else "{", -1)]
                for index, (key, child) in enumerate(entries):
                    lead = ("," if index else "") + pad
                    if key is not None:
                        lead += _string_text(key) + ": "
                    pieces += [(lead, -1), (child, indent + 1)]
                pieces.append(
                    ("\n" + " " * 4 * indent + ("]" if isinstance(item, list) else "}"), -1)
                )
                stack.extend(reversed(pieces))
                continue
            if item is None or isinstance(item, bool):
                write({None: "null", True: "true", False: "false"}[item])
            elif isinstance(item, int):
                write(str(item))
            elif isinstance(item, float):
                text = _double_text(item)
                if text is None:  # the Writer fails on NaN/Inf: the text so far is what shows
                    break
                write(text)
            else:
                write(_string_text(item))
    except _Full:
        return "".join(parts)[:_MAX_VALUE_TEXT] + "..."
    return "".join(parts)


def _shape_text(shape: list[int]) -> str:
    return f"[{','.join(str(d) for d in shape)}]"


# ---- classify: JSON objects -> tf.Examples ----------------------------------------------------


def classify_examples(doc: dict, deadline=None, limit: int | None = None) -> list[bytes]:
    """Serialized tf.Examples (context merged into each) of a classify request body."""
    # Refused past `limit` decoded bytes as gRPC's are (the context is copied into every one).
    context = b""
    if CONTEXT_KEY in doc:
        context = _example_bytes(doc[CONTEXT_KEY])
    if EXAMPLES_KEY not in doc:
        raise _format_error(
            doc, "When method is classify, key 'examples' is expected and was not found"
        )
    examples = doc[EXAMPLES_KEY]
    if not isinstance(examples, list):
        raise _format_error(doc, "Expecting 'examples' value to be an list/array")
    if not examples:
        raise _format_error(doc, "'examples' value is an empty array")
    check_examples_size(EXAMPLES_KEY, len(examples), len(context), 0, limit)
    # The examples' own bytes are bounded by the body's (JSON is no smaller than the protobuf).
    serialized = []
    for index, value in enumerate(examples):
        if not index % _BLOCK:
            check_deadline(deadline)
        # TF Serving concatenates serialized context + example: protobuf merges them on parse.
        serialized.append(context + _example_bytes(value))
    return serialized


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _example_bytes(value) -> bytes:
    """MakeExampleFromJsonObject, serialized: Example.features (1) -> Features.feature (1), a
    map<string, Feature> written by hand so a feature name is kept as the bytes that were sent
    (protobuf's Python API refuses invalid UTF-8); a repeated name: the last one wins."""
    from tensorflow.core.example import feature_pb2

    if not isinstance(value, dict):
        raise invalid_argument(f"Example must be JSON object but got JSON {_json_type(value)}")
    features: dict[bytes, bytes] = {}
    for name, content in members(value):
        feature = feature_pb2.Feature()
        for item in content if isinstance(content, list) else [content]:
            _add_feature_value(item, name, feature)
        key = utf8(name)
        features.pop(key, None)  # `(*map)[name] = feature`: the last value, in its place
        features[key] = feature.SerializeToString()
    entries = b"".join(_field(1, _field(1, key) + _field(2, f)) for key, f in features.items())
    return _field(1, entries) if features else b""


def _add_feature_value(value, name: str, feature) -> None:
    kind = feature.WhichOneof("kind")
    if value is None or isinstance(value, list) or (isinstance(value, dict) and not _is_b64(value)):
        raise invalid_argument(
            f"Feature: {display(name)} has element with unexpected JSON type: {_json_type(value)}"
        )
    if isinstance(value, bool) or (isinstance(value, int) and -(2**63) <= value < 2**64):
        _check_kind(kind, "int64_list", name)
        if value is not True and value is not False and value >= 2**63:
            raise invalid_argument(
                f"Feature: {display(name)} has uint64_t element. Only int64_t is supported."
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
            f"Unexpected element type in feature: {display(name)} expecting type: {names[kind]}"
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
