"""One loaded version of a SavedModel: its signatures, validated calls, and optional batchers."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
from typing import NamedTuple

import grpc
import numpy as np

from serving.batching import Batcher
from serving.errors import ServingError, from_tf_error, invalid_argument, signature_not_found
from serving.files import irregular_kind
from serving.grpc_wire import sorted_gently
from serving.images import check_pixel_budget
from serving.limits import RequestLimits
from serving.protos import BatchingSettings
from serving.tensors import (
    checked_shape,
    data_type_string,
    decoded_nbytes,
    from_tensor_proto,
    tensor_parsing_error,
)

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD_NAMES = (
    "tensorflow/serving/predict",
    "tensorflow/serving/classify",
    "tensorflow/serving/regress",
)
SAVED_MODEL_FILE = "saved_model.pb"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")


# Protocol buffers cannot exceed 2 GiB - 1 bytes; TF Serving's ReadBinaryProto stops there.
MAX_SAVED_MODEL_BYTES = 2**31 - 1


def check_saved_model_file(path: str) -> None:
    """Refuse <path>/saved_model.pb before anything reads it if it is no file or too large."""
    # FAILED_PRECONDITION when it is no regular file (opening a FIFO blocked the poll thread for
    # good: no version of any model loaded again), DATA_LOSS when larger than a protocol buffer
    # can be (tf.saved_model.load reads it whole: a 20 GB sparse file ended the server with
    # SIGSEGV under an 8 GB limit).
    import tensorflow as tf

    file = os.path.join(path, SAVED_MODEL_FILE)
    check_regular_file(file)
    try:
        size = tf.io.gfile.stat(file).length
    except tf.errors.NotFoundError:
        # A numbered child is aspired by its name alone; reader.cc's ReadSavedModel message.
        raise ServingError(
            grpc.StatusCode.NOT_FOUND,
            "Could not find SavedModel .pb or .pbtxt at supplied export directory path: "
            f"{path}. Check that the directory exists and that you have the right permissions "
            "for accessing it.",
        ) from None
    if size > MAX_SAVED_MODEL_BYTES:
        raise ServingError(
            grpc.StatusCode.DATA_LOSS,
            f"Can't parse {file} as binary proto: it is {size} bytes, more than the "
            f"{MAX_SAVED_MODEL_BYTES} a protocol buffer may hold",
        )


def check_regular_file(file: str) -> None:
    """FAILED_PRECONDITION (TF's code for EISDIR) when a version's `file` is no regular file."""
    kind = irregular_kind(file)
    if kind is not None:
        raise ServingError(
            grpc.StatusCode.FAILED_PRECONDITION, f"{file} is {kind}, not a regular file"
        )


# tensorflow_model_server's default --saved_model_tags (server.cc: kSavedModelTagServe).
SERVE_TAGS = frozenset({"serve"})


def read_signature_defs(path: str):
    """The SignatureDef map of the SavedModel's MetaGraph tagged exactly {serve}, as TF Serving's."""
    # As its loader finds it (reader.cc FindMetaGraphDef); DATA_LOSS or NOT_FOUND as it fails.
    import tensorflow as tf
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    file = os.path.join(path, SAVED_MODEL_FILE)
    saved_model = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(file, "rb") as f:
        data = f.read()  # at most MAX_SAVED_MODEL_BYTES (check_saved_model_file)
    try:
        saved_model.ParseFromString(data)
    except DecodeError:
        raise ServingError(
            grpc.StatusCode.DATA_LOSS, f"Can't parse {file} as binary proto"
        ) from None
    for meta_graph in saved_model.meta_graphs:
        if set(meta_graph.meta_info_def.tags) == SERVE_TAGS:
            return meta_graph.signature_def
    # tf.saved_model.load without tags took a lone MetaGraph whatever its tags: a version with
    # one empty MetaGraph went AVAILABLE (no signatures) and replaced the one serving.
    raise ServingError(
        grpc.StatusCode.NOT_FOUND,
        f"Could not find meta graph def matching supplied tags: {{ {' '.join(sorted(SERVE_TAGS))} "
        "}. To inspect available tag-sets in the SavedModel, please use the SavedModel CLI: "
        "`saved_model_cli`",
    )


class Servable:
    """A SavedModel version loaded with tf.saved_model.load, callable by signature key."""

    def __init__(
        self,
        name: str,
        version: int,
        path: str,
        batching: BatchingSettings | None,
        limits: RequestLimits | None = None,
        method_name_check: bool = False,
        tensor_content: bool = False,
    ):
        import tensorflow as tf

        self.name, self.version, self.path = name, version, path
        check_saved_model_file(path)
        self.signature_defs = read_signature_defs(path)  # first: it refuses untagged graphs
        self._model = tf.saved_model.load(path, tags=sorted(SERVE_TAGS))
        self._functions = dict(self._model.signatures)
        self._batching = batching
        self._batchers: dict[str, Batcher] = {}
        self._lock = threading.Lock()
        self.warmup_records = 0
        self._unloaded = False
        self._specs: dict[str, list[_InputSpec]] = {}
        self._running: set = set()  # CancellationManagers of the model calls in progress
        self.priority = None  # the manager's LoadPriority once live (None while loading)
        self.limits = limits or RequestLimits()
        self.method_name_check = method_name_check
        self.tensor_content = tensor_content  # Predict outputs as tensor_content, not fields

    def signature_def(self, key: str):
        """The SignatureDef for `key` ('' means serving_default) or FAILED_PRECONDITION."""
        key = key or DEFAULT_SIGNATURE
        if key not in self._functions or key not in self.signature_defs:
            raise signature_not_found(key)
        return self.signature_defs[key]

    def run(
        self,
        key: str,
        inputs: dict,
        output_filter=(),
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Check `inputs` against signature `key`, run it (batched if enabled), filter outputs."""
        # `inputs` are arrays or TensorProtos.
        key, feed, wanted = self._prepare(key, inputs, output_filter)
        if self._batching is None or self._unloaded:  # in-flight calls finish after an unload
            outputs = self._call_with_deadline(key, feed, timeout)
        else:
            outputs = self._batcher(key).submit(feed, timeout)
        return _filtered(outputs, wanted)

    def _call_with_deadline(self, key: str, feed: dict, timeout: float | None) -> dict:
        # A caller that stops waiting stops the model too: the graph is cancelled at the
        # deadline instead of running on for nobody.
        if timeout is None:
            return self._call(key, feed)
        cancel = _cancellation_manager()
        timer = threading.Timer(timeout, cancel.start_cancel)
        timer.daemon = True
        timer.start()
        try:
            return self._call(key, feed, cancel)
        except ServingError as exc:
            if exc.code == grpc.StatusCode.CANCELLED and not timer.is_alive():
                raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline exceeded") from None
            raise
        finally:
            timer.cancel()

    async def run_async(
        self, key: str, inputs: dict, output_filter=(), executor=None, light: bool = True
    ) -> dict[str, np.ndarray]:
        """`run` for an event loop: batched calls join the batch queue, others go to `executor`."""
        # Inputs are checked on the loop only when they and their request are `light`. No timeout:
        # cancelling the awaiting task (grpc.aio does at the deadline) abandons the call.
        loop = asyncio.get_running_loop()
        key, feed, wanted = await off_the_loop_unless(
            light and is_light(inputs), executor, self._prepare, key, inputs, output_filter
        )
        if self._batching is not None and not self._unloaded:
            return _filtered(await self._batcher(key).submit_async(feed), wanted)
        cancel = _cancellation_manager()
        pending = loop.run_in_executor(executor, self._call, key, feed, cancel)
        try:
            return _filtered(await pending, wanted)
        except asyncio.CancelledError:  # deadline passed or client gone: stop the graph too
            cancel.start_cancel()
            raise

    def _prepare(self, key: str, inputs, output_filter) -> tuple[str, dict, set[str]]:
        # TF Serving's order (predict_util.cc RunPredict, PreProcessPrediction): signature,
        # method name (when checked), input count, each input, then the output filter.
        key = key or DEFAULT_SIGNATURE
        signature = self.signature_def(key)
        if self.method_name_check and signature.method_name not in PREDICT_METHOD_NAMES:
            raise ServingError(
                grpc.StatusCode.INTERNAL,
                "Expected prediction signature method_name to be one of {"
                f"{', '.join(PREDICT_METHOD_NAMES)}}}. Was: {signature.method_name}",
            )
        specs = self._input_specs(key)
        decoded = _decoded_inputs(specs, inputs, self.limits)
        wanted = _validated_filter(signature, output_filter)
        # The session checks dtypes and shapes when it runs, after the output filter passed.
        return key, _checked_feed(specs, inputs, decoded, self.limits), wanted

    def _input_specs(self, key: str) -> list[_InputSpec]:
        # Built once per signature: dtype lookups cost more than the checks themselves.
        specs = self._specs.get(key)
        if specs is None:
            specs = self._specs[key] = _input_specs(self.signature_defs[key])
        return specs

    def batchers(self) -> dict[str, Batcher]:
        """The batchers created so far, by signature key."""
        with self._lock:
            return dict(self._batchers)

    def unload(self) -> None:
        """Drain and stop the batchers; the model is freed once no request holds it."""
        with self._lock:
            self._unloaded = True
            batchers, self._batchers = self._batchers, {}
        for batcher in batchers.values():
            batcher.stop()

    def _batcher(self, key: str) -> Batcher:
        with self._lock:
            if key not in self._batchers:
                self._batchers[key] = Batcher(
                    lambda feed: self._call(key, feed), self._batching, f"{self.name}-{key}"
                )
            return self._batchers[key]

    def cancel_running(self) -> int:
        """Cancel every model call in progress (server shutdown); returns how many."""
        with self._lock:
            running = list(self._running)
        for cancel in running:
            cancel.start_cancel()
        return len(running)

    def _call(self, key: str, feed: dict[str, np.ndarray], cancel=None) -> dict[str, np.ndarray]:
        import tensorflow as tf

        cancel = cancel or _cancellation_manager()
        with self._lock:
            self._running.add(cancel)
        try:
            function = cancel.get_cancelable_function(self._functions[key])
            with self.priority.model_call() if self.priority else contextlib.nullcontext():
                outputs = function(**{k: tf.constant(v) for k, v in feed.items()})
                return {name: tensor.numpy() for name, tensor in outputs.items()}
        except tf.errors.CancelledError:
            raise ServingError(grpc.StatusCode.CANCELLED, "The model call was cancelled") from None
        except (tf.errors.OpError, UnicodeDecodeError) as exc:
            raise from_tf_error(exc) from exc
        except (ValueError, TypeError) as exc:  # inputs the concrete function cannot accept
            raise invalid_argument(str(exc)) from exc
        finally:
            with self._lock:
                self._running.discard(cancel)


# Requests up to this size are prepared on the event loop: a thread hop costs ~0.1 ms, more than
# checking a few images; anything larger may take milliseconds to seconds and goes to a thread.
LIGHT_BYTES = 64 * 1024
LIGHT_ELEMENTS = 1024


async def off_the_loop_unless(light: bool, executor, fn, *args):
    """fn(*args) on the event loop when `light`, else in `executor`."""
    if light:
        return fn(*args)
    # Decoding and checking a large request would hold the loop (and every other RPC) up.
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


def is_light(inputs: dict) -> bool:
    """True when decoding and checking `inputs` (TensorProtos or arrays) is a few microseconds."""
    total = 0
    for value in inputs.values():
        if isinstance(value, np.ndarray):
            if value.size > LIGHT_ELEMENTS:
                return False
            total += sum(map(len, value.flat)) if value.dtype == object else value.nbytes
        else:
            if math.prod(d.size for d in value.tensor_shape.dim) > LIGHT_ELEMENTS:
                return False
            total += value.ByteSize()
        if total > LIGHT_BYTES:
            return False
    return True


def _cancellation_manager():
    # TF's own mechanism for stopping a running function (tf.distribute uses it): ops check it
    # between kernels, so a long graph ends within one kernel of start_cancel().
    from tensorflow.python.eager import cancellation

    return cancellation.CancellationManager()


class _InputSpec(NamedTuple):
    position: int
    alias: str
    feed_name: str
    dtype: object  # tf.DType
    dims: list[int] | None  # None: unknown rank


def _input_specs(signature) -> list[_InputSpec]:
    import tensorflow as tf

    return [
        _InputSpec(
            position,
            alias,
            info.name,
            tf.dtypes.as_dtype(info.dtype),
            None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim],
        )
        for position, (alias, info) in enumerate(sorted(signature.inputs.items()))
    ]


def _decoded_inputs(specs: list[_InputSpec], inputs: dict, limits) -> dict:
    """The inputs as GetInputValues reads them: count, aliases, TensorProtos decoded (within
    `limits`) as Tensor::FromProto would; dtypes and shapes are the session's, checked later."""
    expected, sent = {spec.alias for spec in specs}, set(inputs)
    if len(sent) != len(expected):  # VerifyRequestInputsSize (predict_util.cc)
        # Sorted in steps: a request may send a million names, and one sort call holds the GIL.
        raise invalid_argument(
            f"input size does not match signature: {len(sent)}!={len(expected)} "
            f"len({{{','.join(sorted_gently(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
            f"Sent extra: {{{','.join(sorted_gently(sent - expected))}}}. "
            f"Missing but required: {{{','.join(sorted(expected - sent))}}}."
        )
    _check_decoded_size(specs, inputs, limits.max_tensor_bytes)
    decoded = {}
    for spec in specs:  # GetInputValues (tensorflow/cc/saved_model/util.cc)
        if spec.alias not in inputs:
            raise invalid_argument(
                f"Signature input alias: {spec.alias}(feed name: {spec.feed_name}) not found in "
                f"request and no default value provided. Inputs expected to be in the request "
                f"{{{','.join(sorted(sent))}}}, or default input alias set: "
            )
        value = inputs[spec.alias]
        decoded[spec.alias] = value if isinstance(value, np.ndarray) else _from_proto(value, spec)
    return decoded


def _checked_feed(specs: list[_InputSpec], inputs: dict, decoded: dict, limits) -> dict:
    """The feed, each value's dtype and shape checked as the session checks a feed, then its
    pixels counted against `limits`."""
    feed = {}
    for spec in specs:
        value, sent = decoded[spec.alias], inputs[spec.alias]
        if isinstance(sent, np.ndarray):
            value = _as_dtype(value, spec.dtype, spec.position, spec.alias)
        else:  # the proto's own dtype counts, even for an empty tensor
            _dtype_mismatch(spec.dtype, spec.position, sent.dtype)
            if value is None:  # DT_VARIANT / DT_RESOURCE fed where such a dtype is declared
                raise tensor_parsing_error(spec.alias)
        _check_shape(spec.dims, value.shape, spec.alias)
        check_pixel_budget(spec.alias, value, limits.max_image_pixels)
        feed[spec.alias] = value
    return feed


def _check_decoded_size(specs: list[_InputSpec], inputs: dict, limit: int) -> None:
    """Refuse a request whose TensorProtos would decode to more than `limit` bytes in all.

    Tensor::FromProto fills a declared shape by repeating the last value (or with zeros), so a
    12-byte proto may declare gigabytes; the sizes are computed from the shapes, before decoding.
    """
    sizes = {
        spec.alias: decoded_nbytes(proto, checked_shape(proto, spec.alias), spec.alias)
        for spec in specs
        if not isinstance(proto := inputs.get(spec.alias, np.empty(0)), np.ndarray)
    }
    if sum(sizes.values()) > limit:
        alias = max(sizes, key=sizes.get)
        shape = checked_shape(inputs[alias], alias)
        raise invalid_argument(
            f"Input {alias} declares shape {shape}: {sizes[alias]} bytes once decoded"
            f"{' (all inputs: ' + str(sum(sizes.values())) + ')' if len(sizes) > 1 else ''}, "
            f"more than the {limit} bytes this server decodes per request (--max_message_bytes)"
        )


def _from_proto(proto, spec: _InputSpec) -> np.ndarray | None:
    """A TensorProto input decoded as Tensor::FromProto would; None for DT_VARIANT and
    DT_RESOURCE, which FromProto accepts (default-constructed values) and NumPy cannot hold."""
    from tensorflow.core.framework import types_pb2

    if proto.dtype in (types_pb2.DT_VARIANT, types_pb2.DT_RESOURCE):
        return None
    return from_tensor_proto(proto, spec.alias)


def _dtype_mismatch(want, position: int, have_enum: int) -> None:
    import tensorflow as tf

    have = tf.dtypes.as_dtype(have_enum)
    if have != want:
        raise invalid_argument(
            f"Expects arg[{position}] to be {data_type_string(want.name)} but "
            f"{data_type_string(have.name)} is provided"
        )


def _as_dtype(value: np.ndarray, want, position: int, alias: str) -> np.ndarray:
    import tensorflow as tf

    try:
        have = tf.dtypes.as_dtype(value.dtype)
    except TypeError:
        have = None
    if have == want:
        return value
    if want == tf.string and value.size == 0:  # REST: JSON [] has no dtype (not for protos)
        return value.astype(object)
    raise invalid_argument(
        f"Expects arg[{position}] to be {data_type_string(want.name)} but "
        f"{data_type_string(have.name) if have else value.dtype} is provided"
    )


def _check_shape(dims: list[int] | None, actual: tuple, alias: str) -> None:
    if dims is None:
        return
    if len(dims) != len(actual) or any(
        d not in (-1, a) for d, a in zip(dims, actual, strict=False)
    ):
        raise invalid_argument(
            f"input {alias} has shape {list(actual)} but the signature expects "
            f"{['?' if d == -1 else d for d in dims]}"
        )


def _filtered(outputs: dict[str, np.ndarray], wanted: set[str]) -> dict[str, np.ndarray]:
    return {name: value for name, value in outputs.items() if not wanted or name in wanted}


def _validated_filter(signature, output_filter) -> set[str]:
    wanted: set[str] = set()
    for alias in output_filter:
        if alias not in signature.outputs:
            raise invalid_argument(
                f"output tensor alias not found in signature: {alias} Outputs expected to be in "
                f"the set {{{','.join(sorted(signature.outputs))}}}."
            )
        if alias in wanted:
            raise invalid_argument(f"duplicate output tensor alias: {alias}")
        wanted.add(alias)
    return wanted
