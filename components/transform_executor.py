"""TFX's Transform executor, writing each transformed split as fixed-size shards with its count.

Two things TFX 1.16's Transform cannot be told: how many files a split is written to (its
`WriteToTFRecord` leaves that to the runner: one file per bundle, so the DirectRunner writes one
or two, which N training workers cannot share without each reading everything), and how many
examples it wrote (the Trainer would have to count them: a full pass over the data on every
worker). This executor is TFX's own, except that the transformed examples go through
`van_tfx.data.shard_writer.WriteShards` (`data.examples_per_shard` records per file; the split's
count lands in the transform graph at `example_counts/<split>.json`, which the Trainer receives).

TFX's `Executor.Do` builds its `TransformProcessor` by name, with no hook for the writer, so the
processor class is swapped for ours during `Do` only.
"""

from __future__ import annotations

import contextlib
import json
import os

import apache_beam as beam
from tfx.components.transform import executor as tfx_transform
from tfx.components.transform import labels
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import io_utils

from van_tfx import features
from van_tfx.data.shard_writer import WriteShards
from van_tfx.data.shards import example_count_path
from van_trainer.preprocessing import DECLARED_CLASSES_KEY

# Matches van_tfx.config.DataConfig.examples_per_shard's default (used when custom_config has none).
DEFAULT_EXAMPLES_PER_SHARD = 1024
_SPLIT_PREFIX = "Split-"
# TFX's class, kept before _processor_class swaps the module's name for ours during Do.
_TFX_PROCESSOR = tfx_transform.TransformProcessor


def examples_per_shard(exec_properties: dict) -> int:
    """data.examples_per_shard from the component's custom_config (a JSON string in TFX)."""
    raw = exec_properties.get(standard_component_specs.CUSTOM_CONFIG_KEY) or "{}"
    config = json.loads(raw) if isinstance(raw, str) else dict(raw)
    return int((config.get("data") or {}).get("examples_per_shard", DEFAULT_EXAMPLES_PER_SHARD))


def split_of(output_path: str) -> str:
    """'train' from TFX's materialisation prefix '<uri>/Split-train/transformed_examples'."""
    folder = os.path.basename(os.path.dirname(output_path.rstrip("/")))
    return folder[len(_SPLIT_PREFIX) :] if folder.startswith(_SPLIT_PREFIX) else folder


class ShardingTransformProcessor(_TFX_PROCESSOR):
    """TFX's processor, with TFRecord materialisation through WriteShards."""

    def __init__(self, per_shard: int):
        super().__init__()
        self._per_shard = per_shard
        self._transform_dir = ""

    def Transform(self, inputs, outputs, status_file=None):  # noqa: N802  (TFX's name)
        """TFX's Transform, remembering the transform graph directory the counts go to."""
        self._transform_dir = outputs[labels.TRANSFORM_METADATA_OUTPUT_PATH_LABEL]
        return super().Transform(inputs, outputs, status_file)

    def _EncodeAndWrite(self, schema, file_format, output_path):  # noqa: N802
        if file_format != labels.FORMAT_TFRECORD:
            return _TFX_PROCESSOR._EncodeAndWrite(
                schema=schema, file_format=file_format, output_path=output_path
            )
        count_path = example_count_path(self._transform_dir, split_of(output_path))
        return _EncodeAndWriteShards(schema, output_path, self._per_shard, count_path)


class _EncodeAndWriteShards(beam.PTransform):
    def __init__(self, schema, prefix: str, per_shard: int, count_path: str):
        super().__init__()
        self._schema = schema
        self._prefix = prefix
        self._per_shard = per_shard
        self._count_path = count_path

    def expand(self, batches):
        return (
            batches
            | "EncodeAndSerialize"
            >> beam.ParDo(_TFX_PROCESSOR._RecordBatchToExamplesFn(self._schema))
            | "ExtractExamples" >> beam.Values()
            | "WriteShards" >> WriteShards(self._prefix, self._per_shard, self._count_path)
        )


@contextlib.contextmanager
def _processor_class(factory):
    original = tfx_transform.TransformProcessor
    tfx_transform.TransformProcessor = factory
    try:
        yield
    finally:
        tfx_transform.TransformProcessor = original


class ShardingTransformExecutor(tfx_transform.Executor):
    """TFX's Transform executor; transformed splits are written by ShardingTransformProcessor."""

    def Do(self, input_dict, output_dict, exec_properties):  # noqa: N802  (TFX's name)
        """TFX's Do, with the sharding processor in place of TFX's and the schema's class count."""
        # The schema's class count is handed to the preprocessing_fn.
        per_shard = examples_per_shard(exec_properties)
        schema = artifact_utils.get_single_uri(input_dict[standard_component_specs.SCHEMA_KEY])
        exec_properties = with_declared_classes(exec_properties, declared_classes(schema))
        with _processor_class(lambda: ShardingTransformProcessor(per_shard)):
            return super().Do(input_dict, output_dict, exec_properties)


def declared_classes(schema_dir: str) -> int | None:
    """The class count the schema declares (the label's int_domain max), or None."""
    schema = io_utils.SchemaReader().read(io_utils.get_only_uri_in_dir(schema_dir))
    for feature in schema.feature:
        if feature.name == features.LABEL and feature.HasField("int_domain"):
            return feature.int_domain.max or None
    return None


def with_declared_classes(exec_properties: dict, count: int | None) -> dict:
    """exec_properties whose custom_config carries `declared_classes`."""
    # The class list must have that many entries, so a class with no training record fails
    # Transform, not a model of one class fewer (a missing top label left no gap below the highest
    # one seen).
    if count is None:
        return exec_properties
    raw = exec_properties.get(standard_component_specs.CUSTOM_CONFIG_KEY) or "{}"
    config = json.loads(raw) if isinstance(raw, str) else dict(raw)
    config[DECLARED_CLASSES_KEY] = count
    return {**exec_properties, standard_component_specs.CUSTOM_CONFIG_KEY: json.dumps(config)}
