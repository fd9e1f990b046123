"""One loaded version of a SavedModel: its signatures, validated calls, and optional batchers."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import NamedTuple

import numpy as np

from serving.batching import Batcher
from serving.errors import from_tf_error, invalid_argument, signature_not_found
from serving.protos import BatchingSettings

DEFAULT_SIGNATURE = "serving_default"
SAVED_MODEL_FILE = "saved_model.pb"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")


def read_signature_defs(path: str):
    """The SignatureDef map of the SavedModel's (only) MetaGraph, as TF Serving reports it."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(os.path.join(path, SAVED_MODEL_FILE), "rb") as f:
        saved_model.ParseFromString(f.read())
    return saved_model.meta_graphs[0].signature_def


class Servable:
    """A SavedModel version loaded with tf.saved_model.load, callable by signature key."""

    def __init__(self, name: str, version: int, path: str, batching: BatchingSettings | None):
        import tensorflow as tf

        self.name, self.version, self.path = name, version, path
        self._model = tf.saved_model.load(path)
        self.signature_defs = read_signature_defs(path)
        self._functions = dict(self._model.signatures)
        self._batching = batching
        self._batchers: dict[str, Batcher] = {}
        self._lock = threading.Lock()
        self.warmup_records = 0
        self._unloaded = False
        self._specs: dict[str, list[_InputSpec]] = {}

    def signature_def(self, key: str):
        """The SignatureDef for `key` ('' means serving_default) or FAILED_PRECONDITION."""
        key = key or DEFAULT_SIGNATURE
        if key not in self._functions or key not in self.signature_defs:
            raise signature_not_found(key)
        return self.signature_defs[key]

    def run(
        self,
        key: str,
        inputs: dict[str, np.ndarray],
        output_filter=(),
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Validate `inputs` against signature `key`, run it (batched if enabled), filter outputs."""
        key, feed, wanted = self._prepare(key, inputs, output_filter)
        if self._batching is None or self._unloaded:  # in-flight calls finish after an unload
            outputs = self._call(key, feed)
        else:
            outputs = self._batcher(key).submit(feed, timeout)
        return _filtered(outputs, wanted)

    async def run_async(
        self, key: str, inputs: dict[str, np.ndarray], output_filter=(), executor=None
    ) -> dict[str, np.ndarray]:
        """`run` for an event loop: batched calls join the batch queue, others go to `executor`.

        No timeout: cancelling the awaiting task (grpc.aio does at the deadline) abandons the call.
        """
        key, feed, wanted = self._prepare(key, inputs, output_filter)
        if self._batching is None or self._unloaded:
            pending = asyncio.get_running_loop().run_in_executor(executor, self._call, key, feed)
        else:
            pending = self._batcher(key).submit_async(feed)
        return _filtered(await pending, wanted)

    def _prepare(self, key: str, inputs, output_filter) -> tuple[str, dict, set[str]]:
        key = key or DEFAULT_SIGNATURE
        signature = self.signature_def(key)
        feed = _validated_inputs(self._input_specs(key), inputs)
        return key, feed, _validated_filter(signature, output_filter)

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

    def _call(self, key: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        try:
            outputs = self._functions[key](**{k: tf.constant(v) for k, v in feed.items()})
        except tf.errors.OpError as exc:
            raise from_tf_error(exc) from exc
        except (ValueError, TypeError) as exc:  # inputs the concrete function cannot accept
            raise invalid_argument(str(exc)) from exc
        return {name: tensor.numpy() for name, tensor in outputs.items()}


class _InputSpec(NamedTuple):
    position: int
    alias: str
    dtype: object  # tf.DType
    dims: list[int] | None  # None: unknown rank


def _input_specs(signature) -> list[_InputSpec]:
    import tensorflow as tf

    return [
        _InputSpec(
            position,
            alias,
            tf.dtypes.as_dtype(info.dtype),
            None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim],
        )
        for position, (alias, info) in enumerate(sorted(signature.inputs.items()))
    ]


def _validated_inputs(specs: list[_InputSpec], inputs: dict[str, np.ndarray]) -> dict:
    expected = {spec.alias for spec in specs}
    if inputs.keys() != expected:
        unknown = sorted(set(inputs) - expected)
        if unknown:
            raise invalid_argument(
                f"input tensor alias not found in signature: {unknown[0]}. Inputs expected to be "
                f"in the set {{{','.join(sorted(expected))}}}."
            )
        raise invalid_argument(
            f"input size does not match signature: {len(inputs)}!={len(expected)} len({{"
            f"{','.join(sorted(inputs))}}}) != len({{{','.join(sorted(expected))}}})."
        )
    feed = {}
    for spec in specs:
        value = _as_dtype(inputs[spec.alias], spec.dtype, spec.position, spec.alias)
        _check_shape(spec.dims, value.shape, spec.alias)
        feed[spec.alias] = value
    return feed


def _as_dtype(value: np.ndarray, want, position: int, alias: str) -> np.ndarray:
    import tensorflow as tf

    try:
        have = tf.dtypes.as_dtype(value.dtype)
    except TypeError:
        have = None
    if have == want:
        return value
    if want == tf.string and value.size == 0:
        return value.astype(object)
    raise invalid_argument(
        f"Expects arg[{position}] ({alias}) to be {want.name} but "
        f"{have.name if have else value.dtype} is provided"
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
    wanted = set(output_filter)
    for alias in wanted:
        if alias not in signature.outputs:
            raise invalid_argument(
                f"output tensor alias not found in signature: {alias} Outputs expected to be in "
                f"the set {{{','.join(sorted(signature.outputs))}}}."
            )
    return wanted
