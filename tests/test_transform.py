"""Ingestion, validation gate and Transform, run for real: LocalDagRunner, Beam, SQLite MLMD."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
import tensorflow as tf

from van_tfx import features
from van_tfx.config import DataConfig
from van_tfx.data import shards
from van_tfx.data.records import write_split, write_synset_list
from van_tfx.data.sample import SYNSET_TEXTS, span_records
from van_trainer import preprocessing

PER_SHARD = 32


def write_small_sample(root: Path, train: int = 200, validation: int = 100) -> list:
    """A small span-1 copy of the digits sample (tiny shards); returns the validation records."""
    train_records, validation_records = span_records(1)
    span = root / "span-1"
    write_split(train_records[:train], span, "train", 2)
    write_split(validation_records[:validation], span, "validation", 1)
    write_synset_list(span / "synsets.txt", SYNSET_TEXTS)
    return validation_records[:validation]


def run_ingest_and_transform(tmp: Path, data_root: Path, *, with_transform: bool) -> dict:
    """Run ImportExampleGen → StatisticsGen → CuratedSchema → ExampleValidator → gate (→ Transform)."""
    from tfx import v1 as tfx
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    from pipeline import ingest

    config = DataConfig(examples_per_shard=PER_SHARD)
    example_gen = ingest.example_gen(config, str(data_root))
    statistics = ingest.statistics_gen(example_gen)
    schema = ingest.curated_schema(config, str(data_root), example_gen)
    validator = ingest.example_validator(statistics, schema)
    gate = ingest.anomalies_gate(validator)
    components = [example_gen, statistics, schema, validator, gate]
    if with_transform:
        transform = ingest.transform(
            config, example_gen.outputs["examples"], schema.outputs["schema"]
        )
        transform.add_upstream_node(gate)
        components.append(transform)
    pipeline = tfx.dsl.Pipeline(
        pipeline_name="ingest-test",
        pipeline_root=str(tmp / "root"),
        components=components,
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            str(tmp / "metadata.sqlite")
        ),
        beam_pipeline_args=["--direct_num_workers=1"],
    )
    LocalDagRunner().run(pipeline)
    return {"root": tmp / "root"}


@pytest.fixture(scope="module")
def transformed(tmp_path_factory):
    """One pipeline run on 200 train / 100 eval digits, 32 records per transformed file."""
    tmp = tmp_path_factory.mktemp("transform")
    validation = write_small_sample(tmp / "data")
    run = run_ingest_and_transform(tmp, tmp / "data", with_transform=True)
    return run["root"], validation


def newest(pattern: str) -> str:
    """The most recently written path matching a glob (one run per pipeline root here)."""
    matches = glob.glob(pattern)
    assert matches, f"nothing matches {pattern}"
    return max(matches, key=os.path.getmtime)


def split_files(root: Path, split: str) -> list[str]:
    """The transformed files of one split."""
    split_dir = newest(str(root / "Transform" / "transformed_examples" / "*" / f"Split-{split}"))
    return sorted(glob.glob(os.path.join(split_dir, "*")))


def read_transformed(root: Path, split: str) -> list[tf.train.Example]:
    """The transformed examples of one split."""
    dataset = tf.data.TFRecordDataset(split_files(root, split), compression_type="GZIP")
    return [tf.train.Example.FromString(raw.numpy()) for raw in dataset]


def transform_graph(root: Path) -> str:
    """The newest transform graph directory of the run."""
    return newest(str(root / "Transform" / "transform_graph" / "*"))


def test_transform_keeps_small_jpegs_byte_for_byte_with_sorted_class_ids(transformed):
    root, validation = transformed
    examples = read_transformed(root, "eval")
    assert len(examples) == len(validation)
    by_jpeg = {record.jpeg: record for record in validation}
    for example in examples:
        stored = example.features.feature[features.TRANSFORMED_IMAGE].bytes_list.value[0]
        record = by_jpeg[stored]  # the 64x64 source JPEG itself: no decode, no re-encode
        label = example.features.feature[features.TRANSFORMED_LABEL].int64_list.value[0]
        assert label == record.label - 1  # vocabulary order == sorted synset order
    vocab = Path(transform_graph(root)) / "transform_fn" / "assets" / "synsets"
    assert vocab.read_text().split() == sorted(SYNSET_TEXTS)


def test_transform_writes_full_shards_and_records_each_splits_count(transformed):
    root, validation = transformed
    for split, expected in (("train", 200), ("eval", len(validation))):
        files = split_files(root, split)
        sizes = [sum(1 for _ in tf.data.TFRecordDataset(f, compression_type="GZIP")) for f in files]
        assert sum(sizes) == expected
        assert len(files) >= expected // PER_SHARD  # not one file per split
        assert max(sizes) == PER_SHARD and sizes.count(PER_SHARD) >= len(files) - 2
        assert [os.path.basename(f) for f in files] == [
            f"transformed_examples-{i:05d}-of-{len(files):05d}.gz" for i in range(len(files))
        ]
        assert shards.read_example_count(transform_graph(root), split) == expected
        per_file = {os.path.basename(f): n for f, n in zip(files, sizes, strict=True)}
        assert shards.read_shard_examples(transform_graph(root), split) == per_file


def rewrite_shard(shard: Path, edit) -> list[tf.train.Example]:
    """Apply `edit` to the shard's parsed tf.Examples, write them back in place, return them."""
    records = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(shard))]
    edit(records)
    with tf.io.TFRecordWriter(str(shard)) as writer:
        for record in records:
            writer.write(record.SerializeToString())
    return records


def test_bad_record_stops_the_run_with_a_readable_summary(tmp_path):
    validation = write_small_sample(tmp_path / "data", train=60, validation=30)
    del validation

    def break_two(records):
        del records[0].features.feature[features.LABEL]
        records[1].features.feature[features.IMAGE_FORMAT].bytes_list.value[0] = b"TIFF"

    rewrite_shard(tmp_path / "data" / "span-1" / "validation-00000-of-00001", break_two)
    with pytest.raises(Exception) as failure:
        run_ingest_and_transform(tmp_path, tmp_path / "data", with_transform=False)
    message = str(failure.value)
    assert "split eval: feature 'image/class/label'" in message
    assert "split eval: feature 'image/format'" in message
    assert "split train" not in message


def _truncate(jpeg: bytes) -> bytes:
    return jpeg[:300]


def _break_frame_header(jpeg: bytes) -> bytes:
    # Start and end markers intact, so only a decode can tell: libjpeg rejects the frame.
    at = jpeg.find(b"\xff\xc0")
    return jpeg[: at + 5] + b"\0\0\0\0" + jpeg[at + 9 :]


@pytest.mark.parametrize("damage", [_truncate, _break_frame_header])
def test_damaged_image_in_eval_split_fails_transform_naming_the_record(tmp_path, damage):
    write_small_sample(tmp_path / "data", train=60, validation=30)

    def damage_one(records):
        victim = records[3].features.feature[features.IMAGE_ENCODED].bytes_list
        victim.value[0] = damage(victim.value[0])

    shard = tmp_path / "data" / "span-1" / "validation-00000-of-00001"
    records = rewrite_shard(shard, damage_one)
    name = records[3].features.feature[features.IMAGE_FILENAME].bytes_list.value[0].decode()
    with pytest.raises(Exception) as failure:
        run_ingest_and_transform(tmp_path, tmp_path / "data", with_transform=True)
    message = str(failure.value)
    assert name in message
    assert "not a complete, decodable JPEG or PNG" in message


def _photo(width: int, height: int, fmt: str = "JPEG") -> bytes:
    import io

    from PIL import Image
    from sklearn.datasets import load_sample_images

    photo = Image.fromarray(load_sample_images().images[0]).resize((width, height))
    out = io.BytesIO()
    photo.save(out, fmt, quality=90)
    return out.getvalue()


def test_stored_images_keep_small_jpegs_and_cap_the_rest_keeping_the_aspect():
    small, large, png = _photo(500, 375), _photo(900, 600), _photo(150, 100, "PNG")
    stored = preprocessing.stored_images(tf.constant([small, large, png, b"junk"]), 512, 90)
    stored = stored.numpy()
    assert stored[0] == small
    assert tf.image.extract_jpeg_shape(stored[1]).numpy().tolist() == [341, 512, 3]
    assert len(stored[1]) < len(large)
    assert tf.image.extract_jpeg_shape(stored[2]).numpy().tolist() == [100, 150, 3]
    assert stored[3] == b""  # unreadable: the named check stops the run


def test_image_headers_read_sizes_without_decoding_and_never_raise():
    jpeg, png = _photo(500, 375), _photo(150, 100, "PNG")
    headers = preprocessing.image_headers(
        tf.constant([jpeg, png, _break_frame_header(jpeg), b"", b"\xff\xd8\xff\xe0\x00"])
    )
    headers = {key: value.numpy().tolist() for key, value in headers.items()}
    assert headers["height"][:2] == [375, 100] and headers["width"][:2] == [500, 150]
    assert headers["readable"] == [True, True, False, False, False]
