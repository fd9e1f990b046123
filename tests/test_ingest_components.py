"""CuratedSchema, ServedModel and the span-resolving ImportExampleGen executor on real files."""

from __future__ import annotations

import contextlib
import re
import sys
import uuid
from pathlib import Path

import pytest
import tensorflow as tf
from google.protobuf import text_format
from hypothesis import example, given
from hypothesis import strategies as st
from spans import marked_example, write_span
from tensorflow_metadata.proto.v0 import schema_pb2
from tfx.components.example_gen import utils as example_gen_utils
from tfx.proto import example_gen_pb2
from tfx.types.experimental.simple_artifacts import File
from tfx.types.standard_artifacts import Examples, Model, Schema
from tfx.utils import proto_utils

from components.curated_schema import CuratedSchema, SchemaError, curated_schema_text
from components.example_gen import (
    IncompleteShardsError,
    SpanResolvingImportExecutor,
    check_input_shards,
    check_shard_set,
    has_unresolved_specs,
)
from components.new_data_gate import SERVED_VERSION_KEY, write_training_data
from components.served_model import ServedModel, ServedModelError
from pipeline import ingest
from van_tfx import features
from van_tfx.config import DataConfig
from van_tfx.tfrecords import BadRecordError, CorruptShardError, record_header


def decision_for_span(tmp_path: Path, span: int, version: int | None = None) -> File:
    """A NewDataGate decision naming `span` (and `version`), as the gate records them."""
    decision = File()
    decision.uri = str(tmp_path / "decision" / uuid.uuid4().hex)
    decision.set_int_custom_property("span", span)
    if version is not None:
        decision.set_int_custom_property("version", version)
    return decision


def label_max(schema_artifact: Schema) -> int:
    text = Path(schema_artifact.uri, "schema.pbtxt").read_text()
    schema = text_format.Parse(text, schema_pb2.Schema())
    [label] = [f for f in schema.feature if f.name == features.LABEL]
    return label.int_domain.max


def curate(tmp_path: Path, data: Path, span: int, version: int | None = None, **params) -> Schema:
    schema = Schema()
    schema.uri = str(tmp_path / "schema" / uuid.uuid4().hex)
    params.setdefault("split_pattern", ingest.split_patterns(DataConfig())["train"])
    CuratedSchema.test_call(
        decision=decision_for_span(tmp_path, span, version),
        schema=schema,
        input_base=str(data),
        **params,
    )
    return schema


# ---------------------------------------------------------------------------- CuratedSchema


def test_label_max_follows_the_synsets_of_the_ingested_span(tmp_path):
    data = tmp_path / "data"
    write_span(data, 1, ["a", "b", "c"])
    write_span(data, 2, ["a", "b", "c", "d", "e"])
    assert label_max(curate(tmp_path, data, 1)) == 3
    assert label_max(curate(tmp_path, data, 2)) == 5  # a new span with more classes says so


def test_the_synsets_of_the_decided_version_are_read(tmp_path):
    data = tmp_path / "data"
    for version, synsets in ((1, "a\nb\n"), (2, "a\nb\nc\nd\n")):
        (data / "span-3" / f"ver-{version}").mkdir(parents=True)
        (data / "span-3" / f"ver-{version}" / "synsets.txt").write_text(synsets)
    pattern = "span-{SPAN}/ver-{VERSION}/train-*"
    assert label_max(curate(tmp_path, data, 3, 2, split_pattern=pattern)) == 4
    assert label_max(curate(tmp_path, data, 3, 1, split_pattern=pattern)) == 2


def test_num_classes_overrides_and_a_missing_synset_list_leaves_the_max_open(tmp_path, capfd):
    data = tmp_path / "data"
    write_span(data, 1)
    assert label_max(curate(tmp_path, data, 1, num_classes=7)) == 7
    assert label_max(curate(tmp_path, data, 1)) == 0
    assert "labels are only checked to be >= 1" in capfd.readouterr().err


def test_a_given_schema_file_is_used_and_a_missing_one_is_named(tmp_path):
    data = tmp_path / "data"
    write_span(data, 1, ["a"])
    custom = tmp_path / "my-schema.pbtxt"
    custom.write_text(curated_schema_text() + 'feature { name: "extra" type: INT }\n')
    schema = curate(tmp_path, data, 1, schema_file=str(custom))
    assert label_max(schema) == 1
    assert 'name: "extra"' in Path(schema.uri, "schema.pbtxt").read_text()
    with pytest.raises(SchemaError, match="nope.pbtxt does not exist"):
        curate(tmp_path, data, 1, schema_file=str(tmp_path / "nope.pbtxt"))


# ------------------------------------------------------------------------------- ServedModel


def decision_seeing(version: str) -> File:
    decision = File()
    decision.set_string_custom_property(SERVED_VERSION_KEY, version)
    return decision


def served_model(tmp_path: Path, serving: Path, version: str) -> Model:
    model = Model()
    model.uri = str(tmp_path / "ServedModel" / uuid.uuid4().hex)
    ServedModel.test_call(
        decision=decision_seeing(version), model=model, serving_base_path=str(serving)
    )
    return model


def push(serving: Path, version: int) -> Path:
    """A served version as Pusher leaves it: a SavedModel with the warm-start weights."""
    model_dir = serving / str(version)
    tf.saved_model.save(tf.Module(), str(model_dir))
    (model_dir / "assets.extra").mkdir(exist_ok=True)
    (model_dir / "assets.extra" / "van.weights.h5").write_bytes(b"weights")
    write_training_data(str(model_dir), decision_for_span(model_dir, 1))
    return model_dir


def test_served_version_is_copied_where_trainer_and_evaluator_look(tmp_path):
    serving = tmp_path / "serving"
    push(serving, 1700000000)
    push(serving, 1800000000)
    model = served_model(tmp_path, serving, "1700000000")  # the version the gate saw
    copy = Path(model.uri, "Format-Serving")
    assert (copy / "saved_model.pb").read_bytes() == (
        serving / "1700000000" / "saved_model.pb"
    ).read_bytes()
    assert (copy / "assets.extra" / "van.weights.h5").read_bytes() == b"weights"
    assert model.get_string_custom_property(SERVED_VERSION_KEY) == "1700000000"


def test_a_version_directory_with_leading_zeros_is_copied_from_where_it_is(tmp_path):
    serving = tmp_path / "serving"
    push(serving, 1700000000).rename(serving / "007")
    model = served_model(tmp_path, serving, "007")
    assert (Path(model.uri, "Format-Serving") / "saved_model.pb").read_bytes() == (
        serving / "007" / "saved_model.pb"
    ).read_bytes()


def test_nothing_served_gives_an_empty_model(tmp_path):
    model = served_model(tmp_path, tmp_path / "serving", "")
    assert model.get_string_custom_property(SERVED_VERSION_KEY) == ""
    assert not Path(model.uri, "Format-Serving").exists()


def test_a_version_removed_since_the_gate_looked_is_an_error_naming_it(tmp_path):
    serving = tmp_path / "serving"
    push(serving, 1700000000)
    (serving / "1700000000" / "saved_model.pb").unlink()  # being replaced / deleted
    with pytest.raises(ServedModelError, match="served version 1700000000 is no longer complete"):
        served_model(tmp_path, serving, "1700000000")


# --------------------------------------------------------------- ImportExampleGen's executor


def input_config_json() -> str:
    return proto_utils.proto_to_json(ingest.input_config(DataConfig()))


def test_unresolved_patterns_are_recognised():
    assert has_unresolved_specs(input_config_json())
    plain = proto_utils.proto_to_json(ingest.input_config(DataConfig(layout="plain")))
    assert not has_unresolved_specs(plain)


def ingest_span(
    tmp_path: Path,
    data: Path,
    config: DataConfig | None = None,
    inputs: dict | None = None,
    splits=(ingest.TRAIN_SPLIT, ingest.EVAL_SPLIT),
    custom_config: str | None = None,
) -> Examples:
    """Run the executor as the pipeline configures it, with no driver before it."""
    examples = Examples()
    examples.uri = str(tmp_path / "ImportExampleGen" / "examples")
    config_json = proto_utils.proto_to_json(ingest.input_config(config or DataConfig(), splits))
    exec_properties = {
        "input_base": str(data),
        "input_config": config_json,
        "output_config": "{}",
        "output_data_format": 6,  # FORMAT_TF_EXAMPLE
        "output_file_format": 5,  # FORMAT_TFRECORDS_GZIP
    }
    if custom_config:
        exec_properties["custom_config"] = custom_config
    SpanResolvingImportExecutor().Do(inputs or {}, {"examples": [examples]}, exec_properties)
    return examples


def ingest_partitioned(tmp_path: Path, data: Path, pattern: str) -> Examples:
    """Run the executor with an output split_config (hash partitioning of one input split
    `pattern`), which goes through TFX's own Beam ingestion."""
    examples = Examples()
    examples.uri = str(tmp_path / "ImportExampleGen" / "examples")
    config = example_gen_pb2.Input(
        splits=[example_gen_pb2.Input.Split(name="single", pattern=pattern)]
    )
    output = example_gen_pb2.Output(
        split_config=example_gen_pb2.SplitConfig(
            splits=[example_gen_pb2.SplitConfig.Split(name="all", hash_buckets=1)]
        )
    )
    exec_properties = {
        "input_base": str(data),
        "input_config": proto_utils.proto_to_json(config),
        "output_config": proto_utils.proto_to_json(output),
        "output_data_format": 6,
        "output_file_format": 5,
    }
    SpanResolvingImportExecutor().Do({}, {"examples": [examples]}, exec_properties)
    return examples


@contextlib.contextmanager
def opened_files():
    """The paths Python's open() is called with while the block runs (an audit hook's view)."""
    opened: list[str] = []
    _OPEN_RECORDERS.append(opened)
    try:
        yield opened
    finally:
        _OPEN_RECORDERS.remove(opened)


_OPEN_RECORDERS: list[list[str]] = []


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and _OPEN_RECORDERS and isinstance(args[0], str):
        for opened in _OPEN_RECORDERS:
            opened.append(args[0])


sys.addaudithook(_record_opens)  # audit hooks stay for the process: it records only when asked


def test_executor_resolves_the_newest_span_and_records_what_the_driver_would(tmp_path):
    data = tmp_path / "data"
    write_span(data, 1)
    write_span(data, 2)
    examples = ingest_span(tmp_path, data)
    # The same calculation TFX's driver makes before the executor on LocalDagRunner / Vertex.
    fingerprint, span, version = example_gen_utils.calculate_splits_fingerprint_span_and_version(
        str(data), ingest.input_config(DataConfig()).splits
    )
    assert span == 2
    assert examples.get_int_custom_property("span") == 2
    assert examples.get_string_custom_property("input_fingerprint") == fingerprint
    assert not examples.has_custom_property("version") and version is None
    ingested = list(
        tf.data.TFRecordDataset(tf.io.gfile.glob(str(Path(examples.uri, "Split-train", "*"))))
    )
    assert len(ingested) == 1
    assert tf.train.Example.FromString(ingested[0].numpy()).features.feature[
        "x"
    ].int64_list.value == [2]


def test_on_kfp_the_executor_ingests_the_span_the_gate_decided_on(tmp_path):
    # KFP hands each task under the gate's Cond the decision its condition reads; a span that
    # landed after the gate looked (here span 2, and span 3 still being uploaded) waits.
    import os

    from tfx.proto import range_config_pb2

    data = tmp_path / "data"
    write_span(data, 1)
    for shard in (data / "span-1").iterdir():
        os.utime(shard, (2_000_000, 2_000_000))  # its own mtimes: its own fingerprint
    write_span(data, 2)
    (data / "span-3").mkdir()  # only its train shard so far
    (data / "span-3" / "train-00000-of-00001").write_bytes(
        (data / "span-2" / "train-00000-of-00001").read_bytes()
    )
    only_span_1 = range_config_pb2.RangeConfig(
        static_range=range_config_pb2.StaticRange(start_span_number=1, end_span_number=1)
    )
    fingerprint, _, _ = example_gen_utils.calculate_splits_fingerprint_span_and_version(
        str(data), ingest.input_config(DataConfig()).splits, only_span_1
    )
    decision = decision_for_span(tmp_path, 1)
    decision.set_string_custom_property("input_fingerprint", fingerprint)
    examples = ingest_span(tmp_path, data, inputs={"_NewDataGate.decision": [decision]})
    assert examples.get_int_custom_property("span") == 1
    assert examples.get_string_custom_property("input_fingerprint") == fingerprint
    [records] = read_split(examples, "train").values()
    assert tf.train.Example.FromString(records[0]).features.feature["x"].int64_list.value == [1]


def test_a_span_a_driver_resolved_past_the_gates_decision_is_refused_naming_both(tmp_path):
    # Vertex runs TFX's driver first, which resolves the newest span itself: span 2 landing after
    # the gate decided on span 1 was ingested while schema, smoke test and record named span 1.
    from components.example_gen import SpanMovedError, resolve_like_the_driver

    data = tmp_path / "data"
    write_span(data, 1)
    write_span(data, 2)
    examples = Examples()
    examples.uri = str(tmp_path / "ImportExampleGen" / "examples")
    config_json = proto_utils.proto_to_json(ingest.input_config(DataConfig()))
    driven = resolve_like_the_driver(
        {"input_base": str(data), "input_config": config_json, "output_config": "{}"}, examples
    )
    assert driven["span"] == 2 and not has_unresolved_specs(driven["input_config"])
    inputs = {"_NewDataGate.decision": [decision_for_span(tmp_path, 1)]}
    with pytest.raises(SpanMovedError) as refused:
        SpanResolvingImportExecutor().Do(inputs, {"examples": [examples]}, driven)
    assert str(refused.value) == (
        "ExampleGen's driver resolved span 2, but the NewDataGate decided on span 1: newer data "
        "landed in between (the driver resolves the newest itself); rerun the pipeline, and its "
        "gate decides on the new data"
    )
    assert not list(Path(examples.uri).rglob("*-of-*"))  # nothing ingested
    inputs = {"_NewDataGate.decision": [decision_for_span(tmp_path, 2)]}
    SpanResolvingImportExecutor().Do(inputs, {"examples": [examples]}, driven)
    assert read_split(examples, "train")


def test_an_eval_only_ingest_compares_its_own_split_with_the_gates_fingerprint(tmp_path, caplog):
    # EvalExampleGen ingests one split; the gate fingerprinted both. Only a change to its own
    # split's files is worth the warning.
    data = tmp_path / "data"
    write_span(data, 1)
    fingerprint, _, _ = example_gen_utils.calculate_splits_fingerprint_span_and_version(
        str(data), ingest.input_config(DataConfig()).splits
    )
    decision = decision_for_span(tmp_path, 1)
    decision.set_string_custom_property("input_fingerprint", fingerprint)
    inputs = {"_NewDataGate.decision": [decision]}
    with caplog.at_level("WARNING"):
        examples = ingest_span(tmp_path, data, inputs=inputs, splits=(ingest.EVAL_SPLIT,))
    assert examples.split_names == '["eval"]'
    assert "changed since the NewDataGate looked" not in caplog.text
    eval_shard = next((data / "span-1").glob("validation-*"))
    eval_shard.write_bytes(eval_shard.read_bytes() + eval_shard.read_bytes())
    with caplog.at_level("WARNING"):
        ingest_span(tmp_path / "again", data, inputs=inputs, splits=(ingest.EVAL_SPLIT,))
    assert "span 1 changed since the NewDataGate looked" in caplog.text


def test_the_eval_only_ingest_keeps_every_validation_record_in_its_eval_split(tmp_path):
    # Before: the component was built without an output config, so TFX gave its one input split
    # the default hash buckets train:2 / eval:1, and the Evaluator gated on a third of the
    # validation images (122 of 360 in the demo); the other two thirds sat in a 'train' split.
    data = tmp_path / "data"
    write_span(data, 1)
    shard = data / "span-1" / "validation-00000-of-00001"
    with tf.io.TFRecordWriter(str(shard)) as writer:
        for n in range(90):
            example = marked_example(1)
            example.features.feature["x"].int64_list.value[:] = [n]
            writer.write(example.SerializeToString())
    component = ingest.eval_example_gen(DataConfig(), str(data))
    examples = Examples()
    examples.uri = str(tmp_path / "EvalExampleGen" / "examples")
    properties = {
        key: component.exec_properties[key]
        for key in ("input_base", "input_config", "output_config")
    }
    properties.update(output_data_format=6, output_file_format=5)
    SpanResolvingImportExecutor().Do({}, {"examples": [examples]}, properties)
    assert examples.split_names == '["eval"]'
    assert [len(records) for records in read_split(examples, "eval").values()] == [90]
    assert read_split(examples, "eval") == {"data_tfrecord-00000-of-00001": records_of(shard)}


def write_records(path: Path, count: int, options=None) -> None:
    example = marked_example(b"x" * 300)
    with tf.io.TFRecordWriter(str(path), options) as writer:
        for _ in range(count):
            writer.write(example.SerializeToString())


def flip_byte(path: Path, position: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[position] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda p: flip_byte(p, 100), "is not a readable TFRecord file"),  # first record's data
        (lambda p: flip_byte(p, 3), "is not a readable TFRecord file"),  # its length
        (lambda p: p.write_bytes(p.read_bytes()[:50]), "is not a readable TFRecord file"),
        (lambda p: p.write_bytes(b"label,image\n1,a.jpg\n"), "is not a readable TFRecord file"),
        (lambda p: write_records(p, 3, "GZIP"), "is GZIP-compressed but its name does not end"),
        # TensorFlow's reader allocated the declared 64 GiB and the process died (SIGSEGV).
        (lambda p: p.write_bytes(record_header(2**36) + b"\0" * 64), "declares 68719476736 bytes"),
    ],
    ids=["data", "length", "truncated", "csv", "gzip-unnamed", "huge-length"],
)
@pytest.mark.parametrize("path", ["copy", "tfx"])
def test_a_shard_that_is_bad_from_its_start_is_named(tmp_path, damage, says, path):
    # The copy names it as it reads it; TFX's path (Beam's reader names no file) before Beam runs.
    data = tmp_path / "data"
    write_span(data, 1)
    shard = data / "span-1" / "validation-00000-of-00001"
    write_records(shard, 3)
    damage(shard)
    with pytest.raises(CorruptShardError, match=says) as failure:
        if path == "copy":
            ingest_span(tmp_path, data)
        else:
            ingest_partitioned(tmp_path, data, "span-1/*-00000-of-00001")
    assert str(shard) in str(failure.value)
    assert "is not a readable TFRecord file" in str(failure.value)
    if path == "tfx":
        assert not Path(tmp_path, "ImportExampleGen").exists()  # Beam never ran


@pytest.mark.parametrize(
    ("names", "says"),
    [
        (["train-00000-of-00004", "train-00001-of-00004"], "2 of 4 shards missing: train-00002-of-00004, train-00003-of-00004"),
        (["train-00000-of-00002", "train-00001-of-00002", "train-00000-of-00001"], "more than one set of shards"),
        (["train-00000-of-00001", "train-00000-of-00001.gz"], "shard 0 of 1 is there 2 times"),
        (["train-00000-of-00002", "train-00001-of-00002._COPYING_"], "train-00001-of-00002._COPYING_ is not named"),
    ],
    ids=["upload-in-progress", "two-sets", "plain-and-gzip", "temporary-file"],
)  # fmt: skip
def test_a_split_whose_shards_are_not_one_complete_set_is_refused_naming_them(
    tmp_path, names, says
):
    # Each was ingested silently: half a span, every record twice, or a partial upload.
    data = tmp_path / "data"
    write_span(data, 1)
    span = data / "span-1"
    (span / "train-00000-of-00001").unlink()
    for name in names:
        write_records(span / name, 2, "GZIP" if name.endswith(".gz") else None)
    with pytest.raises(IncompleteShardsError, match="train split") as failure:
        ingest_span(tmp_path, data)
    assert says in str(failure.value)


def test_a_file_matched_by_both_splits_is_refused_naming_it(tmp_path):
    data = tmp_path / "data"
    write_span(data, 1)
    shards = {
        "train": ("span-1/train-*", [str(data / "span-1" / "train-00000-of-00001")]),
        "eval": ("span-1/*-00000-of-00001", [str(data / "span-1" / n) for n in ("train-00000-of-00001", "validation-00000-of-00001")]),
    }  # fmt: skip
    with pytest.raises(IncompleteShardsError, match="matched by both the train and the eval"):
        check_input_shards(shards)


@given(
    total=st.integers(1, 6),
    present=st.lists(st.tuples(st.integers(0, 7), st.booleans()), max_size=9),
    extra=st.sampled_from(["", "train-00000-of-00009", "notes.txt"]),
)
@example(total=1, present=[(0, False), (0, False)], extra="")  # one path listed twice
def test_shards_are_accepted_exactly_when_they_are_one_complete_set(total, present, extra):
    names = [f"train-{i:05d}-of-{total:05d}" + (".gz" if gz else "") for i, gz in present]
    names += [extra] if extra else []
    # Names without shard numbers can't be checked; numbered ones must be exactly one set.
    complete = not extra and sorted(i for i, _ in present) == list(range(total))
    unnumbered_only = not present and extra in ("", "notes.txt")
    try:
        check_shard_set("train", "train-*", [f"/d/{name}" for name in names])
        accepted = True
    except IncompleteShardsError:
        accepted = False
    assert accepted == (complete or unnumbered_only)


@given(
    total=st.integers(1, 12),
    indices=st.lists(st.integers(0, 14), max_size=14),
)
def test_missing_shards_are_counted_and_the_first_five_named_in_order(total, indices):
    # Against the plain definition: every number below the total that no file has.
    from van_tfx.shard_sets import shard_sets

    paths = [f"/d/train-{i:05d}-of-{total:05d}" for i in indices]
    absent = [i for i in range(total) if i not in indices]
    missing = shard_sets("train", "train-*", paths).missing if paths else ()
    if not paths or not absent:
        assert missing == ()
        return
    (shards,) = missing
    assert shards.count == len(absent)
    assert shards.present == total - len(absent)
    assert shards.names == tuple(f"train-{i:05d}-of-{total:05d}" for i in absent[:5])
    more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
    assert (
        shards.problem()
        == f"{len(absent)} of {total} shards missing: " + ", ".join(shards.names) + more
    )


def test_a_shard_name_declaring_a_huge_total_costs_what_its_files_cost():
    # One file `train-00000-of-1000000000000`: the set's total comes from the name, and every
    # missing shard's name used to be built (10**7 of them took 5.8 s and 0.9 GB; this one
    # would need ~90 TB). Now the missing ones are counted and five named.
    from van_tfx.shard_sets import shard_sets

    total = 10**12
    sets = shard_sets("train", "train-*", [f"/d/train-00000-of-{total}"])
    assert sets.problems == (
        f"{total - 1} of {total} shards missing: "
        + ", ".join(f"train-{i:05d}-of-{total}" for i in range(1, 6))
        + f" and {total - 6} more",
    )


def test_among_many_bad_shards_the_first_in_listing_order_is_named_before_tfxs_ingest(tmp_path):
    # The first-record checks run 16 at a time; the one named must not depend on which
    # thread finished first.
    data = tmp_path / "data"
    write_span(data, 1)
    span = data / "span-1"
    (span / "train-00000-of-00001").unlink()
    for index in range(40):
        write_records(span / f"train-{index:05d}-of-00040", 2)
    for index in (7, 23, 31):
        flip_byte(span / f"train-{index:05d}-of-00040", 100)
    for _ in range(3):
        with pytest.raises(CorruptShardError, match="train-00007-of-00040 is not a readable"):
            ingest_partitioned(tmp_path, data, "span-1/train-*")
    # The copy names whichever bad shard its runner reaches first: one of them, with its record.
    with pytest.raises(CorruptShardError) as failure:
        ingest_span(tmp_path, data)
    assert re.search(r"train-000(07|23|31)-of-00040 is not a readable", str(failure.value))


def test_the_copy_opens_each_input_shard_once(tmp_path):
    # A first-record pass before the copy opened every shard a second time (on object storage a
    # round trip and, on GCS, up to a 64 MiB read each) for what the copy reports anyway.
    data = tmp_path / "data"
    write_span(data, 1)
    span = data / "span-1"
    (span / "train-00000-of-00001").unlink()
    shards = [span / f"train-{index:05d}-of-00003" for index in range(3)]
    for shard in shards:
        write_records(shard, 2)
    inputs = [*shards, span / "validation-00000-of-00001"]
    with opened_files() as opened:
        examples = ingest_span(tmp_path, data)
    assert [opened.count(str(path)) for path in inputs] == [1, 1, 1, 1]
    assert [len(r) for r in read_split(examples, "train").values()] == [2, 2, 2]


def test_damage_past_the_first_record_names_the_shard_and_the_record(tmp_path):
    data = tmp_path / "data"
    write_span(data, 1)
    shard = data / "span-1" / "train-00000-of-00001"
    write_records(shard, 3)
    flip_byte(shard, shard.stat().st_size - 100)  # inside the third record
    with pytest.raises(
        CorruptShardError, match=r"damaged at record 2 \(after 2 readable records\)"
    ) as failure:
        ingest_span(tmp_path, data)
    message = str(failure.value)
    assert str(shard) in message and "\n" not in message and len(message) < 600


def test_a_huge_length_past_the_first_record_names_the_shard_and_the_record(tmp_path):
    data = tmp_path / "data"
    write_span(data, 1)
    shard = data / "span-1" / "train-00000-of-00001"
    write_records(shard, 2)
    with shard.open("ab") as out:
        out.write(record_header(2**36) + b"\0" * 64)
    with pytest.raises(
        CorruptShardError, match=r"damaged at record 2 .*declares 68719476736"
    ) as failure:
        ingest_span(tmp_path, data)
    assert str(shard) in str(failure.value)


def image_example(index: int) -> tf.train.Example:
    """A record of the ImageNet format (van_tfx/features.py) with a real JPEG."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 6), (index % 256, 40, 90)).save(out, "JPEG")
    example = tf.train.Example()
    feature = example.features.feature
    feature[features.IMAGE_ENCODED].bytes_list.value.append(out.getvalue())
    feature[features.IMAGE_FORMAT].bytes_list.value.append(b"JPEG")
    feature[features.LABEL].int64_list.value.append(index % 3 + 1)
    feature[features.SYNSET].bytes_list.value.append(f"n{index % 3}".encode())
    feature[features.IMAGE_HEIGHT].int64_list.value.append(6)
    feature[features.IMAGE_WIDTH].int64_list.value.append(8)
    feature[features.IMAGE_FILENAME].bytes_list.value.append(f"n{index % 3}/{index}.jpg".encode())
    return example


def retyped(example: tf.train.Example, name: str, kind: str) -> None:
    """`example`'s feature `name` holding one value of another kind."""
    value = {"bytes_list": b"1", "int64_list": 1, "float_list": 1.0}[kind]
    del example.features.feature[name]
    getattr(example.features.feature[name], kind).value.append(value)


def span_with_one_altered_record(tmp_path: Path, count: int, index: int, alter, *args):
    """A span whose validation shard holds `count` image records, record `index` altered."""
    # alter(example, *args) edits that record in place; returns (data root, the shard).
    data = tmp_path / "data"
    write_span(data, 1)
    shard = data / "span-1" / "validation-00000-of-00001"
    with tf.io.TFRecordWriter(str(shard)) as writer:
        for n in range(count):
            example = image_example(n)
            if n == index:
                alter(example, *args)
            writer.write(example.SerializeToString())
    return data, shard


def with_extra_value(example: tf.train.Example, name: str, extra) -> None:
    """`example` with one more value in its feature `name`."""
    field = example.features.feature[name]
    getattr(field, field.WhichOneof("kind")).value.append(extra)


@pytest.mark.parametrize(
    "name, kind, expected",
    [
        (features.LABEL, "bytes_list", "INT (int64_list)"),
        (features.IMAGE_ENCODED, "int64_list", "BYTES (bytes_list)"),
        (features.IMAGE_WIDTH, "float_list", "INT (int64_list)"),
    ],
)
@pytest.mark.parametrize("index", [0, 300])  # in the first copy batch, in a later one
def test_a_record_with_a_feature_of_the_wrong_kind_is_named_with_its_shard(
    tmp_path, name, kind, expected, index
):
    # StatisticsGen would fail with "Unable to merge incompatible type", naming nothing.
    data, shard = span_with_one_altered_record(tmp_path, 400, index, retyped, name, kind)
    with pytest.raises(BadRecordError) as failure:
        ingest_span(tmp_path, data)
    assert str(failure.value) == (
        f"TFRecord shard {shard}: record {index} (0-based) feature {name!r} holds {kind} "
        f"values, but the schema types it {expected}; StatisticsGen cannot merge one feature "
        "of two kinds"
    )


def test_the_kind_check_holds_a_bounded_number_of_bytes_however_large_the_records(tmp_path):
    # 256 records a batch whatever their size: 256 records of 256 MiB would have been held at
    # once. Ten 8 MiB records, the 8th of the wrong kind: named, and at most ~32 MiB held.
    import tracemalloc

    from components.example_gen import copy_shard, record_schema

    source, target = tmp_path / "in", tmp_path / "out"
    with tf.io.TFRecordWriter(str(source)) as writer:
        for n in range(10):
            example = image_example(n)
            del example.features.feature[features.IMAGE_ENCODED]
            example.features.feature[features.IMAGE_ENCODED].bytes_list.value.append(
                bytes([n]) * (8 << 20)
            )
            if n == 7:
                retyped(example, features.LABEL, "bytes_list")
            writer.write(example.SerializeToString())
    tracemalloc.start()
    try:
        with pytest.raises(
            BadRecordError, match=r"record 7 \(0-based\) feature 'image/class/label'"
        ):
            copy_shard(str(source), str(target), record_schema({}))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 60 << 20, f"{peak / 2**20:.0f} MiB held"


@pytest.mark.parametrize(
    "name, extra",
    [
        (features.LABEL, 7),
        (features.IMAGE_ENCODED, b"\xff\xd8second image"),
        (features.SYNSET, b"n9"),
    ],
)
def test_a_record_with_more_values_than_the_schema_allows_is_named_with_its_shard(
    tmp_path, name, extra
):
    # A label list [1, 7] or two images in one record: ExampleValidator's anomaly named no
    # record, Transform's fixed-length parse of image/encoded failed naming none, and a reader
    # taking the first value would mislabel it silently.
    data, shard = span_with_one_altered_record(tmp_path, 300, 290, with_extra_value, name, extra)
    with pytest.raises(BadRecordError) as failure:
        ingest_span(tmp_path, data)
    assert str(failure.value) == (
        f"TFRecord shard {shard}: record 290 (0-based) feature {name!r} holds 2 values, but "
        "the schema allows at most 1 per record"
    )


def without(example: tf.train.Example, name: str, empty: bool) -> None:
    """`example` lacking feature `name`: absent, or present with an empty value list."""
    kind = example.features.feature[name].WhichOneof("kind")
    del example.features.feature[name]
    if empty:
        getattr(example.features.feature[name], kind).SetInParent()


REQUIRED = [
    features.LABEL,
    features.IMAGE_ENCODED,
    features.SYNSET,
    features.IMAGE_FORMAT,
    features.IMAGE_HEIGHT,
    features.IMAGE_WIDTH,
]


@pytest.mark.parametrize("empty", [False, True], ids=["absent", "empty"])
@pytest.mark.parametrize("name", REQUIRED)
def test_a_record_lacking_a_required_feature_is_named_with_its_shard(tmp_path, name, empty):
    # Absent or present with no values: the copy passed it, and the run stopped at
    # ExampleValidator ("present in fewer examples than expected", no record named) or at
    # Transform's fixed-length parse of image/encoded ("is required but could not be found").
    data, shard = span_with_one_altered_record(tmp_path, 300, 290, without, name, empty)
    with pytest.raises(BadRecordError) as failure:
        ingest_span(tmp_path, data)
    assert str(failure.value) == (
        f"TFRecord shard {shard}: record 290 (0-based) lacks feature {name!r}, which the schema "
        "requires in every record"
    )


@pytest.mark.parametrize("empty", [False, True], ids=["absent", "empty"])
def test_a_record_without_an_optional_feature_is_copied(tmp_path, empty):
    data, shard = span_with_one_altered_record(
        tmp_path, 300, 290, without, features.IMAGE_FILENAME, empty
    )
    examples = ingest_span(tmp_path, data)
    [records] = read_split(examples, "eval").values()
    assert records == records_of(shard)


@pytest.mark.parametrize(
    "marking, bounded",
    [
        ("deprecated: true", False),
        ("lifecycle_stage: DEPRECATED", False),
        ("lifecycle_stage: DISABLED", False),
        ("lifecycle_stage: PLANNED", False),
        ("lifecycle_stage: ALPHA", False),
        ("lifecycle_stage: DEBUG_ONLY", False),
        ("lifecycle_stage: PRODUCTION", True),
        ("lifecycle_stage: BETA", True),
        ("", True),
    ],
)
def test_a_feature_tfdv_does_not_validate_bounds_no_record(tmp_path, marking, bounded):
    # TFDV skips deprecated features (FeatureTypeIsDeprecated): the copy must not refuse a record
    # ExampleValidator would accept.
    from components.example_gen import record_schema, schema_path_config

    schema = tmp_path / "schema.pbtxt"
    schema.write_text(
        f'feature {{ name: "x" type: INT {marking} presence {{ min_fraction: 1.0 }} '
        "value_count { min: 1 max: 1 } }\n"
    )
    config = proto_utils.proto_to_json(schema_path_config(str(schema)))
    parsed = record_schema({"custom_config": config})
    assert parsed.kinds == {"x": "int64_list"}
    assert ("x" in parsed.bounds) == bounded


def test_before_a_record_of_the_wrong_kind_a_record_lacking_a_feature_is_named_first(tmp_path):
    # The batch's parse fails on the wrong kind, and the records are read one by one: the
    # earlier record missing its label is still the one named.
    from components.example_gen import copy_shard, record_schema

    source = tmp_path / "in"
    with tf.io.TFRecordWriter(str(source)) as writer:
        for n in range(10):
            example = image_example(n)
            if n == 3:
                without(example, features.LABEL, empty=False)
            if n == 5:
                retyped(example, features.IMAGE_WIDTH, "float_list")
            writer.write(example.SerializeToString())
    with pytest.raises(BadRecordError) as failure:
        copy_shard(str(source), str(tmp_path / "out"), record_schema({}))
    assert str(failure.value) == (
        f"TFRecord shard {source}: record 3 (0-based) lacks feature 'image/class/label', which "
        "the schema requires in every record"
    )


def bounded_schema(required, optional) -> str:
    """A schema of a required INT feature 'a' and an optional BYTES feature 'b'."""

    # `required` is ('shape', size) or ('count', min, max); `optional` is (min, max); a max of
    # None is left unset.
    def value_count(least, most):
        return f"value_count {{ min: {least}" + (f" max: {most}" if most else "") + " }"

    if required[0] == "shape":
        a = f"shape {{ dim {{ size: {required[1]} }} }}"
    else:
        a = "presence { min_fraction: 1.0 } " + value_count(*required[1:])
    b = "presence { min_count: 0 } " + value_count(*optional)
    return f'feature {{ name: "a" type: INT {a} }}\nfeature {{ name: "b" type: BYTES {b} }}\n'


def out_of_bounds(count: int, required, optional, name: str) -> str | None:
    """What the schema says of `count` values of feature `name` in one record, or None if fine."""
    # The plain reading: a shape is exactly its size; a required feature at least max(min, 1);
    # an optional one absent (0), or min..max.
    if name == "a" and required[0] == "shape":
        least, most = required[1], required[1]
    elif name == "a":
        least, most = max(required[1], 1), required[2]
    else:
        least, most = optional
        if count == 0:
            return None
    if count == 0:
        return f"lacks feature {name!r}, which the schema requires in every record"
    if count < least:
        return (
            f"feature {name!r} holds {count} values, but the schema requires at least {least} "
            "per record"
        )
    if most and count > most:
        return (
            f"feature {name!r} holds {count} values, but the schema allows at most {most} "
            "per record"
        )
    return None


@st.composite
def min_max(draw, lowest: int) -> tuple[int, int | None]:
    least = draw(st.integers(lowest, 2))
    return least, draw(st.one_of(st.none(), st.integers(max(least, 1), 3)))


@given(
    required=st.one_of(
        st.tuples(st.just("shape"), st.integers(1, 2)),
        min_max(0).map(lambda bounds: ("count", *bounds)),
    ),
    optional=min_max(0),
    counts=st.lists(
        st.fixed_dictionaries(
            {"a": st.integers(0, 3), "b": st.integers(0, 3), "empty": st.booleans()}
        ),
        min_size=1,
        max_size=12,
    ),
)
@example(required=("count", 0, 1), optional=(2, 3), counts=[{"a": 1, "b": 1, "empty": False}])
@example(required=("shape", 2), optional=(1, None), counts=[{"a": 0, "b": 0, "empty": True}])
def test_the_copy_refuses_exactly_the_records_outside_the_schemas_value_counts(
    required, optional, counts
):
    # Whatever the schema's bounds and each record's value counts, the copy fails iff a record
    # holds fewer or more values than the schema says (a required feature absent or empty
    # alike), naming the first such record (then feature, by name); else it copies them all.
    import tempfile

    from components.example_gen import copy_shard, record_schema, schema_path_config

    with tempfile.TemporaryDirectory() as directory:
        schema_file = Path(directory, "schema.pbtxt")
        schema_file.write_text(bounded_schema(required, optional))
        config = proto_utils.proto_to_json(schema_path_config(str(schema_file)))
        schema = record_schema({"custom_config": config})
        source, target = Path(directory, "in"), Path(directory, "out")
        with tf.io.TFRecordWriter(str(source)) as writer:
            for record in counts:
                example = tf.train.Example()
                feature = example.features.feature
                for name, value, kind in (("a", 7, "int64_list"), ("b", b"v", "bytes_list")):
                    if record[name] or record["empty"]:  # 0 values: absent, or an empty list
                        getattr(feature[name], kind).value.extend([value] * record[name])
                        getattr(feature[name], kind).SetInParent()
                writer.write(example.SerializeToString())
        problems = [
            (index, problem)
            for index, record in enumerate(counts)
            for name in ("a", "b")
            if (problem := out_of_bounds(record[name], required, optional, name))
        ]
        if not problems:
            assert copy_shard(str(source), str(target), schema) == len(counts)
            assert records_of(target) == records_of(source)
            return
        index, problem = problems[0]
        with pytest.raises(BadRecordError) as failure:
            copy_shard(str(source), str(target), schema)
        assert str(failure.value) == f"TFRecord shard {source}: record {index} (0-based) {problem}"


def test_a_record_that_is_no_tf_example_is_named_with_its_shard(tmp_path):
    data = tmp_path / "data"
    write_span(data, 1)
    shard = data / "span-1" / "train-00000-of-00001"
    with tf.io.TFRecordWriter(str(shard)) as writer:
        for n in range(5):
            writer.write(image_example(n).SerializeToString() if n != 3 else b"\xff" * 40)
    with pytest.raises(
        BadRecordError, match=r"record 3 \(0-based\) is not a serialized"
    ) as failure:
        ingest_span(tmp_path, data)
    assert str(shard) in str(failure.value)


def test_the_kinds_come_from_the_configured_schema(tmp_path):
    # write_span's records carry an int64 'x'; a schema typing it BYTES refuses them.
    from components.example_gen import record_schema, schema_path_config

    schema = tmp_path / "schema.pbtxt"
    schema.write_text('feature { name: "x" type: BYTES }\n')
    data = tmp_path / "data"
    write_span(data, 1)
    config = proto_utils.proto_to_json(schema_path_config(str(schema)))
    assert record_schema({"custom_config": config}).kinds == {"x": "bytes_list"}
    assert record_schema({"custom_config": config}).bounds == {}  # nothing required
    assert record_schema({}).kinds[features.LABEL] == "int64_list"  # the schema shipped
    with pytest.raises(BadRecordError, match="feature 'x' holds int64_list values"):
        ingest_span(tmp_path, data, custom_config=config)


def read_split(examples: Examples, split: str) -> dict[str, list[bytes]]:
    """{output shard name: its records} of one split of an Examples artifact."""
    files = sorted(Path(examples.uri, f"Split-{split}").iterdir())
    return {f.name: [r.numpy() for r in tf.data.TFRecordDataset(str(f))] for f in files}


def records_of(path: Path, compression: str = "") -> list[bytes]:
    return [r.numpy() for r in tf.data.TFRecordDataset(str(path), compression)]


def test_each_shard_is_copied_record_for_record_uncompressed(tmp_path):
    data = tmp_path / "data"
    write_span(data, 1)
    span = data / "span-1"
    (span / "train-00000-of-00001").unlink()
    sources = []
    for index in range(3):  # 700 records: more than one copy batch per shard
        source = span / f"train-{index:05d}-of-00003{'.gz' if index == 1 else ''}"
        example = marked_example(0)
        with tf.io.TFRecordWriter(str(source), "GZIP" if index == 1 else None) as writer:
            for n in range(700 + index):
                example.features.feature["x"].int64_list.value[:] = [index * 1000 + n]
                writer.write(example.SerializeToString())
        sources.append(source)
    examples = ingest_span(tmp_path, data)
    copied = read_split(examples, "train")
    assert list(copied) == [f"data_tfrecord-{i:05d}-of-00003" for i in range(3)]
    for source, records in zip(sources, copied.values(), strict=True):
        assert records == records_of(source, "GZIP" if source.suffix == ".gz" else "")
    assert examples.split_names == '["train", "eval"]'
    assert examples.get_string_custom_property("payload_format") == "FORMAT_TF_EXAMPLE"


def test_the_ingested_split_reads_through_tfx_own_reader(tmp_path):
    from tfx.components.util import tfxio_utils

    data = tmp_path / "data"
    write_span(data, 1)
    examples = ingest_span(tmp_path, data)
    factory = tfxio_utils.get_tfxio_factory_from_artifact([examples], ["test"])
    tfxio = factory(str(Path(examples.uri, "Split-eval", "*")))
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    with beam.Pipeline() as pipeline:
        counts = (
            pipeline
            | tfxio.BeamSource()
            | beam.Map(lambda batch: batch.num_rows)
            | beam.CombineGlobally(sum)
        )
        assert_that(counts, equal_to([1]))


def test_a_split_matching_no_files_is_named(tmp_path):
    data = tmp_path / "data"
    write_span(data, 1)
    (data / "span-1" / "validation-00000-of-00001").unlink()
    # With {SPAN}, TFX's span resolution names the split; without, the copy plan does.
    with pytest.raises(ValueError, match=r"split eval based on span-\{SPAN\}/validation-\*"):
        ingest_span(tmp_path, data)
    with pytest.raises(FileNotFoundError, match=r"span-1/validation-\* \(split 'eval'\)"):
        ingest_span(tmp_path, data / "span-1", DataConfig(layout="plain"))


def test_a_compression_ingestion_cannot_read_is_refused_naming_the_shard(tmp_path):
    data = tmp_path / "data"
    write_span(data, 1)
    shard = data / "span-1" / "train-00000-of-00001"
    shard.rename(shard.with_name(shard.name + ".bz2"))
    with pytest.raises(CorruptShardError, match=r"train-00000-of-00001\.bz2 is compressed"):
        ingest_span(tmp_path, data)


def test_output_hash_partitioning_still_goes_through_tfx(tmp_path):
    data = tmp_path / "data"
    write_span(data, 1)
    examples = ingest_partitioned(tmp_path, data, "span-1/*-00000-of-00001")
    [written] = Path(examples.uri, "Split-all").iterdir()
    assert written.name.endswith(".gz")  # TFX's WriteSplit
    assert len(records_of(written, "GZIP")) == 2


def test_gzip_shards_named_gz_are_ingested(tmp_path):
    data = tmp_path / "data"
    write_span(data, 1)
    for split in ("train", "validation"):
        (data / "span-1" / f"{split}-00000-of-00001").unlink()
        write_records(data / "span-1" / f"{split}-00000-of-00001.gz", 2, "GZIP")
    examples = ingest_span(tmp_path, data)
    assert [len(r) for r in read_split(examples, "eval").values()] == [2]


def test_curated_schema_counts_synsets_as_data_build_reads_them(tmp_path):
    # It counted non-empty lines: a duplicate counted twice (3 classes for 2).
    from components.curated_schema import count_synsets
    from van_tfx.data.records import SynsetListError

    listed = tmp_path / "synsets.txt"
    listed.write_bytes(b"\xef\xbb\xbfn01 one\r\n\r\nn02 two\r\n")
    assert count_synsets(str(listed)) == 2
    listed.write_bytes(b"n01 one\nn02 two\nn01 again\n")
    with pytest.raises(SynsetListError, match=r"synsets\.txt:3: synset 'n01' is listed twice"):
        count_synsets(str(listed))
