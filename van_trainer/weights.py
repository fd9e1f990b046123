"""Keras `.weights.h5` files loaded by layer name, strictly, whichever layer classes wrote them.

tf_keras's `.weights.h5` (its `saving_lib` format) keys each layer by class and position
(`layers/dense_3`), never by name, and `load_weights(by_name=True)` does not change that for this
format. So a file written by the model with C++ depthwise kernels (`kernel_depthwise_conv2d_*`)
loads nothing into a stock model's depthwise convs and vice versa, and `skip_mismatch` turns that
(and a file from another architecture) into warnings. Here each layer is matched by name, every
shape is checked before anything is assigned, and any mismatch is an error naming the layers,
except layers the caller lets stay fresh (a new classifier head).
"""

from __future__ import annotations

import h5py
import numpy as np
import tf_keras as keras
from tf_keras.src.utils.generic_utils import to_snake_case

# Layer classes that hold the same weights in the same order under another class name.
SAME_WEIGHTS_AS = {"kernel_depthwise_conv2d": "depthwise_conv2d"}


class WeightsMismatchError(ValueError):
    """A weights file does not fit the model: names the file and the layers that differ."""


def _portable(class_key: str) -> str:
    for alias, canonical in SAME_WEIGHTS_AS.items():
        if class_key == alias or class_key.startswith(alias + "_"):
            return canonical + class_key[len(alias) :]
    return class_key


def file_keys(model: keras.Model) -> dict[str, str]:
    """Layer name -> the group saving_lib writes it to (class in snake case, numbered by order)."""
    seen: dict[str, int] = {}
    keys = {}
    for layer in model.layers:
        base = _portable(to_snake_case(type(layer).__name__))
        count = seen[base] = seen.get(base, -1) + 1
        keys[layer.name] = f"layers/{base}_{count}" if count else f"layers/{base}"
    return keys


def read_weights_file(path: str) -> dict[str, list[np.ndarray]]:
    """Every layer group of a saving_lib `.weights.h5` -> its arrays in order (portable keys)."""
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise WeightsMismatchError(
            f"{path}: not a readable Keras .weights.h5 file ({exc})"
        ) from exc
    with handle:
        if not isinstance(handle.get("layers"), h5py.Group):
            raise WeightsMismatchError(f"{path}: no 'layers' group; not a Keras .weights.h5 file")
        stored = {}
        for name, group in handle["layers"].items():
            variables = group.get("vars", {})
            arrays = [np.asarray(variables[str(i)]) for i in range(len(variables))]
            stored[f"layers/{_portable(name)}"] = arrays
    return stored


def _differences(model, stored, keep_fresh, skip=()) -> tuple[list[str], list[str]]:
    keys = file_keys(model)
    problems, fresh = [], []
    for layer in model.layers:
        wanted = [tuple(w.shape) for w in layer.weights]
        got = [a.shape for a in stored.get(keys[layer.name], [])]
        if layer.name in skip and layer.weights:
            fresh.append(layer.name)
            continue
        if wanted == got:
            continue
        if layer.name in keep_fresh:
            fresh.append(layer.name)
        else:
            problems.append(f"{layer.name} (model {wanted}, file {got or 'nothing'})")
    extra = sorted(k for k, v in stored.items() if v and k not in set(keys.values()))
    if extra:
        problems.append(
            f"file layers the model lacks: {extra[:5]}{' ...' if len(extra) > 5 else ''}"
        )
    return problems, fresh


def load_weights_by_name(
    model: keras.Model, path: str, keep_fresh: tuple[str, ...] = (), skip: tuple[str, ...] = ()
) -> list[str]:
    """Load `path` into `model` layer by layer, all or nothing; returns the layers kept fresh."""
    # Except `keep_fresh` layers whose shapes differ (kept fresh) and `skip` layers.
    stored = read_weights_file(path)
    problems, fresh = _differences(model, stored, keep_fresh, skip)
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise WeightsMismatchError(
            f"{path} does not fit model {model.name!r}: {len(problems)} layer(s) differ: {shown}"
        )
    keys = file_keys(model)
    for layer in model.layers:
        if layer.weights and layer.name not in fresh:
            layer.set_weights(stored[keys[layer.name]])
    return fresh
