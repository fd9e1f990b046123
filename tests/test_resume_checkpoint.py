"""The Trainer's resume checkpoint (<model_run_dir>/backup) read back as untrusted input: a real
tf_keras checkpoint, written by the Trainer's own callbacks before a simulated kill, then
damaged on disk. A checkpoint that can't be restored is an error naming the directory, never
a bare TF error or a silent start from step 0."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tf_keras as keras
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from van_tfx.config import load_config
from van_trainer import train

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
    "cut data file": (_cut_data, "IndexError: Read less bytes than requested", {}),
    "index removed": (_no_index, "NotFoundError", {}),
    "state file garbage": (_garbage_state, "state file `checkpoint` names no checkpoint", {}),
    "another model's": (lambda chief: None, "incompatible tensor with shape (8,)", {"width": 16}),
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
