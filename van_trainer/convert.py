"""Convert official VAN-Classification checkpoints (PyTorch) into tf_keras weights, without torch.

A `.pth`/`.pth.tar` file is a zip holding `<name>/data.pkl` (a pickle) and `<name>/data/<key>`
raw storages. The pickle is read by `_RestrictedUnpickler`: only the globals torch uses to rebuild
tensors are resolved (to NumPy implementations here, never to torch); any other global becomes an
inert placeholder class that is never imported, and *calling* one (pickle REDUCE, the only way a
pickle executes code) raises `UnsafeCheckpointError`.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
from pathlib import Path

import numpy as np

IGNORED_SUFFIXES = (".num_batches_tracked",)

# torch storage class -> NumPy dtype of its raw little/big-endian bytes.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle tried to call something other than a tensor-rebuild function."""


class CheckpointMismatchError(ValueError):
    """The state dict does not fit the requested VAN variant (missing/unexpected key, shape)."""


class _StorageType:
    """Stand-in for `torch.FloatStorage` & co: only carries the NumPy dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _PlaceholderMeta(type):
    # Calling the class is what pickle's REDUCE does; NEWOBJ/BUILD go through __new__/__setstate__
    # and merely record data, so e.g. an argparse.Namespace in `args` loads as inert data.
    def __call__(cls, *args, **kwargs):
        raise UnsafeCheckpointError(
            f"refusing to call {cls.__module__}.{cls.__qualname__} from the checkpoint's pickle: "
            "only torch tensor-rebuild functions may be called (the file may be malicious)"
        )


class Placeholder(metaclass=_PlaceholderMeta):
    """Inert stand-in for a non-tensor global of the checkpoint (never imported, never called)."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __setstate__(self, state):
        self.__dict__["_state"] = state
        if isinstance(state, dict):
            self.__dict__.update(state)


def _placeholder_class(module: str, name: str) -> type:
    cls = _PlaceholderMeta(name, (Placeholder,), {"__module__": module, "__qualname__": name})
    return cls


def _to_numpy(raw: bytes, dtype, byteorder: str) -> np.ndarray:
    if dtype == "bfloat16":  # NumPy has no bfloat16: widen the 16 high bits to float32
        halves = np.frombuffer(raw, dtype=np.dtype(np.uint16).newbyteorder(byteorder))
        return (halves.astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder(byteorder)).astype(dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, *_):
    """NumPy version of torch._utils._rebuild_tensor_v2 (a strided view, copied)."""
    if not isinstance(storage, np.ndarray):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    needed = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=False)) + 1
    if math.prod(size) and needed > storage.size:
        raise pickle.UnpicklingError(f"tensor of size {size} overruns its storage")
    base = storage[storage_offset:]
    strides = tuple(s * storage.itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(base, shape=size, strides=strides).copy()


def _rebuild_parameter(data, requires_grad=False, hooks=None, *_):
    """NumPy version of torch._utils._rebuild_parameter (a Parameter is just its tensor)."""
    return data


def _numpy_scalar(dtype, raw: bytes = b""):
    """Safe numpy.core.multiarray.scalar (timm stores metrics as NumPy scalars)."""
    return np.frombuffer(raw, dtype=dtype)[0]


def _numpy_dtype(name, align=False, copy=False):
    """Safe numpy.dtype for _numpy_scalar's argument."""
    return np.dtype(name)


_SAFE_CALLABLES = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only tensor-rebuild globals; storages come from the zip archive."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if (module, name) in _SAFE_CALLABLES:
            return _SAFE_CALLABLES[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        return _placeholder_class(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id in checkpoint: {pid!r}")
        _, storage_type, key, _location, _numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(
                f"unsupported storage type in checkpoint: {storage_type!r}"
            )
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}data/{key}")
            self._storages[key] = _to_numpy(raw, storage_type.dtype, self._byteorder)
        return self._storages[key]


def _load_torch_zip(path: Path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: not a torch zip checkpoint (expected one data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = archive.read(f"{prefix}byteorder").decode().strip()
        byteorder = {"little": "<", "big": ">"}.get(byteorder)
        if byteorder is None:
            raise ValueError(f"{path}: unknown byteorder record in checkpoint")
        return _RestrictedUnpickler(archive.read(pickles[0]), archive, prefix, byteorder).load()


def _extract_state_dict(obj, path: Path) -> dict:
    """The state dict inside a checkpoint object (`state_dict`/`model` entry, or the object)."""
    if isinstance(obj, dict):
        for entry in ("state_dict", "model", "state_dict_ema"):
            if isinstance(obj.get(entry), dict):
                return obj[entry]
        if all(isinstance(v, np.ndarray) for v in obj.values()):
            return obj
    raise ValueError(f"{path}: no state dict found (expected a `state_dict` entry or a bare one)")


def load_state_dict(path) -> dict[str, np.ndarray]:
    """Read a `.pth`/`.pth.tar` (torch zip format) or `.npz` VAN checkpoint into NumPy arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: not a zip-format torch checkpoint; legacy (torch<1.6) files are not "
            "supported, re-save with torch.save(obj, f) from torch>=1.6"
        )
    state = _extract_state_dict(_load_torch_zip(path), path)
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return {str(k): np.asarray(v) for k, v in state.items()}


# ---- state-dict <-> Keras mapping -------------------------------------------------------------


def _torch_to_keras(array: np.ndarray, layer, weight_name: str) -> np.ndarray:
    """Re-lay a PyTorch tensor out for the Keras weight of `layer` called `weight_name`."""
    import tf_keras as keras

    if weight_name == "kernel" and isinstance(layer, keras.layers.DepthwiseConv2D):
        return array.transpose(2, 3, 0, 1)  # [C, 1, kh, kw] -> [kh, kw, C, 1]
    if weight_name == "kernel" and isinstance(layer, keras.layers.Conv2D):
        return array.transpose(2, 3, 1, 0)  # [out, in/groups, kh, kw] -> [kh, kw, in/groups, out]
    if weight_name == "kernel" and isinstance(layer, keras.layers.Dense):
        return array.reshape(array.shape[0], -1).T  # Linear [out, in] or 1x1 conv [out, in, 1, 1]
    return array


def _keras_to_torch_shape(shape, layer, weight_name: str) -> tuple:
    import tf_keras as keras

    shape = tuple(shape)
    if weight_name == "kernel" and isinstance(layer, keras.layers.DepthwiseConv2D):
        return (shape[2], 1, shape[0], shape[1])
    if weight_name == "kernel" and isinstance(layer, keras.layers.Conv2D):
        return (shape[3], shape[2], shape[0], shape[1])
    if weight_name == "kernel" and isinstance(layer, keras.layers.Dense):
        pointwise = layer.name != "head"  # 1x1 convs are 4-D in the state dict
        return (shape[1], shape[0], 1, 1) if pointwise else (shape[1], shape[0])
    return shape


# Keras weight name -> PyTorch parameter/buffer name.
_KERAS_TO_TORCH = {
    "kernel": "weight",
    "depthwise_kernel": "weight",
    "bias": "bias",
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}


def official_weight_map(model) -> dict:
    """Official state-dict key -> (layer, Keras variable) for every weight of a `build_van` model.

    The mapping is `<layer name>.<torch weight name>`; a LayerScale layer *is* the parameter
    (`block1.0.layer_scale_1`).
    """
    from van_trainer.model import LayerScale

    mapping = {}
    for layer in model.layers:
        for variable in layer.weights:
            short = variable.name.split("/")[-1].split(":")[0]
            if isinstance(layer, LayerScale):
                key = layer.name
            else:
                key = f"{layer.name}.{_KERAS_TO_TORCH.get(short, short)}"
            short = "kernel" if short == "depthwise_kernel" else short
            mapping[key] = (layer, variable, short)
    return mapping


def _check_keys(state_dict: dict, mapping: dict, variant: str) -> None:
    missing = sorted(set(mapping) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(mapping))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(
                f"unexpected key(s) {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
            )
        raise CheckpointMismatchError(
            f"checkpoint does not match VAN-{variant}: " + "; ".join(parts)
        )


def convert_state_dict(state_dict: dict, variant: str, num_classes: int | None = None):
    """Build VAN-`variant` (dynamic H/W) and load an official state dict into it; returns the model."""
    from van_trainer.model import build_van

    state_dict = {
        k: np.asarray(v) for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIXES)
    }
    if num_classes is None:
        if "head.weight" not in state_dict:
            raise CheckpointMismatchError("missing key 'head.weight' (needed for num_classes)")
        num_classes = int(state_dict["head.weight"].shape[0])
    model = build_van(variant, num_classes=num_classes, input_shape=(None, None, 3))
    mapping = official_weight_map(model)
    _check_keys(state_dict, mapping, variant)
    for key, (layer, variable, short) in mapping.items():
        array = state_dict[key]
        expected = _keras_to_torch_shape(variable.shape, layer, short)
        if tuple(array.shape) != expected:
            raise CheckpointMismatchError(
                f"shape mismatch for {key!r}: checkpoint has {tuple(array.shape)}, "
                f"VAN-{variant} with {num_classes} classes expects {expected}"
            )
        variable.assign(_torch_to_keras(array.astype(np.float32), layer, short))
    return model


def convert_checkpoint(variant: str, checkpoint, output, num_classes: int | None = None) -> Path:
    """Convert an official checkpoint file into `output` (a `.weights.h5` for `load_weights`)."""
    output = Path(output)
    if not output.name.endswith(".h5"):
        raise ValueError(f"output must be a .weights.h5 file, got {output}")
    model = convert_state_dict(load_state_dict(checkpoint), variant, num_classes)
    output.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(output))
    return output
