"""One loaded version of a SavedModel: its signatures, validated calls, and optional batchers."""

from __future__ import annotations

import os
import threading

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
        key = key or DEFAULT_SIGNATURE
        signature = self.signature_def(key)
        feed = _validated_inputs(signature, inputs)
        wanted = _validated_filter(signature, output_filter)
        if self._batching is None or self._unloaded:  # in-flight calls finish after an unload
            outputs = self._call(key, feed)
        else:
            outputs = self._batcher(key).submit(feed, timeout)
        return {name: value for name, value in outputs.items() if not wanted or name in wanted}

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


def _validated_inputs(signature, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import tensorflow as tf

    expected = signature.inputs
    if set(inputs) != set(expected):
        unknown = sorted(set(inputs) - set(expected))
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
    for position, (alias, info) in enumerate(sorted(expected.items())):
        want = tf.dtypes.as_dtype(info.dtype)
        value = inputs[alias]
        feed[alias] = _as_dtype(value, want, position, alias)
        _check_shape(info.tensor_shape, feed[alias].shape, alias)
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


def _check_shape(shape_proto, actual: tuple, alias: str) -> None:
    if shape_proto.unknown_rank:
        return
    dims = [d.size for d in shape_proto.dim]
    if len(dims) != len(actual) or any(
        d not in (-1, a) for d, a in zip(dims, actual, strict=False)
    ):
        raise invalid_argument(
            f"input {alias} has shape {list(actual)} but the signature expects "
            f"{['?' if d == -1 else d for d in dims]}"
        )


def _validated_filter(signature, output_filter) -> set[str]:
    wanted = set(output_filter)
    for alias in wanted:
        if alias not in signature.outputs:
            raise invalid_argument(
                f"output tensor alias not found in signature: {alias} Outputs expected to be in "
                f"the set {{{','.join(sorted(signature.outputs))}}}."
            )
    return wanted
