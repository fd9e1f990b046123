"""Keras weights files move between the stock and the C++-kernel models by layer name, strictly."""

from __future__ import annotations

import logging
import os

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from van_tfx.config import load_config
from van_trainer import train, weights
from van_trainer.model import build_van, training_implementation, uses_kernels

STOCK = training_implementation(use_kernels=False)
KERNELS = training_implementation(use_kernels=True)


def tiny(num_classes=5, implementation=STOCK, variant="tiny", seed=0):
    """A tiny VAN whose every weight is random (so a skipped layer can't pass by accident)."""
    model = build_van(variant, num_classes, (32, 32, 3), implementation=implementation)
    rng = np.random.default_rng(seed)
    model.set_weights([rng.standard_normal(w.shape).astype("float32") for w in model.weights])
    return model


def assert_same_weights(a, b, skip=()):
    for layer in a.layers:
        if layer.name in skip or not layer.weights:  # weightless layers differ (a fused GELU)
            continue
        for x, y in zip(layer.weights, b.get_layer(layer.name).weights, strict=True):
            np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=f"{layer.name}/{x.name}")


def saved(model, tmp_path, name="w.weights.h5"):
    path = str(tmp_path / name)
    model.save_weights(path)
    return path


def test_kernel_layers_are_in_use_here():
    # The rest of this file only means something where the C++ kernels load.
    assert uses_kernels(tiny(implementation=KERNELS))


@pytest.mark.parametrize("implementation", [STOCK, KERNELS], ids=["stock", "kernels"])
def test_file_keys_name_every_group_tf_keras_writes(tmp_path, implementation):
    model = tiny(implementation=implementation)
    with h5py.File(saved(model, tmp_path), "r") as f:
        written = {f"layers/{weights._portable(name)}" for name in f["layers"]}
    assert set(weights.file_keys(model).values()) == written


@pytest.mark.parametrize(
    "writer, reader", [(KERNELS, STOCK), (STOCK, KERNELS)], ids=["kernels->stock", "stock->kernels"]
)
def test_weights_cross_between_implementations(tmp_path, writer, reader):
    source = tiny(implementation=writer, seed=1)
    target = tiny(implementation=reader, seed=2)
    assert weights.load_weights_by_name(target, saved(source, tmp_path)) == []
    assert_same_weights(source, target)


def test_pretrained_weights_load_into_the_trainers_model_with_a_fresh_head(tmp_path):
    # Official weights are converted into the stock model (1000 classes here: 5); the Trainer
    # builds the C++-kernel model with its own class count.
    pretrained = saved(tiny(num_classes=5, seed=1), tmp_path)
    config = load_config(
        None,
        ["model.variant=tiny", "model.image_size=32", f"model.pretrained_weights={pretrained}"],
    )
    model = train.build_model(config, 3)
    head_before = model.get_layer("head").kernel.numpy().copy()
    assert uses_kernels(model)
    assert train.load_initial_weights(model, config, 3, None) == pretrained
    assert_same_weights(tiny(num_classes=5, seed=1), model, skip=("head",))
    np.testing.assert_array_equal(model.get_layer("head").kernel.numpy(), head_before)


def test_a_file_from_another_architecture_is_refused_and_loads_nothing(tmp_path):
    other = saved(build_van("b0", 5, (32, 32, 3), implementation=STOCK), tmp_path)
    model = tiny(seed=3)
    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(weights.WeightsMismatchError, match=r"w\.weights\.h5 does not fit") as err:
        weights.load_weights_by_name(model, other, keep_fresh=("head",))
    assert "stem" in str(err.value) or "block1.0" in str(err.value)  # names a layer
    for w, b in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(w.numpy(), b)


def test_only_the_layers_named_may_stay_fresh(tmp_path):
    five = saved(tiny(num_classes=5), tmp_path)
    with pytest.raises(weights.WeightsMismatchError, match=r"head \(model \[\(128, 3\)"):
        weights.load_weights_by_name(tiny(num_classes=3), five)
    assert weights.load_weights_by_name(tiny(num_classes=3), five, keep_fresh=("head",)) == ["head"]


def test_pretrained_weights_that_do_not_fit_fail_the_trainer(tmp_path):
    other = saved(build_van("b0", 5, (32, 32, 3), implementation=STOCK), tmp_path)
    config = load_config(
        None, ["model.variant=tiny", "model.image_size=32", f"model.pretrained_weights={other}"]
    )
    with pytest.raises(weights.WeightsMismatchError, match="layer"):
        train.load_initial_weights(train.build_model(config, 3), config, 3, None)


def test_a_file_that_is_not_keras_weights_is_named(tmp_path):
    junk = tmp_path / "junk.weights.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(weights.WeightsMismatchError, match="junk.weights.h5"):
        weights.load_weights_by_name(tiny(), str(junk))
    with h5py.File(tmp_path / "empty.weights.h5", "w"):
        pass
    with pytest.raises(weights.WeightsMismatchError, match="empty.weights.h5: no 'layers'"):
        weights.load_weights_by_name(tiny(), str(tmp_path / "empty.weights.h5"))


def test_no_served_model_is_no_warm_start_without_a_warning(tmp_path, caplog):
    # Before: every first run warned "warm start skipped: ... has no Keras weights at ...".
    config = load_config(None, ["model.variant=tiny", "model.image_size=32"])
    model = train.build_model(config, 3)
    empty = tmp_path / "ServedModel" / "model" / "5" / "Format-Serving"  # nothing served
    with caplog.at_level(logging.INFO, logger=train.log.name):
        assert train.load_initial_weights(model, config, 3, str(empty)) == ""
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "nothing is served yet" in caplog.text
    caplog.clear()
    empty.mkdir(parents=True)  # a served copy without our weights file is still a warning
    with caplog.at_level(logging.INFO, logger=train.log.name):
        assert train.load_initial_weights(model, config, 3, str(empty)) == ""
    assert "warm start skipped" in caplog.text
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


# ---------------------------------------------------------------- damaged or hostile files

STEM = "patch_embed1.proj"  # a conv with a kernel [7, 7, 3, 16] and a bias [16]


def damaged(tmp_path, change, name="bad.weights.h5"):
    """A real file of `tiny()` whose stem conv's `vars` group `change(vars, kernel, bias)` edits."""
    path = saved(tiny(), tmp_path, name)
    group = weights.file_keys(tiny())[STEM]
    with h5py.File(path, "a") as f:
        variables = f[group]["vars"]
        kernel, bias = variables["0"][()], variables["1"][()]
        change(variables, kernel, bias)
    return path


def _replace(name, **dataset):
    def change(variables, kernel, bias):
        del variables[name]
        variables.create_dataset(name, **dataset)

    return change


def _refill(name, value):
    def change(variables, kernel, bias):
        variables[name][...] = value

    return change


def _chunk_bomb(variables, kernel, bias):
    # 16 floats in a 2**28-float gzip chunk: reading them inflated 1 GB (2.8 MB file).
    del variables["1"]
    bomb = variables.create_dataset(
        "1", shape=(16,), maxshape=(None,), chunks=(2**28,), dtype="f4", compression="gzip"
    )
    bomb[...] = bias


def _huge(variables, kernel, bias):
    del variables["0"]
    huge = variables.create_dataset("0", shape=(2**40,), dtype="f4", chunks=(2**10,))
    huge[:16] = 1.0  # one chunk stored: the rest reads as the fill value


def _link(kind):
    def change(variables, kernel, bias):
        variables.file["elsewhere"] = kernel
        del variables["0"]
        variables["0"] = (
            h5py.SoftLink("/elsewhere")
            if kind == "soft"
            else h5py.ExternalLink("other.h5", "/elsewhere")
        )

    return change


HOSTILE = {
    # Declares 4 TB: reading it before the shape check ended in MemoryError (8 GB RSS for 2**31).
    "huge declared shape": (_huge, "differ"),
    "chunk larger than the dataset": (_chunk_bomb, r"chunks \(268435456,\) larger than"),
    "NaN weights": (_refill("0", np.nan), "2352 non-finite value"),
    "infinite bias": (_refill("1", np.inf), "16 non-finite value"),
    # Finite in float64, Inf once set_weights cast it to the model's float32.
    "float64 beyond float32": (_replace("0", data=np.full((7, 7, 3, 16), 1e300)), "2352 non-fin"),
    "declared, never written": (_replace("0", shape=(7, 7, 3, 16), dtype="f4"), "no stored values"),
    "integer weights": (_replace("0", data=np.ones((7, 7, 3, 16), "i8")), "dtype int64"),
    "string weights": (_replace("0", data=np.full((7, 7, 3, 16), b"x")), "dtype |S1"),
    "group for a weight": (lambda v, k, b: (v.__delitem__("0"), v.create_group("0")), "is a Group"),
    "gap in the numbering": (lambda v, k, b: v.move("1", "7"), r"holds \['0', '7'\]"),
    "data in another file": (
        _replace("0", shape=(7, 7, 3, 16), dtype="f4", external=[("/etc/hostname", 0, 2352 * 4)]),
        "keeps its data in another file",
    ),
    "soft link": (_link("soft"), "is a SoftLink"),
    "external link": (_link("external"), "is a ExternalLink"),
}


@pytest.mark.parametrize("change, problem", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_damaged_or_hostile_file_is_refused_naming_it_and_loads_nothing(
    tmp_path, change, problem
):
    # Before: NaN, integers and another file's bytes loaded silently; strings, groups, gaps and
    # the 4 TB shape raised ValueError/KeyError/MemoryError tracebacks naming no file.
    path = damaged(tmp_path, change)
    model = tiny(seed=3)
    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(weights.WeightsMismatchError, match=problem) as err:
        weights.load_weights_by_name(model, path)
    assert "bad.weights.h5" in str(err.value)
    for w, b in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(w.numpy(), b)


def test_a_corrupted_compressed_weight_is_refused_naming_the_dataset(tmp_path):
    def compress(variables, kernel, bias):
        del variables["0"]
        variables.create_dataset("0", data=kernel, chunks=kernel.shape, compression="gzip")

    path = damaged(tmp_path, compress)
    with h5py.File(path, "r") as f:
        chunk = f[weights.file_keys(tiny())[STEM]]["vars"]["0"].id.get_chunk_info(0)
    data = bytearray(open(path, "rb").read())
    data[chunk.byte_offset + 10 : chunk.byte_offset + 40] = b"\xff" * 30
    open(path, "wb").write(bytes(data))
    # Before: OSError "Can't synchronously read data (filter returned failure during read)".
    with pytest.raises(
        weights.WeightsMismatchError, match=r"bad\.weights\.h5: .*/vars/0 is unread"
    ):
        weights.load_weights_by_name(tiny(), path)


@given(offsets=st.lists(st.integers(0, 19_999), min_size=1, max_size=8), byte=st.integers(0, 255))
@settings(max_examples=60, deadline=None)
def test_any_damage_to_the_files_structure_loads_or_is_refused_naming_it(
    shared_model, offsets, byte
):
    # The first 20 kB hold the superblock, B-trees, heaps and object headers; h5py reads them
    # lazily, so damage there raised RuntimeError/KeyError at whichever lookup met it.
    data = bytearray(shared_model["bytes"])
    for offset in offsets:
        data[offset] = byte
    path = shared_model["dir"] / "fuzzed.weights.h5"
    path.write_bytes(bytes(data))
    try:
        weights.load_weights_by_name(shared_model["model"], str(path))
    except weights.WeightsMismatchError as exc:
        assert "fuzzed.weights.h5" in str(exc)
    assert all(np.isfinite(w.numpy()).all() for w in shared_model["model"].weights)


@pytest.fixture(scope="module")
def shared_model(tmp_path_factory):
    """One tiny model and its saved file's bytes, shared by the Hypothesis examples."""
    directory = tmp_path_factory.mktemp("fuzz")
    model = tiny()
    return {"model": model, "bytes": open(saved(model, directory), "rb").read(), "dir": directory}


@pytest.mark.parametrize(
    "change", [_refill("0", np.nan), _replace("0", data=np.full((7, 7, 3, 16), b"x"))]
)
def test_a_damaged_served_model_makes_the_warm_start_train_fresh(tmp_path, caplog, change):
    # docs/trainer.md: a base model whose weights do not fit starts training fresh with a
    # warning. Before, NaN weights were loaded (the run died at its first step) and a string
    # dataset raised ValueError out of the Trainer.
    base = tmp_path / "served"
    (base / "assets.extra").mkdir(parents=True)
    path = damaged(tmp_path, change)
    os.replace(path, base / "assets.extra" / "van.weights.h5")
    config = load_config(None, ["model.variant=tiny", "model.image_size=32"])
    model = train.build_model(config, 5)
    before = [w.numpy().copy() for w in model.weights]
    with caplog.at_level(logging.WARNING, logger=train.log.name):
        assert train.load_initial_weights(model, config, 5, str(base)) == ""
    assert "warm start skipped" in caplog.text and "van.weights.h5" in caplog.text
    for w, b in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(w.numpy(), b)
