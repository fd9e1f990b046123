"""Convert official VAN-Classification checkpoints (PyTorch) into tf_keras weights, without torch.

A `.pth`/`.pth.tar` file is a zip holding `<name>/data.pkl` (a pickle) and `<name>/data/<key>`
raw storages. Checkpoints come from the internet, so nothing in one is trusted:

- The pickle is read by `_RestrictedUnpickler`, on Python's pure-Python unpickler (the C one
  grows its memo table to whatever index a 6-byte opcode names). Only the globals torch uses to
  rebuild tensors are resolved (to NumPy implementations here, never to torch); any other global
  becomes an inert placeholder class that is never imported, and *calling* one (pickle REDUCE,
  the only way a pickle executes code) raises `UnsafeCheckpointError`.
- Unpickling touches no tensor memory: storages and tensors are records (`_Storage`,
  `_TensorRef`) that pickle cannot modify. Only the state dict's tensors are materialised, each
  after its storage reference (offset, sizes, strides, element count, storage bytes) is checked
  against the storage; anything malformed is refused with the tensor's name.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

IGNORED_SUFFIXES = (".num_batches_tracked",)
MAX_RANK = 32  # NumPy's limit; VAN's tensors have at most 4 dimensions
# A compressed storage may inflate this much at most (torch.save stores storages uncompressed;
# float weights deflate by ~1.1x), so a small file cannot make the converter allocate gigabytes.
MAX_STORAGE_INFLATION = 64

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


class CheckpointFormatError(pickle.UnpicklingError, ValueError):
    """The checkpoint is malformed: not a torch zip, a broken pickle, storage or tensor record."""


class CheckpointMismatchError(ValueError):
    """The state dict does not fit the requested VAN variant (missing/unexpected key, shape)."""


class _Frozen:
    """Records pickle may hand around but never modify (BUILD would call __setstate__)."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise UnsafeCheckpointError(f"the checkpoint tried to modify a {type(self).__name__}")

    def __setstate__(self, state):
        raise UnsafeCheckpointError(f"the checkpoint tried to modify a {type(self).__name__}")


class _StorageType(_Frozen):
    """Stand-in for `torch.FloatStorage` & co: only carries the NumPy dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", _STORAGE_DTYPES[name])

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize


class _Storage(_Frozen):
    """A storage of the archive, by reference: read only if a state-dict tensor uses it."""

    __slots__ = ("key", "storage_type", "numel")

    def __init__(self, key: str, storage_type: _StorageType, numel: int):
        for name, value in (("key", key), ("storage_type", storage_type), ("numel", numel)):
            object.__setattr__(self, name, value)


class _TensorRef(_Frozen):
    """What torch._utils._rebuild_tensor_v2 was asked to build; checked before it is built."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        for name, value in zip(self.__slots__, (storage, offset, size, stride), strict=True):
            object.__setattr__(self, name, value)


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
            self.__dict__.update((k, v) for k, v in state.items() if isinstance(k, str))


def _placeholder_class(module: str, name: str) -> type:
    cls = _PlaceholderMeta(name, (Placeholder,), {"__module__": module, "__qualname__": name})
    return cls


def _to_numpy(raw: bytes, dtype, byteorder: str) -> np.ndarray:
    if dtype == "bfloat16":  # NumPy has no bfloat16: widen the 16 high bits to float32
        halves = np.frombuffer(raw, dtype=np.dtype(np.uint16).newbyteorder(byteorder))
        return (halves.astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder(byteorder)).astype(dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, *_):
    """torch._utils._rebuild_tensor_v2, recorded: `_materialise` checks and builds it later."""
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, *_):
    """NumPy version of torch._utils._rebuild_parameter (a Parameter is just its tensor)."""
    return data


def _numpy_scalar(dtype, raw: bytes = b""):
    """Safe numpy.core.multiarray.scalar (timm stores metrics as NumPy scalars)."""
    if not isinstance(dtype, np.dtype) or not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
        raise CheckpointFormatError(f"malformed NumPy scalar record ({dtype!r}, {raw!r:.40})")
    return np.frombuffer(raw, dtype=dtype)[0]


def _numpy_dtype(name, align=False, copy=False):
    """Safe numpy.dtype for _numpy_scalar's argument: plain numeric and boolean types only."""
    try:
        dtype = np.dtype(name) if isinstance(name, str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "biufc" or dtype.fields or dtype.subdtype:
        raise CheckpointFormatError(f"unsupported NumPy dtype in checkpoint: {name!r:.40}")
    return dtype


_SAFE_CALLABLES = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
}


class _RestrictedUnpickler(pickle._Unpickler):  # pure Python: its memo is a dict
    """Unpickler resolving only tensor-rebuild globals; storages are references into the zip."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))

    def find_class(self, module, name):
        if (module, name) in _SAFE_CALLABLES:
            return _SAFE_CALLABLES[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        return _placeholder_class(str(module), str(name))

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointFormatError(f"unsupported persistent id in checkpoint: {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(
                f"unsupported storage type in checkpoint: {storage_type!r:.80}"
            )
        if not isinstance(key, str) or not _is_count(numel):
            raise CheckpointFormatError(f"malformed storage record in checkpoint: {pid!r:.80}")
        return _Storage(key, storage_type, numel)


def _is_count(value) -> bool:
    return type(value) is int and value >= 0  # not bool, not a float, not a placeholder


class _TorchZip:
    """An open torch zip checkpoint: its pickle, and storages read (once) on demand."""

    def __init__(self, archive: zipfile.ZipFile, path: Path):
        self.archive, self.path = archive, path
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise CheckpointFormatError(
                f"{path}: not a torch zip checkpoint (expected one data.pkl)"
            )
        self.prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{self.prefix}byteorder" in names:
            byteorder = archive.read(f"{self.prefix}byteorder").decode(errors="replace").strip()
        self.byteorder = {"little": "<", "big": ">"}.get(byteorder)
        if self.byteorder is None:
            raise CheckpointFormatError(f"{path}: unknown byteorder record in checkpoint")
        self._arrays: dict[str, np.ndarray] = {}
        self._records: dict[str, tuple[str, int]] = {}

    def load_pickle(self):
        """The checkpoint object, with storages and tensors as unresolved references."""
        try:
            return _RestrictedUnpickler(self.archive.read(f"{self.prefix}data.pkl")).load()
        except (UnsafeCheckpointError, CheckpointFormatError):
            raise
        except Exception as exc:  # any malformed opcode stream: a bad file, not a bug here
            raise CheckpointFormatError(
                f"{self.path}: malformed checkpoint pickle ({type(exc).__name__}: {exc})"
            ) from None

    def storage_array(self, storage: _Storage, tensor: str) -> np.ndarray:
        """The storage's elements as a 1-D array, after checking its bytes match its record."""
        name = f"{self.prefix}data/{storage.key}"
        seen = self._records.setdefault(storage.key, (storage.storage_type.name, storage.numel))
        if seen != (storage.storage_type.name, storage.numel):
            raise _tensor_error(
                tensor, f"uses storage {storage.key!r} with another type or size than before"
            )
        if storage.key not in self._arrays:
            try:
                info = self.archive.getinfo(name)
            except KeyError:
                raise _tensor_error(
                    tensor, f"uses storage {storage.key!r}, which is not in the archive"
                ) from None
            expected = storage.numel * storage.storage_type.itemsize
            if info.file_size != expected:
                raise _tensor_error(
                    tensor,
                    f"storage {storage.key!r} holds {info.file_size} bytes, its record says "
                    f"{storage.numel} x {storage.storage_type.name} = {expected} bytes",
                )
            if info.file_size > MAX_STORAGE_INFLATION * max(info.compress_size, 1):
                raise _tensor_error(
                    tensor,
                    f"storage {storage.key!r} inflates {info.compress_size} -> {info.file_size} "
                    "bytes, more than any real weights do (a zip bomb?)",
                )
            try:
                raw = self.archive.read(name)
            except (zipfile.BadZipFile, OSError, RuntimeError, ValueError) as exc:
                raise _tensor_error(
                    tensor, f"storage {storage.key!r} is unreadable: {exc}"
                ) from None
            array = _to_numpy(raw, storage.storage_type.dtype, self.byteorder)
            array.flags.writeable = False
            self._arrays[storage.key] = array
        return self._arrays[storage.key]

    def materialise(self, name: str, ref) -> np.ndarray:
        """The state-dict entry `name` as an array, refused unless it is a well-formed tensor."""
        if not isinstance(ref, _TensorRef):
            raise _tensor_error(name, f"is {type(ref).__name__}, not a tensor")
        if not isinstance(ref.storage, _Storage):
            raise _tensor_error(name, "is rebuilt from something that is not a storage")
        storage = self.storage_array(ref.storage, name)
        layout = _checked_layout(name, ref, storage.size)  # against the bytes actually read
        if math.prod(layout.size) == 0:
            return np.empty(layout.size, dtype=storage.dtype)
        base = storage[layout.offset :]
        strides = tuple(s * storage.itemsize for s in layout.stride)
        return np.lib.stride_tricks.as_strided(base, shape=layout.size, strides=strides).copy()


class _Layout(NamedTuple):
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _checked_layout(name: str, ref: _TensorRef, storage_numel: int) -> _Layout:
    """The tensor's offset/size/stride once proven to address only elements of its storage."""
    offset, size, stride = ref.offset, ref.size, ref.stride
    if not _is_count(offset):
        raise _tensor_error(name, f"has storage offset {offset!r:.40} (must be an integer >= 0)")
    for what, dims in (("size", size), ("stride", stride)):
        if not isinstance(dims, tuple | list) or not all(_is_count(d) for d in dims):
            raise _tensor_error(name, f"has {what} {dims!r:.60} (must be integers >= 0)")
    if len(size) != len(stride) or len(size) > MAX_RANK:
        raise _tensor_error(name, f"has size {tuple(size)} but stride {tuple(stride)}")
    numel = math.prod(size)
    if numel:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage_numel:
            raise _tensor_error(
                name,
                f"size {tuple(size)}, stride {tuple(stride)} at offset {offset} reaches element "
                f"{last} of a storage of {storage_numel}",
            )
        # Stride 0 repeats elements: fine for a view, but a state dict never needs more elements
        # than it stores, and repetition would let a tiny file fill memory.
        if numel > storage_numel:
            raise _tensor_error(
                name, f"has {numel} elements, more than its storage's {storage_numel}"
            )
    elif offset > storage_numel or any(d > storage_numel for d in size):
        raise _tensor_error(name, f"is empty but has size {tuple(size)} at offset {offset}")
    return _Layout(offset, tuple(size), tuple(stride))


def _tensor_error(name: str, problem: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"tensor {name!r} {problem}")


def _extract_state_dict(obj, path: Path) -> dict:
    """The state dict inside a checkpoint object (`state_dict`/`model` entry, or the object)."""
    if isinstance(obj, dict):
        for entry in ("state_dict", "model", "state_dict_ema"):
            if isinstance(obj.get(entry), dict):
                return obj[entry]
        if obj and all(isinstance(v, _TensorRef) for v in obj.values()):
            return obj
    raise CheckpointFormatError(
        f"{path}: no state dict found (expected a `state_dict` entry or a bare one)"
    )


def _load_torch_zip(path: Path) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as archive:
            checkpoint = _TorchZip(archive, path)
            state = _extract_state_dict(checkpoint.load_pickle(), path)
            names = [k if isinstance(k, str) else None for k in state]
            if None in names:
                raise CheckpointFormatError(f"{path}: state dict keys must be strings")
            if names and all(k.startswith("module.") for k in names):  # saved from DDP
                names = [k[len("module.") :] for k in names]
            return {
                name: checkpoint.materialise(name, ref)
                for name, ref in zip(names, state.values(), strict=True)
            }
    except zipfile.BadZipFile as exc:
        raise CheckpointFormatError(f"{path}: corrupt zip archive: {exc}") from None


def load_state_dict(path) -> dict[str, np.ndarray]:
    """Read a `.pth`/`.pth.tar` (torch zip format) or `.npz` VAN checkpoint into NumPy arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if not zipfile.is_zipfile(path):
        raise CheckpointFormatError(
            f"{path}: not a zip-format torch checkpoint; legacy (torch<1.6) files are not "
            "supported, re-save with torch.save(obj, f) from torch>=1.6"
        )
    return _load_torch_zip(path)


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
