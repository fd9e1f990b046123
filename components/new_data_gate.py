"""NewDataGate: a run ingests and trains only when its data differs from what the served model learned.

The gate is the first task of the pipeline. It resolves the span ImportExampleGen would ingest
(TFX's own FileBasedInputProcessor: newest `{SPAN}`, and the input fingerprint of its files: names,
sizes, mtimes) and compares it with the record the served model carries,
`<serving_base_path>/<newest version>/assets.extra/van_training_data.json`, which ServingSmokeTest
writes into the copy Pusher pushes. Every other task runs under `Cond(new_data == 1)`, so an idle
scheduled run costs one listing of the span's files, not a copy of the dataset, its statistics and
a Transform pass (what ImportExampleGen, StatisticsGen and Transform would spend on unchanged data).

TFX caching cannot do this job: after a push the baseline (the served model) is a new Trainer input,
so an idle night would retrain and usually push again, night after night. The decision carries
`new_data` (1/0), a readable `reason`, the span and fingerprint it saw, and `served_version`, the
version the ServedModel baseline then copies (so the comparison and the baseline refer to one model).

The gate reads state outside its inputs (the data root and the serving directory), so it must never
be served from a cache: the local runner and the Kubeflow compiler both switch caching off for it.
"""

import json
import os
import sys

import tensorflow as tf
from tfx.dsl.component.experimental.annotations import OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types.experimental.simple_artifacts import File

from serving.manager import list_versions
from van_tfx import storage

GATE_ID = "NewDataGate"
DECISION_OUTPUT = "decision"
# A first-party TFX type: KFP v2 maps it to `tfx.File`; a custom type would need its import path
# as a one-dot schema title.
DECISION_TYPE_NAME = File.TYPE_NAME
NEW_DATA_KEY = "new_data"  # int custom property of the decision: 1 train, 0 skip
REASON_KEY = "reason"
SPAN_KEY = "span"
FINGERPRINT_KEY = "input_fingerprint"  # the name ImportExampleGen's driver uses
SERVED_VERSION_KEY = "served_version"  # "" when nothing is served
DECISION_FILE = "decision.json"
TRAINING_DATA_FILE = "van_training_data.json"  # next to TF Serving's warmup file
_ASSETS_EXTRA = "assets.extra"


class TrainingDataRecordError(ValueError):
    """A served model's training-data record is unreadable; the message names the file."""


def data_to_ingest(input_base: str, input_config_json: str) -> dict:
    """Span and input fingerprint of what ImportExampleGen would ingest now (TFX's own logic)."""
    from tfx.components.example_gen import input_processor
    from tfx.proto import example_gen_pb2
    from tfx.utils import proto_utils

    config = proto_utils.json_to_proto(input_config_json, example_gen_pb2.Input())
    processor = input_processor.FileBasedInputProcessor(input_base, config.splits, None)
    span, version = processor.resolve_span_and_version()
    return {
        "span": span,
        "input_fingerprint": processor.get_input_fingerprint(span, version),
    }


def training_data(examples) -> dict:
    """What identifies the data in an Examples artifact: span, input fingerprint, URI."""
    return {
        "span": examples_span(examples),
        "input_fingerprint": examples.get_string_custom_property(FINGERPRINT_KEY),
        "examples_uri": examples.uri,
    }


def examples_span(examples) -> int:
    """The span of an Examples artifact (a custom property locally, maybe a property on KFP)."""
    if examples.has_custom_property(SPAN_KEY):
        return examples.get_int_custom_property(SPAN_KEY)
    # The KFP v2 entrypoint turns artifact metadata whose key is a declared property (Examples
    # declares `span`) into that property rather than a custom one.
    return int(examples.span or 0)


def training_data_path(model_dir: str) -> str:
    """Where a pushed model keeps the record of the data it was trained on."""
    return os.path.join(model_dir, _ASSETS_EXTRA, TRAINING_DATA_FILE)


def write_training_data(model_dir: str, examples) -> None:
    """Record in `model_dir` which data (span, fingerprint, URI) the model was trained on."""
    storage.write_text(training_data_path(model_dir), json.dumps(training_data(examples), indent=2))


def newest_served_version(serving_base_path: str) -> str | None:
    """The version TF Serving would serve: the highest integer dir holding saved_model.pb."""
    # The model server's own listing: a version still being pushed (no saved_model.pb yet, the
    # Pusher copies it last) is not served, so it is not what the data is compared with.
    versions = list_versions(serving_base_path)
    return str(versions[-1]) if versions else None


def read_training_data(model_dir: str) -> dict | None:
    """The training-data record of a pushed model; None for a model pushed without one."""
    path = training_data_path(model_dir)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as handle:
        text = handle.read()
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrainingDataRecordError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(record, dict) or not {"span", "input_fingerprint"} <= set(record):
        raise TrainingDataRecordError(
            f"{path} must hold a JSON object with 'span' and 'input_fingerprint', got {text[:200]!r}"
        )
    return record


def decide(current: dict, serving_base_path: str, force: bool = False) -> tuple[bool, str, str]:
    """(train?, why, served version or "") for data `current` against the newest served model."""
    span = current["span"]
    version = newest_served_version(serving_base_path)
    if force:
        return True, f"retraining forced (retrain_on_same_data) on span {span}", version or ""
    if version is None:
        return True, f"no model is served from {serving_base_path} yet: train on span {span}", ""
    record = read_training_data(os.path.join(serving_base_path, version))
    if record is None:
        why = (
            f"served version {version} has no {_ASSETS_EXTRA}/{TRAINING_DATA_FILE}, so what it "
            f"was trained on is unknown: train on span {span}"
        )
        return True, why, version
    if record["span"] != span:
        newer = "new data" if span > record["span"] else "other data"
        why = f"{newer}: span {span}; served version {version} was trained on span {record['span']}"
        return True, why, version
    if record["input_fingerprint"] != current["input_fingerprint"]:
        why = (
            f"span {span} changed (different files, sizes or mtimes) since served version "
            f"{version} was trained on it"
        )
        return True, why, version
    why = (
        f"span {span} with the same input fingerprint is what served version {version} was "
        "trained on"
    )
    return False, why, version


def has_new_data(gate):
    """The predicate for tfx.dsl.Cond: the gate decided this run has data worth training on."""
    return gate.outputs[DECISION_OUTPUT].future()[0].custom_property(NEW_DATA_KEY) == 1


@component
def NewDataGate(  # noqa: N802  (TFX component names are class-like)
    decision: OutputArtifact[File],
    input_base: Parameter[str],
    input_config: Parameter[str],
    serving_base_path: Parameter[str],
    force: Parameter[int] = 0,  # an int, not a bool: the local and KFP compilers encode it alike
) -> None:
    """Set decision.new_data to 1 when the newest span differs from the served model's, else 0."""
    current = data_to_ingest(input_base, input_config)
    new_data, reason, served_version = decide(current, serving_base_path, bool(force))
    decision.set_int_custom_property(NEW_DATA_KEY, int(new_data))
    decision.set_string_custom_property(REASON_KEY, reason)
    decision.set_int_custom_property(SPAN_KEY, current["span"])
    decision.set_string_custom_property(FINGERPRINT_KEY, current["input_fingerprint"])
    decision.set_string_custom_property(SERVED_VERSION_KEY, served_version)
    summary = {NEW_DATA_KEY: int(new_data), REASON_KEY: reason, **current}
    summary[SERVED_VERSION_KEY] = served_version
    storage.write_text(os.path.join(decision.uri, DECISION_FILE), json.dumps(summary, indent=2))
    skipped = "" if new_data else "; every later step is skipped"
    print(f"NewDataGate: {reason}{skipped}", file=sys.stderr)
