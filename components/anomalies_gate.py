"""AnomaliesGate: a TFX Python-function component that stops the run when data has anomalies.

ExampleValidator only records anomalies; without a gate, Transform and the Trainer would go on to
train on bad data. The gate reads each split's Anomalies proto and raises with one readable line
per anomaly, e.g. "split eval: feature 'image/class/label': Missing feature / out of range".
It also reads each split's statistics: TFDV validates nothing for a split with no examples (it
reports no anomalies, even against `dataset_constraints { min_examples_count }`), so an empty
split is caught here.
"""

import os

from tfx.dsl.component.experimental.annotations import InputArtifact
from tfx.dsl.component.experimental.decorators import component
from tfx.types import artifact_utils
from tfx.types.standard_artifacts import ExampleAnomalies, ExampleStatistics

ANOMALIES_FILE = "SchemaDiff.pb"
STATISTICS_FILE = "FeatureStats.pb"


class DataAnomaliesError(RuntimeError):
    """The data does not match the schema; the message lists every anomaly."""


class ValidationFileError(ValueError):
    """A statistics or anomalies file is unreadable or not its proto; names the file."""


def _read_proto(path: str, message):
    """`message` parsed from the file at `path`; ValidationFileError naming it otherwise."""
    from google.protobuf.message import DecodeError
    from tfx.utils import io_utils

    try:
        message.ParseFromString(io_utils.read_bytes_file(path))
    except DecodeError as exc:  # named no file: "Error parsing message with type ..."
        raise ValidationFileError(
            f"{path} is not a {message.DESCRIPTOR.full_name} proto ({exc})"
        ) from None
    return message


def read_anomalies(anomalies_artifact) -> dict:
    """{split name: tensorflow_metadata Anomalies proto} of an ExampleAnomalies artifact."""
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    result = {}
    for split in artifact_utils.decode_split_names(anomalies_artifact.split_names):
        path = os.path.join(
            artifact_utils.get_split_uri([anomalies_artifact], split), ANOMALIES_FILE
        )
        result[split] = _read_proto(path, anomalies_pb2.Anomalies())
    return result


def empty_splits(statistics_artifact) -> list[str]:
    """The splits of an ExampleStatistics artifact that count no examples."""
    from tensorflow_metadata.proto.v0 import statistics_pb2

    empty = []
    for split in artifact_utils.decode_split_names(statistics_artifact.split_names):
        path = os.path.join(
            artifact_utils.get_split_uri([statistics_artifact], split), STATISTICS_FILE
        )
        stats = _read_proto(path, statistics_pb2.DatasetFeatureStatisticsList())
        if sum(dataset.num_examples for dataset in stats.datasets) == 0:
            empty.append(split)
    return sorted(empty)


def describe_anomalies(split: str, anomalies) -> list[str]:
    """One line per anomalous feature (and for dataset-level anomalies) of one split."""
    lines = []
    for feature in sorted(anomalies.anomaly_info):
        info = anomalies.anomaly_info[feature]
        lines.append(f"split {split}: feature '{feature}': {_summary(info)}")
    if anomalies.HasField("dataset_anomaly_info") and anomalies.dataset_anomaly_info.reason:
        lines.append(f"split {split}: dataset: {_summary(anomalies.dataset_anomaly_info)}")
    return lines


def _summary(info) -> str:
    short = " / ".join(r.short_description for r in info.reason if r.short_description)
    detail = " ".join(r.description for r in info.reason if r.description)
    short = short or info.short_description or "anomaly"
    return f"{short} ({detail})" if detail else short


@component
def AnomaliesGate(  # noqa: N802 (TFX names)
    anomalies: InputArtifact[ExampleAnomalies], statistics: InputArtifact[ExampleStatistics]
) -> None:
    """Fail the pipeline run when any split is empty or ExampleValidator found any anomaly."""
    lines = [
        f"split {split}: no examples (its input files hold no records)"
        for split in empty_splits(statistics)
    ]
    for split, proto in sorted(read_anomalies(anomalies).items()):
        lines.extend(describe_anomalies(split, proto))
    if lines:
        raise DataAnomaliesError(
            "the input data does not match the schema; the run stops before Transform:\n  "
            + "\n  ".join(lines)
        )
