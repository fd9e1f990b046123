"""ImportExampleGen's executor, resolving `{SPAN}` itself when no driver did.

TFX resolves ImportExampleGen's `span-{SPAN}` patterns in a driver: LocalDagRunner runs it before
the executor, Vertex AI Pipelines runs it as the container's `lifecycle.preCacheCheck` hook. The
open-source Kubeflow Pipelines backend runs no lifecycle hooks (nothing in its `backend/src/v2`
reads them), so there the executor would get the raw pattern and fail with "No files found based
on the file pattern .../span-{SPAN}/train-*". This executor then does what the driver would have
done, with the driver's own pieces (tfx/orchestration/kubeflow/v2/file_based_example_gen/driver.py):
resolve the span (and version), compute the input fingerprint, record span, version and
fingerprint on the Examples artifact (`driver.update_output_artifact`), and ingest that span. The
span is the one the NewDataGate decided on when its decision is among the inputs (KFP gives each
gated task the decision its condition reads), else the newest.
Where a driver ran, the patterns arrive resolved and this is TFX's executor unchanged.

Ingesting is a copy, shard by shard. TFX's executor reads every record, reshuffles them all
(`WriteSplit`'s Reshuffle: at ImageNet-1k ~146 GB through the runner's shuffle) and GZIPs them
again (JPEG bytes barely compress; every later read pays the inflate). The shards are already
TFRecords, so this executor copies each input shard to one output shard
(`Split-<split>/data_tfrecord-NNNNN-of-MMMMM`, uncompressed; readers pick compression by name as
Beam does), one Beam element per shard, so a distributed runner spreads the files over its
workers. Each record is read with its CRCs checked on the way, so a damaged shard fails naming
the shard and the record. An output `split_config` (hash partitioning), which needs every record
routed, goes through TFX's path unchanged.

Before Beam runs, the executor checks what names alone show: complete shard sets, splits sharing
no file, compressions it cannot read. The copy names a shard bad from its start (another format,
a GZIP file not named `*.gz`, which Beam would read as uncompressed, a truncated or damaged start)
as it names later damage. TFX's path reads through Beam, whose reader names no file, so there each
shard's first record is read before Beam runs (one open each; on GCS a ranged read of the bytes
needed, not TF's 64 MiB block), and Beam's own error for later damage (the whole record in hex) is
cut to one line naming the split's pattern.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from absl import logging
from tfx.components.example_gen import driver, utils
from tfx.components.example_gen.import_example_gen import executor as import_executor
from tfx.dsl.io import fileio
from tfx.proto import example_gen_pb2, range_config_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import proto_utils

from components.input_fingerprint import InputProcessor
from components.new_data_gate import (
    DECISION_OUTPUT,
    GATE_ID,
    VERSION_KEY,
    decided_data,
    span_range,
)
from van_tfx import storage
from van_tfx.shard_sets import IncompleteShardsError, check_shard_set
from van_tfx.tfrecords import BadRecordError, CorruptShardError, read_records, write_records

_INPUT_CONFIG = standard_component_specs.INPUT_CONFIG_KEY
_CUSTOM_CONFIG = standard_component_specs.CUSTOM_CONFIG_KEY
_RANGE_CONFIG = standard_component_specs.RANGE_CONFIG_KEY
_BEAM_CORRUPT_RECORD = "Not a valid TFRecord"
# The input TFX's KFP compiler adds to each task under the gate's Cond, for its condition.
GATE_DECISION_INPUT = f"_{GATE_ID}.{DECISION_OUTPUT}"
_OUTPUT_SHARD = "data_tfrecord-{index:05d}-of-{count:05d}"
# Records checked against the schema's kinds and value bounds per C++ parse: at most this many,
# and no more bytes than _COPY_BATCH_BYTES unless one record alone is larger (a record may hold
# 256 MiB, and 256 of those would have been held at once, twice: the list and the parse's string
# tensor).
_COPY_BATCH = 256
_COPY_BATCH_BYTES = 32 << 20
# tf.train.Feature's kind for each schema type (STRUCT and unknown types are not checked).
_FEATURE_KINDS = {1: "bytes_list", 2: "int64_list", 3: "float_list"}  # BYTES, INT, FLOAT
_SCHEMA_TYPES = {"bytes_list": "BYTES", "int64_list": "INT", "float_list": "FLOAT"}
# Compressions Beam reads by file name that tf.data cannot: such shards are refused by name.
_UNCOPYABLE_SUFFIXES = (".bz2", ".deflate", ".zst", ".zstd", ".lzma")


def has_unresolved_specs(input_config_json: str) -> bool:
    """Whether any split pattern still holds a {SPAN}, {VERSION} or date spec."""
    config = proto_utils.json_to_proto(input_config_json, example_gen_pb2.Input())
    return any(any(utils.verify_split_pattern_specs(split)) for split in config.splits)


def split_fingerprints(fingerprint: str, names: list[str]) -> str:
    """The lines of a TFX input fingerprint (one `split:<name>,...` line per split) for `names`."""
    # The gate fingerprints every split, an ExampleGen of fewer splits only its own.
    wanted = {f"split:{name}" for name in names}
    return "\n".join(line for line in fingerprint.split("\n") if line.split(",")[0] in wanted)


def resolve_like_the_driver(
    exec_properties: dict, examples_artifact, decided: dict | None = None
) -> dict:
    """Exec properties with span, version, fingerprint and patterns, resolved as TFX's driver."""
    # For the span and version the gate `decided` on, else the newest.
    resolved = dict(exec_properties)
    config = proto_utils.json_to_proto(resolved[_INPUT_CONFIG], example_gen_pb2.Input())
    range_config = None
    if decided is not None:
        # The decided span only: the processor's fingerprint is of the span it resolved, and a
        # newer span still being uploaded must not fail this run ("Latest span should be the
        # same for each split").
        range_config = span_range(decided["span"])
    elif resolved.get(_RANGE_CONFIG):
        range_config = proto_utils.json_to_proto(
            resolved[_RANGE_CONFIG], range_config_pb2.RangeConfig()
        )
    # TFX's processor, its fingerprint's stats made concurrently (components/input_fingerprint).
    processor = InputProcessor(
        resolved[standard_component_specs.INPUT_BASE_KEY], config.splits, range_config
    )
    span, version = processor.resolve_span_and_version()
    if decided is not None and version != decided[VERSION_KEY]:
        raise ValueError(
            f"span {span} now resolves to version {version}, but the NewDataGate decided on "
            f"version {decided[VERSION_KEY]}: a new version landed in between; rerun the pipeline"
        )
    resolved[utils.SPAN_PROPERTY_NAME] = span
    resolved[utils.VERSION_PROPERTY_NAME] = version
    resolved[utils.FINGERPRINT_PROPERTY_NAME] = processor.get_input_fingerprint(span, version)
    if decided is not None and resolved[utils.FINGERPRINT_PROPERTY_NAME] != split_fingerprints(
        decided["input_fingerprint"], [split.name for split in config.splits]
    ):
        # Safe: the training record keeps the gate's fingerprint, so the next run trains again.
        logging.warning(
            "span %s changed since the NewDataGate looked (files, sizes or mtimes)", span
        )
    for split in config.splits:
        split.pattern = processor.get_pattern_for_span_version(split.pattern, span, version)
    resolved[_INPUT_CONFIG] = proto_utils.proto_to_json(config)
    driver.update_output_artifact(resolved, examples_artifact.mlmd_artifact)
    how = "as the NewDataGate decided" if decided else "itself (the newest)"
    logging.info("No ExampleGen driver ran: resolved span %s, version %s %s", span, version, how)
    return resolved


class SpanMovedError(ValueError):
    """ExampleGen's driver resolved another span than the NewDataGate decided on; names both."""


def check_driver_span(exec_properties: dict, decided: dict) -> None:
    """Refuse a span or version a driver resolved other than the one the gate decided on."""
    # Vertex runs TFX's driver before this executor, and it resolves the newest span itself: a
    # span landing after the gate looked would be trained on while the schema, the smoke test
    # and the training record name the gate's (and the next run would train again).
    span = exec_properties.get(utils.SPAN_PROPERTY_NAME)
    version = exec_properties.get(utils.VERSION_PROPERTY_NAME)
    if span is None:
        return
    if int(span) != decided["span"] or (
        decided[VERSION_KEY] is not None
        and version is not None
        and int(version) != decided[VERSION_KEY]
    ):
        resolved = f"span {span}" + (f" version {version}" if version is not None else "")
        wanted = f"span {decided['span']}" + (
            f" version {decided[VERSION_KEY]}" if decided[VERSION_KEY] is not None else ""
        )
        raise SpanMovedError(
            f"ExampleGen's driver resolved {resolved}, but the NewDataGate decided on {wanted}: "
            "newer data landed in between (the driver resolves the newest itself); rerun the "
            "pipeline, and its gate decides on the new data"
        )


def shard_records(path: str, ranged: bool = False) -> Iterator[bytes]:
    """read_records of an input shard, one unreadable from its start named as no TFRecord file."""
    # Another format, a GZIP file without .gz, a truncated start: the message the first-record
    # pass gave, now from whichever read meets it first (the copy, or the pass on TFX's path).
    count = 0
    try:
        for record in read_records(path, ranged):
            yield record
            count += 1
    except CorruptShardError as exc:
        if count:
            raise
        raise CorruptShardError(
            f"TFRecord shard {path} is not a readable TFRecord file (truncated, corrupted or "
            f"another format): {exc.reason}",
            exc.reason,
        ) from None


def check_first_record(path: str) -> None:
    """Read one shard's first record (one open; ranged on GCS); CorruptShardError names it."""
    next(shard_records(path, ranged=True), None)


def check_shard_names(paths: list[str]) -> None:
    """CorruptShardError naming a shard compressed in a way ingestion cannot read (by name)."""
    for path in paths:
        if path.endswith(_UNCOPYABLE_SUFFIXES):
            raise CorruptShardError(
                f"TFRecord shard {path} is compressed as its name says "
                f"({os.path.splitext(path)[1]}), which ingestion cannot read; store shards "
                "uncompressed or GZIP-compressed (*.gz)"
            )


def input_patterns(exec_properties: dict) -> list[str]:
    """The full file pattern of each input split."""
    config = proto_utils.json_to_proto(exec_properties[_INPUT_CONFIG], example_gen_pb2.Input())
    base = exec_properties[standard_component_specs.INPUT_BASE_KEY]
    return [os.path.join(base, split.pattern) for split in config.splits]


def split_shards(exec_properties: dict) -> dict[str, tuple[str, list[str]]]:
    """{split name: (its full pattern, the shards it matches, in name order)}: one listing each."""
    config = proto_utils.json_to_proto(exec_properties[_INPUT_CONFIG], example_gen_pb2.Input())
    patterns = zip(config.splits, input_patterns(exec_properties), strict=True)
    return {split.name: (pattern, sorted(fileio.glob(pattern))) for split, pattern in patterns}


def check_input_shards(shards: dict[str, tuple[str, list[str]]]) -> None:
    """The checks of names alone: complete shard sets, disjoint splits, readable compressions."""
    for name, (pattern, paths) in shards.items():
        check_shard_set(name, pattern, paths)
    check_splits_are_disjoint(shards)
    check_shard_names([path for _, split_paths in shards.values() for path in split_paths])


def check_first_records(shards: dict[str, tuple[str, list[str]]]) -> None:
    """check_first_record of every shard, 16 at a time; the first bad in listing order is named."""
    paths = [path for _, split_paths in shards.values() for path in split_paths]
    storage.for_each_file(check_first_record, paths)


def check_splits_are_disjoint(shards: dict[str, tuple[str, list[str]]]) -> None:
    """IncompleteShardsError naming a file that two splits' patterns match."""
    # Otherwise the eval split would hold training data, and the Evaluator would bless accuracy
    # measured on it.
    owner: dict[str, str] = {}
    for name, (pattern, paths) in shards.items():
        for path in paths:
            if path in owner:
                raise IncompleteShardsError(
                    f"{path} is matched by both the {owner[path]} and the {name} split's "
                    f"patterns (the {name} split's is {pattern}): each file belongs to one split"
                )
            owner[path] = name


def schema_path_config(schema_path: str) -> example_gen_pb2.CustomConfig:
    """ImportExampleGen's custom_config naming the curated schema (data.schema_path)."""
    # '' names the one shipped. The copy checks every record against its feature types and
    # value counts (record_schema).
    from google.protobuf import any_pb2, wrappers_pb2

    packed = any_pb2.Any()
    packed.Pack(wrappers_pb2.StringValue(value=schema_path))
    return example_gen_pb2.CustomConfig(custom_config=packed)


@dataclass(frozen=True)
class ValueBounds:
    """How many values of one feature a record must and may hold, by the curated schema."""

    least: int  # fewer is refused (0: no lower bound)
    most: int | None  # more is refused (None: no upper bound)
    required: bool  # whether a record without it (absent or empty) is refused


@dataclass(frozen=True)
class RecordSchema:
    """The curated schema as the copy checks each record: feature kinds and value bounds."""

    kinds: dict[str, str]  # {feature: 'bytes_list', 'int64_list' or 'float_list'}
    bounds: dict[str, ValueBounds]  # the typed features the schema bounds


def record_schema(exec_properties: dict) -> RecordSchema:
    """The kinds and value bounds of the curated schema schema_path_config names (one parse)."""
    # Parsed once per executor run and handed to every copy_shard (Beam pickles it along).
    schema = _curated_schema(exec_properties)
    kinds, bounds = {}, {}
    for f in schema.feature:
        if f.type not in _FEATURE_KINDS:
            continue  # STRUCT and unknown types: not checked
        kinds[f.name] = _FEATURE_KINDS[f.type]
        bound = value_bounds(f)
        if bound is not None:
            bounds[f.name] = bound
    return RecordSchema(kinds, bounds)


def value_bounds(feature) -> ValueBounds | None:
    """The ValueBounds of one schema feature, or None when it bounds nothing."""
    # A fixed `shape` means exactly the product of its dims, in every record: Transform parses it
    # fixed-length. Otherwise `value_count { min max }`, and `presence { min_fraction: 1.0 }`
    # makes it required (at least 1 value when value_count sets no min). A record out of these
    # bounds (a label list [3, 7], a record without image/encoded) used to reach
    # ExampleValidator, whose anomaly names no record ("present in fewer examples than
    # expected"), or Transform, whose fixed-length parse fails naming none; taking a list's first
    # value would silently mislabel.
    # An optional feature with no values passes: the batch parse cannot tell absent from empty.
    # A deprecated feature bounds nothing, as in TFDV's FeatureTypeIsDeprecated (feature_util.cc),
    # so the copy never refuses what ExampleValidator would accept.
    if feature_is_deprecated(feature):
        return None
    if feature.HasField("shape"):
        size = math.prod(d.size for d in feature.shape.dim)
        return ValueBounds(least=size, most=size, required=True)
    required = feature.presence.min_fraction >= 1.0
    counted = feature.HasField("value_count")
    least = feature.value_count.min if counted else 0
    most = feature.value_count.max if counted and feature.value_count.max > 0 else None
    if required:
        least = max(least, 1)
    if least == 0 and most is None:
        return None
    return ValueBounds(least=least, most=most, required=required)


def feature_is_deprecated(feature) -> bool:
    """Whether TFDV skips validating a schema feature (deprecated, or a not-yet/no-longer stage)."""
    # `deprecated: true`, or a lifecycle_stage of PLANNED, ALPHA, DEPRECATED, DEBUG_ONLY or
    # DISABLED (LifecycleStageIsDeprecated); TFX's ExampleValidator passes no environment, so
    # in_environment / not_in_environment change nothing there either.
    from tensorflow_metadata.proto.v0 import schema_pb2

    stages = schema_pb2.LifecycleStage
    skipped = {stages.PLANNED, stages.ALPHA, stages.DEPRECATED, stages.DEBUG_ONLY, stages.DISABLED}
    return feature.deprecated or (
        feature.HasField("lifecycle_stage") and feature.lifecycle_stage in skipped
    )


def _curated_schema(exec_properties: dict):
    from google.protobuf import text_format, wrappers_pb2
    from tensorflow_metadata.proto.v0 import schema_pb2

    from components.curated_schema import curated_schema_text

    path = wrappers_pb2.StringValue()
    config = exec_properties.get(_CUSTOM_CONFIG)
    if config:
        parsed = proto_utils.json_to_proto(config, example_gen_pb2.CustomConfig())
        parsed.custom_config.Unpack(path)
    return text_format.Parse(curated_schema_text(path.value), schema_pb2.Schema())


def _parse_spec(kinds: dict[str, str]) -> dict:
    import tensorflow as tf

    dtypes = {"bytes_list": tf.string, "int64_list": tf.int64, "float_list": tf.float32}
    return {name: tf.io.VarLenFeature(dtypes[kind]) for name, kind in kinds.items()}


def record_kind_problem(record: bytes, kinds: dict[str, str], spec: dict) -> str | None:
    """What keeps one serialized record from parsing with the schema's feature kinds, or None."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError

    try:
        example = tf.train.Example.FromString(record)
    except DecodeError:
        return "is not a serialized tf.train.Example"
    present = example.features.feature
    for name, kind in kinds.items():
        found = present[name].WhichOneof("kind") if name in present else None
        if found is not None and found != kind:
            return (
                f"feature {name!r} holds {found} values, but the schema types it "
                f"{_SCHEMA_TYPES[kind]} ({kind})"
            )
    try:
        tf.io.parse_example([record], spec)
    except (tf.errors.InvalidArgumentError, UnicodeDecodeError) as exc:
        return f"does not parse as a tf.train.Example: {str(exc)[:200]!r}"
    return None


def check_records(batch, schema: RecordSchema, spec: dict, source: str, start: int) -> None:
    """Raise BadRecordError if a record of `batch` breaks the schema's feature kinds or bounds."""
    # The records are `start`.. of `source`; the error names the shard, the first bad record's
    # index and the feature.
    import tensorflow as tf

    try:
        # One C++ parse per batch; the records are read again one by one only when it fails.
        parsed = tf.io.parse_example(batch, spec)
    except (tf.errors.InvalidArgumentError, UnicodeDecodeError):
        parsed = None
    if parsed is not None:
        _check_value_counts(parsed, len(batch), schema.bounds, source, start)
        return
    for offset, record in enumerate(batch):
        problem = record_kind_problem(record, schema.kinds, spec)
        if problem:
            if offset:
                # The records before it parse: one of them out of bounds is the first bad one.
                before = tf.io.parse_example(batch[:offset], spec)
                _check_value_counts(before, offset, schema.bounds, source, start)
            raise BadRecordError(
                f"TFRecord shard {source}: record {start + offset} (0-based) {problem}; "
                "StatisticsGen cannot merge one feature of two kinds"
            )


def _check_value_counts(
    parsed: dict, size: int, bounds: dict[str, ValueBounds], source: str, start: int
) -> None:
    # The first record of the batch (then feature, in name order) holding fewer or more values
    # than its bounds; one bincount of the sparse parse's row indices per feature counts each
    # record's values without a Python loop, for both bounds.
    import numpy as np

    worst = None
    for name in sorted(bounds):
        if name not in parsed:
            continue
        bound = bounds[name]
        counts = np.bincount(parsed[name].indices.numpy()[:, 0], minlength=size)
        bad = counts < bound.least
        if not bound.required:
            bad &= counts > 0  # an optional feature may be absent (or empty: the same here)
        if bound.most is not None:
            bad |= counts > bound.most
        found = np.flatnonzero(bad)
        if found.size and (worst is None or found[0] < worst[0]):
            worst = (int(found[0]), name, int(counts[found[0]]))
    if worst is not None:
        offset, name, count = worst
        raise BadRecordError(
            f"TFRecord shard {source}: record {start + offset} (0-based) "
            f"{_count_problem(name, count, bounds[name])}"
        )


def _count_problem(name: str, count: int, bound: ValueBounds) -> str:
    if count == 0:
        return f"lacks feature {name!r}, which the schema requires in every record"
    if count < bound.least:
        return (
            f"feature {name!r} holds {count} values, but the schema requires at least "
            f"{bound.least} per record"
        )
    return (
        f"feature {name!r} holds {count} values, but the schema allows at most {bound.most} "
        "per record"
    )


def copy_shard(source: str, target: str, schema: RecordSchema | None = None) -> int:
    """Copy one TFRecord shard record by record, uncompressed, checked; returns the count."""
    # Lengths are bounded and CRCs checked, and each record's schema features must be of the
    # schema's kinds and hold as many values as its bounds say.
    records = shard_records(source)
    if schema is not None and schema.kinds:
        records = _schema_checked(records, schema, source)
    return write_records(target, records)


def _schema_checked(records, schema: RecordSchema, source: str):
    # Batches of _COPY_BATCH records or _COPY_BATCH_BYTES: one C++ parse each, the records
    # re-read one by one only on failure.
    spec, batch, start, held = _parse_spec(schema.kinds), [], 0, 0
    for record in records:
        batch.append(record)
        held += len(record)
        if len(batch) == _COPY_BATCH or held >= _COPY_BATCH_BYTES:
            check_records(batch, schema, spec, source, start)
            yield from batch
            start, batch, held = start + len(batch), [], 0
    if batch:
        check_records(batch, schema, spec, source, start)
        yield from batch


def shard_copies(
    shards: dict[str, tuple[str, list[str]]], examples_uri: str
) -> list[tuple[str, str]]:
    """(input shard, output shard) for every shard of every split, in name order."""
    copies = []
    for name, (pattern, sources) in shards.items():
        if not sources:
            raise FileNotFoundError(f"no files match {pattern} (split {name!r})")
        target_dir = os.path.join(examples_uri, f"Split-{name}")
        for index, source in enumerate(sources):
            shard = _OUTPUT_SHARD.format(index=index, count=len(sources))
            copies.append((source, os.path.join(target_dir, shard)))
    return copies


def is_copyable(exec_properties: dict) -> bool:
    """Whether the splits come straight from the input patterns (no output hash partitioning)."""
    output = proto_utils.json_to_proto(
        exec_properties.get(standard_component_specs.OUTPUT_CONFIG_KEY) or "{}",
        example_gen_pb2.Output(),
    )
    return not output.split_config.splits


def shard_error(error: Exception) -> Exception | None:
    """The CorruptShardError or BadRecordError inside a runner's error, or None."""
    # The runner's error wraps it, or re-raises it with the step's name appended.
    found = re.search(
        r"(CorruptShardError|BadRecordError): (TFRecord shard .*?)(?: \[while running|$)",
        str(error),
        re.M,
    )
    if found:
        kind = CorruptShardError if found.group(1) == "CorruptShardError" else BadRecordError
        return kind(found.group(2))
    if isinstance(error, CorruptShardError | BadRecordError):
        return type(error)(re.sub(r" \[while running.*", "", str(error), flags=re.S))
    return None


class SpanResolvingImportExecutor(import_executor.Executor):
    """TFX's ImportExampleGen executor, resolving span specs and ingesting by copying shards."""

    # It resolves span specs left unresolved by the runner.

    def Do(self, input_dict, output_dict, exec_properties):  # noqa: N802  (TFX's name)
        """Resolve {SPAN} like TFX's driver when no driver did, then ingest the shards."""
        examples = artifact_utils.get_single_instance(
            output_dict[standard_component_specs.EXAMPLES_KEY]
        )
        # On KFP the gated task also receives the gate's decision (the input its trigger
        # condition reads): ingest the span the gate decided on, not whatever is newest a pod
        # start later, so schema, smoke test and training record all name this data.
        decisions = input_dict.get(GATE_DECISION_INPUT) or []
        decided = decided_data(decisions[0]) if decisions else None
        if has_unresolved_specs(exec_properties[_INPUT_CONFIG]):
            exec_properties = resolve_like_the_driver(exec_properties, examples, decided)
        elif decided is not None:
            check_driver_span(exec_properties, decided)
        shards = split_shards(exec_properties)
        check_input_shards(shards)
        if is_copyable(exec_properties):
            # No first-record pass: the copy reads every record with its CRCs and names the
            # shard and record at any damage, and a read of a shard's start cost a round trip
            # (and on GCS up to a 64 MiB block) per shard before the copy read it all again.
            self._copy_shards(examples, exec_properties, shards)
        else:
            # Beam's reader names no shard: a shard bad from its start is named before Beam runs.
            check_first_records(shards)
            self._tfx_ingest(input_dict, output_dict, exec_properties)

    def _copy_shards(self, examples, exec_properties, shards) -> None:
        import apache_beam as beam
        from tfx.components.example_gen import write_split
        from tfx.components.util import examples_utils

        self._log_startup({}, {"examples": [examples]}, exec_properties)
        copies = shard_copies(shards, examples.uri)
        schema = record_schema(exec_properties)  # the curated schema, parsed once
        for directory in sorted({os.path.dirname(target) for _, target in copies}):
            fileio.makedirs(directory)
        examples.split_names = artifact_utils.encode_split_names(list(shards))
        try:
            with self._make_beam_pipeline() as pipeline:
                _ = (
                    pipeline
                    | "Shards" >> beam.Create(copies)
                    | "Spread" >> beam.Reshuffle()  # file names only: a few KB
                    | "CopyShards" >> beam.MapTuple(copy_shard, schema=schema)
                )
        except Exception as exc:
            named = shard_error(exc)
            if named is None:
                raise
            raise named from None
        payload = exec_properties.get(standard_component_specs.OUTPUT_DATA_FORMAT_KEY)
        if payload:
            examples_utils.set_payload_format(examples, payload)
        file_format = exec_properties.get(standard_component_specs.OUTPUT_FILE_FORMAT_KEY)
        if file_format:
            # TFX knows one file format, 'tfrecords_gzip', and its readers pick the
            # compression by file name, so uncompressed shards are read as such.
            examples_utils.set_file_format(examples, write_split.to_file_format_str(file_format))
        logging.info("Copied %d shards into %s", len(copies), examples.uri)

    def _tfx_ingest(self, input_dict, output_dict, exec_properties) -> None:
        try:
            super().Do(input_dict, output_dict, exec_properties)
        except Exception as exc:
            if _BEAM_CORRUPT_RECORD not in str(exc):
                raise
            raise CorruptShardError(
                f"a TFRecord shard matched by {' or '.join(input_patterns(exec_properties))} is "
                "damaged after its first record (Beam's reader names no file): "
                f"{str(exc).splitlines()[0][:200]}"
            ) from None
