"""`van-tfx demo`'s last stage: predictions printed from a real server, and its flag's bounds."""

from __future__ import annotations

import pytest

from pipeline.demo import DEMO_BATCH, serve_and_predict
from serving import testing
from van_tfx.cli import main
from van_tfx.config import Config


def test_demo_prints_the_asked_number_of_predictions_across_batches(tmp_path):
    # Before: only the first batch's rows were printed, under a header counting more.
    base = tmp_path / "serving" / "van"
    testing.export(testing.build_tiny_model(), str(base), 1)
    config = Config.model_validate({"serving": {"base_path": str(base)}})
    image = testing.encode_image((200, 10, 10))
    records = [(image, testing.SYNSETS[i % 2]) for i in range(DEMO_BATCH + 6)]
    lines: list[str] = []
    top1 = serve_and_predict(config, records, DEMO_BATCH + 3, lines.append)
    assert lines[0].endswith(f"; {DEMO_BATCH + 3} predictions:")
    rows = [line for line in lines if line.startswith(("  ok ", "  BAD"))]
    assert len(rows) == DEMO_BATCH + 3
    assert top1 == pytest.approx(sum(r.startswith("  ok ") for r in rows[:2]) / 2)


@pytest.mark.parametrize("value", ["-1", "x"])
def test_demo_refuses_a_prediction_count_that_is_not_a_count(capsys, value):
    # Before: -1 ran the whole pipeline, then printed "-1 predictions:" and all rows but one.
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--num-predictions", value])
    assert exited.value.code == 2
    assert "argument --num-predictions: " in capsys.readouterr().err
