"""Write real torch zip-format checkpoints without torch (same globals and persistent ids).

`torch.save` (protocol 2) writes `archive/data.pkl`, `archive/byteorder`, `archive/version` and one
`archive/data/<key>` file of raw bytes per storage; tensors pickle as
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())`
with the storage as persistent id `('storage', torch.FloatStorage, key, 'cpu', numel)`.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile

import numpy as np

_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


class Global:
    """A reference to `module.name` pickled as a GLOBAL opcode without importing it."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __reduce_ex__(self, protocol):  # a str means "save as a global": see _Pickler.save_global
        return self.name

    def __call__(self, *args):  # pickle requires REDUCE targets to be callable
        raise TypeError(f"{self.module}.{self.name} is a pickle reference only")


class _Storage:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


class _Tensor:
    def __init__(self, storage: _Storage, shape, parameter: bool):
        self.storage, self.shape, self.parameter = storage, shape, parameter

    def __reduce_ex__(self, protocol):
        stride = tuple(int(s) for s in np.cumprod((1,) + self.shape[::-1])[:-1][::-1])
        args = (self.storage, 0, self.shape, stride, False, collections.OrderedDict())
        tensor = (Global("torch._utils", "_rebuild_tensor_v2"), args)
        if not self.parameter:
            return tensor
        plain = _Tensor(self.storage, self.shape, parameter=False)
        return (
            Global("torch._utils", "_rebuild_parameter"),
            (plain, True, collections.OrderedDict()),
        )


class _Pickler(pickle._Pickler):  # pure-Python pickler: its save_global can be overridden
    def save_global(self, obj, name=None):
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            storage_type = Global("torch", _STORAGE_NAMES[obj.array.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.array.size)
        return None


def _tensorise(obj, storages: list, parameters: bool):
    """Replace NumPy arrays (anywhere in dicts/lists) by pickle-able fake tensors."""
    if isinstance(obj, np.ndarray):
        storage = _Storage(str(len(storages)), np.ascontiguousarray(obj))
        storages.append(storage)
        return _Tensor(storage, tuple(obj.shape), parameter=parameters)
    if isinstance(obj, dict):
        return type(obj)((k, _tensorise(v, storages, parameters)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_tensorise(v, storages, parameters) for v in obj]
    return obj


def save_torch_zip(obj, path, archive_name: str = "archive", parameters: bool = False) -> None:
    """Write `obj` (dicts of NumPy arrays and plain data) like `torch.save(obj, path)`."""
    storages: list[_Storage] = []
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(_tensorise(obj, storages, parameters))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{archive_name}/data.pkl", buffer.getvalue())
        archive.writestr(f"{archive_name}/byteorder", "little")
        for storage in storages:
            little_endian = storage.array.astype(storage.array.dtype.newbyteorder("<"))
            archive.writestr(f"{archive_name}/data/{storage.key}", little_endian.tobytes())
        archive.writestr(f"{archive_name}/version", "3\n")


def save_raw_pickle_zip(payload: bytes, path, archive_name: str = "archive") -> None:
    """Write a torch-layout zip whose data.pkl is `payload` (for hostile-pickle tests)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{archive_name}/data.pkl", payload)
        archive.writestr(f"{archive_name}/byteorder", "little")


class StorageRecord:
    """A storage's persistent id as a hostile file may write it (any type name, any numel)."""

    def __init__(self, key: str, type_name: str, numel):
        self.key, self.type_name, self.numel = key, type_name, numel


class TensorRecord:
    """`_rebuild_tensor_v2(storage, offset, size, stride, ...)` with arbitrary metadata."""

    def __init__(self, storage: StorageRecord, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce_ex__(self, protocol):
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        return (Global("torch._utils", "_rebuild_tensor_v2"), args)


class _RecordPickler(_Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageRecord):
            return ("storage", Global("torch", obj.type_name), obj.key, "cpu", obj.numel)
        return super().persistent_id(obj)


def save_records_zip(state: dict, storages: dict[str, bytes], path) -> None:
    """Write a torch-layout zip of TensorRecords (a state dict) and raw storage bytes by key."""
    buffer = io.BytesIO()
    _RecordPickler(buffer, protocol=2).dump({"state_dict": state})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        for key, raw in storages.items():
            archive.writestr(f"archive/data/{key}", raw)
