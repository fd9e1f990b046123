"""NewVersionPusher: TFX's Pusher executor run for real, on a local serving dir and on ram://.

Each push here is `NewVersionPusher().Do` on real artifacts (blessings, a PushedModel output, a
real SavedModel carrying the smoke test's training-data record), as the pipeline runs it. The
versions already in the serving directory are what TFX's executor gets wrong: a higher version
(named in milliseconds) that keeps every clock-named push from being served, and a version at the
current second that TFX skips and still records as this run's push.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid

import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tfx.proto import pusher_pb2
from tfx.types.standard_artifacts import InfraBlessing, ModelBlessing, PushedModel
from tfx.utils import path_utils, proto_utils

from components.new_data_gate import (
    decide,
    newest_served_version,
    read_training_data,
    training_data_path,
)
from components.pusher import (
    CLAIM_PREFIX,
    NewVersionPusher,
    NoVersionLeftError,
    choose_version,
    claim_version,
    push_new_version,
)
from pipeline.local import mlmd_properties
from pipeline.outcome import RunArtifact, summarize
from serving.manager import INT64_MAX
from van_tfx import storage

MILLISECOND_VERSION = "1733400000000"  # a hand push named in milliseconds: 1000x the clock


def ram_root() -> str:
    """A fresh ram:// directory: TensorFlow's in-process file system, reached like a bucket."""
    return f"ram://van-tfx-push-{uuid.uuid4().hex}"


@pytest.fixture(params=["local", "ram"])
def root(request, tmp_path) -> str:
    """Where a test keeps its artifacts and serving base path: this disk, or a bucket stand-in."""
    return str(tmp_path) if request.param == "local" else ram_root()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> str:
    """A real SavedModel (saved_model.pb, variables/, fingerprint.pb)."""

    class Scale(tf.Module):
        def __init__(self):
            self.factor = tf.Variable(2.0)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def __call__(self, x):
            return x * self.factor

    path = str(tmp_path_factory.mktemp("model") / "saved")
    tf.saved_model.save(Scale(), path)
    return path


def files(directory: str) -> dict[str, bytes]:
    """Every file under `directory` (that exists: see storage.copy_tree on ram://) and its bytes."""
    found = {}
    for parent, _, names in tf.io.gfile.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            if tf.io.gfile.exists(path):
                with tf.io.gfile.GFile(path, "rb") as handle:
                    found[os.path.relpath(path, directory)] = handle.read()
    return found


class Run:
    """One pipeline run's Pusher inputs and output: its smoke-tested model, its blessings, and
    the PushedModel artifact the executor fills in."""

    def __init__(self, root: str, saved_model: str, name: str, blessed: bool = True):
        self.name = name
        self.model_blessing = ModelBlessing()
        self.model_blessing.uri = f"{root}/Evaluator/blessing/{name}"
        self.model_blessing.set_int_custom_property("blessed", int(blessed))
        # What ServingSmokeTest leaves: the candidate plus its training-data record.
        self.infra_blessing = InfraBlessing()
        self.infra_blessing.uri = f"{root}/ServingSmokeTest/blessing/{name}"
        self.infra_blessing.set_int_custom_property("blessed", 1)
        self.infra_blessing.set_int_custom_property("has_model", 1)
        model_dir = path_utils.stamped_model_path(self.infra_blessing.uri)
        storage.copy_tree(saved_model, model_dir)
        self.record = {"span": 1, "input_fingerprint": f"fingerprint of {name}"}
        storage.write_text(training_data_path(model_dir), json.dumps(self.record))
        self.pushed = PushedModel()
        self.pushed.uri = f"{root}/Pusher/pushed_model/{name}"

    def push(self, base: str, executor=NewVersionPusher) -> None:
        """Run the Pusher executor's Do on this run's artifacts, pushing to `base`."""
        destination = pusher_pb2.PushDestination(
            filesystem=pusher_pb2.PushDestination.Filesystem(base_directory=base)
        )
        executor().Do(
            {"model_blessing": [self.model_blessing], "infra_blessing": [self.infra_blessing]},
            {"pushed_model": [self.pushed]},
            {"push_destination": proto_utils.proto_to_json(destination)},
        )

    def outcome(self):
        """The run outcome `van-tfx run` prints, read from the PushedModel as MLMD stores it."""
        artifact = RunArtifact(
            "PushedModel", self.pushed.uri, mlmd_properties(self.pushed.mlmd_artifact)
        )
        return summarize({"PushedModel": [artifact]}, span=1, run_id=self.name)


def other_model(base: str, name: str, saved_model: str) -> dict[str, bytes]:
    """Put another run's complete model (no training record) at `<base>/<name>`; its files."""
    storage.copy_tree(saved_model, f"{base}/{name}")
    storage.write_text(f"{base}/{name}/assets.extra/pushed_by", f"someone else, as {name}")
    return files(f"{base}/{name}")


def assert_pushed_this_run(run: Run, base: str) -> int:
    """Check the outcome names the version holding this run's model, served; return it."""
    outcome = run.outcome()
    assert outcome.pushed
    version = outcome.pushed_version
    assert outcome.pushed_path == f"{base}/{version}"
    assert read_training_data(outcome.pushed_path) == run.record
    # The highest complete version: what TF Serving serves, and what the next run's gate finds
    # this run's training record in (so the same data is not trained on again).
    assert newest_served_version(base) == version
    train, why, served = decide(run.record, base)
    assert (train, served) == (False, version), why
    assert not [n for n in tf.io.gfile.listdir(outcome.pushed_path) if n.startswith(CLAIM_PREFIX)]
    return int(version)


def test_push_lands_above_a_higher_millisecond_version(root, saved_model, caplog):
    base = f"{root}/serving/van"
    before = other_model(base, MILLISECOND_VERSION, saved_model)
    run = Run(root, saved_model, "run1")
    with caplog.at_level(logging.WARNING):
        run.push(base)
    version = assert_pushed_this_run(run, base)
    assert version == int(MILLISECOND_VERSION) + 1
    assert files(f"{base}/{MILLISECOND_VERSION}") == before
    # The log says why the version is not the clock's, naming the higher version.
    assert f"Pushing as version {version}, above the clock" in caplog.text
    assert f"{base}/{MILLISECOND_VERSION} is a higher version" in caplog.text


def test_a_version_at_the_clock_is_left_alone_and_the_push_gets_a_new_number(root, saved_model):
    base = f"{root}/serving/van"
    now = int(time.time())
    # Another push this second (and the next few, whichever second Do's clock reads).
    existing = {str(v): other_model(base, str(v), saved_model) for v in range(now, now + 5)}
    run = Run(root, saved_model, "run1")
    run.push(base)
    version = assert_pushed_this_run(run, base)
    assert str(version) not in existing and version > now + 4
    for name, contents in existing.items():
        assert files(f"{base}/{name}") == contents


def test_concurrent_pushes_each_get_their_own_version(root, saved_model):
    # Every pusher picks the same number (one above the millisecond version, whatever the
    # clock): only one may have it, and each outcome names the version holding its model.
    base = f"{root}/serving/van"
    other_model(base, MILLISECOND_VERSION, saved_model)
    runs = [Run(root, saved_model, f"run{i}") for i in range(3)]
    start = threading.Barrier(len(runs))
    errors = []

    def push(run):
        start.wait()
        try:
            run.push(base)
        except Exception as exc:  # reported below, with the thread's run
            errors.append((run.name, exc))

    threads = [threading.Thread(target=push, args=(run,)) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    versions = []
    for run in runs:
        outcome = run.outcome()
        assert outcome.pushed and outcome.pushed_path == f"{base}/{outcome.pushed_version}"
        assert read_training_data(outcome.pushed_path) == run.record
        assert int(outcome.pushed_version) > int(MILLISECOND_VERSION)
        versions.append(outcome.pushed_version)
    assert len(set(versions)) == len(runs)
    assert int(newest_served_version(base)) == max(map(int, versions))
    for version in versions:
        assert files(f"{base}/{version}").keys() == files(f"{base}/{versions[0]}").keys()


def test_no_version_left_above_int64_max_is_refused_naming_it(root, saved_model):
    base = f"{root}/serving/van"
    other_model(base, str(INT64_MAX - 1), saved_model)
    first = Run(root, saved_model, "run1")
    first.push(base)
    assert assert_pushed_this_run(first, base) == INT64_MAX  # the last one TF Serving can read
    second = Run(root, saved_model, "run2")
    with pytest.raises(NoVersionLeftError, match=f"^{base}: version '{INT64_MAX}' is int64's max"):
        second.push(base)
    assert sorted(tf.io.gfile.listdir(base)) == sorted([str(INT64_MAX - 1), str(INT64_MAX)])
    assert not second.pushed.has_custom_property("pushed")


def test_an_unblessed_model_is_not_pushed(root, saved_model):
    base = f"{root}/serving/van"
    run = Run(root, saved_model, "run1", blessed=False)
    run.push(base)
    assert not run.outcome().pushed
    assert not tf.io.gfile.exists(base)


def test_a_claimed_or_written_version_is_not_claimed_again(root):
    version_dir = f"{root}/serving/van/1800000000"
    claim = claim_version(version_dir)
    assert claim is not None
    assert claim_version(version_dir) is None  # someone else's claim is there
    tf.io.gfile.remove(claim)
    storage.write_text(f"{version_dir}/variables/variables.index", "a hand push")
    assert claim_version(version_dir) is None  # someone else's files are there
    assert tf.io.gfile.listdir(version_dir) in (["variables"], ["variables/"])


def test_a_failed_copy_leaves_no_version_behind(root):
    base = f"{root}/serving/van"
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        push_new_version(f"{root}/no-model", base)
    assert tf.io.gfile.listdir(base) == []


# ------------------------------------------------------------------------------ the rule itself

# TF Serving's version names (safe_strto64), written out independently of serving.manager.
_VERSION = re.compile(r"[ \t\n\v\f\r]*(-?[0-9]+)[ \t\n\v\f\r]*")


def as_version(name: str) -> int | None:
    """The int64 a child name stands for to TF Serving, or None."""
    match = _VERSION.fullmatch(name)
    value = int(match.group(1)) if match else None
    return value if value is not None and -(2**63) <= value <= INT64_MAX else None


NOW = int(time.time())
numbers = st.one_of(
    st.integers(NOW - 10, NOW + 10),  # seconds around the clock
    st.integers(NOW * 1000 - 5, NOW * 1000 + 5),  # milliseconds
    st.integers(-(2**70), 2**70),  # any length, int64's range and beyond
    st.integers(INT64_MAX - 3, INT64_MAX + 3),
)
numeric_names = st.builds(
    lambda number, zeros, pad: f"{pad}{'0' * zeros}{number}{pad}",
    numbers,
    st.integers(0, 2),
    st.sampled_from(["", "", " ", "\t"]),
)
other_names = st.one_of(
    st.sampled_from(["1e3", "+5", "0x10", "²", "٣", "12a", "-", "tmp-push", ".van_tfx_rejected"]),
    st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), max_size=8),
).filter(lambda name: name not in ("", ".", ".."))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.one_of(numeric_names, other_names), st.booleans(), max_size=8))
def test_the_pushed_version_is_numeric_new_and_above_every_existing_one(children):
    # Each child a file (False) or a directory (True): TF Serving counts both as versions.
    base = tempfile.mkdtemp(prefix="van-tfx-push-")
    model = tempfile.mkdtemp(prefix="van-tfx-model-")
    try:
        for name, is_dir in children.items():
            path = os.path.join(base, name)
            if is_dir:
                os.mkdir(path)
            else:
                with open(path, "w") as handle:
                    handle.write(name)
        existing = [v for v in map(as_version, children) if v is not None]
        with open(os.path.join(model, "saved_model.pb"), "w") as handle:
            handle.write("pb")
        if INT64_MAX in existing:
            with pytest.raises(NoVersionLeftError, match=str(INT64_MAX)):
                push_new_version(model, base)
            assert sorted(os.listdir(base)) == sorted(children)
            return
        clock = int(time.time())
        version, path = push_new_version(model, base)
        after = int(time.time())
        assert as_version(str(version)) == version  # numeric, within int64
        assert str(version) not in children  # new
        assert version >= clock and all(version > v for v in existing)  # above every one
        assert version <= max(after, max(existing, default=after) + 1)  # and no higher
        assert os.listdir(path) == ["saved_model.pb"]  # the model, no claim left
        assert sorted(os.listdir(base)) == sorted([*children, str(version)])
    finally:
        shutil.rmtree(base)
        shutil.rmtree(model)


@given(
    st.lists(st.tuples(st.integers(-(2**63), INT64_MAX - 1), st.text(max_size=3))),
    st.integers(0, 2**40),
)
def test_choose_version_is_the_clock_or_one_above_the_highest(children, now):
    version, higher = choose_version(children, now)
    highest = max((v for v, _ in children), default=None)
    if highest is None or highest < now:
        assert (version, higher) == (now, None)
    else:
        assert version == highest + 1
        assert higher == max(children)[1]
