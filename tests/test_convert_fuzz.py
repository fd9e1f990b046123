"""The weight converter on hostile files: malformed tensor metadata and pickle opcode streams.

Properties (Hypothesis): loading never crashes and never reads outside a tensor's storage. It
either returns arrays whose every element is the storage element the metadata addresses, or
refuses with CheckpointFormatError / UnsafeCheckpointError naming what is wrong.
"""

from __future__ import annotations

import io
import math
import pickle
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.torch_format import (
    StorageRecord,
    TensorRecord,
    save_raw_pickle_zip,
    save_records_zip,
    save_torch_zip,
)
from van_trainer import convert

REFUSALS = (convert.CheckpointFormatError, convert.UnsafeCheckpointError)
FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def storage_bytes(numel: int) -> bytes:
    """Float32 elements 0, 1, 2, ... : each value names its own position in the storage."""
    return np.arange(numel, dtype="<f4").tobytes()


def expected_elements(numel: int, offset: int, size: tuple, stride: tuple) -> np.ndarray:
    """The addressed storage elements, by explicit index arithmetic with a bounds check."""
    values = np.zeros(size, dtype=np.float32)
    for index in np.ndindex(*size):
        position = offset + sum(i * s for i, s in zip(index, stride, strict=True))
        assert 0 <= position < numel, "the converter accepted a tensor reaching outside storage"
        values[index] = position
    return values


def test_negative_stride_is_refused_naming_the_tensor(tmp_path):
    # Before: as_strided walked backwards from the storage start and copied foreign memory.
    storage = StorageRecord("0", "FloatStorage", 4)
    state = {"head.weight": TensorRecord(storage, 3, (4,), (-1,))}
    save_records_zip(state, {"0": storage_bytes(4)}, tmp_path / "c.pth")
    with pytest.raises(convert.CheckpointFormatError, match=r"'head\.weight' has stride \(-1,\)"):
        convert.load_state_dict(tmp_path / "c.pth")


def test_negative_offset_is_refused_naming_the_tensor(tmp_path):
    # Before: storage[-4:] plus a large size read past the storage end (segfault).
    storage = StorageRecord("0", "FloatStorage", 8)
    state = {"norm1.bias": TensorRecord(storage, -4, (1000, 1000), (1000, 1))}
    save_records_zip(state, {"0": storage_bytes(8)}, tmp_path / "c.pth")
    with pytest.raises(convert.CheckpointFormatError, match=r"'norm1\.bias' has storage offset -4"):
        convert.load_state_dict(tmp_path / "c.pth")


def test_stride_zero_cannot_amplify_a_tiny_storage(tmp_path):
    storage = StorageRecord("0", "FloatStorage", 1)
    state = {"w": TensorRecord(storage, 0, (2**20, 2**20), (0, 0))}  # 4 TiB from 4 bytes
    save_records_zip(state, {"0": storage_bytes(1)}, tmp_path / "c.pth")
    with pytest.raises(convert.CheckpointFormatError, match="more than its storage's 1"):
        convert.load_state_dict(tmp_path / "c.pth")


def test_storage_bytes_must_match_its_record(tmp_path):
    storage = StorageRecord("0", "FloatStorage", 16)  # claims 64 bytes, holds 8
    save_records_zip({"w": TensorRecord(storage, 0, (16,), (1,))}, {"0": b"\0" * 8}, tmp_path / "c")
    with pytest.raises(convert.CheckpointFormatError, match=r"'w' .*holds 8 bytes.*= 64 bytes"):
        convert.load_state_dict(tmp_path / "c")


def test_non_tensor_state_dict_values_are_refused_by_name(tmp_path):
    nested = [[1.0]]
    for _ in range(40):  # 2**40 elements if it were ever turned into an array
        nested = [nested, nested]
    save_raw_pickle_zip(pickle.dumps({"state_dict": {"x": nested}}, protocol=2), tmp_path / "c")
    with pytest.raises(convert.CheckpointFormatError, match="'x' is list, not a tensor"):
        convert.load_state_dict(tmp_path / "c")


def test_cli_names_the_tensor_and_exits_2(tmp_path, capsys):
    from van_tfx.cli import main

    storage = StorageRecord("0", "FloatStorage", 4)
    save_records_zip(
        {"block1.0.mlp.fc1.weight": TensorRecord(storage, 0, (4,), (-2,))},
        {"0": storage_bytes(4)},
        tmp_path / "bad.pth",
    )
    out = tmp_path / "w.weights.h5"
    args = ["--variant", "b0", "--checkpoint", str(tmp_path / "bad.pth"), "--output", str(out)]
    assert main(["convert-weights", *args]) == 2
    assert "'block1.0.mlp.fc1.weight' has stride" in capsys.readouterr().err
    assert not out.exists()


ints = st.one_of(
    st.integers(-3, 12), st.integers(-(2**64), 2**64), st.sampled_from([2**31, 2**62, 2**63])
)
not_ints = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=3))
dims = st.lists(ints, max_size=4).map(tuple)
metadata_value = st.one_of(ints, not_ints)


@st.composite
def plausible_layouts(draw):
    """Offset, size and stride of one rank, in ranges where a 0..24 storage often fits."""
    rank = draw(st.integers(0, 3))
    size = tuple(draw(st.lists(st.integers(0, 4), min_size=rank, max_size=rank)))
    stride = tuple(draw(st.lists(st.integers(-1, 5), min_size=rank, max_size=rank)))
    return draw(st.integers(-1, 8)), size, stride


wild_layouts = st.tuples(
    metadata_value,
    st.one_of(dims, not_ints, st.lists(metadata_value, max_size=3)),
    st.one_of(dims, not_ints, st.lists(metadata_value, max_size=3)),
)


@FUZZ
@given(
    numel=st.integers(0, 24),
    record_numel=st.one_of(*[st.none()] * 6, ints, not_ints),
    layout=st.one_of(*[plausible_layouts()] * 3, wild_layouts),
    type_name=st.sampled_from(["FloatStorage"] * 8 + ["LongStorage", "Bogus"]),
)
def test_malformed_tensor_metadata_never_reads_outside_storage(
    tmp_path, numel, record_numel, layout, type_name
):
    offset, size, stride = layout
    record = numel if record_numel is None else record_numel
    storage = StorageRecord("0", type_name, record)
    path = tmp_path / "fuzz.pth"
    save_records_zip(
        {"w": TensorRecord(storage, offset, size, stride)}, {"0": storage_bytes(numel)}, path
    )
    try:
        state = convert.load_state_dict(path)
    except REFUSALS as exc:
        event("refused")
        assert "'w'" in str(exc) or "storage type" in str(exc) or "storage record" in str(exc)
        return
    array = state["w"]
    # Accepted only if it is exactly what the metadata addresses, inside the storage.
    assert type_name == "FloatStorage" and record == numel
    assert array.shape == tuple(size) and array.size <= numel
    event("accepted")
    np.testing.assert_array_equal(
        array, expected_elements(numel, offset, tuple(size), tuple(stride))
    )


def valid_pickle() -> tuple[bytes, dict[str, bytes]]:
    """data.pkl and storages of a real two-tensor checkpoint, to mutate."""
    buffer = io.BytesIO()
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(3, dtype=np.int64)}
    save_torch_zip({"state_dict": state, "epoch": 3}, buffer)
    with zipfile.ZipFile(buffer) as archive:
        storages = {n.split("/")[-1]: archive.read(n) for n in archive.namelist() if "/data/" in n}
        return archive.read("archive/data.pkl"), storages


VALID_PICKLE, VALID_STORAGES = valid_pickle()


def load_pickle_bytes(payload: bytes, path) -> dict:
    """load_state_dict on a checkpoint whose data.pkl is `payload` (storages of VALID_PICKLE)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
        for key, raw in VALID_STORAGES.items():
            archive.writestr(f"archive/data/{key}", raw)
    return convert.load_state_dict(path)


def check_outcome(payload: bytes, tmp_path) -> None:
    try:
        state = load_pickle_bytes(payload, tmp_path / "fuzz.pth")
    except REFUSALS as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("loaded")
    storage_elements = {len(raw) // 4 for raw in VALID_STORAGES.values()} | {
        len(raw) // 8 for raw in VALID_STORAGES.values()
    }
    for value in state.values():
        assert isinstance(value, np.ndarray) and value.size <= max(storage_elements)


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(VALID_PICKLE)), st.sampled_from("rid"), st.binary(max_size=3)),
        min_size=1,
        max_size=4,
    ),
    cut=st.one_of(st.none(), st.integers(0, len(VALID_PICKLE))),
)
def test_mutated_checkpoint_pickles_load_or_are_refused(tmp_path, edits, cut):
    data = bytearray(VALID_PICKLE)
    for position, kind, blob in edits:
        position = min(position, len(data))
        if kind == "r":
            data[position : position + len(blob)] = blob
        elif kind == "i":
            data[position:position] = blob
        else:
            del data[position : position + 1 + len(blob)]
    check_outcome(bytes(data if cut is None else data[:cut]), tmp_path)


# Opcodes with their argument encoders: a grammar wide enough to reach globals, calls, builds,
# persistent ids, memo reads/writes at any index, and the frame and long-integer readers.
def _u4(n):
    return (n % 2**32).to_bytes(4, "little")


def _text(s):
    raw = s.encode()
    return pickle.BINUNICODE + _u4(len(raw)) + raw


PWNED = Path(tempfile.gettempdir()) / "van-tfx-convert-fuzz-pwned"
GLOBALS = [
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "FloatStorage"),
    ("torch", "LongStorage"),
    ("collections", "OrderedDict"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("posix", "system"),
    ("builtins", "eval"),
    ("argparse", "Namespace"),
]
opcode = st.one_of(
    st.sampled_from(
        [
            pickle.MARK,
            pickle.TUPLE,
            pickle.TUPLE1,
            pickle.TUPLE2,
            pickle.TUPLE3,
            pickle.EMPTY_TUPLE,
            pickle.EMPTY_DICT,
            pickle.EMPTY_LIST,
            pickle.SETITEM,
            pickle.SETITEMS,
            pickle.APPEND,
            pickle.APPENDS,
            pickle.REDUCE,
            pickle.BUILD,
            pickle.NEWOBJ,
            pickle.BINPERSID,
            pickle.DUP,
            pickle.POP,
            pickle.POP_MARK,
            pickle.NONE,
            pickle.NEWTRUE,
            pickle.NEWFALSE,
            pickle.MEMOIZE,
            pickle.STACK_GLOBAL,
            pickle.DICT,
            pickle.LIST,
            pickle.OBJ,
            pickle.FROZENSET,
            pickle.EMPTY_SET,
            pickle.ADDITEMS,
        ]
    ),
    st.sampled_from(GLOBALS).map(lambda g: pickle.GLOBAL + f"{g[0]}\n{g[1]}\n".encode()),
    st.sampled_from(["storage", "0", "1", "a", "cpu", f"touch {PWNED}"]).map(_text),
    st.integers(-(2**40), 2**40).map(lambda n: pickle.BININT + (n % 2**32).to_bytes(4, "little")),
    st.integers(0, 2**32 - 1).map(lambda n: pickle.LONG_BINPUT + _u4(n)),
    st.integers(0, 2**32 - 1).map(lambda n: pickle.LONG_BINGET + _u4(n)),
    st.integers(0, 255).map(lambda n: pickle.BINGET + bytes([n])),
    st.integers(0, 2**64 - 1).map(lambda n: pickle.FRAME + n.to_bytes(8, "little")),
    st.integers(0, 2**32 - 1).map(lambda n: pickle.LONG4 + _u4(n) + b"\x01"),
    st.integers(0, 2**64 - 1).map(lambda n: pickle.BINBYTES8 + n.to_bytes(8, "little")),
)


@FUZZ
@given(st.lists(opcode, max_size=40), st.booleans())
def test_random_opcode_streams_load_or_are_refused(tmp_path, ops, proto4):
    header = pickle.PROTO + (b"\x04" if proto4 else b"\x02")
    payload = header + b"".join(ops) + pickle.STOP
    check_outcome(payload, tmp_path)
    assert not PWNED.exists()


def test_memo_index_bomb_is_cheap(tmp_path):
    # The C unpickler sizes its memo table by the largest index: 6 bytes would allocate 32 GiB.
    payload = pickle.PROTO + b"\x02" + pickle.NONE + pickle.LONG_BINPUT + _u4(2**32 - 1)
    save_raw_pickle_zip(payload + pickle.STOP, tmp_path / "c.pth")
    with pytest.raises(convert.CheckpointFormatError):
        convert.load_state_dict(tmp_path / "c.pth")


def test_real_checkpoint_tensors_are_exact_copies_of_their_storage(tmp_path):
    # The positive case of the properties above: offsets, non-contiguous strides, empty tensors.
    storage = StorageRecord("0", "FloatStorage", 24)
    state = {
        "transposed": TensorRecord(storage, 0, (4, 6), (1, 4)),
        "window": TensorRecord(storage, 5, (2, 3), (6, 2)),
        "empty": TensorRecord(storage, 24, (0, 3), (3, 1)),
        "scalar": TensorRecord(storage, 23, (), ()),
    }
    save_records_zip(state, {"0": storage_bytes(24)}, tmp_path / "c.pth")
    loaded = convert.load_state_dict(tmp_path / "c.pth")
    for name, record in state.items():
        expected = expected_elements(24, record.offset, record.size, record.stride)
        np.testing.assert_array_equal(loaded[name], expected, err_msg=name)
    assert math.prod(loaded["empty"].shape) == 0
