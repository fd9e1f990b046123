"""metrics.json and training_curves.png after training, from a history.csv that a killed run,
or anything else, may have left damaged: the PNG is skipped with a warning naming the file and
line, never the Trainer failed after its model was exported."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from van_trainer import train

HEADER = "epoch,accuracy,loss,val_accuracy,val_loss\n"
ROWS = "".join(f"{e},0.{e + 1},1.{9 - e},0.{e},1.{8 - e}\n" for e in range(5))


def report(run_dir, history: bytes | None, caplog):
    """write_run_report over `history` as history.csv; returns the warnings it logged."""
    run_dir.mkdir(exist_ok=True)
    if history is not None:
        (run_dir / train.HISTORY_CSV).write_bytes(history)
    (run_dir / train.CURVES_PNG).unlink(missing_ok=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=train.log.name):
        train.write_run_report(str(run_dir), {"final": {"accuracy": 0.5}})
    assert json.loads((run_dir / train.METRICS_JSON).read_text()) == {"final": {"accuracy": 0.5}}
    return [r.getMessage() for r in caplog.records]


def test_a_whole_history_is_plotted(tmp_path, caplog):
    assert report(tmp_path, (HEADER + ROWS).encode(), caplog) == []
    assert (tmp_path / train.CURVES_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_value_keeps_its_own_rows_epoch(tmp_path, caplog):
    # Before, empty values were dropped and the rest slid onto earlier epochs; CSVLogger's
    # "NA" (a value not logged) raised ValueError out of the Trainer.
    history = HEADER + "0,0.1,1.9,NA,\n1,0.2,1.8,0.3,1.6\n"
    assert report(tmp_path, history.encode(), caplog) == []
    read = train._read_history(str(tmp_path / train.HISTORY_CSV))
    assert read["val_accuracy"] == ([2], [0.3]) and read["val_loss"] == ([2], [1.6])
    assert read["loss"] == ([1, 2], [1.9, 1.8])


@pytest.mark.parametrize(
    "history, problem",
    [
        # A run killed mid-row, its restart appending the next row to the cut one.
        (HEADER + "0,0.1,1.9,0.0,1.8\n1,0.2" + "0,0.3,1.7,0.2,1.6\n", "line 3: more fields"),
        (HEADER + "0,abc,1.9,0.0,1.8\n", "line 2: accuracy is 'abc', not a number"),
        (HEADER + ",0.1,1.9,0.0,1.8\n", "line 2: epoch is '', not a number"),
        (HEADER + "0.5,0.1,1.9,0.0,1.8\n", "line 2: epoch is '0.5'"),
        (HEADER.encode() + b"0,0.1,1.9,\xff,1.8\n", "is not UTF-8"),
        (HEADER + "0,1,1,1,1\n" * (train.MAX_HISTORY_ROWS + 1), "more than 100000 rows"),
        (HEADER + '0,"' + "1" * 200_000 + '",1,1,1\n', "field larger than field limit"),
    ],
    ids=[
        "cut row continued",
        "not a number",
        "no epoch",
        "half an epoch",
        "not UTF-8",
        "too many rows",
        "huge field",
    ],
)
def test_a_damaged_history_skips_the_plot_naming_the_file_and_line(
    tmp_path, caplog, history, problem
):
    # Before: TypeError / ValueError / UnicodeDecodeError / csv.Error out of the Trainer,
    # after the export, so TFX failed a trained run.
    history = history if isinstance(history, bytes) else history.encode()
    [warning] = report(tmp_path, history, caplog)
    assert str(tmp_path / train.HISTORY_CSV) in warning and problem in warning
    assert not (tmp_path / train.CURVES_PNG).exists()


def test_a_history_over_the_size_limit_is_not_read(tmp_path, caplog):
    path = tmp_path / train.HISTORY_CSV
    with open(path, "wb") as handle:  # sparse: 1 GiB declared, nothing written
        handle.truncate(1 << 30)
    [warning] = report(tmp_path, None, caplog)
    assert f"is over {train.MAX_HISTORY_BYTES} bytes" in warning


@given(
    st.lists(
        st.lists(st.sampled_from(["0", "1.5", "", "NA", "nan", "x", '"', "1,2", "\r"]), max_size=7),
        max_size=6,
    )
)
# caplog is cleared by report() for each example.
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_history_is_plotted_or_skipped_with_a_warning(tmp_path_factory, caplog, rows):
    run_dir = tmp_path_factory.mktemp("run")
    text = HEADER + "".join(",".join(row) + "\n" for row in rows)
    warnings = report(run_dir, text.encode(), caplog)
    assert (run_dir / train.CURVES_PNG).exists() != bool(warnings)
    assert all(str(run_dir / train.HISTORY_CSV) in w for w in warnings)
