"""Ingestion, validation gate and Transform, run for real: LocalDagRunner, Beam, SQLite MLMD."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    """Run NewDataGate → ImportExampleGen → StatisticsGen → CuratedSchema → ExampleValidator →
    AnomaliesGate (→ Transform)."""
    from tfx import v1 as tfx
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    from pipeline import ingest

    config = DataConfig(examples_per_shard=PER_SHARD)
    # The new-data gate names the span CuratedSchema reads synsets.txt from (it always trains
    # here: nothing is served from the empty serving path).
    new_data = ingest.new_data_gate(config, str(data_root), str(tmp / "serving"), force=False)
    example_gen = ingest.example_gen(config, str(data_root))
    schema = ingest.curated_schema(config, str(data_root), new_data)
    statistics = ingest.statistics_gen(example_gen, schema)
    validator = ingest.example_validator(statistics, schema)
    gate = ingest.anomalies_gate(validator, statistics)
    components = [new_data, example_gen, statistics, schema, validator, gate]
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
    dataset = tf.data.TFRecordDataset(split_files(root, split))
    return [tf.train.Example.FromString(raw.numpy()) for raw in dataset]


def transform_graph(root: Path) -> str:
    """The newest transform graph directory of the run."""
    return newest(str(root / "Transform" / "transform_graph" / "*"))


def test_statistics_count_images_but_never_use_their_bytes_as_values(transformed):
    import tensorflow_data_validation as tfdv

    root, _ = transformed
    stats_file = newest(str(root / "StatisticsGen" / "statistics" / "*" / "Split-train"))
    dataset = tfdv.load_stats_binary(os.path.join(stats_file, "FeatureStats.pb")).datasets[0]
    by_name = {f.path.step[0]: f for f in dataset.features}
    image = by_name[features.IMAGE_ENCODED]
    # Top-k / unique counts would key a shuffle on every image's bytes (ImageNet: ~140 GB).
    assert image.WhichOneof("stats") == "bytes_stats"  # sizes only: no top-k, no uniques
    assert image.bytes_stats.common_stats.num_non_missing == dataset.num_examples == 200
    assert by_name[features.SYNSET].string_stats.top_values  # other strings still counted


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
        sizes = [sum(1 for _ in tf.data.TFRecordDataset(f)) for f in files]  # uncompressed
        assert sum(sizes) == expected
        assert len(files) >= expected // PER_SHARD  # not one file per split
        assert max(sizes) == PER_SHARD and sizes.count(PER_SHARD) >= len(files) - 2
        assert [os.path.basename(f) for f in files] == [
            f"transformed_examples-{i:05d}-of-{len(files):05d}" for i in range(len(files))
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

    # Two anomalies only ExampleValidator sees (the copy already names a record lacking a
    # required feature): label 0 under the schema's int_domain min 1, and a format off its domain.
    def break_two(records):
        records[0].features.feature[features.LABEL].int64_list.value[0] = 0
        records[1].features.feature[features.IMAGE_FORMAT].bytes_list.value[0] = b"TIFF"

    rewrite_shard(tmp_path / "data" / "span-1" / "validation-00000-of-00001", break_two)
    with pytest.raises(Exception) as failure:
        run_ingest_and_transform(tmp_path, tmp_path / "data", with_transform=False)
    message = str(failure.value)
    assert "split eval: feature 'image/class/label'" in message
    assert "split eval: feature 'image/format'" in message
    assert "split train" not in message


def test_an_empty_split_stops_the_run_naming_it(tmp_path):
    # TFDV reports no anomalies at all for a split without examples; the gate counts them.
    write_small_sample(tmp_path / "data", train=60, validation=30)
    (tmp_path / "data" / "span-1" / "validation-00000-of-00001").write_bytes(b"")
    with pytest.raises(Exception, match=r"split eval: no examples") as failure:
        run_ingest_and_transform(tmp_path, tmp_path / "data", with_transform=False)
    assert "split train" not in str(failure.value)


def test_a_feature_of_the_wrong_kind_in_one_record_stops_ingestion_naming_it(tmp_path):
    # Through the pipeline's own ImportExampleGen (the schema path rides in its custom_config):
    # StatisticsGen used to fail with "Unable to merge incompatible type", naming nothing.
    from van_tfx.tfrecords import BadRecordError

    write_small_sample(tmp_path / "data", train=60, validation=30)
    shard = next((tmp_path / "data" / "span-1").glob("validation-00000-of-*"))

    def label_as_bytes(records):
        label = records[7].features.feature[features.LABEL]
        value = label.int64_list.value[0]
        label.Clear()
        label.bytes_list.value.append(str(value).encode())

    rewrite_shard(shard, label_as_bytes)
    with pytest.raises(BadRecordError) as failure:
        run_ingest_and_transform(tmp_path, tmp_path / "data", with_transform=False)
    assert str(failure.value) == (
        f"TFRecord shard {shard}: record 7 (0-based) feature 'image/class/label' holds "
        "bytes_list values, but the schema types it INT (int64_list); StatisticsGen cannot "
        "merge one feature of two kinds"
    )


def _truncate(jpeg: bytes) -> bytes:
    return jpeg[:300]


def _break_frame_header(jpeg: bytes) -> bytes:
    # Start and end markers intact, so only a decode can tell: libjpeg rejects the frame.
    at = jpeg.find(b"\xff\xc0")
    return jpeg[: at + 5] + b"\0\0\0\0" + jpeg[at + 9 :]


def _png_with_corrupt_data(jpeg: bytes) -> bytes:
    # A PNG (always re-encoded, so always decoded) whose header and IEND are intact but whose
    # image data is damaged: only a decode can tell, and the re-encode must not be that decode.
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(out, "PNG")
    png = bytearray(out.getvalue())
    at = png.find(b"IDAT") + 8
    png[at : at + 16] = bytes(16)
    return bytes(png)


def transform_failure_after(tmp_path: Path, split: str, edit, index: int) -> tuple[str, str]:
    """Write the small sample, `edit` the first `split` shard's records, run ingestion and
    Transform, and return (image/filename of record `index`, the error the run failed with)."""
    write_small_sample(tmp_path / "data", train=60, validation=30)
    shard = next((tmp_path / "data" / "span-1").glob(f"{split}-00000-of-*"))
    records = rewrite_shard(shard, edit)
    name = records[index].features.feature[features.IMAGE_FILENAME].bytes_list.value[0].decode()
    with pytest.raises(Exception) as failure:
        run_ingest_and_transform(tmp_path, tmp_path / "data", with_transform=True)
    return name, str(failure.value)


@pytest.mark.parametrize("damage", [_truncate, _break_frame_header, _png_with_corrupt_data])
def test_damaged_image_in_eval_split_fails_transform_naming_the_record(tmp_path, damage):
    def damage_one(records):
        victim = records[3].features.feature[features.IMAGE_ENCODED].bytes_list
        victim.value[0] = damage(victim.value[0])

    name, message = transform_failure_after(tmp_path, "validation", damage_one, 3)
    assert name in message
    assert "not a complete, decodable JPEG or PNG" in message


def test_a_damaged_image_in_the_training_split_fails_transform_naming_the_record(tmp_path):
    # The analysis pass reads no image bytes (tests/test_class_list.py), so the training split's
    # images are checked only as the transform pass stores them: they must still be.
    def damage_one(records):
        victim = records[3].features.feature[features.IMAGE_ENCODED].bytes_list
        victim.value[0] = _truncate(victim.value[0])

    name, message = transform_failure_after(tmp_path, "train", damage_one, 3)
    assert f"image/encoded of record image/filename =] [{name}] [is not a complete" in message


def test_a_damaged_image_without_a_filename_is_named_by_synset_label_and_size(tmp_path):
    # image/filename is optional: the error must still say which record to look at.
    write_small_sample(tmp_path / "data", train=60, validation=30)
    span = tmp_path / "data" / "span-1"

    def strip(records):
        for record in records:
            del record.features.feature[features.IMAGE_FILENAME]

    for shard in span.glob("train-*"):
        rewrite_shard(shard, strip)

    def strip_and_truncate(records):
        strip(records)
        victim = records[3].features.feature[features.IMAGE_ENCODED].bytes_list
        victim.value[0] = _truncate(victim.value[0])

    records = rewrite_shard(next(span.glob("validation-*")), strip_and_truncate)
    feature = records[3].features.feature
    with pytest.raises(Exception) as failure:
        run_ingest_and_transform(tmp_path, tmp_path / "data", with_transform=True)
    synset = feature[features.SYNSET].bytes_list.value[0].decode()
    label = feature[features.LABEL].int64_list.value[0]
    assert (
        f"<no image/filename>, image/class/synset = {synset}, image/class/label = {label}, "
        "image/encoded of 300 bytes] [is not a complete, decodable JPEG or PNG"
    ) in str(failure.value)


def test_records_are_named_by_filename_else_by_synset_label_and_image_size():
    names = preprocessing.record_names(
        tf.constant([b"a/1.jpg", b"", b""]),
        tf.constant([b"xyz", b"abcd", b""]),
        tf.constant([b"n01", b"n02", b"\xffn03"]),
        tf.constant([1, 2, -1], tf.int64),
    )
    assert names.numpy().tolist() == [
        b"a/1.jpg",
        b"<no image/filename>, image/class/synset = n02, image/class/label = 2, "
        b"image/encoded of 4 bytes",
        b"<no image/filename>, image/class/synset = \xffn03, image/class/label = -1, "
        b"image/encoded of 0 bytes",
    ]


@pytest.mark.parametrize("split", ["train", "validation"])
def test_a_label_that_disagrees_with_its_synset_stops_transform_naming_the_record(tmp_path, split):
    # In the training split the class list refuses the pair while it is made (one analysis
    # pass); in the eval split each record is checked against that list.
    def relabel_one(records):
        label = records[5].features.feature[features.LABEL].int64_list
        label.value[0] = label.value[0] % 10 + 1  # another class's label, same synset

    name, message = transform_failure_after(tmp_path, split, relabel_one, 5)
    assert name in message
    if split == "train":
        assert "labels with more than one synset" in message
    else:
        assert "which disagree with the class list of the training split" in message


def test_a_broken_class_list_without_filenames_names_the_pair_by_label_and_synset(tmp_path):
    # Before, by "<no image/filename>, image/class/synset = S, image/class/label = L,
    # image/encoded of N bytes", and so the analysis pass decoded every image's bytes.
    write_small_sample(tmp_path / "data", train=60, validation=30)
    span = tmp_path / "data" / "span-1"

    def strip(records):
        for record in records:
            del record.features.feature[features.IMAGE_FILENAME]

    first, *others = sorted(span.glob("train-*"))
    for shard in [*others, *span.glob("validation-*")]:
        rewrite_shard(shard, strip)

    def strip_and_relabel(records):
        strip(records)
        label = records[5].features.feature[features.LABEL].int64_list
        label.value[0] = label.value[0] % 10 + 1  # another class's label, same synset

    records = rewrite_shard(first, strip_and_relabel)
    feature = records[5].features.feature
    with pytest.raises(Exception) as failure:
        run_ingest_and_transform(tmp_path, tmp_path / "data", with_transform=True)
    synset = feature[features.SYNSET].bytes_list.value[0].decode()
    label = feature[features.LABEL].int64_list.value[0]
    assert f"label {label} with synset {synset} (no record of it has an image/filename)" in str(
        failure.value
    )


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


def test_stored_images_never_decode_what_failed_the_decode_check():
    broken = _png_with_corrupt_data(_photo(150, 100))
    images = tf.constant([_photo(900, 600), broken])
    decodes = preprocessing.image_decodes(images)
    assert decodes.numpy().tolist() == [True, False]
    assert preprocessing.image_is_complete(images).numpy().tolist() == [True, True]
    with pytest.raises(tf.errors.InvalidArgumentError):  # what a decode of it would do
        tf.io.decode_png(broken)
    stored = preprocessing.stored_images(images, 512, 90, decodes).numpy()
    assert tf.image.extract_jpeg_shape(stored[0]).numpy().tolist() == [341, 512, 3]
    assert stored[1] == b""


def test_image_headers_read_sizes_without_decoding_and_never_raise():
    jpeg, png = _photo(500, 375), _photo(150, 100, "PNG")
    headers = preprocessing.image_headers(
        tf.constant([jpeg, png, _break_frame_header(jpeg), b"", b"\xff\xd8\xff\xe0\x00"])
    )
    headers = {key: value.numpy().tolist() for key, value in headers.items()}
    assert headers["height"][:2] == [375, 100] and headers["width"][:2] == [500, 150]
    assert headers["readable"] == [True, True, False, False, False]


def test_jpeg_fill_bytes_before_a_marker_are_read_like_libjpeg_reads_them():
    jpeg = _photo(500, 375)
    filled = jpeg[:2] + b"\xff\xff" + jpeg[2:]  # fill bytes before the first segment's marker
    assert tf.io.decode_jpeg(filled).shape == (375, 500, 3)
    headers = preprocessing.image_headers(tf.constant([filled]))
    assert headers["readable"].numpy().tolist() == [True]
    assert [headers["height"].numpy()[0], headers["width"].numpy()[0]] == [375, 500]


def _motion_photo(jpeg: bytes) -> bytes:
    # An Android motion photo: the JPEG, then an MP4 (here its header and 4 KB) after its EOI.
    return jpeg + b"\x00\x00\x00\x18ftypmp42" + bytes(4096)


def _with_comments(jpeg: bytes, count: int = 300) -> bytes:
    return jpeg[:2] + b"\xff\xfe\x00\x03x" * count + jpeg[2:]


def _with_fill_bytes(jpeg: bytes, count: int = 300) -> bytes:
    return jpeg[:2] + b"\xff" * count + jpeg[2:]


def _with_stray_markers(jpeg: bytes) -> bytes:
    # After APP0: stray bytes (libjpeg skips them with a warning), RST0 and TEM (no length).
    app0_end = 4 + int.from_bytes(jpeg[4:6], "big")
    return jpeg[:app0_end] + b"abc\xff\xd0\xff\x01" + jpeg[app0_end:]


def _padded_jpeg(jpeg: bytes) -> bytes:
    return jpeg + bytes(16)  # camera padding after EOI


def _png_with_trailing_byte(jpeg: bytes) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(out, "PNG")
    return out.getvalue() + b"\n"


_VALID_ODDITIES = [
    _motion_photo,
    _with_comments,
    _with_fill_bytes,
    _with_stray_markers,
    _padded_jpeg,
    _png_with_trailing_byte,
]


def test_whatever_libjpeg_or_libpng_decode_is_read_checked_and_stored():
    jpeg = _photo(500, 375)
    images = [make(jpeg) for make in _VALID_ODDITIES]
    for image in images:  # the rule: what TF decodes in full is not corrupt
        assert tf.io.decode_image(image, channels=3).shape == (375, 500, 3)
    batch = tf.constant(images)
    headers = preprocessing.image_headers(batch)
    assert headers["readable"].numpy().all()
    assert set(headers["height"].numpy()) == {375} and set(headers["width"].numpy()) == {500}
    assert preprocessing.image_is_complete(batch, headers).numpy().all()
    decodes = preprocessing.image_decodes(batch)
    assert decodes.numpy().all()
    stored = preprocessing.stored_images(batch, 512, 90, decodes, headers).numpy()
    for out in stored:
        assert tf.image.extract_jpeg_shape(out).numpy().tolist() == [375, 500, 3]
    # A trailer is not stored: that JPEG is re-encoded. Padding of a few bytes is kept.
    motion, padded = _VALID_ODDITIES.index(_motion_photo), _VALID_ODDITIES.index(_padded_jpeg)
    assert b"ftypmp42" not in stored[motion] and stored[motion].endswith(b"\xff\xd9")
    assert stored[padded] == images[padded]
    assert stored[_VALID_ODDITIES.index(_with_comments)] == images[1]  # kept byte for byte


def test_a_header_of_any_number_of_markers_is_read_as_libjpeg_reads_it_in_bounded_time():
    import time

    jpeg = _photo(500, 375)
    # 262,144 empty COM segments (1 MB): a step per marker took ~10 s; walked, well under 1 s.
    many = jpeg[:2] + b"\xff\xfe\x00\x02" * 262_144 + jpeg[2:]
    mixed = jpeg[:2] + b"\xff\xd0ab\xff\xfe\x00\x03x\xff\xff\xff\x01" * 200 + jpeg[2:]
    sos_first = jpeg[:2] + b"\xff\xfe\x00\x03x" * 100 + b"\xff\xda\x00\x02" + jpeg[2:]
    read = tf.function(lambda batch: preprocessing.image_headers(batch))
    batch = tf.constant([many, mixed, sos_first, jpeg])
    read(batch)  # traced once
    began = time.perf_counter()
    headers = {key: value.numpy().tolist() for key, value in read(batch).items()}
    took = time.perf_counter() - began
    assert headers["readable"] == [True, True, False, True]
    assert headers["height"][:2] == [375, 375] and headers["width"][:2] == [500, 500]
    for image in (many, mixed):
        assert tf.image.extract_jpeg_shape(image).numpy().tolist() == [375, 500, 3]
    with pytest.raises(tf.errors.InvalidArgumentError):  # SOS before the frame: libjpeg refuses
        tf.image.extract_jpeg_shape(sos_first)
    assert took < 3, f"{took:.1f} s"


def test_valid_images_with_trailers_segments_or_fill_bytes_pass_transform(tmp_path):
    write_small_sample(tmp_path / "data", train=60, validation=30)
    shard = next((tmp_path / "data" / "span-1").glob("validation-00000-of-*"))

    def oddities(records):
        for record, make in zip(records, _VALID_ODDITIES, strict=False):
            image = record.features.feature[features.IMAGE_ENCODED].bytes_list
            image.value[0] = make(image.value[0])

    records = rewrite_shard(shard, oddities)
    run_ingest_and_transform(tmp_path, tmp_path / "data", with_transform=True)
    stored = [
        example.features.feature[features.TRANSFORMED_IMAGE].bytes_list.value[0]
        for example in read_transformed(tmp_path / "root", "eval")
    ]
    assert len(stored) == len(records)
    for image in stored:
        assert tf.image.extract_jpeg_shape(image).numpy().tolist() == [64, 64, 3]
        assert b"ftypmp42" not in image
    padded = records[_VALID_ODDITIES.index(_padded_jpeg)]
    assert padded.features.feature[features.IMAGE_ENCODED].bytes_list.value[0] in stored


def test_a_retried_shard_finalize_renames_nothing_twice_and_records_the_same_counts(tmp_path):
    from van_tfx.data import shard_writer

    temp = tmp_path / "Split-train.tmp"
    temp.mkdir()
    written = []
    for name, count in (("b", 3), ("a", 5)):
        (temp / f"{name}.gz").write_bytes(name.encode() * count)
        written.append((str(temp / f"{name}.gz"), count))
    prefix = str(tmp_path / "Split-train" / "transformed_examples")
    counts = tmp_path / "graph" / "example_counts" / "train.json"
    (tmp_path / "Split-train").mkdir()  # a finalize that died after its first rename
    os.rename(temp / "a.gz", tmp_path / "Split-train" / "transformed_examples-00000-of-00002")
    shard_writer._finalize(written, prefix, str(temp), str(counts))
    first = counts.read_text()
    shard_writer._finalize(written, prefix, str(temp), str(counts))  # a retry of the step
    assert counts.read_text() == first
    files = sorted(p.name for p in (tmp_path / "Split-train").iterdir())
    assert files == [f"transformed_examples-0000{i}-of-00002" for i in range(2)]
    assert (tmp_path / "Split-train" / files[0]).read_bytes() == b"aaaaa"  # sorted temp order
    assert not temp.exists()


def test_a_finalize_missing_a_shard_it_never_renamed_fails_naming_it(tmp_path):
    from van_tfx.data import shard_writer

    prefix = str(tmp_path / "Split-train" / "transformed_examples")
    missing = str(tmp_path / "tmp" / "gone.gz")
    with pytest.raises(tf.errors.NotFoundError, match="gone.gz"):
        shard_writer._finalize([(missing, 3)], prefix, str(tmp_path / "tmp"), "")


_SEED_IMAGES = {}


def _seed_image(kind: str) -> bytes:
    if kind not in _SEED_IMAGES:
        size = (90, 60) if kind == "JPEG" else (40, 30)
        _SEED_IMAGES[kind] = _photo(*size, kind)
    return _SEED_IMAGES[kind]


@st.composite
def damaged_images(draw):
    """A real JPEG or PNG, cut, overwritten and/or extended at random places; or plain bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=64))
    data = bytearray(_seed_image(draw(st.sampled_from(["JPEG", "PNG"]))))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["cut", "overwrite", "insert", "append", "markers"]))
        chunk = draw(st.binary(min_size=1, max_size=16))
        if edit == "cut":
            data = data[:at]
        elif edit == "overwrite":
            data[at : at + len(chunk)] = chunk
        elif edit == "insert":
            data[at:at] = chunk
        elif edit == "append":  # a trailer, up to a few KB
            data += chunk * draw(st.integers(1, 300))
        else:  # after the start marker: many COM segments, fill bytes, RST/TEM, stray bytes
            piece = draw(st.sampled_from([b"\xff\xfe\x00\x03x", b"\xff", b"\xff\xd0", b"\xff\x01"]))
            data[2:2] = piece * draw(st.integers(1, 400)) + chunk * draw(st.booleans())
    return bytes(data)


def _decodes_in_full(image: bytes) -> bool:
    decode = tf.io.decode_jpeg if image.startswith(b"\xff\xd8") else tf.io.decode_png
    try:
        decode(image, channels=3)
    except tf.errors.InvalidArgumentError:
        return False
    return True


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(damaged_images(), min_size=1, max_size=4))
def test_whatever_the_bytes_storing_them_never_reaches_a_failing_decoder(images):
    batch = tf.constant(images)
    headers = preprocessing.image_headers(batch)  # string ops only: never raises
    decodes = preprocessing.image_decodes(batch)
    # Transform's image path with the decode check it gets: never raises, so the named check
    # is the error a user sees; whatever it keeps or re-encodes decodes as a JPEG.
    stored = preprocessing.stored_images(batch, 64, 90, decodes).numpy()
    complete = preprocessing.image_is_complete(batch, headers).numpy()
    heights, widths = headers["height"].numpy(), headers["width"].numpy()
    for i, (image, out) in enumerate(zip(images, stored, strict=True)):
        readable, ok = headers["readable"].numpy()[i], decodes.numpy()[i]
        if out:
            assert readable and ok
            assert tf.io.decode_jpeg(out, channels=3).shape[2] == 3
        if image.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")) and _decodes_in_full(image):
            # What TF decodes in full passes every check: it is not corrupt.
            assert readable and ok and complete[i], image[:64]
        if readable and ok and image.startswith(b"\xff\xd8\xff"):
            # The header parse agrees with libjpeg on every JPEG libjpeg decodes.
            height, width, _ = tf.image.extract_jpeg_shape(image).numpy().tolist()
            assert [heights[i], widths[i]] == [height, width]


def _png_declaring(width: int, height: int) -> bytes:
    """A real, decodable grey PNG of width x height zeros: a few hundred KB for 100 M pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    packer, row = zlib.compressobj(9), b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_an_image_over_the_pixel_budget_is_refused_by_name_and_never_decoded():
    bomb = _png_declaring(10_000, 10_000)  # 100 M pixels, over the 64 M default
    assert len(bomb) < 1_000_000
    images = tf.constant([_photo(150, 100, "PNG"), bomb])
    headers = preprocessing.image_headers(images)
    assert preprocessing.declared_pixels(headers).numpy().tolist() == [15_000, 100_000_000]
    budget = preprocessing.image_settings({"data": {}})[2]
    affordable = preprocessing.declared_pixels(headers) <= budget
    assert preprocessing.image_decodes(images, affordable).numpy().tolist() == [True, False]
    stored = preprocessing.stored_images(images, 512, 90, affordable, headers).numpy()
    assert stored[1] == b""  # never handed to a decoder
    names = tf.constant([b"small.png", b"bomb.png"])
    with pytest.raises(tf.errors.InvalidArgumentError) as refused:
        preprocessing.check_pixel_budget(headers, names, budget)
    said = " ".join(str(refused.value.message).replace("b'", "").replace("'", "").split())
    assert "bomb.png declares 10000 x 10000 pixels, more than data.max_image_pixels" in said
    preprocessing.check_pixel_budget(headers, names, 100_000_000)  # within a larger budget
    assert preprocessing.image_settings({"data": {"max_image_pixels": 5}})[2] == 5


_PEAK_OF_A_BATCH = """
import resource, sys
import van_tfx  # noqa: F401  (legacy Keras before TensorFlow)
import tensorflow as tf
from test_transform import _png_declaring
from van_trainer import preprocessing

tf.config.threading.set_inter_op_parallelism_threads(10)  # a worker with cores to spare
count, side, budget = (int(arg) for arg in sys.argv[1:])
batch = tf.constant([_png_declaring(side, side)] * count)

@tf.function
def store(encoded):
    return preprocessing.stored_images(encoded, 512, 90, max_pixels=budget)

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert len(set(store(batch).numpy())) == 1
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_a_batch_decodes_no_more_pixels_at_once_than_the_budget():
    # Eight PNGs of 9 M pixels each, each the whole budget: re-encoded one at a time, the
    # batch costs about one of them (<= 20 bytes a pixel), not the up to 10 tf.map_fn ran at once
    # (2.0 GB here before, 0.15 GB now).
    import subprocess
    import sys

    side = 3000
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent)] + sys.path))
    grown = subprocess.run(
        [sys.executable, "-c", _PEAK_OF_A_BATCH, "8", str(side), str(side * side)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.split()[-1]
    assert int(grown) < 2 * 20 * side * side, f"the batch grew the process by {grown} bytes"


def test_images_are_reencoded_in_passes_by_size_and_each_lands_in_its_place():
    # A budget of 1 M pixels: passes of <= 100 k pixels (10 at once), <= 250 k (4), <= 500 k
    # (2) and the rest (1); a kept JPEG and bytes that are no image in between.
    sizes = [(300, 200), (100, 100), (500, 400), (640, 480), (120, 80), (2000, 1000)]
    images = [_photo(w, h, "PNG") for w, h in sizes]
    kept = _photo(200, 150)
    batch = tf.constant(images[:3] + [kept, b"junk"] + images[3:])
    stored = preprocessing.stored_images(batch, 512, 90, max_pixels=1_000_000).numpy()
    shapes = [tf.image.extract_jpeg_shape(x).numpy().tolist() if x else None for x in stored]
    assert shapes == [
        [200, 300, 3],
        [100, 100, 3],
        [400, 500, 3],
        [150, 200, 3],
        None,
        [384, 512, 3],
        [80, 120, 3],
        [256, 512, 3],
    ]
    assert stored[3] == kept
    empty = preprocessing.stored_images(tf.constant([], tf.string), 512, 90, max_pixels=10)
    assert empty.shape == (0,)


def test_png_transparency_is_composited_on_white_like_data_build():
    import io

    import numpy as np
    from PIL import Image

    rgba = np.zeros([64, 64, 4], np.uint8)  # transparent black on the left half
    rgba[:, 32:] = (200, 30, 30, 255)  # opaque red on the right
    rgba[:8, :8] = (0, 0, 255, 128)  # half-transparent blue corner
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, "PNG")
    stored = preprocessing.stored_images(tf.constant([out.getvalue()]), 512, 95).numpy()[0]
    pixels = tf.io.decode_jpeg(stored).numpy().astype(int)
    assert pixels[16:, 8:24].min() >= 250  # white, not black
    np.testing.assert_allclose(pixels[16:, 40:56].mean(axis=(0, 1)), (200, 30, 30), atol=6)
    np.testing.assert_allclose(pixels[2:6, 2:6].mean(axis=(0, 1)), (127, 127, 255), atol=8)


def test_a_label_that_disagrees_with_its_synset_is_named_with_its_record():
    synsets = tf.constant([b"n01", b"n02", b"n03", b"n04"] * 8)
    labels = tf.constant([1, 2, 3, 4] * 8, tf.int64)
    labels = tf.tensor_scatter_nd_update(labels, [[21]], tf.constant([3], tf.int64))
    names = tf.constant([f"img{i}.jpg".encode() for i in range(32)])
    ids = tf.constant([0, 1, 2, 3] * 8, tf.int64)  # the vocabulary's ids, by synset
    with pytest.raises(tf.errors.InvalidArgumentError) as refused:
        preprocessing.check_labels(ids, labels, synsets, names, tf.constant(True))
    said = " ".join(str(refused.value.message).replace("b'", "").replace("'", "").split())
    assert "img21.jpg has image/class/label 3 and image/class/synset n02 which disagree" in said
    preprocessing.check_labels(ids, labels, synsets, names, tf.constant(False))  # not analyzed
    good = tf.constant([1, 2, 3, 4] * 8, tf.int64)
    preprocessing.check_labels(ids, good, synsets, names, tf.constant(True))


def test_a_class_with_no_record_at_the_top_stops_transform_naming_it(tmp_path):
    # synsets.txt lists 10 classes; without any record of the 10th the class list had 9
    # entries and the run trained a 9-class model without a word.
    write_small_sample(tmp_path / "data", train=60, validation=30)

    def drop_the_last_class(records):
        records[:] = [
            r for r in records if r.features.feature[features.LABEL].int64_list.value[0] != 10
        ]

    for shard in (tmp_path / "data" / "span-1").glob("*-of-*"):
        rewrite_shard(shard, drop_the_last_class)
    with pytest.raises(Exception) as failure:
        run_ingest_and_transform(tmp_path, tmp_path / "data", with_transform=True)
    assert "labels with no record in the training split: 10 (1 of 1..10" in str(failure.value)
