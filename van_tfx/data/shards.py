"""Transformed splits on disk: fixed-size TFRecord shards and the example count beside them.

Multi-worker training gives each worker its own files (van_trainer/dataset.py), so a split needs
many files of equal size whatever the Beam runner does. Beam's `WriteToTFRecord(num_shards=N)`
gets N files through a GroupByKey of every record, which the DirectRunner holds in memory (the
whole split) and Dataflow pays as a shuffle. `WriteShards` instead rolls each bundle's output to
a new file every `examples_per_shard` records: no shuffle, memory flat, every file but each
bundle's last exactly full. Like Beam's file sinks, bundles write temporary files that one
finalize step renames (`<prefix>-00000-of-00042`), so a retried bundle leaves no duplicates.
The shards are not compressed: their JPEGs do not shrink (GZIP saved 0.3 %), and GZIP cost
15x the write time and 3x the read time (benchmarks/bench_augment.py --sections storage).

The same finalize step records how many examples the split holds (`example_counts/<split>.json`
in the transform graph), so the Trainer plans its steps without reading the data. The writer is
in van_tfx.data.shard_writer (Beam); this module, which the Trainer reads, needs no Beam.
"""

from __future__ import annotations

import json
import os

EXAMPLE_COUNTS_DIR = "example_counts"
SHARD_SUFFIX = ""  # uncompressed; readers take *.gz (older runs) as GZIP


def example_count_path(transform_dir: str, split: str) -> str:
    """Where the example count of `split` lives inside a transform graph directory."""
    return os.path.join(transform_dir, EXAMPLE_COUNTS_DIR, f"{split}.json")


def _read_counts(transform_dir: str, split: str) -> dict | None:
    import tensorflow as tf

    path = example_count_path(transform_dir, split)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def read_example_count(transform_dir: str, split: str) -> int | None:
    """The number of examples Transform wrote for `split`, or None if it recorded none."""
    counts = _read_counts(transform_dir, split)
    return None if counts is None else int(counts["examples"])


def read_shard_examples(transform_dir: str, split: str) -> dict[str, int] | None:
    """Examples per shard file (by file name) of `split`, or None if Transform recorded none."""
    counts = _read_counts(transform_dir, split)
    if counts is None or "shard_examples" not in counts:
        return None
    return {name: int(n) for name, n in counts["shard_examples"].items()}
