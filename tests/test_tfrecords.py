"""TFRecord files read in Python: the same records as TensorFlow's reader, every declared length
bounded before it is believed, and any damage named with the file and the record."""

from __future__ import annotations

import gzip

import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from van_tfx import tfrecords
from van_tfx.tfrecords import CorruptShardError, read_records, write_records

RECORDS = [b"", b"a", b"\x00" * 300, bytes(range(256)) * 40]


def tf_records(path) -> list[bytes]:
    return [
        r.numpy()
        for r in tf.data.TFRecordDataset(str(path), tfrecords.tfrecord_compression(str(path)))
    ]


def tf_write(path, records, options=None) -> None:
    with tf.io.TFRecordWriter(str(path), options) as writer:
        for record in records:
            writer.write(record)


@pytest.mark.parametrize("name", ["shard", "shard.gz"])
def test_records_written_by_tensorflow_read_the_same(tmp_path, name):
    path = tmp_path / name
    tf_write(path, RECORDS, "GZIP" if name.endswith(".gz") else None)
    assert list(read_records(str(path))) == RECORDS


def test_records_written_here_are_tensorflows_bytes(tmp_path):
    tf_write(tmp_path / "theirs", RECORDS)
    assert write_records(str(tmp_path / "ours"), RECORDS) == len(RECORDS)
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()


@pytest.mark.parametrize("length", [2**36, 2**62, 2**64 - 1, 10_000])
@pytest.mark.parametrize("name", ["shard", "shard.gz"])
def test_a_header_declaring_more_than_there_is_is_refused_before_reading(tmp_path, name, length):
    # TensorFlow's reader allocated 2**36 bytes for such a 58-byte file and died (SIGSEGV).
    path = tmp_path / name
    tf_write(tmp_path / "plain", [b"first"])  # the first record is fine; append the hostile one
    body = (tmp_path / "plain").read_bytes() + tfrecords.record_header(length) + b"\0" * 64
    path.write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
    reader = read_records(str(path))
    assert next(reader) == b"first"
    with pytest.raises(CorruptShardError) as failure:
        next(reader)
    message = str(failure.value)
    assert str(path) in message and "at record 1" in message
    assert f"declares {length} bytes" in message or "cut off" in message


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    records=st.lists(st.binary(max_size=200), max_size=6),
    cut=st.integers(0, 2000),
    flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 255)), max_size=3),
    tail=st.binary(max_size=30),
)
def test_damaged_files_read_as_tensorflow_reads_them_or_fail_naming_the_record(
    tmp_path, records, cut, flips, tail
):
    path = tmp_path / "damaged"
    write_records(str(path), records)
    raw = bytearray(path.read_bytes())
    for position, mask in flips:
        if position < len(raw):
            raw[position] ^= mask
    path.write_bytes(bytes(raw[: max(cut, 0)] if cut < len(raw) else raw) + tail)
    try:
        expected, tf_failed = tf_records(path), False
    except (tf.errors.DataLossError, tf.errors.OutOfRangeError):
        expected, tf_failed = None, True
    ours = []
    try:
        for record in read_records(str(path)):
            ours.append(record)
    except CorruptShardError as failure:
        assert f"at record {len(ours)} " in str(failure)
        if not tf_failed:
            # TensorFlow takes a header cut off at the end of the file for the end of the file,
            # silently losing what was there; this reader names it.
            assert "header is cut off" in str(failure) and ours == expected
    else:
        assert ours == expected


def test_a_gzip_file_not_named_gz_is_named_as_one_from_the_bytes_already_read(tmp_path):
    # The ingest pre-check opened every shard a second time just to look for GZIP's magic.
    path = tmp_path / "shard"
    tf_write(path, RECORDS, "GZIP")
    with pytest.raises(CorruptShardError) as failure:
        next(read_records(str(path)))
    assert "at record 0 " in str(failure.value)
    assert "GZIP-compressed but its name does not end in .gz" in failure.value.reason
    tf_write(tmp_path / "plain", RECORDS)  # a plain shard whose data starts with the magic
    raw = (tmp_path / "plain").read_bytes()
    (tmp_path / "damaged").write_bytes(raw[:12] + b"\x1f\x8b" + raw[14:])
    assert list(read_records(str(tmp_path / "plain"))) == RECORDS
    with pytest.raises(CorruptShardError, match="its data's checksum does not match"):
        list(read_records(str(tmp_path / "damaged")))
