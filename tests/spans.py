"""Tiny span directories in the ImageNet-style layout, for the tests of span resolution and the gate."""

from __future__ import annotations

import functools
from pathlib import Path

import tensorflow as tf

from van_tfx import features


@functools.cache
def tiny_jpeg() -> bytes:
    """A real 2x2 JPEG, built once: the copy reads records, never decodes their images."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 40, 90)).save(out, "JPEG")
    return out.getvalue()


def marked_example(x: int | bytes) -> tf.train.Example:
    """A record carrying every feature the shipped schema requires, and the marker `x`."""
    # The tests read `x` back; the required features let the copy's schema check pass it.
    example = tf.train.Example()
    feature = example.features.feature
    feature[features.IMAGE_ENCODED].bytes_list.value.append(tiny_jpeg())
    feature[features.IMAGE_FORMAT].bytes_list.value.append(b"JPEG")
    feature[features.LABEL].int64_list.value.append(1)
    feature[features.SYNSET].bytes_list.value.append(b"n0")
    feature[features.IMAGE_HEIGHT].int64_list.value.append(2)
    feature[features.IMAGE_WIDTH].int64_list.value.append(2)
    kind = "bytes_list" if isinstance(x, bytes) else "int64_list"
    getattr(feature["x"], kind).value.append(x)
    return example


def write_span(data_root: Path, span: int, synsets: list[str] | None = None) -> None:
    """A span directory with one train and one validation TFRecord shard (and synsets.txt)."""
    directory = data_root / f"span-{span}"
    directory.mkdir(parents=True, exist_ok=True)
    example = marked_example(span)
    for name in ("train-00000-of-00001", "validation-00000-of-00001"):
        with tf.io.TFRecordWriter(str(directory / name)) as writer:
            writer.write(example.SerializeToString())
    if synsets is not None:
        (directory / "synsets.txt").write_text("".join(f"{s}\n" for s in synsets))


def write_shards(directory: Path, stem: str, total: int, indices=None) -> list[Path]:
    """TFRecord shards `<stem>-NNNNN-of-<total>` (all of them, or those `indices`) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    example = marked_example(total)
    paths = []
    for index in range(total) if indices is None else indices:
        paths.append(directory / f"{stem}-{index:05d}-of-{total:05d}")
        with tf.io.TFRecordWriter(str(paths[-1])) as writer:
            writer.write(example.SerializeToString())
    return paths
