"""Ingestion and validation components: ExampleGen, StatisticsGen, schema, validator, gate.

Split names are 'train' and 'eval' everywhere downstream. The curated schema lives next to this
file; its label domain max (the number of classes) is filled in from the data's synset list when
the pipeline is built, so no class count is hard-coded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tfx import v1 as tfx
from tfx.proto import example_gen_pb2

from van_tfx import storage
from van_tfx.config import DataConfig
from van_tfx.data.sample import existing_spans
from van_trainer import features

CURATED_SCHEMA = Path(__file__).resolve().parent / "schema" / "schema.pbtxt"
SYNSETS_FILE = "synsets.txt"
DERIVED_SCHEMA_DIR = "_schema"  # under the data root; ExampleGen's patterns never match it
TRAIN_SPLIT = "train"
EVAL_SPLIT = "eval"
_SPAN_DIR = "span-{SPAN}/"


class DerivedSchemaError(RuntimeError):
    """The schema with the label max filled in cannot be written; the message names the path."""


def split_patterns(config: DataConfig) -> dict[str, str]:
    """File patterns of the train and eval splits, relative to the data root.

    The plain layout drops the `span-{SPAN}/` directory from the configured patterns, so
    `data.layout=plain` alone reads <root>/train-* and <root>/validation-*.
    """
    patterns = {TRAIN_SPLIT: config.train_pattern, EVAL_SPLIT: config.eval_pattern}
    if config.layout == "plain":
        patterns = {k: p.replace(_SPAN_DIR, "") for k, p in patterns.items()}
        for name, pattern in patterns.items():
            if "{SPAN}" in pattern:
                raise ValueError(
                    f"data.layout=plain but the {name} pattern {pattern!r} uses {{SPAN}}"
                )
    return patterns


def input_config(config: DataConfig) -> example_gen_pb2.Input:
    """ImportExampleGen's input config: splits 'train' and 'eval' (latest span by default)."""
    return example_gen_pb2.Input(
        splits=[
            example_gen_pb2.Input.Split(name=name, pattern=pattern)
            for name, pattern in split_patterns(config).items()
        ]
    )


def example_gen(config: DataConfig, data_root: str) -> tfx.components.ImportExampleGen:
    """ImportExampleGen over the data root's TFRecords, splits 'train' and 'eval'."""
    return tfx.components.ImportExampleGen(
        input_base=str(data_root), input_config=input_config(config)
    )


def statistics_gen(example_gen_component) -> tfx.components.StatisticsGen:
    """Per-split statistics of the raw examples."""
    return tfx.components.StatisticsGen(examples=example_gen_component.outputs["examples"])


def schema_importer(config: DataConfig, data_root: str) -> tfx.components.ImportSchemaGen:
    """ImportSchemaGen of the curated schema, with the label domain max taken from the data."""
    return tfx.components.ImportSchemaGen(schema_file=schema_file(config, data_root))


def example_validator(
    statistics_gen_component, schema_component
) -> tfx.components.ExampleValidator:
    """Validate each split's statistics against the curated schema."""
    return tfx.components.ExampleValidator(
        statistics=statistics_gen_component.outputs["statistics"],
        schema=schema_component.outputs["schema"],
    )


def anomalies_gate(example_validator_component):
    """The gate that fails the run, with a readable summary, when any split has anomalies."""
    from components.anomalies_gate import AnomaliesGate

    return AnomaliesGate(anomalies=example_validator_component.outputs["anomalies"])


# ---- the schema actually imported -------------------------------------------------------------


def schema_file(config: DataConfig, data_root: str) -> str:
    """Path of the schema to import: the curated one, with the label max set when it is known.

    The class count comes from data.num_classes when set, else from the synsets.txt of the
    newest span (or of the root, for the plain layout). When neither is readable at build time
    (e.g. a gs:// root while compiling for Kubeflow) the curated schema is used as is: labels
    are then only checked to be >= 1, and Transform still rejects unknown synsets. The derived
    schema is written under the data root, which may be object storage (the pods read it there).
    """
    curated = Path(config.schema_path) if config.schema_path else CURATED_SCHEMA
    num_classes = config.num_classes or count_synsets(config, data_root)
    if not num_classes:
        return str(curated)
    text = with_label_max(curated.read_text(), num_classes)
    # Content-addressed: ImportSchemaGen caches on the path, so a changed schema needs a new one.
    # A plain string join: Path() would collapse gs:// to gs:/ and write on this machine.
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    target = os.path.join(str(data_root), DERIVED_SCHEMA_DIR, digest, "schema.pbtxt")
    write_once(target, text)
    return target


def write_once(path: str, text: str) -> None:
    """Write `text` to `path` unless it exists; local or object storage (tf.io.gfile)."""
    import tensorflow as tf

    try:
        if tf.io.gfile.exists(path):
            return
        tf.io.gfile.makedirs(os.path.dirname(path))
        tmp = path + ".tmp"
        with tf.io.gfile.GFile(tmp, "w") as handle:
            handle.write(text)
        tf.io.gfile.rename(tmp, path, overwrite=True)  # readers never see half a schema
    except tf.errors.OpError as exc:
        reason = str(exc.message).strip().splitlines()[0]
        raise DerivedSchemaError(
            f"cannot write the schema with the data's class count to {path}: {reason}. "
            "The pipeline's ImportSchemaGen reads it from there: give this machine write access "
            "to the data root, or set data.num_classes=0 to import the curated schema as is."
        ) from None


def count_synsets(config: DataConfig, data_root: str) -> int:
    """Number of lines of the newest span's synsets.txt (0 when there is none to read here)."""
    root = Path(data_root)
    if storage.is_remote(data_root) or not root.is_dir():
        return 0
    directory = root
    if config.layout == "spans":
        spans = existing_spans(root)
        if not spans:
            return 0
        directory = root / f"span-{spans[-1]}"
    synsets = directory / SYNSETS_FILE
    if not synsets.exists():
        return 0
    return sum(1 for line in synsets.read_text().splitlines() if line.strip())


def with_label_max(schema_text: str, num_classes: int) -> str:
    """The schema text with the label's int_domain max set to num_classes."""
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    schema = text_format.Parse(schema_text, schema_pb2.Schema())
    for feature in schema.feature:
        if feature.name == features.LABEL:
            feature.int_domain.min = 1
            feature.int_domain.max = num_classes
            return text_format.MessageToString(schema)
    raise ValueError(f"the curated schema has no {features.LABEL!r} feature")
