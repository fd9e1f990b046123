"""The Trainer's resume checkpoint (<model_run_dir>/backup) read back as untrusted input: a real
tf_keras checkpoint, written by the Trainer's own callbacks before a simulated kill, then
damaged on disk. A checkpoint that can't be restored is an error naming the directory, never
a bare TF error or a silent start from step 0."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensor_bundle import declare_string_length, header, read_entries, write_index

from van_tfx.config import load_config
from van_trainer import checkpoint_index, optim, train

CONFIG = load_config(None, ["train.checkpoint_every_steps=1"])
KILLED_AT = 3  # steps done before the simulated kill
DATA = np.ones((32, 4), "float32"), np.ones((32, 3), "float32")


class Killed(Exception):
    """Stands for the SIGKILL that leaves a backup behind."""


class KillAt(keras.callbacks.Callback):
    """Stop training by an exception once KILLED_AT steps are done (and checkpointed)."""

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == KILLED_AT:
            raise Killed


def model_of(width: int = 8) -> keras.Model:
    """A small compiled model: the checkpoint's format does not depend on the model's size."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(width), keras.layers.Dense(3)])
    model.compile("sgd", "mse")
    return model


def fit(run_dir, model=None, extra=()) -> list:
    """model.fit with the Trainer's callbacks for run_dir; returns the callbacks."""
    callbacks = train.build_callbacks(CONFIG, str(run_dir), lambda step: 0.1, True)
    (model or model_of()).fit(
        *DATA, batch_size=4, epochs=2, callbacks=callbacks + list(extra), verbose=0
    )
    return callbacks


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A run directory as a run killed after KILLED_AT steps leaves it."""
    run_dir = tmp_path_factory.mktemp("killed") / "model_run"
    with pytest.raises(Killed):
        fit(run_dir, extra=[KillAt()])
    assert list((run_dir / train.BACKUP_DIR / "chief").glob("ckpt-*.index"))
    return run_dir


def copy_of(killed_run, tmp_path):
    """A fresh copy of the killed run's directory to damage."""
    run_dir = tmp_path / "model_run"
    shutil.copytree(killed_run, run_dir)
    return run_dir


def test_an_intact_checkpoint_resumes_where_the_run_was_killed(killed_run, tmp_path):
    callbacks = fit(copy_of(killed_run, tmp_path))
    assert callbacks[1].initial_step == KILLED_AT


def _cut_data(chief):
    [data] = chief.glob("ckpt-*.data-*")
    data.write_bytes(data.read_bytes()[:10])


def _no_index(chief):
    [index] = chief.glob("ckpt-*.index")
    index.unlink()


def _garbage_state(chief):
    (chief / "checkpoint").write_text("garbage")


DAMAGE = {
    "cut data file": (_cut_data, "_CHECKPOINTABLE_OBJECT_GRAPH lies past the end of its data", {}),
    "index removed": (_no_index, "NotFoundError", {}),
    "state file garbage": (_garbage_state, "state file `checkpoint` names no checkpoint", {}),
    "another model's": (lambda chief: None, "declares shape [8] where the model's", {"width": 16}),
}


@pytest.mark.parametrize("damage, problem, model", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_checkpoint_that_cant_be_restored_is_an_error_naming_the_backup(
    killed_run, tmp_path, damage, problem, model
):
    # Before: IndexError, ValueError and NotFoundError tracebacks naming no run directory, and
    # a garbage state file started the run again from step 0 without a word.
    run_dir = copy_of(killed_run, tmp_path)
    damage(run_dir / train.BACKUP_DIR / "chief")
    with pytest.raises(train.ResumeCheckpointError) as err:
        fit(run_dir, model_of(**model))
    message = str(err.value)
    assert problem in message
    assert f"remove {run_dir / train.BACKUP_DIR} to train this run from its first step" in message


@given(
    which=st.sampled_from(["index", "data"]),
    spots=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1),
)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_damaged_checkpoint_resumes_or_is_an_error_naming_the_backup(
    killed_run, tmp_path_factory, which, spots
):
    run_dir = copy_of(killed_run, tmp_path_factory.mktemp("fuzz"))
    [path] = (run_dir / train.BACKUP_DIR / "chief").glob(f"ckpt-*.{which}*")
    data = bytearray(path.read_bytes())
    for where, byte in spots:
        data[int(where * len(data))] = byte
    path.write_bytes(bytes(data))
    try:
        callbacks = fit(run_dir)
    except train.ResumeCheckpointError as exc:
        assert str(run_dir / train.BACKUP_DIR) in str(exc)
    else:  # the bytes changed were not read, or were the same
        assert callbacks[1].initial_step == KILLED_AT


# --------------------------------------------------------------------------- declared shapes
# A checkpoint's .index declares each tensor's shape and dtype, and TF allocates that shape
# before reading any data. Hostile checkpoints are written by TF itself (SaveV2): an entry saved
# as slices of a larger tensor gets the larger shape in the index, with only the slices as data.

BIAS = "model/layer_with_weights-0/bias/.ATTRIBUTES/VARIABLE_VALUE"  # shape [8] in model_of()


def rewrite(chief, key, value=None, full_shape=(), slice_rows=1):
    """Save the checkpoint in `chief` again with `key` (new or not) as `value` or `full_shape`."""
    # full_shape: the first dimension is saved as slices of slice_rows rows, all the same
    # tensor (so writing costs one slice), the other dimensions whole.
    latest = tf.train.latest_checkpoint(str(chief))
    reader = tf.train.load_checkpoint(latest)
    dtypes = reader.get_variable_to_dtype_map()
    names, specs, tensors = [], [], []
    for name in sorted({*reader.get_variable_to_shape_map(), key}):
        if name != key:
            names.append(name), specs.append(""), tensors.append(reader.get_tensor(name))
        elif value is not None:
            names.append(name), specs.append(""), tensors.append(value)
        else:
            rows = tf.zeros([slice_rows, *full_shape[1:]], dtypes.get(name, tf.float32))
            whole = " ".join(str(d) for d in full_shape)
            for start in range(0, min(full_shape[0], 64 * slice_rows), slice_rows):
                spec = ":".join([f"{start},{slice_rows}"] + ["-"] * (len(full_shape) - 1))
                names.append(name), specs.append(f"{whole} {spec}"), tensors.append(rows)
    for path in tf.io.gfile.glob(latest + ".*"):
        tf.io.gfile.remove(path)
    tf.raw_ops.SaveV2(prefix=latest, tensor_names=names, shape_and_slices=specs, tensors=tensors)
    return latest


def refusal_of(run_dir) -> str:
    """The ResumeCheckpointError message fitting model_of() in run_dir gives."""
    with pytest.raises(train.ResumeCheckpointError) as err:
        fit(run_dir)
    message = str(err.value)
    assert f"remove {run_dir / train.BACKUP_DIR} to train this run from its first step" in message
    return message


def refusal_and_peak_rss_growth(run_dir) -> tuple[str, int]:
    """(The ResumeCheckpointError message, peak RSS growth in MiB) of fit() in a new process."""
    script = f"""
import resource, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_resume_checkpoint import fit
from van_trainer import train
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    fit({str(run_dir)!r})
except train.ResumeCheckpointError as exc:
    print(exc)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    done = subprocess.run(
        [sys.executable, "-B", "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    *message, growth_mib = done.stdout.strip().splitlines()
    assert f"remove {run_dir / train.BACKUP_DIR} to train this run from its first step" in (
        "\n".join(message)
    )
    return "\n".join(message), int(growth_mib)


def test_a_checkpoint_declaring_a_huge_shape_is_refused_from_its_index(killed_run, tmp_path):
    # Before: the 8 TiB allocation failed in TF's allocator (its dump in the log) and the error
    # was about slices; a shape TF could allocate was allocated (see the RSS test below).
    run_dir = copy_of(killed_run, tmp_path)
    rewrite(run_dir / train.BACKUP_DIR / "chief", BIAS, full_shape=(2**31, 2**10))
    message = refusal_of(run_dir)
    assert f"{BIAS} declares shape [2147483648, 1024] where the model's " in message
    assert "/bias:0 has shape [8]" in message
    assert str(run_dir / train.BACKUP_DIR / "chief") in message


def test_a_checkpoint_declaring_a_huge_shape_is_refused_before_any_big_allocation(
    killed_run, tmp_path
):
    # 512 MiB declared and present as data (64 slices of the same 8 MiB, the file made sparse:
    # 8 KB on disk). Before: restoring grew the process by ~1.1 GiB (read twice: once by the
    # check that every value is readable, once by tf_keras) before tf_keras refused the shape.
    run_dir = copy_of(killed_run, tmp_path)
    chief = run_dir / train.BACKUP_DIR / "chief"
    latest = rewrite(chief, BIAS, full_shape=(2**27,), slice_rows=2**21)
    [data] = Path(latest).parent.glob(Path(latest).name + ".data-*")
    sparse = data.with_suffix(".sparse")
    with data.open("rb") as source, sparse.open("wb") as target:
        while chunk := source.read(1 << 20):
            if chunk.count(0) == len(chunk):
                target.seek(len(chunk), 1)
            else:
                target.write(chunk)
        target.truncate()
    sparse.replace(data)
    message, growth_mib = refusal_and_peak_rss_growth(run_dir)
    assert f"{BIAS} declares shape [134217728] where the model's " in message
    print(f"\npeak RSS growth refusing a 512 MiB entry: {growth_mib} MiB")
    assert int(growth_mib) < 200  # reading the entry needs >= 512 MiB


WRONG = {
    "small shape": (np.zeros(9, "float32"), "declares shape [9] where the model's "),
    "dtype": (np.zeros(8, "float64"), "declares dtype float64 where the model's "),
    "scalar": (np.float32(0), "declares shape [] where the model's "),
}


@pytest.mark.parametrize("value, problem", WRONG.values(), ids=WRONG.keys())
def test_an_entry_unlike_the_models_variable_is_refused_naming_it(
    killed_run, tmp_path, value, problem
):
    # Before: refused only once TF had allocated and read the entry, in TF's words
    # ("Received incompatible tensor with shape (9,) when attempting to restore variable with
    # shape (8,)"; "{{function_node __wrapped__RestoreV2_dtypes_9_device_...}} expected dtype
    # float does not equal original dtype double").
    run_dir = copy_of(killed_run, tmp_path)
    rewrite(run_dir / train.BACKUP_DIR / "chief", BIAS, value=value)
    message = refusal_of(run_dir)
    assert f"{BIAS} {problem}" in message
    assert "/bias:0 has " in message


def test_an_entry_the_model_has_no_variable_for_is_refused_naming_it(killed_run, tmp_path):
    run_dir = copy_of(killed_run, tmp_path)
    chief = run_dir / train.BACKUP_DIR / "chief"
    rewrite(chief, "model/extra/.ATTRIBUTES/VARIABLE_VALUE", full_shape=(2**40,))
    assert "model/extra/.ATTRIBUTES/VARIABLE_VALUE (shape [1099511627776]) is not a variable " in (
        refusal_of(run_dir)
    )


def test_a_checkpoint_lacking_one_of_the_models_variables_is_refused_naming_it(
    killed_run, tmp_path
):
    # Before: tf_keras restored the other entries and kept this variable's fresh value silently.
    run_dir = copy_of(killed_run, tmp_path)
    chief = run_dir / train.BACKUP_DIR / "chief"
    latest = tf.train.latest_checkpoint(str(chief))
    reader = tf.train.load_checkpoint(latest)
    kept = sorted(name for name in reader.get_variable_to_shape_map() if name != BIAS)
    tensors = [reader.get_tensor(name) for name in kept]
    for path in tf.io.gfile.glob(latest + ".*"):
        tf.io.gfile.remove(path)
    tf.raw_ops.SaveV2(
        prefix=latest, tensor_names=kept, shape_and_slices=[""] * len(kept), tensors=tensors
    )
    message = refusal_of(run_dir)
    assert f"{BIAS} (the model's " in message
    assert "/bias:0) is missing from the checkpoint" in message


@pytest.mark.parametrize("name", ["index", "state"])
def test_an_index_or_state_file_larger_than_the_model_needs_is_refused_unread(
    killed_run, tmp_path, name
):
    # TF reads both whole into memory.
    run_dir = copy_of(killed_run, tmp_path)
    chief = run_dir / train.BACKUP_DIR / "chief"
    [path] = chief.glob("ckpt-*.index") if name == "index" else [chief / "checkpoint"]
    with path.open("r+b") as file:
        file.truncate(2**30)  # sparse: costs no disk
    assert f"{path.name} is 1073741824 bytes, more than the " in refusal_of(run_dir)


@pytest.fixture(scope="module")
def expected_entries():
    """What a checkpoint of model_of() (optimizer built) holds, by TF's naming."""
    return train.resume_checkpoint_entries(model_of())


@given(data=st.data())
@settings(max_examples=200, deadline=None)
def test_the_check_refuses_exactly_the_entries_unlike_the_models(expected_entries, data):
    keys = sorted(expected_entries)
    declared = {key: (shape, dtype) for key, (shape, dtype, _) in expected_entries.items()}
    assert train.checkpoint_mismatches(declared, expected_entries) == []
    missing = data.draw(st.lists(st.sampled_from(keys), unique=True, max_size=2))
    for key in missing:
        del declared[key]
    keys = sorted(declared)
    changed = data.draw(st.lists(st.sampled_from(keys), unique=True, max_size=4))
    for key in changed:
        shape = data.draw(st.lists(st.integers(0, 2**40), max_size=4).map(tuple))
        dtype = data.draw(st.sampled_from(["float32", "float64", "int64", "string"]))
        declared[key] = (shape, dtype)
    problems = train.checkpoint_mismatches(declared, expected_entries)
    for problem, key in zip(problems, sorted(missing), strict=False):
        assert problem == (
            f"{key} (the model's {expected_entries[key][2]}) is missing from the checkpoint"
        )
    problems = problems[len(missing) :]
    differing = [key for key in keys if declared[key] != expected_entries[key][:2]]
    assert [problem.split(" ", 1)[0] for problem in problems] == differing
    for problem, key in zip(problems, differing, strict=True):
        shape, dtype = declared[key]
        want_shape, want_dtype, name = expected_entries[key]
        if shape != want_shape:
            assert f"declares shape {list(shape)} where the model's {name} has shape" in problem
        else:
            assert f"declares dtype {dtype} where the model's {name} has dtype {want_dtype}" in (
                problem
            )


CONFIGS = {
    "default": [],
    "ema": ["train.ema_decay=0.999"],
    "mixed_float16": ["train.mixed_precision=mixed_float16"],
}


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_the_expected_entries_are_what_tf_keras_writes_for_van(tmp_path, overrides):
    # The check's expected keys come from TF's traversal: they must be exactly the entries
    # tf_keras' BackupAndRestore writes for the Trainer's model and optimizer, or every resume
    # would be refused.
    from tf_keras.src.distribute.worker_training_state import WorkerTrainingState

    config = load_config(None, ["model.variant=tiny", "model.image_size=32", *overrides])
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(config.train.mixed_precision.replace("none", "float32"))
    try:
        model = train.build_model(config, 5)
        schedule = optim.build_schedule(config.train, steps_per_epoch=10, epochs=2)
        train.compile_model(model, config, schedule, 5)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    expected = train.resume_checkpoint_entries(model)
    WorkerTrainingState(model, str(tmp_path)).back_up(0)
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path / "chief")))
    dtypes = reader.get_variable_to_dtype_map()
    written = {
        key: (tuple(s), dtypes[key].name) for key, s in reader.get_variable_to_shape_map().items()
    }
    assert written == {key: (shape, dtype) for key, (shape, dtype, _) in expected.items()}
    # The index and object graph bounds hold with room to spare (a quarter used at most).
    latest = tf.train.latest_checkpoint(str(tmp_path / "chief"))
    tensors = len(expected)
    index_limit = train.INDEX_BYTES_BASE + train.INDEX_BYTES_PER_TENSOR * tensors
    string_limit = train.STRING_BYTES_BASE + train.STRING_BYTES_PER_TENSOR * tensors
    entries = checkpoint_index.read_index(f"{latest}.index", index_limit // 4)
    checkpoint_index.check_strings(latest, entries, string_limit // 4)
    assert entries.keys() == expected.keys()


# --------------------------------------------------------------------------- index structure
# What TF allocates from the index's structure and the string data, before reading: written with
# tests/tensor_bundle.py, as TF's writer never would.


def test_a_string_declaring_a_huge_length_is_refused_before_any_big_allocation(
    killed_run, tmp_path
):
    # The object graph entry pointed at 12 bytes declaring a 1 GiB string (length checksum
    # valid). Before: TF zero-filled the declared 2 GiB (peak RSS +2054 MiB) and then raised
    # "IndexError: Read less bytes than requested".
    run_dir = copy_of(killed_run, tmp_path)
    latest = tf.train.latest_checkpoint(str(run_dir / train.BACKUP_DIR / "chief"))
    declare_string_length(latest, train.OBJECT_GRAPH_KEY, 2**30)
    message, growth_mib = refusal_and_peak_rss_growth(run_dir)
    assert "string entry _CHECKPOINTABLE_OBJECT_GRAPH declares 1073741824 bytes of strings in " in (
        message
    )
    print(f"\npeak RSS growth refusing a 1 GiB string: {growth_mib} MiB")
    assert growth_mib < 200


@given(length=st.integers(0, 2**40))
@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_a_string_entry_is_refused_unless_its_lengths_are_what_it_holds(
    killed_run, tmp_path_factory, length
):
    run_dir = copy_of(killed_run, tmp_path_factory.mktemp("string"))
    latest = tf.train.latest_checkpoint(str(run_dir / train.BACKUP_DIR / "chief"))
    declare_string_length(latest, train.OBJECT_GRAPH_KEY, length)
    entries = checkpoint_index.read_index(f"{latest}.index", 1 << 20)
    if length == 3:  # the bytes it holds: TF may read it (and finds no object graph in "abc")
        checkpoint_index.check_strings(latest, entries, 1 << 20)
    else:
        with pytest.raises(checkpoint_index.CheckpointIndexError, match=f"declares {length} "):
            checkpoint_index.check_strings(latest, entries, 1 << 20)


def test_an_index_rewritten_with_the_same_entries_still_resumes(killed_run, tmp_path):
    # The test writer's tables are read by TF as its own (so the refusals below are not about
    # the writer).
    run_dir = copy_of(killed_run, tmp_path)
    latest = tf.train.latest_checkpoint(str(run_dir / train.BACKUP_DIR / "chief"))
    entries = {key: entry.SerializeToString() for key, entry in read_entries(latest).items()}
    write_index(f"{latest}.index", {"": header(), **entries})
    assert fit(run_dir)[1].initial_step == KILLED_AT


def test_an_index_footer_declaring_a_huge_block_is_refused_unread(killed_run, tmp_path):
    # Before: TF allocated the declared size first: std::bad_alloc (a bare MemoryError) under
    # the 16 GB address-space limit, "Read less bytes than requested" without one.
    run_dir = copy_of(killed_run, tmp_path)
    latest = tf.train.latest_checkpoint(str(run_dir / train.BACKUP_DIR / "chief"))
    entries = {key: entry.SerializeToString() for key, entry in read_entries(latest).items()}
    write_index(f"{latest}.index", {"": header(), **entries}, index_block_size=2**40)
    assert "footer declares a block of 1099511627776 bytes at " in refusal_of(run_dir)


@given(
    spots=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1),
    cut=st.floats(0, 1),
)
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_reading_any_damaged_index_gives_entries_or_a_checkpoint_index_error(
    killed_run, tmp_path_factory, spots, cut
):
    # The Python reader runs before TF on untrusted bytes: no other exception (TF checks the
    # blocks' checksums itself, once the reader has found every block inside the file).
    [index] = (killed_run / train.BACKUP_DIR / "chief").glob("ckpt-*.index")
    data = bytearray(index.read_bytes())
    for where, byte in spots:
        data[int(where * len(data))] = byte
    path = tmp_path_factory.mktemp("index") / "ckpt-1.index"
    path.write_bytes(bytes(data[: max(1, int(cut * len(data)))] if cut < 1 else data))
    try:
        entries = checkpoint_index.read_index(str(path), 1 << 20)
    except checkpoint_index.CheckpointIndexError:
        return
    assert all(isinstance(key, str) for key in entries)
