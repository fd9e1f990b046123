"""TFRecord files read in Python, each record's declared length checked before it is trusted.

TensorFlow's record reader allocates whatever length a record header declares: a 58-byte shard
whose header declared 2**36 bytes killed `van-tfx run` with SIGSEGV inside
libtensorflow_framework, no file named. Every TFRecord file that comes from outside (input
shards, a model's warmup requests) is read here instead: a length is believed only up to the
bytes left in the file and MAX_RECORD_BYTES (a GZIP stream's length is unknown, so it is read in
pieces), and both CRCs of every record are checked (google-crc32c, a C extension), so a damaged
file fails naming the file and the record.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
import zlib
from collections.abc import Iterable, Iterator

import google_crc32c

from van_tfx import storage

# An ImageNet record is ~110 KB and one at data.max_image_pixels a few tens of MB.
MAX_RECORD_BYTES = 256 << 20
_HEADER = struct.Struct("<QI")  # length, masked CRC of the length
_FOOTER = struct.Struct("<I")  # masked CRC of the data
_PIECE = 16 << 20  # a GZIP stream's record is read this much at a time
_MASK_DELTA = 0xA282EAD8
GZIP_MAGIC = b"\x1f\x8b"  # the first two bytes of every GZIP stream (RFC 1952)


class CorruptShardError(IOError):
    """A TFRecord shard that cannot be read to the end (truncated or corrupted)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message  # what is wrong, without the file and record


class BadRecordError(ValueError):
    """A readable TFRecord record that is not a tf.Example of the schema's feature kinds."""


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data` (tensorflow/core/lib/hash/crc32c.h Mask)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def tfrecord_compression(path: str) -> str:
    """tf.data's compression_type for a TFRecord file, from its name as Beam decides it."""
    return "GZIP" if str(path).endswith(".gz") else ""


def read_records(path: str, ranged: bool = False) -> Iterator[bytes]:
    """Each record of TFRecord file `path` (GZIP if *.gz); CorruptShardError names file, record."""
    # ranged: the caller wants the first few records only; on gs:// they are fetched in small
    # byte ranges (storage.open_ranged), not in TF's 64 MiB blocks.
    index = 0
    with _open(path, ranged) as (stream, size):
        try:
            # size is None for a GZIP stream: only a plain file is sniffed for GZIP's magic.
            while (record := _next_record(stream, size, sniff=index == 0)) is not None:
                yield record
                index += 1
        except (_Damage, EOFError, zlib.error, gzip.BadGzipFile) as damage:
            reason = (
                damage if isinstance(damage, _Damage) else f"its GZIP stream is damaged ({damage})"
            )
            raise CorruptShardError(
                f"TFRecord shard {path} is damaged at record {index} (after {index} readable "
                f"records): {reason}",
                str(reason),
            ) from None


def write_records(path: str, records: Iterable[bytes]) -> int:
    """Write `records` as an uncompressed TFRecord file `path`; returns how many."""
    count = 0
    with _open_for_writing(path) as out:
        for record in records:
            out.write(record_header(len(record)))
            out.write(record)
            out.write(_FOOTER.pack(masked_crc(record)))
            count += 1
    return count


def record_header(length: int) -> bytes:
    """The 12 bytes before a record of `length` bytes: the length and its masked CRC."""
    length_bytes = struct.pack("<Q", length)
    return length_bytes + _FOOTER.pack(masked_crc(length_bytes))


class _Damage(Exception):
    """What is wrong with the record being read."""


def _next_record(stream, size: int | None, sniff: bool = False) -> bytes | None:
    header = stream.read(_HEADER.size)
    if not header:
        return None
    if len(header) < _HEADER.size:
        raise _Damage(f"its header is cut off after {len(header)} of {_HEADER.size} bytes")
    length, length_crc = _HEADER.unpack(header)
    if masked_crc(header[:8]) != length_crc:
        if sniff and size is not None and header.startswith(GZIP_MAGIC):
            # Read from the bytes in hand: a second open just to sniff cost a round trip (and on
            # GCS a 64 MiB read) per shard.
            raise _Damage(
                "it is GZIP-compressed but its name does not end in .gz, so it is read as "
                "uncompressed TFRecords (as Beam reads it); rename it *.gz"
            )
        raise _Damage("its length's checksum does not match (not a TFRecord file, or damaged)")
    left = None if size is None else max(size - stream.tell() - _FOOTER.size, 0)
    if left is not None and length > left:
        raise _Damage(f"it declares {length} bytes, more than the {left} left in the file")
    if length > MAX_RECORD_BYTES:
        raise _Damage(
            f"it declares {length} bytes, more than a record may hold ({MAX_RECORD_BYTES})"
        )
    data = _read_exactly(stream, length)
    footer = stream.read(_FOOTER.size)
    if len(data) < length or len(footer) < _FOOTER.size:
        raise _Damage(f"it is cut off: the file ends inside its {length} bytes")
    if masked_crc(data) != _FOOTER.unpack(footer)[0]:
        raise _Damage("its data's checksum does not match")
    return data


def _read_exactly(stream, length: int) -> bytes:
    # One read of a bounded length; a GZIP stream's pieces are read up to the length, so a
    # declared length the stream doesn't hold is never allocated.
    if length <= _PIECE:
        return stream.read(length)
    pieces, wanted = [], length
    while wanted and (piece := stream.read(min(wanted, _PIECE))):
        pieces.append(piece)
        wanted -= len(piece)
    return b"".join(pieces)


@contextlib.contextmanager
def _open(path: str, ranged: bool = False):
    """(a readable binary stream, its size in bytes or None for GZIP) of `path`, local or on
    object storage; `ranged`: read in small byte ranges where storage.open_ranged can."""
    path = str(path)
    opened = storage.open_ranged(path) if ranged else None
    if opened is not None:
        raw, size = opened
    elif "://" in path:
        import tensorflow as tf

        raw = tf.io.gfile.GFile(path, "rb")
        size = raw.size()
    else:
        raw = open(path, "rb", buffering=1 << 20)  # noqa: SIM115 (closed below)
        size = os.fstat(raw.fileno()).st_size
    with raw:
        if tfrecord_compression(path) == "GZIP":
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                yield stream, None
        else:
            yield raw, size


def _open_for_writing(path: str):
    if "://" not in str(path):
        return open(path, "wb", buffering=1 << 20)  # noqa: SIM115 (the caller's with closes it)
    import tensorflow as tf

    return tf.io.gfile.GFile(str(path), "wb")
