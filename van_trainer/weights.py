"""Keras `.weights.h5` files loaded by layer name, strictly, whichever layer classes wrote them.

tf_keras's `.weights.h5` (its `saving_lib` format) keys each layer by class and position
(`layers/dense_3`), never by name, and `load_weights(by_name=True)` does not change that for this
format. So a file written by the model with C++ depthwise kernels (`kernel_depthwise_conv2d_*`)
loads nothing into a stock model's depthwise convs and vice versa, and `skip_mismatch` turns that
(and a file from another architecture) into warnings. Here each layer is matched by name, every
shape is checked before anything is assigned, and any mismatch is an error naming the layers,
except layers the caller lets stay fresh (a new classifier head).

The file may be damaged or hostile (the served model's weights, a downloaded conversion): the
shapes are compared from the file's metadata before any value is read, so what is read is at
most the model's own size; only float datasets stored in the file itself (no links, external
or virtual storage, chunks no larger than the dataset) are read, and a value that is not finite,
or any HDF5 error, is a WeightsMismatchError naming the file.
"""

from __future__ import annotations

import contextlib

import h5py
import numpy as np
import tf_keras as keras
from tf_keras.src.utils.generic_utils import to_snake_case

# Layer classes that hold the same weights in the same order under another class name.
SAME_WEIGHTS_AS = {"kernel_depthwise_conv2d": "depthwise_conv2d"}


class WeightsMismatchError(ValueError):
    """A weights file does not fit the model, or is damaged: names the file and what is wrong."""

    # What is wrong: the layers that differ, or the dataset at fault.


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


def _member(group: h5py.Group, name: str, kind: type, path: str):
    """`group[name]` if it is a `kind` stored in this file (a hard link), else a refusal."""
    link = group.get(name, getlink=True)
    # A soft or external link (or an external/virtual dataset) makes the loader read another
    # object or another file than the one named; tf_keras never writes one.
    if not isinstance(link, h5py.HardLink):
        raise WeightsMismatchError(
            f"{path}: {group.name}/{name} is a {type(link).__name__}, not a {kind.__name__} "
            "stored in the file"
        )
    member = group[name]
    if not isinstance(member, kind):
        raise WeightsMismatchError(
            f"{path}: {member.name} is a {type(member).__name__}, not a {kind.__name__}"
        )
    return member


def _checked_dataset(dataset: h5py.Dataset, path: str) -> h5py.Dataset:
    """A weight's dataset, once its metadata prove that reading it costs only its own size."""
    where = f"{path}: {dataset.name}"
    if dataset.dtype.kind != "f":  # set_weights would cast ints and fail on strings
        raise WeightsMismatchError(f"{where} has dtype {dataset.dtype}; weights are floats")
    if dataset.is_virtual or dataset.external:
        raise WeightsMismatchError(f"{where} keeps its data in another file")
    # Declared but never written: HDF5 would hand out its fill value (zeros) as the weights.
    if dataset.size and not dataset.id.get_storage_size():
        raise WeightsMismatchError(f"{where} has no stored values")
    # A compressed chunk is inflated whole: one larger than the dataset would let a few stored
    # bytes make the reader inflate gigabytes for a 16-value bias.
    if dataset.chunks and any(
        c > max(n, 1) for c, n in zip(dataset.chunks, dataset.shape, strict=True)
    ):
        raise WeightsMismatchError(
            f"{where} has chunks {dataset.chunks} larger than its shape {dataset.shape}"
        )
    return dataset


def _stored_datasets(handle: h5py.File, path: str) -> dict[str, list[h5py.Dataset]]:
    """Every layer group of an open `.weights.h5` -> its weight datasets in order (unread)."""
    if "layers" not in handle:
        raise WeightsMismatchError(f"{path}: no 'layers' group; not a Keras .weights.h5 file")
    layers = _member(handle, "layers", h5py.Group, path)
    stored = {}
    for name in layers:
        group = _member(layers, name, h5py.Group, path)
        if "vars" not in group:
            stored[f"layers/{_portable(name)}"] = []
            continue
        variables = _member(group, "vars", h5py.Group, path)
        names = set(variables)
        if names != {str(i) for i in range(len(names))}:
            raise WeightsMismatchError(
                f"{path}: {variables.name} holds {sorted(names)[:5]}, not datasets 0..n-1"
            )
        stored[f"layers/{_portable(name)}"] = [
            _checked_dataset(_member(variables, str(i), h5py.Dataset, path), path)
            for i in range(len(names))
        ]
    return stored


def _read(dataset: h5py.Dataset, path: str) -> np.ndarray:
    """A dataset's values; a damaged one (a failing filter, a cut file) or non-finite values
    are refused, naming the file and the dataset."""
    try:
        array = np.asarray(dataset[()])
    except _HDF5_ERRORS as exc:
        raise WeightsMismatchError(f"{path}: {dataset.name} is unreadable ({exc})") from None
    bad = array.size - np.count_nonzero(np.isfinite(array))
    if array.dtype.itemsize > 4:  # float64 beyond float32's range: Inf once assigned
        bad += np.count_nonzero(np.abs(array[np.isfinite(array)]) > np.finfo(np.float32).max)
    if bad:  # a warm start from NaN weights ends the run at its first step
        raise WeightsMismatchError(
            f"{path}: {dataset.name} holds {bad} non-finite value(s) (NaN or Inf, or beyond "
            f"float32's range) of {array.size}"
        )
    return array


# What h5py raises for a damaged file: its metadata are read lazily, so a broken B-tree, heap
# or object header surfaces at any lookup, as any of these (found by corrupting real files).
_HDF5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


@contextlib.contextmanager
def _open(path: str):
    """The file opened for reading; any HDF5 error inside is a WeightsMismatchError naming it."""
    try:
        with h5py.File(path, "r") as handle:
            yield handle
    except WeightsMismatchError:
        raise
    except _HDF5_ERRORS as exc:
        raise WeightsMismatchError(
            f"{path}: not a readable Keras .weights.h5 file ({type(exc).__name__}: {exc})"
        ) from None


def _differences(model, stored, keep_fresh, skip=()) -> tuple[list[str], list[str]]:
    keys = file_keys(model)
    problems, fresh = [], []
    for layer in model.layers:
        wanted = [tuple(w.shape) for w in layer.weights]
        got = [tuple(a.shape) for a in stored.get(keys[layer.name], [])]
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
    with _open(path) as handle:
        stored = _stored_datasets(handle, path)
        # Shapes come from the file's metadata: nothing is read before they match the model,
        # so a dataset declaring billions of values (or inflating to them) is never read.
        problems, fresh = _differences(model, stored, keep_fresh, skip)
        if problems:
            shown = "; ".join(problems[:5]) + (
                f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
            )
            raise WeightsMismatchError(
                f"{path} does not fit model {model.name!r}: {len(problems)} layer(s) differ: "
                f"{shown}"
            )
        keys = file_keys(model)
        loaded = {
            layer.name: [_read(d, path) for d in stored[keys[layer.name]]]
            for layer in model.layers
            if layer.weights and layer.name not in fresh
        }
    for layer in model.layers:  # only once every array is read and checked: all or nothing
        if layer.name in loaded:
            layer.set_weights(loaded[layer.name])
    return fresh
