"""Read and write a TF checkpoint's `.index` (a LevelDB-format table of BundleEntryProtos).

Tests use it to write checkpoints TF's own writer never would: entries pointing anywhere in the
data file, blocks declaring any size. The format: tensorflow/core/lib/io/{block,format,table}.
"""

from __future__ import annotations

import struct

import google_crc32c
from tensorflow.core.protobuf import tensor_bundle_pb2

MAGIC = 0xDB4775248B80FB57


def varint(value: int) -> bytes:
    """`value` as a LevelDB varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def masked_crc(data: bytes) -> int:
    """LevelDB's masked CRC32C of `data`."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    # A restart at every entry: no key shares a prefix with the one before (valid, just longer).
    body, restarts = bytearray(), []
    for key, value in entries:
        restarts.append(len(body))
        body += varint(0) + varint(len(key)) + varint(len(value)) + key + value
    body += b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))
    return bytes(body)


def _with_trailer(block: bytes) -> bytes:
    return block + b"\0" + struct.pack("<I", masked_crc(block + b"\0"))


def write_index(path, entries: dict[str, bytes], index_block_size: int | None = None) -> None:
    """Write `entries` (key -> serialized proto, header under "") as a `.index` table at `path`."""
    # index_block_size: declare this size for the index block in the footer (hostile files).
    data = _block([(k.encode(), v) for k, v in sorted(entries.items())])
    last = max(k.encode() for k in entries)
    out = bytearray(_with_trailer(data))
    meta_offset = len(out)
    out += _with_trailer(_block([]))
    index_offset = len(out)
    handle = varint(0) + varint(len(data))
    index = _block([(last + b"\xff", handle)])
    out += _with_trailer(index)
    size = len(index) if index_block_size is None else index_block_size
    footer = varint(meta_offset) + varint(len(_block([]))) + varint(index_offset) + varint(size)
    out += footer + bytes(40 - len(footer)) + struct.pack("<Q", MAGIC)
    with open(path, "wb") as file:
        file.write(out)


def read_entries(reader_path: str) -> dict:
    """Each key of a checkpoint (prefix) -> its serialized BundleEntryProto (header under "")."""
    from van_trainer import checkpoint_index

    return checkpoint_index.read_index(reader_path + ".index", limit=1 << 30)


def entry(serialized: bytes) -> tensor_bundle_pb2.BundleEntryProto:
    """Parse a BundleEntryProto."""
    proto = tensor_bundle_pb2.BundleEntryProto()
    proto.ParseFromString(serialized)
    return proto


def header() -> bytes:
    """The BundleHeaderProto of a one-shard little-endian bundle, serialized."""
    return tensor_bundle_pb2.BundleHeaderProto(num_shards=1).SerializeToString()


def declare_string_length(prefix: str, key: str, length: int) -> None:
    """Point string entry `key` at new data declaring a `length`-byte string, holding 3 bytes."""
    # A valid length checksum, so TF gets as far as allocating the string.
    entries = {k: v.SerializeToString() for k, v in read_entries(prefix).items()}
    data_path = f"{prefix}.data-00000-of-00001"
    packed = struct.pack("<I", length) if length <= 0xFFFFFFFF else struct.pack("<Q", length)
    data = varint(length) + struct.pack("<I", masked_crc(packed)) + b"abc"
    with open(data_path, "ab") as file:
        offset = file.tell()
        file.write(data)
    proto = entry(entries[key])
    proto.offset, proto.size = offset, len(data)
    entries[key] = proto.SerializeToString()
    write_index(prefix + ".index", {"": header(), **entries})
