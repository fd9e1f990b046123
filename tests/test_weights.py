"""Keras weights files move between the stock and the C++-kernel models by layer name, strictly."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest

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
