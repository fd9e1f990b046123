"""An exported model's class list (assets.extra/van.classes.txt) read back as untrusted input.

The warm start gives the base model's classifier rows to this run's classes only when the base
model's list is this run's, and the Evaluator compares with the served model only then: a list
read wrongly (a cut last line dropped, a name twice) or without bound (a file of a billion
lines) must be an error naming the file, and that error must make only the classifier fresh.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.served_model import class_list_change
from van_tfx.config import load_config
from van_trainer import export, train
from van_trainer.model import build_van, training_implementation


def served(directory, data: bytes):
    """An export directory holding only `data` as its class list."""
    path = directory / export.CLASS_LIST_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(directory)


def written(names: list[str]) -> bytes:
    """The bytes export_serving_model writes for `names`."""
    return "".join(f"{name}\n" for name in names).encode("utf-8")


# What the writer can write: class_list.py refuses empty synsets and line breaks.
NAMES = st.lists(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), min_size=1),
    unique=True,
    min_size=1,
    max_size=20,
)


@st.composite
def damaged_lists(draw):
    """A written list cut short, with a name repeated, or with bytes spliced in."""
    data = written(draw(NAMES))
    at = draw(st.integers(0, len(data)))
    return data[:at] + draw(st.binary(max_size=8)) + data[at + draw(st.integers(0, 8)) :]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A directory the Hypothesis examples rewrite."""
    return tmp_path_factory.mktemp("class_list")


@given(names=NAMES)
@settings(max_examples=100, deadline=None)
def test_every_list_the_exporter_writes_reads_back_as_it_was(scratch, names):
    assert export.read_class_list(served(scratch, written(names))) == names


@given(data=st.binary(max_size=60) | damaged_lists() | NAMES.map(lambda n: written(n + n[:1])))
@settings(max_examples=300, deadline=None)
def test_any_bytes_read_as_a_list_that_writes_back_to_them_or_are_refused(scratch, data):
    # Before: "n01\nn02" read as ["n01"] (the cut name dropped), b"" and b"\n\n" as lists with
    # nothing or empty names, "a\na\n" as a list giving two rows to one class.
    try:
        names = export.read_class_list(served(scratch, data))
    except export.ClassListFileError as exc:
        assert "van.classes.txt is not a class list" in str(exc)
        return
    assert written(names) == data
    assert names and all(names) and len(set(names)) == len(names)


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"n01\nn02", "its last line has no newline"),
        (b"", "it is empty"),
        (b"n01\n\nn02\n", "line 2 is ''"),
        (b"n01\r\nn02\r\n", r"line 1 is 'n01\\r'"),
        (b"n01\nn02\nn01\n", "'n01' is on more than one line"),
        (b"n01\xff\n", "not UTF-8"),
        (b"a\n" * (export.MAX_CLASSES + 1), f"{export.MAX_CLASSES} lines"),
    ],
    ids=["cut", "empty", "empty name", "CRLF", "duplicate", "not UTF-8", "too many classes"],
)
def test_a_damaged_class_list_is_refused_naming_the_file(tmp_path, data, problem):
    with pytest.raises(export.ClassListFileError, match=problem) as err:
        export.read_class_list(served(tmp_path, data))
    assert str(tmp_path / export.CLASS_LIST_PATH) in str(err.value)


def test_a_huge_class_list_is_refused_having_read_only_the_limit(tmp_path):
    # Before: read whole and split (a 300 MB file of newlines held 5 GB); this 1 GiB file is
    # sparse, and what is read is capped at MAX_CLASS_LIST_BYTES + 1.
    path = tmp_path / export.CLASS_LIST_PATH
    path.parent.mkdir(parents=True)
    with open(path, "wb") as handle:
        handle.truncate(1 << 30)
    with pytest.raises(
        export.ClassListFileError, match=f"over {export.MAX_CLASS_LIST_BYTES} bytes"
    ):
        export.read_class_list(str(tmp_path))


def test_a_directory_in_place_of_the_class_list_is_refused_naming_it(tmp_path):
    (tmp_path / export.CLASS_LIST_PATH).mkdir(parents=True)  # before: a TF error traceback
    with pytest.raises(export.ClassListFileError, match="van.classes.txt is unreadable"):
        export.read_class_list(str(tmp_path))


@pytest.mark.parametrize("data", [b"n0\nn1\nn2", b"n0\nn1\nn1\n", b"n0\xff\n", None])
def test_a_damaged_base_class_list_warm_starts_all_but_the_classifier(tmp_path, caplog, data):
    # docs/trainer.md: a base model whose class list can't say which class each row is gets a
    # fresh classifier; the rest is warm-started. Before, a directory there ended the run.
    config = load_config(None, ["model.variant=tiny", "model.image_size=32"])
    base = tmp_path / "served"
    stock = build_van("tiny", 3, (32, 32, 3), implementation=training_implementation(False))
    rng = np.random.default_rng(0)
    stock.set_weights([rng.standard_normal(w.shape).astype("float32") for w in stock.weights])
    (base / "assets.extra").mkdir(parents=True)
    stock.save_weights(export.keras_weights_path(str(base)))
    if data is None:
        (base / export.CLASS_LIST_PATH).mkdir()
    else:
        served(base, data)
    model = train.build_model(config, 3)
    head = model.get_layer("head").get_weights()
    with caplog.at_level(logging.INFO, logger=train.log.name):
        assert train.load_initial_weights(model, config, 3, str(base), ["n0", "n1", "n2"])
    assert "class list is unusable" in caplog.text and "van.classes.txt" in caplog.text
    for got, want in zip(model.get_layer("head").get_weights(), head, strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(
        model.get_layer("patch_embed1.proj").get_weights(),
        stock.get_layer("patch_embed1.proj").get_weights(),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)


def test_a_damaged_served_class_list_drops_the_baseline_saying_why(tmp_path):
    candidate = served(tmp_path / "candidate", b"n0\nn1\n")
    baseline = served(tmp_path / "baseline", b"n0\nn1\nn1\n")  # before: "another order"
    why = class_list_change(candidate, baseline, "7")
    assert "served version 7's class list is unusable" in why
    assert "'n1' is on more than one line" in why and "eval.min_top1 alone" in why
