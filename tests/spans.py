"""Tiny span directories in the ImageNet-style layout, for the tests of span resolution and the gate."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf


def write_span(data_root: Path, span: int, synsets: list[str] | None = None) -> None:
    """A span directory with one train and one validation TFRecord shard (and synsets.txt)."""
    directory = data_root / f"span-{span}"
    directory.mkdir(parents=True, exist_ok=True)
    example = tf.train.Example()
    example.features.feature["x"].int64_list.value.append(span)
    for name in ("train-00000-of-00001", "validation-00000-of-00001"):
        with tf.io.TFRecordWriter(str(directory / name)) as writer:
            writer.write(example.SerializeToString())
    if synsets is not None:
        (directory / "synsets.txt").write_text("".join(f"{s}\n" for s in synsets))


def write_shards(directory: Path, stem: str, total: int, indices=None) -> list[Path]:
    """TFRecord shards `<stem>-NNNNN-of-<total>` (all of them, or those `indices`) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    example = tf.train.Example()
    example.features.feature["x"].int64_list.value.append(total)
    paths = []
    for index in range(total) if indices is None else indices:
        paths.append(directory / f"{stem}-{index:05d}-of-{total:05d}")
        with tf.io.TFRecordWriter(str(paths[-1])) as writer:
            writer.write(example.SerializeToString())
    return paths
