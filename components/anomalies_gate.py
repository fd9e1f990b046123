"""AnomaliesGate: a TFX Python-function component that stops the run when data has anomalies.

ExampleValidator only records anomalies; without a gate, Transform and the Trainer would go on to
train on bad data. The gate reads each split's Anomalies proto and raises with one readable line
per anomaly, e.g. "split eval: feature 'image/class/label': Missing feature / out of range".
"""

import os

from tfx.dsl.component.experimental.annotations import InputArtifact
from tfx.dsl.component.experimental.decorators import component
from tfx.types import artifact_utils
from tfx.types.standard_artifacts import ExampleAnomalies

ANOMALIES_FILE = "SchemaDiff.pb"


class DataAnomaliesError(RuntimeError):
    """The data does not match the schema; the message lists every anomaly."""


def read_anomalies(anomalies_artifact) -> dict:
    """{split name: tensorflow_metadata Anomalies proto} of an ExampleAnomalies artifact."""
    from tensorflow_metadata.proto.v0 import anomalies_pb2
    from tfx.utils import io_utils

    result = {}
    for split in artifact_utils.decode_split_names(anomalies_artifact.split_names):
        path = os.path.join(
            artifact_utils.get_split_uri([anomalies_artifact], split), ANOMALIES_FILE
        )
        anomalies = anomalies_pb2.Anomalies()
        anomalies.ParseFromString(io_utils.read_bytes_file(path))
        result[split] = anomalies
    return result


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
def AnomaliesGate(anomalies: InputArtifact[ExampleAnomalies]) -> None:  # noqa: N802 (TFX names)
    """Fail the pipeline run when ExampleValidator found any anomaly in any split."""
    lines = []
    for split, proto in sorted(read_anomalies(anomalies).items()):
        lines.extend(describe_anomalies(split, proto))
    if lines:
        raise DataAnomaliesError(
            "the input data does not match the schema; the run stops before Transform:\n  "
            + "\n  ".join(lines)
        )
