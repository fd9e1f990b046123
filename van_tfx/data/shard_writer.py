"""The Beam writer of van_tfx.data.shards: rolling fixed-size shards, renamed once, and a count."""

from __future__ import annotations

import json
import os
import uuid

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from van_tfx import storage
from van_tfx.data.shards import SHARD_SUFFIX


class _WriteRollingShards(beam.DoFn):
    """Writes a bundle's records to temporary files of at most `per_shard` records each."""

    def __init__(self, temp_dir: str, per_shard: int):
        self._temp_dir = temp_dir
        self._per_shard = per_shard

    def setup(self):
        import tensorflow as tf

        tf.io.gfile.makedirs(self._temp_dir)  # once per worker, not per file (object storage)

    def start_bundle(self):
        self._writer = None
        self._path = ""
        self._in_file = 0
        self._done: list[tuple[str, int]] = []

    def process(self, record: bytes):
        if self._writer is None or self._in_file == self._per_shard:
            self._roll()
        self._writer.write(record)
        self._in_file += 1

    def _roll(self):
        import tensorflow as tf

        self._close()
        self._path = os.path.join(self._temp_dir, uuid.uuid4().hex + SHARD_SUFFIX)
        self._writer = tf.io.TFRecordWriter(self._path)
        self._in_file = 0

    def _close(self):
        if self._writer is not None:
            self._writer.close()
            self._done.append((self._path, self._in_file))
            self._writer = None

    def finish_bundle(self):
        self._close()
        for item in self._done:
            yield WindowedValue(item, MIN_TIMESTAMP, [GlobalWindow()])


def _rename_to_shard(path: str, target: str) -> None:
    import tensorflow as tf

    try:
        tf.io.gfile.rename(path, target, overwrite=True)
    except tf.errors.NotFoundError:
        # A retried finalize finds the files it already renamed in place: skip those.
        if not tf.io.gfile.exists(target):
            raise


def _finalize(written: list[tuple[str, int]], prefix: str, temp_dir: str, count_path: str):
    """Rename the temporary files to numbered shards, record the count, drop the temp dir."""
    import tensorflow as tf

    written = sorted(written)
    tf.io.gfile.makedirs(os.path.dirname(prefix))
    targets = [
        f"{prefix}-{index:05d}-of-{len(written):05d}{SHARD_SUFFIX}" for index in range(len(written))
    ]
    storage.for_each_file(_rename_to_shard, [path for path, _ in written], targets)
    shard_examples = {
        os.path.basename(target): count for target, (_, count) in zip(targets, written, strict=True)
    }
    if tf.io.gfile.exists(temp_dir):
        tf.io.gfile.rmtree(temp_dir)  # files of failed (retried) bundles
    if count_path:
        tf.io.gfile.makedirs(os.path.dirname(count_path))
        with tf.io.gfile.GFile(count_path, "w") as f:
            json.dump(
                {
                    "examples": sum(n for _, n in written),
                    "files": len(written),
                    "shard_examples": shard_examples,
                },
                f,
            )


class WriteShards(beam.PTransform):
    """Serialized records -> `<prefix>-NNNNN-of-MMMMM` shards of `examples_per_shard` records."""

    # The last shard of each bundle is shorter; the records' total goes to `count_path` (if given).

    def __init__(self, prefix: str, examples_per_shard: int, count_path: str = ""):
        super().__init__()
        if examples_per_shard < 1:
            raise ValueError(f"examples_per_shard must be >= 1, not {examples_per_shard}")
        self._prefix = prefix
        self._per_shard = examples_per_shard
        self._count_path = count_path

    def expand(self, records):
        """Write the records to rolling temp shards, then rename them into place and count them."""
        temp_dir = f"{os.path.dirname(self._prefix)}.tmp-{uuid.uuid4().hex[:12]}"
        return (
            records
            | "WriteRollingShards" >> beam.ParDo(_WriteRollingShards(temp_dir, self._per_shard))
            | "ListShards" >> beam.combiners.ToList()
            | "Finalize" >> beam.Map(_finalize, self._prefix, temp_dir, self._count_path)
        )
