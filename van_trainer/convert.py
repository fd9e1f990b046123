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
- The work a file can cause is bounded, not just its size: zip members are read only up to a
  cap (`data.pkl`) or an inflation ratio (storages, `.npz` arrays, checked against the declared
  array headers before any data is read); the pickle runs at most `MAX_PICKLE_WORK` steps, each
  of bounded cost (memo reuse can make a 1 kB pickle describe a 2**40-element structure, so
  untrusted values are never repr-ed whole, nor hashed unless they hash in constant time); and
  no model is built from a size the file merely declares.
"""

from __future__ import annotations

import collections
import io
import lzma
import math
import pickle
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

IGNORED_SUFFIXES = (".num_batches_tracked",)
MAX_RANK = 32  # NumPy's limit; VAN's tensors have at most 4 dimensions
MAX_DIM = 2**63  # torch sizes, strides and offsets are int64
# A compressed storage may inflate this much at most (torch.save stores storages uncompressed;
# float weights deflate by ~1.1x), so a small file cannot make the converter allocate gigabytes.
MAX_STORAGE_INFLATION = 64
# A state dict may use its storages' elements this many times over (tied weights share one
# storage); more would let a few pickle bytes copy one large storage into many tensors.
MAX_STORAGE_REUSE = 4
# data.pkl of a VAN-b6 training checkpoint (state dict, EMA copy, AdamW state) is 2.6 MB and
# runs 0.55 M opcodes. No step builds more than ~220 bytes (an empty set): 2 M steps, < 0.5 GB.
MAX_PICKLE_BYTES = 64 << 20
MAX_PICKLE_WORK = 2_000_000
MAX_GLOBALS = 256  # distinct global names one pickle may reference (torch uses < 10)
MAX_GLOBAL_NAME = 256  # characters in a module or global name
MAX_NEWOBJ_ARGS = 4  # plain data (argparse.Namespace & co) is created from no arguments
MAX_BYTEORDER_BYTES = 16
MAX_NUM_CLASSES = 100_000  # ImageNet-22k, the largest official head, has 21,841
_SHOWN_CHARS = 100  # of an untrusted string in an error message
_SHOWN_ITEMS = 4  # of an untrusted tuple or list, two levels deep at most
_READ_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    OSError,
    RuntimeError,  # encrypted member
    NotImplementedError,  # unsupported compression method
    ValueError,
)

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
    """The state dict does not fit the requested VAN variant (keys, shapes, dtypes, values)."""


def _clip(text: str, limit: int = _SHOWN_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."


def _brief(value, depth: int = 2) -> str:
    """A repr of an untrusted value, cut short: its cost never depends on what the value holds."""
    kind = type(value)
    if kind in (bool, float, type(None)) or (kind is int and -MAX_DIM <= value <= MAX_DIM):
        return repr(value)
    if isinstance(value, str | bytes):  # slice first: repr of the whole could be megabytes
        return repr(value[:_SHOWN_CHARS]) + ("..." if len(value) > _SHOWN_CHARS else "")
    if kind in (tuple, list) and depth > 0:
        items = [_brief(item, depth - 1) for item in value[:_SHOWN_ITEMS]]
        items += ["..."] if len(value) > _SHOWN_ITEMS else []
        text = ", ".join(items) + ("," if kind is tuple and len(value) == 1 else "")
        return f"({text})" if kind is tuple else f"[{text}]"
    return f"<{_type_name(value)}>"


def _type_name(value) -> str:
    return _clip(type(value).__qualname__)


def _exc_text(exc: BaseException) -> str:
    """`Type: message` of an error raised on untrusted data; its arguments are never repr-ed."""
    message = exc.args[0] if len(exc.args) == 1 and type(exc.args[0]) is str else ""
    return f"{type(exc).__name__}: {_clip(message, 200)}" if message else type(exc).__name__


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
        if kwargs or len(args) > MAX_NEWOBJ_ARGS:  # *args copies them on every NEWOBJ
            raise CheckpointFormatError(
                f"the checkpoint creates a {_clip(cls.__module__)}.{_clip(cls.__qualname__)} "
                f"with {len(args)} arguments"
            )
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __setstate__(self, state):
        self.__dict__["_state"] = state
        if isinstance(state, dict):  # the copy is charged to the pickle's work (see load_build)
            self.__dict__.update((k, v) for k, v in state.items() if isinstance(k, str))


def _placeholder_class(module: str, name: str) -> type:
    cls = _PlaceholderMeta(name, (Placeholder,), {"__module__": module, "__qualname__": name})
    return cls


def _to_numpy(raw: bytes, dtype, byteorder: str) -> np.ndarray:
    if dtype == "bfloat16":  # NumPy has no bfloat16: widen the 16 high bits to float32
        halves = np.frombuffer(raw, dtype=np.dtype(np.uint16).newbyteorder(byteorder))
        return (halves.astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder(byteorder)).astype(dtype)


# No *args on the rebuild functions: a REDUCE that succeeds must cost O(1), whatever it is given.
def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None
):
    """torch._utils._rebuild_tensor_v2, recorded: `_materialise` checks and builds it later."""
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    """NumPy version of torch._utils._rebuild_parameter (a Parameter is just its tensor)."""
    return data


def _ordered_dict(*args):
    """collections.OrderedDict as pickle calls it: empty (its items follow as SETITEMS)."""
    if args:  # copying an argument would cost its size on every REDUCE that reuses it
        raise CheckpointFormatError("the checkpoint builds an OrderedDict from arguments")
    return collections.OrderedDict()


def _numpy_scalar(dtype, raw: bytes = b""):
    """Safe numpy.core.multiarray.scalar (timm stores metrics as NumPy scalars)."""
    if not isinstance(dtype, np.dtype) or not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
        raise CheckpointFormatError(
            f"malformed NumPy scalar record ({_brief(dtype)}, {_brief(raw)})"
        )
    return np.frombuffer(raw, dtype=dtype)[0]


def _numpy_dtype(name, align=False, copy=False):
    """Safe numpy.dtype for _numpy_scalar's argument: plain numeric and boolean types only."""
    dtype = None
    if type(name) is str and len(name) <= 16:  # NumPy parses all of it
        try:
            dtype = np.dtype(name)
        except (TypeError, ValueError, OverflowError):
            pass
    if dtype is None or dtype.kind not in "biufc" or dtype.fields or dtype.subdtype:
        raise CheckpointFormatError(f"unsupported NumPy dtype in checkpoint: {_brief(name)}")
    return dtype


_SAFE_CALLABLES = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
}
_STORAGE_TYPES = {name: _StorageType(name) for name in _STORAGE_DTYPES}


def _check_hashable(value) -> None:
    """Refuse a dict key or set element whose hash could cost more than a constant."""
    # A tuple is re-hashed in full on every use (memo reuse nests them exponentially, 40 levels
    # in a 1 kB pickle) and int or tuple hashes can be made to collide; str/bytes cache theirs.
    if type(value) in (str, bytes, float, bool, type(None)):
        return
    if type(value) is int and -MAX_DIM <= value <= MAX_DIM:
        return
    raise CheckpointFormatError(
        f"unsupported dict key or set element in checkpoint: {_brief(value)} "
        "(only strings, bytes and numbers are)"
    )


class _WorkBudget(dict):
    """An unpickler's opcode table that charges each opcode it hands out to the file's budget."""

    def __init__(self, table: dict, budget: int):
        super().__init__(table)
        self.left = budget

    def __getitem__(self, code):
        self.spend(1)
        if code not in self:
            raise CheckpointFormatError(f"unknown pickle opcode {bytes([code])!r} in checkpoint")
        return dict.__getitem__(self, code)

    def spend(self, units: int) -> None:
        """Charge `units` steps; refuse the checkpoint once MAX_PICKLE_WORK are spent."""
        self.left -= units
        if self.left < 0:
            raise CheckpointFormatError(
                f"the checkpoint's pickle takes more than {MAX_PICKLE_WORK} steps to load "
                "(opcodes, plus attributes set by BUILD)"
            )


class _RestrictedUnpickler(pickle._Unpickler):  # pure Python: its memo is a dict
    """Unpickler resolving only tensor-rebuild globals; storages are references into the zip."""

    dispatch = dict(pickle._Unpickler.dispatch)  # + overrides below the class

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.dispatch = _WorkBudget(type(self).dispatch, MAX_PICKLE_WORK)
        self._placeholders: dict[tuple[str, str], type] = {}

    def find_class(self, module, name):
        if (module, name) in _SAFE_CALLABLES:
            return _SAFE_CALLABLES[(module, name)]
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        return self._placeholder(str(module), str(name))

    def _placeholder(self, module: str, name: str) -> type:
        # One class per name: a class costs ~1 kB, and a GLOBAL opcode only a few bytes.
        if (module, name) not in self._placeholders:
            if max(len(module), len(name)) > MAX_GLOBAL_NAME:
                raise CheckpointFormatError(
                    f"the checkpoint names a global {_brief(f'{module}.{name}')}, longer than "
                    f"{MAX_GLOBAL_NAME} characters"
                )
            if len(self._placeholders) >= MAX_GLOBALS:
                raise CheckpointFormatError(
                    f"the checkpoint names more than {MAX_GLOBALS} distinct globals"
                )
            self._placeholders[(module, name)] = _placeholder_class(module, name)
        return self._placeholders[(module, name)]

    def persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) == 5 and _is_str(pid[0], "storage")):
            raise CheckpointFormatError(f"unsupported persistent id in checkpoint: {_brief(pid)}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(
                f"unsupported storage type in checkpoint: {_brief(storage_type)}"
            )
        # torch names storages "0", "1", ...: a long key would be copied into every lookup.
        if type(key) is not str or len(key) > _SHOWN_CHARS or not _is_count(numel):
            raise CheckpointFormatError(f"malformed storage record in checkpoint: {_brief(pid)}")
        return _Storage(key, storage_type, numel)

    def load_build(self):
        """BUILD, charged for the attributes it copies (a reused state could copy repeatedly)."""
        state = self.stack[-1] if self.stack else None
        parts = state[:2] if type(state) is tuple else (state,)
        self.dispatch.spend(sum(len(part) for part in parts if isinstance(part, dict)))
        super().load_build()


def _is_str(value, text: str) -> bool:
    return type(value) is str and value == text  # == on anything else may cost its size


def _checking_keys(load, keys):
    """Opcode implementation `load`, run once `keys(stack)` (what it will hash) are checked."""

    def checked(self):
        for key in keys(self.stack):
            _check_hashable(key)
        load(self)

    return checked


def _refuse_extension(self):
    # EXT opcodes resolve globals through copyreg's process-wide cache, bypassing find_class.
    raise CheckpointFormatError("the checkpoint uses pickle extension codes (torch never does)")


# Opcodes that hash what they are given, and where that is (the pure-Python unpickler keeps
# the items since the last MARK in `stack`; SETITEM's key is the one below the value).
_HASHING_OPCODES = (
    (pickle.SETITEM, pickle._Unpickler.load_setitem, lambda stack: stack[-2:-1]),
    (pickle.SETITEMS, pickle._Unpickler.load_setitems, lambda stack: stack[::2]),
    (pickle.DICT, pickle._Unpickler.load_dict, lambda stack: stack[::2]),
    (pickle.ADDITEMS, pickle._Unpickler.load_additems, lambda stack: stack),
    (pickle.FROZENSET, pickle._Unpickler.load_frozenset, lambda stack: stack),
)
for _opcode, _load, _keys in _HASHING_OPCODES:
    _RestrictedUnpickler.dispatch[_opcode[0]] = _checking_keys(_load, _keys)
for _opcode in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
    _RestrictedUnpickler.dispatch[_opcode[0]] = _refuse_extension
_RestrictedUnpickler.dispatch[pickle.BUILD[0]] = _RestrictedUnpickler.load_build


def _is_count(value) -> bool:
    return type(value) is int and 0 <= value < MAX_DIM  # not bool, a float, or a placeholder


def _read_member(archive: zipfile.ZipFile, name: str, limit: int, owner: str) -> bytes:
    """Zip member `name`'s bytes; refused, naming `owner` and the member, if over `limit`."""
    info = archive.getinfo(name)
    if info.file_size > limit:  # zipfile never returns more than the size it declares
        raise CheckpointFormatError(
            f"{owner}: zip member {_brief(name)} inflates to {info.file_size} bytes, over the "
            f"{limit}-byte limit"
        )
    try:
        with archive.open(info) as member:
            return member.read()
    except _READ_ERRORS as exc:
        raise CheckpointFormatError(
            f"{owner}: zip member {_brief(name)} is unreadable ({_exc_text(exc)})"
        ) from None


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
        byteorder = b"little"
        if f"{self.prefix}byteorder" in names:
            name = f"{self.prefix}byteorder"
            byteorder = _read_member(archive, name, MAX_BYTEORDER_BYTES, str(path)).strip()
        self.byteorder = {b"little": "<", b"big": ">"}.get(byteorder)
        if self.byteorder is None:
            raise CheckpointFormatError(f"{path}: unknown byteorder record in checkpoint")
        self._arrays: dict[str, np.ndarray] = {}
        self._records: dict[str, tuple[str, int]] = {}
        self._bytes_read = self._bytes_used = 0

    def load_pickle(self):
        """The checkpoint object, with storages and tensors as unresolved references."""
        data = _read_member(
            self.archive, f"{self.prefix}data.pkl", MAX_PICKLE_BYTES, str(self.path)
        )
        try:
            return _RestrictedUnpickler(data).load()
        except (UnsafeCheckpointError, CheckpointFormatError):
            raise
        except Exception as exc:  # any malformed opcode stream: a bad file, not a bug here
            raise CheckpointFormatError(
                f"{self.path}: malformed checkpoint pickle ({_exc_text(exc)})"
            ) from None

    def storage_array(self, storage: _Storage, tensor: str) -> np.ndarray:
        """The storage's elements as a 1-D array, after checking its bytes match its record."""
        seen = self._records.setdefault(storage.key, (storage.storage_type.name, storage.numel))
        if seen != (storage.storage_type.name, storage.numel):
            raise _tensor_error(
                tensor, f"uses storage {_brief(storage.key)} with another type or size than before"
            )
        if storage.key not in self._arrays:
            raw = self._storage_bytes(storage, tensor)
            array = _to_numpy(raw, storage.storage_type.dtype, self.byteorder)
            array.flags.writeable = False
            self._arrays[storage.key] = array
            self._bytes_read += len(raw)
        return self._arrays[storage.key]

    def _storage_bytes(self, storage: _Storage, tensor: str) -> bytes:
        name, key = f"{self.prefix}data/{storage.key}", _brief(storage.key)
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise _tensor_error(
                tensor, f"uses storage {key}, which is not in the archive"
            ) from None
        expected = storage.numel * storage.storage_type.itemsize
        if info.file_size != expected:
            raise _tensor_error(
                tensor,
                f"storage {key} holds {info.file_size} bytes, its record says "
                f"{storage.numel} x {storage.storage_type.name} = {expected} bytes",
            )
        if info.file_size > MAX_STORAGE_INFLATION * max(info.compress_size, 1):
            raise _tensor_error(
                tensor,
                f"storage {key} inflates {info.compress_size} -> {info.file_size} "
                "bytes, more than any real weights do (a zip bomb?)",
            )
        return _read_member(self.archive, name, expected, f"tensor {_brief(tensor)}")

    def materialise(self, name: str, ref) -> np.ndarray:
        """The state-dict entry `name` as an array, refused unless it is a well-formed tensor."""
        if not isinstance(ref, _TensorRef):
            raise _tensor_error(name, f"is {_type_name(ref)}, not a tensor")
        if not isinstance(ref.storage, _Storage):
            raise _tensor_error(name, "is rebuilt from something that is not a storage")
        storage = self.storage_array(ref.storage, name)
        layout = _checked_layout(name, ref, storage.size)  # against the bytes actually read
        self._use(name, math.prod(layout.size) * storage.itemsize)
        if math.prod(layout.size) == 0:
            return np.empty(layout.size, dtype=storage.dtype)
        base = storage[layout.offset :]
        strides = tuple(s * storage.itemsize for s in layout.stride)
        return np.lib.stride_tricks.as_strided(base, shape=layout.size, strides=strides).copy()

    def _use(self, name: str, nbytes: int) -> None:
        # Each tensor fits its storage, but many state-dict entries may name the same tensor.
        self._bytes_used += nbytes
        if self._bytes_used > MAX_STORAGE_REUSE * self._bytes_read:
            raise _tensor_error(
                name,
                f"brings the state dict to {self._bytes_used} bytes of tensors from "
                f"{self._bytes_read} bytes of storage (more than {MAX_STORAGE_REUSE}x reuse)",
            )


class _Layout(NamedTuple):
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _checked_layout(name: str, ref: _TensorRef, storage_numel: int) -> _Layout:
    """The tensor's offset/size/stride once proven to address only elements of its storage."""
    offset, size, stride = ref.offset, ref.size, ref.stride
    if not _is_count(offset):
        raise _tensor_error(name, f"has storage offset {_brief(offset)} (must be in [0, 2**63))")
    for what, dims in (("size", size), ("stride", stride)):
        if not _is_dims(dims):
            raise _tensor_error(
                name, f"has {what} {_brief(dims)} (must be <= {MAX_RANK} integers in [0, 2**63))"
            )
    if len(size) != len(stride):
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


def _is_dims(dims) -> bool:
    """A shape or strides: few enough dimensions that products and messages stay small."""
    return type(dims) in (tuple, list) and len(dims) <= MAX_RANK and all(map(_is_count, dims))


def _tensor_error(name: str, problem: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"tensor {_brief(name)} {problem}")


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


def _open_zip(path: Path, what: str) -> zipfile.ZipFile:
    """`path` opened as a zip archive; a corrupt or unsupported one is refused, naming `what`."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, NotImplementedError, EOFError, ValueError) as exc:
        raise CheckpointFormatError(f"{path}: corrupt {what}: {_exc_text(exc)}") from None


def _load_torch_zip(path: Path) -> dict[str, np.ndarray]:
    with _open_zip(path, "zip archive") as archive:
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


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` (`np.savez[_compressed]`), every size checked before reading."""
    with _open_zip(path, ".npz (zip) archive") as archive:
        infos = archive.infolist()
        _check_npz_members(infos, path)
        return {info.filename[: -len(".npy")]: _read_npy(archive, info, path) for info in infos}


def _check_npz_members(infos: list, path: Path) -> None:
    names = [info.filename for info in infos]
    for name in names:
        if not name.endswith(".npy"):
            raise CheckpointFormatError(f"{path}: zip member {_brief(name)} is not a .npy array")
    if len(set(names)) != len(names):
        raise CheckpointFormatError(f"{path}: an array is stored twice")
    # Checked over the whole file: savez_compressed squeezes an all-zero array (an untrained
    # bias) far below 1/64, but real weights dominate a checkpoint and barely compress.
    declared, size = sum(info.file_size for info in infos), path.stat().st_size
    if declared > MAX_STORAGE_INFLATION * max(size, 1):
        raise CheckpointFormatError(
            f"{path}: its arrays inflate to {declared} bytes, more than {MAX_STORAGE_INFLATION}x "
            f"the file's {size} bytes (a zip bomb?)"
        )


def _read_npy(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> np.ndarray:
    where = f"{path}: array {_brief(info.filename[: -len('.npy')])}"
    try:
        with archive.open(info) as member:
            return _read_npy_member(member, info.file_size, where)
    except CheckpointFormatError:
        raise
    except _READ_ERRORS as exc:
        raise CheckpointFormatError(f"{where} is unreadable ({_exc_text(exc)})") from None


# NumPy parses the header dict with ast.literal_eval, and a 1.0/2.0 header that fails that
# again after its tokenize-based filter: every one of these comes from a damaged header.
_NPY_HEADER_ERRORS = (ValueError, TypeError, SyntaxError, tokenize.TokenError, RecursionError)


def _read_npy_member(member, size: int, where: str) -> np.ndarray:
    """One .npy array, read only once its header proves the data is `size` bytes in all."""
    version = np.lib.format.read_magic(member)
    if version not in ((1, 0), (2, 0)):  # 3.0 only adds UTF-8 field names: no weights have any
        raise CheckpointFormatError(f"{where} has unsupported .npy format version {version}")
    read_header = getattr(np.lib.format, f"read_array_header_{version[0]}_0")
    try:
        shape, fortran_order, dtype = read_header(member)  # NumPy caps a header at 10,000 bytes
    except _NPY_HEADER_ERRORS as exc:
        raise CheckpointFormatError(
            f"{where} has a malformed .npy header ({_exc_text(exc)})"
        ) from None
    if not _is_dims(shape) or dtype.kind not in "biuf" or dtype.fields or dtype.subdtype:
        raise CheckpointFormatError(
            f"{where} has shape {_brief(shape)} and dtype {_clip(str(dtype))}: only numeric "
            f"arrays of at most {MAX_RANK} dimensions are weights"
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if member.tell() + nbytes != size:
        raise CheckpointFormatError(
            f"{where} declares {shape} x {dtype} = {nbytes} bytes of data, its zip member holds "
            f"{size - member.tell()}"
        )
    array = np.frombuffer(member.read(nbytes), dtype=dtype)
    return array.reshape(shape, order="F" if fortran_order else "C").copy()


def load_state_dict(path) -> dict[str, np.ndarray]:
    """Read a `.pth`/`.pth.tar` (torch zip format) or `.npz` VAN checkpoint into NumPy arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".npz":
        return _load_npz(path)
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
    """Official state-dict key -> (layer, Keras variable) for each weight of a `build_van` model."""
    # The mapping is `<layer name>.<torch weight name>`; a LayerScale layer *is* the parameter
    # (`block1.0.layer_scale_1`).
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
            parts.append(f"missing key(s) {_key_list(missing)}")
        if unexpected:
            parts.append(f"unexpected key(s) {_key_list(unexpected)}")
        raise CheckpointMismatchError(
            f"checkpoint does not match VAN-{variant}: " + "; ".join(parts)
        )


def _key_list(keys: list) -> str:
    return "[" + ", ".join(_brief(k) for k in keys[:10]) + (", ...]" if len(keys) > 10 else "]")


def _weights(state_dict: dict) -> dict[str, np.ndarray]:
    """The state dict's arrays by key, without bookkeeping buffers (num_batches_tracked)."""
    for key in state_dict:
        if not isinstance(key, str):
            raise CheckpointMismatchError(f"state dict key {_brief(key)} is not a string")
    return {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIXES)}


def _check_num_classes(num_classes) -> None:
    """Refuse a class count that is not an integer from 1 to MAX_NUM_CLASSES."""
    is_int = isinstance(num_classes, int | np.integer) and not isinstance(num_classes, bool)
    if not is_int or not 1 <= num_classes <= MAX_NUM_CLASSES:
        raise ValueError(
            f"num_classes must be an integer from 1 to {MAX_NUM_CLASSES}, "
            f"got {_clip(repr(num_classes))}"
        )


def _checked_head(weights: dict, variant: str, width: int, num_classes) -> int:
    """The class count, once `head.weight` proves it holds that many rows of `width` weights."""
    # Checked before the model is built: an empty (N, 0) head costs a file nothing, but a
    # model with N classes gigabytes.
    if num_classes is not None:
        _check_num_classes(num_classes)
    if "head.weight" not in weights:
        raise CheckpointMismatchError("missing key 'head.weight' (needed for num_classes)")
    shape = weights["head.weight"].shape
    rows = num_classes if num_classes is not None else shape[0] if shape else 0
    if shape != (rows, width) or not 1 <= rows <= MAX_NUM_CLASSES:
        classes = num_classes if num_classes is not None else f"1 to {MAX_NUM_CLASSES}"
        raise CheckpointMismatchError(
            f"shape mismatch for 'head.weight': checkpoint has {shape}, VAN-{variant} expects "
            f"(num_classes, {width}) with num_classes {classes}"
        )
    return int(rows)


def _check_values(key: str, array: np.ndarray) -> None:
    """Refuse weights that are not floating point, or not finite."""
    if array.dtype.kind != "f":  # official weights are float32; casting ints/strings is a guess
        raise CheckpointMismatchError(
            f"{_brief(key)} has dtype {_clip(str(array.dtype))}: VAN weights must be floating "
            "point (float16, float32 or float64)"
        )
    bad = array.size - np.count_nonzero(np.isfinite(array))
    if bad:
        raise CheckpointMismatchError(
            f"{_brief(key)} has {bad} non-finite value(s) (NaN or Inf) of {array.size}"
        )
    # The model is float32: a float64 value beyond its range would be loaded as Inf.
    limit = np.finfo(np.float32).max
    over = np.count_nonzero(np.abs(array) > limit) if array.dtype.itemsize > 4 else 0
    if over:
        raise CheckpointMismatchError(
            f"{_brief(key)} has {over} value(s) beyond float32's range (|x| > {limit:.4g}) of "
            f"{array.size}"
        )


def convert_state_dict(state_dict: dict, variant: str, num_classes: int | None = None):
    """Build VAN-`variant` (dynamic H/W) and load an official state dict into it; returns the model."""
    from van_trainer.model import VARIANTS, build_van

    if variant not in VARIANTS:
        raise ValueError(f"unknown VAN variant {variant!r}; choose one of {sorted(VARIANTS)}")
    weights = _weights(state_dict)
    num_classes = _checked_head(weights, variant, VARIANTS[variant].embed_dims[-1], num_classes)
    for key, array in weights.items():
        _check_values(key, array)
    model = build_van(variant, num_classes=num_classes, input_shape=(None, None, 3))
    mapping = official_weight_map(model)
    _check_keys(weights, mapping, variant)
    for key, (layer, variable, short) in mapping.items():
        array = weights[key]
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
    if num_classes is not None:  # before reading a possibly large file
        _check_num_classes(num_classes)
    model = convert_state_dict(load_state_dict(checkpoint), variant, num_classes)
    output.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(output))
    return output
