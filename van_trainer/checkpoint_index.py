"""A TF checkpoint's `.index` read in Python, within bounds, before TensorFlow reads it.

The index is a LevelDB-format table of BundleEntryProtos (tensorflow/core/lib/io/format.cc,
block.cc; tensorflow/core/util/tensor_bundle). TensorFlow allocates what its fields declare
before reading: a block handle's size (`new char[size]`: a footer declaring 1 TiB raised
std::bad_alloc), a string's length in the data file (`tstring::resize`, zero-filled). Here every
block handle must lie inside the file, and every string entry's lengths inside its entry and the
entry inside a bound, before TF is asked to read any of it.
"""

from __future__ import annotations

import math
import struct

import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import tensor_bundle_pb2

FOOTER_BYTES = 48  # two block handles padded to 40 bytes, then the 8-byte magic number
MAGIC = 0xDB4775248B80FB57
BLOCK_TRAILER_BYTES = 5  # compression type and masked CRC32C after each block
HEADER_KEY = ""  # the BundleHeaderProto's key


class CheckpointIndexError(ValueError):
    """A checkpoint's index or string data declares more than its files hold or a bound allows."""


def _varint(data: bytes, at: int, end: int, what: str) -> tuple[int, int]:
    value = shift = 0
    while at < end and shift < 64:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
    raise CheckpointIndexError(f"{what}: a varint runs past its end")


def _handle(data: bytes, at: int, end: int, blocks_end: int, what: str):
    offset, at = _varint(data, at, end, what)
    size, at = _varint(data, at, end, what)
    if offset + size + BLOCK_TRAILER_BYTES > blocks_end:
        raise CheckpointIndexError(
            f"{what} declares a block of {size} bytes at {offset}, past the file's "
            f"{blocks_end} bytes of blocks"
        )
    return (offset, size), at


def _block_entries(data: bytes, handle: tuple[int, int], what: str) -> list[tuple[bytes, bytes]]:
    start, size = handle
    end = start + size
    if size < 4:
        raise CheckpointIndexError(f"{what}: a block of {size} bytes has no restart count")
    (restarts,) = struct.unpack_from("<I", data, end - 4)
    if 4 * (restarts + 1) > size:
        raise CheckpointIndexError(f"{what}: a block declares more restarts than it holds")
    entries_end = end - 4 * (restarts + 1)
    entries, key, at = [], b"", start
    while at < entries_end:
        shared, at = _varint(data, at, entries_end, what)
        fresh, at = _varint(data, at, entries_end, what)
        length, at = _varint(data, at, entries_end, what)
        if shared > len(key) or at + fresh + length > entries_end:
            raise CheckpointIndexError(f"{what}: a block entry runs past its block")
        key = key[:shared] + data[at : at + fresh]
        entries.append((key, data[at + fresh : at + fresh + length]))
        at += fresh + length
    return entries


def read_index(path: str, limit: int) -> dict[str, tensor_bundle_pb2.BundleEntryProto]:
    """Each key of the checkpoint index at `path` (at most `limit` bytes) -> its entry, checked."""
    # The header (a BundleHeaderProto) is left out. Raises CheckpointIndexError naming the file.
    name = path.rsplit("/", 1)[-1]
    size = tf.io.gfile.stat(path).length
    if size > limit:
        raise CheckpointIndexError(
            f"{name} is {size} bytes, more than the {limit} a checkpoint of this model needs"
        )
    with tf.io.gfile.GFile(path, "rb") as file:
        data = file.read(limit + 1)
    if len(data) < FOOTER_BYTES or struct.unpack_from("<Q", data, len(data) - 8)[0] != MAGIC:
        raise CheckpointIndexError(f"{name} is not a checkpoint index (no table footer)")
    blocks_end = len(data) - FOOTER_BYTES
    what = f"{name}'s footer"
    _, at = _handle(data, blocks_end, len(data) - 8, blocks_end, what)  # the metaindex block
    index_handle, _ = _handle(data, at, len(data) - 8, blocks_end, what)
    entries, done = {}, 0
    for _, value in _block_entries(data, index_handle, f"{name}'s index block"):
        what = f"{name}'s index block"
        block, _ = _handle(value, 0, len(value), blocks_end, what)
        # TF writes the data blocks one after another: blocks read again or out of order
        # would make parsing cost more than the file's size.
        if block[0] < done:
            raise CheckpointIndexError(f"{what} names a data block twice or out of order")
        done = block[0] + block[1] + BLOCK_TRAILER_BYTES
        for key, serialized in _block_entries(data, block, f"{name}'s data block"):
            if key.decode("utf-8", "replace") == HEADER_KEY:
                continue
            entry = tensor_bundle_pb2.BundleEntryProto()
            try:
                entry.ParseFromString(serialized)
            except Exception as exc:  # protobuf's DecodeError, whichever implementation
                raise CheckpointIndexError(f"{name}: the entry for {key!r} is unparseable") from exc
            entries[key.decode("utf-8", "replace")] = entry
    return entries


def check_strings(
    prefix: str, entries: dict[str, tensor_bundle_pb2.BundleEntryProto], limit: int
) -> None:
    """Refuse a string entry larger than `limit` bytes, or whose lengths exceed what it holds."""
    # TF resizes each string to the length the data file declares before reading it, whatever
    # the entry's size: a 12-byte entry declaring 2 GiB cost 2 GiB. Its format (tensor_bundle.cc,
    # WriteStringTensor): a varint length per element, a 4-byte checksum, then the bytes.
    for key, entry in sorted(entries.items()):
        if entry.dtype != types_pb2.DT_STRING or entry.slices:
            continue
        if entry.size > limit:
            raise CheckpointIndexError(
                f"string entry {key} is {entry.size} bytes, more than the {limit} allowed"
            )
        count = math.prod(dim.size for dim in entry.shape.dim)
        # Listed, not globbed: the run directory's name may hold glob characters.
        directory, name = prefix.rsplit("/", 1) if "/" in prefix else (".", prefix)
        start = f"{name}.data-{entry.shard_id:05d}-of-"
        shards = [f for f in tf.io.gfile.listdir(directory) if f.startswith(start)]
        if len(shards) != 1:
            raise CheckpointIndexError(f"string entry {key}: its data file {start}* is not there")
        shard = f"{directory}/{shards[0]}"
        if entry.offset + entry.size > tf.io.gfile.stat(shard).length:
            raise CheckpointIndexError(f"string entry {key} lies past the end of its data file")
        with tf.io.gfile.GFile(shard, "rb") as file:
            file.seek(entry.offset)
            data = file.read(entry.size)
        at, total = 0, 0
        for _ in range(count):
            length, at = _varint(data, at, len(data), f"string entry {key}")
            total += length
        if at + 4 + total != entry.size:
            raise CheckpointIndexError(
                f"string entry {key} declares {total} bytes of strings in an entry of "
                f"{entry.size} bytes"
            )
