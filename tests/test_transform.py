"""Ingestion, validation gate and Transform, run for real: LocalDagRunner, Beam, SQLite MLMD."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from van_tfx import features
from van_tfx.config import DataConfig
from van_tfx.data.records import write_split, write_synset_list
from van_tfx.data.sample import SYNSET_TEXTS, span_records
from van_trainer import preprocessing

STORED = 32


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
    from tfx.proto import transform_pb2

    from pipeline import ingest

    config = DataConfig(stored_image_size=STORED)
    example_gen = ingest.example_gen(config, str(data_root))
    statistics = ingest.statistics_gen(example_gen)
    schema = ingest.curated_schema(config, str(data_root), example_gen)
    validator = ingest.example_validator(statistics, schema)
    gate = ingest.anomalies_gate(validator)
    components = [example_gen, statistics, schema, validator, gate]
    if with_transform:
        transform = tfx.components.Transform(
            examples=example_gen.outputs["examples"],
            schema=schema.outputs["schema"],
            preprocessing_fn="van_trainer.preprocessing.preprocessing_fn",
            splits_config=transform_pb2.SplitsConfig(
                analyze=["train"], transform=["train", "eval"]
            ),
            custom_config={"data": config.model_dump(mode="json")},
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
    """One pipeline run on ~200 train / 100 eval digits with stored size 32."""
    tmp = tmp_path_factory.mktemp("transform")
    validation = write_small_sample(tmp / "data")
    run = run_ingest_and_transform(tmp, tmp / "data", with_transform=True)
    return run["root"], validation


def newest(pattern: str) -> str:
    """The most recently written path matching a glob (one run per pipeline root here)."""
    matches = glob.glob(pattern)
    assert matches, f"nothing matches {pattern}"
    return max(matches, key=os.path.getmtime)


def read_transformed(root: Path, split: str) -> list[tf.train.Example]:
    """The transformed examples of one split."""
    split_dir = newest(str(root / "Transform" / "transformed_examples" / "*" / f"Split-{split}"))
    files = sorted(glob.glob(os.path.join(split_dir, "*")))
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP")
    return [tf.train.Example.FromString(raw.numpy()) for raw in dataset]


def test_transform_outputs_stored_uint8_images_and_sorted_class_ids(transformed):
    root, validation = transformed
    examples = read_transformed(root, "eval")
    assert len(examples) == len(validation)
    for example, record in zip(examples, validation, strict=True):
        raw = example.features.feature[features.TRANSFORMED_IMAGE].bytes_list.value[0]
        image = preprocessing.decode_transformed_image(tf.constant(raw), STORED).numpy()
        assert image.dtype == np.uint8 and image.shape == (STORED, STORED, 3)
        label = example.features.feature[features.TRANSFORMED_LABEL].int64_list.value[0]
        assert label == record.label - 1  # vocabulary order == sorted synset order
    vocab = newest(
        str(root / "Transform" / "transform_graph" / "*" / "transform_fn" / "assets" / "synsets")
    )
    assert Path(vocab).read_text().split() == sorted(SYNSET_TEXTS)


def test_transformed_image_matches_the_source_digit(transformed):
    # A 64x64 digit resized to 32x32 must look like the PIL-downscaled original, not noise.
    import io

    from PIL import Image

    root, validation = transformed
    example = read_transformed(root, "eval")[0]
    raw = example.features.feature[features.TRANSFORMED_IMAGE].bytes_list.value[0]
    image = preprocessing.decode_transformed_image(tf.constant(raw), STORED).numpy().astype(float)
    source = Image.open(io.BytesIO(validation[0].jpeg)).convert("RGB").resize((STORED, STORED))
    assert np.abs(image - np.asarray(source, float)).mean() < 12


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


def test_truncated_image_in_eval_split_fails_transform_naming_the_record(tmp_path):
    write_small_sample(tmp_path / "data", train=60, validation=30)

    def truncate_one(records):
        victim = records[3].features.feature[features.IMAGE_ENCODED].bytes_list
        victim.value[0] = victim.value[0][:300]

    shard = tmp_path / "data" / "span-1" / "validation-00000-of-00001"
    records = rewrite_shard(shard, truncate_one)
    name = records[3].features.feature[features.IMAGE_FILENAME].bytes_list.value[0].decode()
    with pytest.raises(Exception) as failure:
        run_ingest_and_transform(tmp_path, tmp_path / "data", with_transform=True)
    message = str(failure.value)
    assert name in message
    assert "not a complete JPEG or PNG" in message
