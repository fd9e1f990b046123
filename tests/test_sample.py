"""The bundled digits sample: counts, labels, layout, and that a new span is new data."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from van_tfx import features
from van_tfx.cli import main
from van_tfx.data.records import read_examples, read_synset_mapping
from van_tfx.data.sample import build_sample


@pytest.fixture(scope="module")
def spans(tmp_path_factory):
    """Span 1 and span 2 of the sample in one data dir."""
    root = tmp_path_factory.mktemp("data")
    first = build_sample(root)
    second = build_sample(root, new_span=True)
    return root, first, second


def records(span_dir, split):
    """All records of one split of a span."""
    return list(read_examples(sorted(span_dir.glob(f"{split}-*-of-*"))))


def test_span_holds_every_digit_with_at_least_300_validation_images(spans):
    _, first, _ = spans
    train, validation = records(first, "train"), records(first, "validation")
    assert len(train) + len(validation) == 1797
    assert len(validation) >= 300
    assert {r[features.SYNSET] for r in validation} == {f"digit_{d}".encode() for d in range(10)}
    assert sorted(p.name for p in first.glob("train-*")) == [
        "train-00000-of-00002",
        "train-00001-of-00002",
    ]


def test_labels_and_texts_follow_the_synset_list(spans):
    _, first, _ = spans
    synsets = read_synset_mapping(first / "synsets.txt")
    assert list(synsets) == [f"digit_{d}" for d in range(10)]
    assert synsets["digit_0"] == "digit zero"
    for record in records(first, "validation"):
        synset = record[features.SYNSET].decode()
        assert record[features.LABEL] == list(synsets).index(synset) + 1
        assert record[features.CLASS_TEXT].decode() == synsets[synset]
        image = Image.open(io.BytesIO(record[features.IMAGE_ENCODED]))
        assert image.mode == "RGB" and image.size == (64, 64)


def test_new_span_has_a_different_split_and_different_renderings(spans):
    _, first, second = spans
    assert (first.name, second.name) == ("span-1", "span-2")
    names = {
        r[features.IMAGE_FILENAME].decode().split("/", 1)[1] for r in records(first, "validation")
    }
    new = {
        r[features.IMAGE_FILENAME].decode().split("/", 1)[1] for r in records(second, "validation")
    }
    assert names != new  # a different seeded draw
    # The same source digit is rendered differently (shift/rotation/contrast) in span 2.
    common = sorted(names & new)[0]
    pixels = []
    for span in (first, second):
        [record] = [
            r
            for r in records(span, "validation")
            if r[features.IMAGE_FILENAME].decode().endswith(common)
        ]
        pixels.append(np.asarray(Image.open(io.BytesIO(record[features.IMAGE_ENCODED])), float))
    assert np.abs(pixels[0] - pixels[1]).mean() > 5


def test_sample_without_new_span_leaves_existing_data_untouched(spans, capsys):
    root, _, second = spans
    before = {p: p.stat().st_mtime_ns for p in second.iterdir()}
    assert main(["data", "sample", str(root)]) == 0
    assert "already present" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in second.iterdir()} == before
    assert sorted(p.name for p in root.iterdir()) == ["span-1", "span-2"]


def test_default_dir_is_under_van_tfx_home(tmp_path, monkeypatch):
    monkeypatch.setenv("VAN_TFX_HOME", str(tmp_path))
    span = build_sample(shards=1)
    assert span == tmp_path / "data" / "span-1"
    assert len(list(span.glob("train-*-of-00001"))) == 1


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["data", "sample", "{dir}", "--shards", "0"], "argument --shards: must be from 1 to 720"),
        (["data", "sample", "{dir}", "--shards", "-2"], "argument --shards: must be from 1 to 720"),
        (["data", "sample", "{dir}", "--shards", "721"], "argument --shards: must be from 1 to"),
        (["data", "sample", "{dir}", "--shards", "two"], "argument --shards: not an integer"),
        (
            ["data", "build", "{dir}", "{dir}/o", "--workers", "-3"],
            "argument --workers: must be >= 1",
        ),
        (
            ["data", "build", "{dir}", "{dir}/o", "--workers", "0"],
            "argument --workers: must be >= 1",
        ),
        (["data", "build", "{dir}", "{dir}/o", "--shards", "0"], "argument --shards: must be >= 1"),
    ],
    ids=[
        "shards0",
        "shards-2",
        "shards721",
        "shards-word",
        "workers-3",
        "workers0",
        "build-shards0",
    ],
)
def test_out_of_range_counts_are_refused_naming_the_flag(tmp_path, capsys, argv, says):
    # --shards 0 / -2 were ZeroDivisionError / IndexError tracebacks; --workers -3 was accepted.
    with pytest.raises(SystemExit) as exit_:
        main([a.format(dir=tmp_path) for a in argv])
    assert exit_.value.code == 2 and says in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_shard_bound_keeps_a_record_in_every_validation_shard():
    from van_tfx.data.cli import SAMPLE_MAX_SHARDS
    from van_tfx.data.sample import VALIDATION_IMAGES

    assert SAMPLE_MAX_SHARDS // 2 == VALIDATION_IMAGES


def test_write_split_keeps_one_shard_file_open_at_a_time(tmp_path):
    # `data sample --shards 400` under `ulimit -n 256` failed with "Too many open files":
    # write_split opened every shard at once.
    import subprocess
    import sys

    script = f"""
import io, os, resource
import tensorflow as tf
from PIL import Image
from van_tfx.data.records import ImageRecord, read_examples, write_split
out = io.BytesIO(); Image.new("RGB", (8, 8)).save(out, "JPEG")
records = [ImageRecord(out.getvalue(), 8, 8, 1, "a", "a", f"a/{{k}}.jpg") for k in range(400)]
used = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 30, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
paths = write_split(records, {str(tmp_path)!r}, "train", 400)
print(len(paths), len(list(read_examples(paths))))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["400", "400"]
