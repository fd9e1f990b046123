"""The class list of a training split in one analysis pass: label i's synset on line i - 1.

TFT's vocabulary orders its entries by frequency, so label order (= sorted synset order) needs
weights that depend on each label's count, i.e. a second analysis phase that reads the whole
training split again (~146 GB at ImageNet-1k) only to order ~1,000 strings. This Beam analyzer,
run through `tft.experimental.ptransform_analyzer`, reduces the split to its distinct
(label, synset) pairs in the same pass as any other analyzer, checks that they are the list
1..N one-to-one, and writes that list as the `synsets` vocabulary file (TFTransformOutput's
`vocabulary_by_name` finds it by that name). A record that breaks the list is named by its
image/filename (the smallest one among those with the offending pair), or, where no record of
the pair has one, by the pair alone: a name read from the image (its size) would make TFX's
analysis pass read every image's bytes (van_trainer/preprocessing.py).
"""

from __future__ import annotations

import itertools
import os
import uuid

import apache_beam as beam
import numpy as np
from tensorflow_transform.beam.experimental.analyzer_impls import PTransformAnalyzer

from van_tfx import features

# What the vocabulary file holds before analysis (TFT's own placeholder for vocabularies).
PLACEHOLDER = b"TEMPORARY_ASSET_VALUE"
# Pairs named in one error message; the rest are counted.
_NAMED = 5


class ClassListError(ValueError):
    """The training split's labels and synsets are not the list 1..N, one-to-one."""


def pairs_in_batch(batch) -> list[tuple[tuple[int, bytes], bytes]]:
    """((label, synset), first_name of its image/filenames) for each distinct pair of a batch."""
    labels, synsets, filenames = (np.asarray(column).reshape(-1) for column in batch)
    first: dict[tuple[int, bytes], bytes] = {}
    for label, synset, filename in zip(
        labels.tolist(), synsets.tolist(), filenames.tolist(), strict=True
    ):
        key = (label, synset)
        first[key] = first_name((first[key], filename)) if key in first else filename
    return list(first.items())


def first_name(filenames) -> bytes:
    """The smallest non-empty image/filename among `filenames`, b'' if all are empty."""
    # b'' (no image/filename) sorts first, yet locates nothing: any real name beats it.
    return min(filenames, key=lambda name: (not name, name))


def _text(value: bytes) -> str:
    return value.decode("utf-8", "backslashreplace")[:200]


def _record(name: bytes) -> str:
    if not name:
        return "no record of it has an image/filename"
    return f"record image/filename = {_text(name)}"


def _named(pairs: list[tuple[tuple[int, bytes], bytes]]) -> str:
    shown = [
        f"label {label} with synset {_text(synset)} ({_record(name)})"
        for (label, synset), name in sorted(pairs)[:_NAMED]
    ]
    more = len(pairs) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def class_list(
    pairs: list[tuple[tuple[int, bytes], bytes]], declared: int | None = None
) -> list[bytes]:
    """The synsets in label order, from every distinct (label, synset) pair of the split."""
    # They must number `declared` classes when the schema declares a count.
    if not pairs:
        raise ClassListError("the training split has no records: there is no class list")
    by_label: dict[int, list] = {}
    by_synset: dict[bytes, list] = {}
    for pair in pairs:
        (label, synset), _ = pair
        by_label.setdefault(label, []).append(pair)
        by_synset.setdefault(synset, []).append(pair)
    problems = []
    shared = [p for group in by_label.values() if len(group) > 1 for p in group]
    if shared:
        problems.append(f"labels with more than one synset: {_named(shared)}")
    reused = [p for group in by_synset.values() if len(group) > 1 for p in group]
    if reused:
        problems.append(f"synsets with more than one label: {_named(reused)}")
    below = [p for p in pairs if p[0][0] < 1]
    if below:
        problems.append(f"labels below 1: {_named(below)}")
    # One synset per line of the vocabulary file: an empty one or one with a line break can't
    # be, and the exported model's class names are text.
    unwritable = [p for p in pairs if not _is_writable(p[0][1])]
    if unwritable:
        problems.append(
            f"empty synsets, synsets with line breaks or not UTF-8 text: {_named(unwritable)}"
        )
    top = max(max(by_label), declared or 0)
    # Counted, never listed in full: one stray label of 4e9 must not build a 4e9-entry range.
    missing_count = top - sum(1 for label in by_label if 1 <= label <= top)
    if missing_count > 0:
        absent = (n for n in range(1, top + 1) if n not in by_label)
        first = list(itertools.islice(absent, 20))
        listed = ", ".join(map(str, first)) + (" ..." if missing_count > len(first) else "")
        problems.append(
            f"labels with no record in the training split: {listed} ({missing_count} of "
            f"1..{top}; every class needs training images)"
        )
    if declared is not None and top > declared:
        beyond = [p for p in pairs if p[0][0] > declared]
        problems.append(
            f"labels beyond the {declared} classes the schema declares: {_named(beyond)}"
        )
    if problems:
        raise ClassListError(
            f"{features.LABEL} and {features.SYNSET} of the training split must number the "
            f"classes 1..N, one synset per label: {' | '.join(problems)}"
        )
    return [by_label[label][0][0][1] for label in range(1, top + 1)]  # top == len(by_label)


def _is_writable(synset: bytes) -> bool:
    if not synset or b"\n" in synset or b"\r" in synset:
        return False
    try:
        synset.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class ClassList(PTransformAnalyzer):
    """Batches of (labels, synsets, filenames) -> the class list file's path, or its length."""

    def __init__(self, output: str, declared: int | None = None):
        super().__init__()
        if output not in ("path", "count"):
            raise ValueError(f"output must be 'path' or 'count', got {output!r}")
        self._output = output
        self._declared = declared  # the schema's class count, which the list must have

    def expand(self, batches):
        """Distinct pairs of the whole split, checked, as one file path or one count."""
        listed = (
            batches
            | "PairsPerBatch" >> beam.FlatMap(pairs_in_batch)
            | "FirstRecordPerPair" >> beam.CombinePerKey(first_name)
            | "AllPairs" >> beam.combiners.ToList()
            | "ClassList" >> beam.Map(class_list, self._declared)
        )
        if self._output == "count":
            return listed | "Count" >> beam.Map(lambda names: np.int64(len(names)))
        return listed | "Write" >> beam.Map(write_class_list, self.base_temp_dir)


def write_class_list(names: list[bytes], base_temp_dir: str) -> bytes:
    """Write the synsets one per line as <temp>/<unique>/synsets; returns the path."""
    import tensorflow as tf

    # A directory of its own: the file must be named like the vocabulary for TFT to find it,
    # and a retried bundle must not overwrite a file another attempt returned.
    directory = os.path.join(base_temp_dir, f"class_list_{uuid.uuid4().hex}")
    tf.io.gfile.makedirs(directory)
    path = os.path.join(directory, features.SYNSET_VOCABULARY)
    with tf.io.gfile.GFile(path, "wb") as handle:
        handle.write(b"".join(name + b"\n" for name in names))
    return path.encode()
