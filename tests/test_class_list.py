"""The training split's class list: one analysis pass, label order, records named when it breaks."""

from __future__ import annotations

import tempfile

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from hypothesis import example, given
from hypothesis import strategies as st

from van_tfx import features
from van_trainer import preprocessing
from van_trainer.class_list import ClassListError, class_list, first_name, pairs_in_batch


def pairs(*items: tuple[int, bytes, bytes]) -> list:
    return [((label, synset), name) for label, synset, name in items]


def test_the_list_is_in_label_order_whatever_the_synsets_sort_order():
    listed = class_list(pairs((2, b"a", b"x.jpg"), (1, b"z", b"y.jpg"), (3, b"m", b"w.jpg")))
    assert listed == [b"z", b"a", b"m"]


def test_a_batch_gives_each_distinct_pair_once_with_its_smallest_filename():
    batch = (
        np.array([[1], [2], [1], [1]]),
        np.array([[b"n1"], [b"n2"], [b"n1"], [b"n1"]]),
        np.array([[b"c.jpg"], [b"b.jpg"], [b"a.jpg"], [b"d.jpg"]]),
    )
    assert sorted(pairs_in_batch(batch)) == [((1, b"n1"), b"a.jpg"), ((2, b"n2"), b"b.jpg")]


def test_a_pair_is_named_by_a_filename_whenever_one_of_its_records_has_one():
    # b'' is a record without image/filename: it sorts first but locates nothing (before, it
    # named the pair, and the records of that pair that had a filename went unnamed).
    batch = (
        np.array([[1], [1], [2], [2]]),
        np.array([[b"n1"], [b"n1"], [b"n2"], [b"n2"]]),
        np.array([[b""], [b"b.jpg"], [b""], [b""]]),
    )
    assert sorted(pairs_in_batch(batch)) == [((1, b"n1"), b"b.jpg"), ((2, b"n2"), b"")]
    assert first_name([b"", b"z.jpg", b"", b"y.jpg"]) == b"y.jpg"
    assert first_name([b"", b""]) == b""


def test_a_pair_without_any_filename_is_named_by_its_label_and_synset():
    # Before, by "<no image/filename>, ..., image/encoded of N bytes", which costs the analysis
    # pass every image's bytes; the label and synset it repeated already name the pair.
    with pytest.raises(ClassListError) as failure:
        class_list(pairs((1, b"n1", b""), (1, b"n2", b"b.jpg")))
    assert (
        "labels with more than one synset: label 1 with synset n1 (no record of it has an "
        "image/filename); label 1 with synset n2 (record image/filename = b.jpg)"
    ) in str(failure.value)


@pytest.mark.parametrize(
    "items, says",
    [
        (
            [(1, b"n1", b"a.jpg"), (1, b"n2", b"b.jpg"), (2, b"n3", b"c.jpg")],
            "labels with more than one synset: label 1 with synset n1 (record image/filename "
            "= a.jpg); label 1 with synset n2 (record image/filename = b.jpg)",
        ),
        (
            [(1, b"n1", b"a.jpg"), (2, b"n1", b"b.jpg")],
            "synsets with more than one label: label 1 with synset n1",
        ),
        # Before, the list went on past the highest label: "2, 3, 5, 6, ... 21".
        ([(1, b"n1", b"a.jpg"), (4, b"n4", b"b.jpg")], "no record in the training split: 2, 3 (2 of 1..4"),
        (
            [(1, b"n1", b"a.jpg"), (4_000_000_000, b"n4", b"b.jpg")],
            "no record in the training split: 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, "
            "16, 17, 18, 19, 20, 21 ... (3999999998 of 1..4000000000",
        ),
        ([(0, b"n0", b"a.jpg"), (1, b"n1", b"b.jpg")], "labels below 1: label 0 with synset n0"),
        ([(1, b"n\n1", b"a.jpg")], "synsets with line breaks or not UTF-8 text: label 1 with synset n\n1"),
        # Before, Transform passed it and the Trainer's export failed after training.
        ([(1, b"\xff\xfedigit", b"a.jpg")], "not UTF-8 text: label 1 with synset \\xff\\xfedigit"),
        ([], "has no records"),
    ],
    ids=["two-synsets", "two-labels", "gap", "huge-label", "zero", "newline", "not-utf8", "empty"],
)  # fmt: skip
def test_a_broken_class_list_is_refused_naming_records(items, says):
    with pytest.raises(ClassListError, match=None) as failure:
        class_list(pairs(*items))
    assert says in str(failure.value)


def test_a_declared_class_with_no_training_record_is_refused_even_at_the_top():
    # Labels 1..2 of 3 declared: before, a 2-class list, and a model of one class fewer.
    items = pairs((1, b"n1", b"a.jpg"), (2, b"n2", b"b.jpg"))
    assert class_list(items) == [b"n1", b"n2"]
    with pytest.raises(ClassListError) as failure:
        class_list(items, declared=3)
    assert "labels with no record in the training split: 3 (1 of 1..3" in str(failure.value)
    with pytest.raises(ClassListError) as failure:
        class_list(items, declared=1)
    assert "labels beyond the 1 classes the schema declares: label 2" in str(failure.value)


@given(
    st.lists(
        st.tuples(st.integers(-2, 12), st.sampled_from([b"a", b"b", b"c", b"d", b"e", b""])),
        max_size=20,
    ),
    st.none() | st.integers(1, 8),
)
@example([(1, b"a"), (2, b"b"), (1, b"a")], None)
@example([(1, b"a"), (2, b"b")], 3)
def test_the_list_exists_exactly_when_labels_are_1_to_n_one_to_one(raw, declared):
    items = pairs(*[(label, synset, f"{i}.jpg".encode()) for i, (label, synset) in enumerate(raw)])
    distinct = {(label, synset) for label, synset in raw}
    labels = {label for label, _ in distinct}
    valid = (
        bool(distinct)
        and labels == set(range(1, len(labels) + 1))
        and len(distinct) == len(labels) == len({synset for _, synset in distinct})
        and all(synset for _, synset in distinct)
        and declared in (None, len(labels))
    )
    first = {}
    for key, name in items:
        first[key] = min(first.get(key, name), name)
    if valid:
        listed = class_list(list(first.items()), declared)
        assert all(listed[label - 1] == synset for label, synset in distinct)
    else:
        with pytest.raises(ClassListError):
            class_list(list(first.items()), declared)


def analysis_phases(preprocessing_fn) -> list[str]:
    """The analysis phases tf.Transform plans for `preprocessing_fn` over the raw schema."""
    spec = {
        features.IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string),
        features.IMAGE_FILENAME: tf.io.FixedLenFeature([], tf.string),
        features.LABEL: tf.io.FixedLenFeature([], tf.int64),
        features.SYNSET: tf.io.FixedLenFeature([], tf.string),
    }
    pipeline = beam.Pipeline()
    with tft_beam.Context(temp_dir=tempfile.mkdtemp()):
        raw = pipeline | beam.Create([])
        _ = (raw, tft.DatasetMetadata.from_feature_spec(spec)) | tft_beam.AnalyzeDataset(
            preprocessing_fn
        )
    names = {t.unique_name for t in pipeline.to_runner_api().components.transforms.values()}
    return sorted({n.split("/")[1] for n in names if "/ApplySavedModel[Phase" in n})


def test_transform_reads_the_training_split_once_to_analyze_it():
    # Besides the pass that transforms it: the class list is found in the same pass as anything
    # else the preprocessing_fn analyzes (the weighted vocabulary needed a second one).
    assert analysis_phases(preprocessing.preprocessing_fn) == ["ApplySavedModel[Phase0]"]


def tfx_type_specs() -> dict:
    """The raw features' TypeSpecs as TFX's Transform derives them (the curated schema, tfx_bsl)."""
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2
    from tfx_bsl.public import tfxio

    from components.curated_schema import curated_schema_text

    schema = text_format.Parse(curated_schema_text(), schema_pb2.Schema())
    source = tfxio.TFExampleRecord(file_pattern=tempfile.mkdtemp(), schema=schema)
    return source.TensorAdapter().OriginalTypeSpecs()


def test_the_analysis_pass_decodes_no_image_bytes():
    # TFX's Transform decodes for its analysis pass the columns TFT names here (and only
    # those): before, image/encoded too, ~146 GB at ImageNet-1k for ~1,000 (label, synset) pairs.
    specs = tfx_type_specs()
    analyzed = tft.get_analyze_input_columns(preprocessing.preprocessing_fn, specs)
    assert set(analyzed) == {features.LABEL, features.SYNSET, features.IMAGE_FILENAME}
    # The transform pass still gets all the checks read (TFX projects it to these).
    transformed = tft.get_transform_input_columns(preprocessing.preprocessing_fn, specs)
    assert set(transformed) == {
        features.IMAGE_ENCODED,
        features.LABEL,
        features.SYNSET,
        features.IMAGE_FILENAME,
    }
