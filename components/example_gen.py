"""ImportExampleGen's executor, resolving `{SPAN}` itself when no driver did.

TFX resolves ImportExampleGen's `span-{SPAN}` patterns in a driver: LocalDagRunner runs it before
the executor, Vertex AI Pipelines runs it as the container's `lifecycle.preCacheCheck` hook. The
open-source Kubeflow Pipelines backend runs no lifecycle hooks (nothing in its `backend/src/v2`
reads them), so there the executor would get the raw pattern and fail with "No files found based
on the file pattern .../span-{SPAN}/train-*". This executor then does what the driver would have
done, with the driver's own pieces (tfx/orchestration/kubeflow/v2/file_based_example_gen/driver.py):
resolve the newest span (and version), compute the input fingerprint, record span, version and
fingerprint on the Examples artifact (`driver.update_output_artifact`), and ingest that span.
Where a driver ran, the patterns arrive resolved and this is TFX's executor unchanged.

Beam's TFRecord reader reports a damaged shard without naming it (`Not a valid TFRecord.
Mismatch of data mask: b'...'`, the whole record in hex). So before Beam runs, the executor
reads each shard's first record (CRCs checked; one record per shard, not a pass over the data)
and fails naming the shard: a wrong format, a GZIP file not named `*.gz` (Beam picks the
compression by file name), a truncated or damaged start. Damage further in still comes from
Beam; that error is cut to one line and names the split's pattern.
"""

from __future__ import annotations

import os

from absl import logging
from tfx.components.example_gen import driver, input_processor, utils
from tfx.components.example_gen.import_example_gen import executor as import_executor
from tfx.dsl.io import fileio
from tfx.proto import example_gen_pb2, range_config_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import proto_utils

from van_tfx.data.records import CorruptShardError

_INPUT_CONFIG = standard_component_specs.INPUT_CONFIG_KEY
_RANGE_CONFIG = standard_component_specs.RANGE_CONFIG_KEY
_GZIP_MAGIC = b"\x1f\x8b"
_BEAM_CORRUPT_RECORD = "Not a valid TFRecord"


def has_unresolved_specs(input_config_json: str) -> bool:
    """Whether any split pattern still holds a {SPAN}, {VERSION} or date spec."""
    config = proto_utils.json_to_proto(input_config_json, example_gen_pb2.Input())
    return any(any(utils.verify_split_pattern_specs(split)) for split in config.splits)


def resolve_like_the_driver(exec_properties: dict, examples_artifact) -> dict:
    """Exec properties with span, version, fingerprint and resolved patterns, as TFX's driver sets."""
    resolved = dict(exec_properties)
    config = proto_utils.json_to_proto(resolved[_INPUT_CONFIG], example_gen_pb2.Input())
    range_config = None
    if resolved.get(_RANGE_CONFIG):
        range_config = proto_utils.json_to_proto(
            resolved[_RANGE_CONFIG], range_config_pb2.RangeConfig()
        )
    processor = input_processor.FileBasedInputProcessor(
        resolved[standard_component_specs.INPUT_BASE_KEY], config.splits, range_config
    )
    span, version = processor.resolve_span_and_version()
    resolved[utils.SPAN_PROPERTY_NAME] = span
    resolved[utils.VERSION_PROPERTY_NAME] = version
    resolved[utils.FINGERPRINT_PROPERTY_NAME] = processor.get_input_fingerprint(span, version)
    for split in config.splits:
        split.pattern = processor.get_pattern_for_span_version(split.pattern, span, version)
    resolved[_INPUT_CONFIG] = proto_utils.proto_to_json(config)
    driver.update_output_artifact(resolved, examples_artifact.mlmd_artifact)
    logging.info("No ExampleGen driver ran: resolved span %s, version %s itself", span, version)
    return resolved


def check_first_record(path: str) -> None:
    """Read one shard's first record as Beam would, raising CorruptShardError naming the shard."""
    import tensorflow as tf

    compressed = path.endswith(".gz")
    with fileio.open(path, "rb") as handle:
        if not compressed and handle.read(2) == _GZIP_MAGIC:
            raise CorruptShardError(
                f"TFRecord shard {path} is GZIP-compressed but its name does not end in .gz, "
                "so it would be read as uncompressed TFRecords; rename it *.gz"
            )
    if not compressed and os.path.splitext(path)[1] in (".bz2", ".deflate", ".zst", ".lzma"):
        return  # Beam decompresses these by name; tf.data can't: Beam's own error will do
    try:
        for _ in tf.data.TFRecordDataset(path, "GZIP" if compressed else "").take(1):
            pass
    except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as exc:
        raise CorruptShardError(
            f"TFRecord shard {path} is not a readable TFRecord file (truncated, corrupted or "
            f"another format): {exc.message.splitlines()[0][:200]}"
        ) from None


def input_patterns(exec_properties: dict) -> list[str]:
    """The full file pattern of each input split."""
    config = proto_utils.json_to_proto(exec_properties[_INPUT_CONFIG], example_gen_pb2.Input())
    base = exec_properties[standard_component_specs.INPUT_BASE_KEY]
    return [os.path.join(base, split.pattern) for split in config.splits]


def check_input_shards(exec_properties: dict) -> None:
    """check_first_record for every shard every split pattern matches."""
    for pattern in input_patterns(exec_properties):
        for path in sorted(fileio.glob(pattern)):
            check_first_record(path)


class SpanResolvingImportExecutor(import_executor.Executor):
    """TFX's ImportExampleGen executor that resolves span specs left unresolved by the runner."""

    def Do(self, input_dict, output_dict, exec_properties):  # noqa: N802  (TFX's name)
        """Resolve {SPAN} like TFX's driver when no driver did, then ingest as TFX does."""
        if has_unresolved_specs(exec_properties[_INPUT_CONFIG]):
            examples = artifact_utils.get_single_instance(
                output_dict[standard_component_specs.EXAMPLES_KEY]
            )
            exec_properties = resolve_like_the_driver(exec_properties, examples)
        check_input_shards(exec_properties)
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
