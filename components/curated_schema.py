"""CuratedSchema: the curated schema, with the label's class count taken from the span being ingested.

TFX's ImportSchemaGen imports a file as it is, so the class count (the label's int_domain max, which
ExampleValidator checks) would have to be written into a copy when the pipeline is built: from the
data a compile machine happens to see, into the data root it must be able to write, and frozen into
every scheduled run compiled from it. This component does it at run time instead, in the pod: it
reads the `synsets.txt` next to the training files of the span the NewDataGate opened the run for
(through tf.io.gfile, so a gs:// data root works) and writes the schema artifact. A new span with
more classes gets a schema that says so; compiling has no side effects.

It takes the gate's decision (span and version), not the Examples artifact: open-source KFP's
launcher downloads every input artifact into the pod before it starts, so an Examples input
would cost a copy of the whole dataset (~146 GB at ImageNet-1k) to read one small file.
"""

import os
import sys
from importlib import resources

import tensorflow as tf
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types.experimental.simple_artifacts import File
from tfx.types.standard_artifacts import Schema

from components.new_data_gate import VERSION_KEY, decided_data, span_pattern
from van_tfx import features
from van_tfx.data.records import SynsetListError, parse_synset_mapping

SCHEMA_FILE = "schema.pbtxt"  # the name TFX components look for in a Schema artifact
SYNSETS_FILE = "synsets.txt"


class SchemaError(ValueError):
    """The curated schema or the data's synset list cannot be used; the message names the file."""


def curated_schema_text(schema_file: str = "") -> str:
    """The curated schema: `schema_file` (local or object storage), else the one shipped here."""
    if not schema_file:
        return resources.files("components").joinpath("schema", SCHEMA_FILE).read_text()
    if not tf.io.gfile.exists(schema_file):
        raise SchemaError(f"data.schema_path {schema_file} does not exist")
    with tf.io.gfile.GFile(schema_file) as handle:
        return handle.read()


def synsets_path(input_base: str, split_pattern: str, span: int, version: int | None) -> str:
    """The synsets.txt beside a span's files: the split pattern's directory, span filled in."""
    pattern = span_pattern(input_base, split_pattern, span, version)
    return os.path.join(os.path.dirname(pattern), SYNSETS_FILE)


def count_synsets(path: str) -> int:
    """Number of synsets a synsets.txt lists (0 if there is none), read as `data build` reads it."""
    # SynsetListError names the file and line of a malformed one.
    if not tf.io.gfile.exists(path):
        return 0
    if tf.io.gfile.isdir(path):
        raise SynsetListError(f"{path}: is a directory, not a synset list")
    with tf.io.gfile.GFile(path, "rb") as handle:
        return len(parse_synset_mapping(handle.read(), path))


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
    raise SchemaError(f"the curated schema has no {features.LABEL!r} feature")


@component
def CuratedSchema(  # noqa: N802  (TFX component names are class-like)
    decision: InputArtifact[File],
    schema: OutputArtifact[Schema],
    input_base: Parameter[str],
    split_pattern: Parameter[str],
    schema_file: Parameter[str] = "",
    num_classes: Parameter[int] = 0,
) -> None:
    """Write the curated schema with the label max of this span (num_classes, else synsets.txt)."""
    text = curated_schema_text(schema_file)
    if not num_classes:
        data = decided_data(decision)
        path = synsets_path(input_base, split_pattern, data["span"], data[VERSION_KEY])
        num_classes = count_synsets(path)
        if not num_classes:
            print(
                f"CuratedSchema: no {path}: labels are only checked to be >= 1 "
                "(set data.num_classes to check the upper bound)",
                file=sys.stderr,
            )
    if num_classes:
        text = with_label_max(text, num_classes)
    tf.io.gfile.makedirs(schema.uri)
    with tf.io.gfile.GFile(os.path.join(schema.uri, SCHEMA_FILE), "w") as handle:
        handle.write(text)
