"""AnomaliesGate's readers on real ExampleStatistics / ExampleAnomalies artifacts whose files
may be damaged: a file that is not its proto is an error naming it, not a bare DecodeError."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorflow_metadata.proto.v0 import statistics_pb2
from tfx.types import artifact_utils, standard_artifacts

from components.anomalies_gate import (
    ANOMALIES_FILE,
    STATISTICS_FILE,
    ValidationFileError,
    empty_splits,
    read_anomalies,
)


def artifact(kind, root, files: dict[str, bytes]):
    """An artifact of `kind` at `root` with one split per entry of `files` (its file's bytes)."""
    made = kind()
    made.uri = str(root)
    made.split_names = artifact_utils.encode_split_names(sorted(files))
    name = STATISTICS_FILE if kind is standard_artifacts.ExampleStatistics else ANOMALIES_FILE
    for split, data in files.items():
        (root / f"Split-{split}").mkdir(parents=True, exist_ok=True)
        (root / f"Split-{split}" / name).write_bytes(data)
    return made


def stats_of(*counts: int) -> bytes:
    """A DatasetFeatureStatisticsList with one dataset per count."""
    stats = statistics_pb2.DatasetFeatureStatisticsList()
    for count in counts:
        stats.datasets.add(num_examples=count)
    return stats.SerializeToString()


def test_the_empty_split_is_found(tmp_path):
    files = {"train": stats_of(3), "eval": stats_of(0)}
    assert empty_splits(artifact(standard_artifacts.ExampleStatistics, tmp_path, files)) == ["eval"]


GARBAGE = b"\x0a\xff\xff\xff\xff\x0f garbage"  # a length-delimited field longer than the file


@pytest.mark.parametrize(
    "kind, read, proto",
    [
        (standard_artifacts.ExampleStatistics, empty_splits, "DatasetFeatureStatisticsList"),
        (standard_artifacts.ExampleAnomalies, read_anomalies, "Anomalies"),
    ],
    ids=["statistics", "anomalies"],
)
def test_a_file_that_is_not_its_proto_is_an_error_naming_it(tmp_path, kind, read, proto):
    # Before: google.protobuf.message.DecodeError "Error parsing message with type ...".
    made = artifact(kind, tmp_path, {"train": stats_of(1), "eval": GARBAGE})
    with pytest.raises(ValidationFileError, match=f"is not a tensorflow.metadata.v0.{proto}"):
        read(made)
    with pytest.raises(ValidationFileError, match="Split-eval"):
        read(made)


@given(data=st.binary(max_size=40))
@settings(max_examples=200, deadline=None)
def test_any_statistics_file_is_read_or_an_error_naming_it(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("stats")
    made = artifact(standard_artifacts.ExampleStatistics, root, {"train": data})
    try:
        found = empty_splits(made)
    except ValidationFileError as exc:
        assert str(root / "Split-train" / STATISTICS_FILE) in str(exc)
        return
    parsed = statistics_pb2.DatasetFeatureStatisticsList.FromString(data)
    assert found == ([] if sum(d.num_examples for d in parsed.datasets) else ["train"])
