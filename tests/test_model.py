"""VAN model: official parameter counts, names, shapes, precision, serialisation, regularisers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from van_trainer.model import (
    INFERENCE_IMPLEMENTATION,
    VARIANTS,
    DropPath,
    LayerScale,
    build_van,
    count_trainable_parameters,
    drop_path_rates,
    fold_for_inference,
    fused_gelu,
    gelu,
)


@pytest.fixture(scope="module")
def b0():
    tf.keras.utils.set_random_seed(0)
    return build_van("b0")


@pytest.mark.parametrize(
    ("variant", "expected"),
    [("b0", 4_105_800), ("b1", 13_861_800), ("b2", 26_578_472), ("b3", 44_765_608)],
)
def test_trainable_parameter_counts_match_the_paper(variant, expected, request):
    model = request.getfixturevalue("b0") if variant == "b0" else build_van(variant)
    assert count_trainable_parameters(model) == expected
    # BatchNorm moving statistics exist but are not trainable.
    moving = [w for w in model.non_trainable_weights if "moving_" in w.name]
    assert moving and len(model.non_trainable_weights) == len(moving)


def test_variant_table_has_official_configs():
    assert VARIANTS["b2"].depths == (3, 3, 12, 3)
    assert VARIANTS["b5"].embed_dims == (96, 192, 480, 768)
    assert VARIANTS["b6"].embed_dims == (96, 192, 384, 768)
    assert all(cfg.mlp_ratios == (8, 8, 4, 4) for cfg in VARIANTS.values())


def test_layers_carry_official_state_dict_names(b0):
    names = {layer.name for layer in b0.layers}
    for name in [
        "patch_embed1.proj",
        "patch_embed4.norm",
        "block1.0.norm1",
        "block1.0.attn.proj_1",
        "block1.0.attn.spatial_gating_unit.conv0",
        "block1.0.attn.spatial_gating_unit.conv_spatial",
        "block1.0.attn.spatial_gating_unit.conv1",
        "block3.4.attn.proj_2",
        "block3.4.mlp.fc1",
        "block3.4.mlp.dwconv.dwconv",
        "block4.1.mlp.fc2",
        "block4.1.layer_scale_2",
        "norm4",
        "head",
    ]:
        assert name in names


def test_normalisation_settings_are_official():
    model = build_van("tiny")
    bn = model.get_layer("block1.0.norm1")
    assert (bn.epsilon, bn.momentum) == (1e-5, 0.9)
    assert model.get_layer("norm2").epsilon == 1e-6
    assert model.get_layer("patch_embed1.proj").kernel_size == (7, 7)
    assert model.get_layer("patch_embed1.proj").strides == (4, 4)
    spatial = model.get_layer("block1.0.attn.spatial_gating_unit.conv_spatial")
    assert spatial.kernel_size == (7, 7) and spatial.dilation_rate == (3, 3)
    np.testing.assert_allclose(model.get_layer("block2.0.layer_scale_1").scale.numpy(), 1e-2)


def test_official_initialisation_statistics(b0):
    model = b0
    fc1 = model.get_layer("block1.0.mlp.fc1").kernel.numpy()  # 1x1, fan_out = 256
    dw = model.get_layer("block1.0.mlp.dwconv.dwconv").depthwise_kernel.numpy()  # fan_out = 9
    head = model.get_layer("head").kernel.numpy()
    assert fc1.std() == pytest.approx(np.sqrt(2 / 256), rel=0.05)
    assert dw.std() == pytest.approx(np.sqrt(2 / 9), rel=0.05)
    assert head.std() == pytest.approx(0.02, rel=0.15) and np.abs(head).max() <= 0.04 + 1e-6
    assert not model.get_layer("block1.0.attn.proj_1").bias.numpy().any()


@pytest.fixture(scope="module")
def tiny_dynamic():
    return build_van("tiny", num_classes=7, input_shape=(None, None, 3))


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 64, 96, 3), (3, 96, 64, 3)])
def test_dynamic_input_sizes_give_logits(tiny_dynamic, shape):
    logits = tiny_dynamic(tf.random.normal(shape), training=False)
    assert logits.shape == (shape[0], 7) and logits.dtype == tf.float32
    assert np.isfinite(logits.numpy()).all()


@pytest.mark.parametrize("bad", [(48, 48, 3), (224, 224, 1), (16, 16, 3)])
def test_input_shapes_not_multiple_of_32_are_rejected(bad):
    with pytest.raises(ValueError, match="input_shape"):
        build_van("tiny", input_shape=bad)


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="unknown VAN variant 'b9'"):
        build_van("b9")


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_float32_logits(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = build_van("tiny", num_classes=5, input_shape=(32, 32, 3))
        assert model.get_layer("block1.0.mlp.fc1").compute_dtype == policy.split("_")[1]
        logits = model(tf.random.normal([2, 32, 32, 3]), training=False)
        assert logits.dtype == tf.float32 and np.isfinite(logits.numpy()).all()
        assert model.get_layer("head").kernel.dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_drop_path_drops_whole_samples_only_in_training():
    layer = DropPath(0.5)
    x = tf.ones([400, 2, 2, 3])
    np.testing.assert_array_equal(layer(x, training=False).numpy(), x.numpy())
    out = layer(x, training=True).numpy()
    per_sample = out.reshape(400, -1)
    # Each sample is either dropped entirely or scaled by 1/keep.
    assert set(np.unique(per_sample.min(1))) <= {0.0, 2.0}
    assert (per_sample.min(1) == per_sample.max(1)).all()
    assert 120 < (per_sample[:, 0] == 0).sum() < 280


def test_drop_path_rates_rise_linearly_over_all_blocks():
    rates = drop_path_rates((3, 3, 5, 2), 0.1)
    assert len(rates) == 13 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    model = build_van("tiny", drop_path_rate=0.1)
    assert len(drop_path_rates((1, 1, 1, 1), 0.1)) == 4
    assert model.get_layer("block1.0.drop_path_1").rate == 0.0
    assert model.get_layer("block2.0.drop_path_2").rate == pytest.approx(0.1 / 3)
    assert model.get_layer("block4.0.drop_path_2").rate == pytest.approx(0.1)


def test_training_mode_updates_batch_norm_statistics():
    model = build_van("tiny", num_classes=3, input_shape=(32, 32, 3))
    bn = model.get_layer("block1.0.norm1")
    before = bn.moving_mean.numpy().copy()
    model(tf.random.normal([4, 32, 32, 3]) * 3 + 1, training=True)
    assert not np.allclose(before, bn.moving_mean.numpy())


def test_get_config_from_config_round_trip():
    model = build_van("tiny", num_classes=4, input_shape=(None, None, 3), drop_path_rate=0.2)
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    x = tf.random.normal([2, 64, 64, 3])
    np.testing.assert_allclose(clone(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
    assert isinstance(clone.get_layer("block1.0.layer_scale_1"), LayerScale)
    assert clone.get_layer("block4.0.drop_path_2").rate == pytest.approx(0.2)


def test_saved_model_round_trip(tmp_path):
    model = build_van("tiny", num_classes=4, input_shape=(None, None, 3))
    x = tf.random.normal([2, 64, 32, 3])
    model.save(str(tmp_path / "van"))
    restored = keras.models.load_model(str(tmp_path / "van"))
    np.testing.assert_allclose(restored(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
    raw = tf.saved_model.load(str(tmp_path / "van"))
    np.testing.assert_allclose(
        raw(x, training=False).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "fold_gelu_constants", [True, False], ids=["gelu-constants-folded", "plain"]
)
def test_fold_for_inference_matches_the_model_in_eval_mode(fold_gelu_constants):
    model = build_van("tiny", num_classes=6, input_shape=(None, None, 3))
    x = tf.random.normal([4, 64, 32, 3], seed=3) * 2
    for _ in range(3):  # move BatchNorm statistics away from their 0/1 init
        model(x, training=True)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, LayerScale):
            layer.scale.assign(rng.uniform(0.5, 1.5, layer.scale.shape))
        if getattr(layer, "bias", None) is not None:  # zero at init would hide a mis-folded bias
            layer.bias.assign(rng.normal(0.0, 0.5, layer.bias.shape))
    impl = dataclasses.replace(INFERENCE_IMPLEMENTATION, fold_gelu_constants=fold_gelu_constants)
    folded = fold_for_inference(model, implementation=impl)
    expected = model(x, training=False).numpy()
    np.testing.assert_allclose(
        folded(x).numpy(), expected, rtol=1e-4, atol=1e-4 * abs(expected).max()
    )
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)


def _element_wise_ops(model) -> int:
    graph = tf.function(model).get_concrete_function(tf.TensorSpec([1, 32, 32, 3])).graph
    element_wise = {"Mul", "AddV2", "Add", "Erf", "RealDiv", "Sub"}
    return sum(op.type in element_wise for op in graph.get_operations())


def test_folding_gelu_constants_leaves_three_element_wise_ops_per_gelu():
    model = build_van("tiny", num_classes=3, input_shape=(None, None, 3))
    plain = dataclasses.replace(INFERENCE_IMPLEMENTATION, fold_gelu_constants=False)
    plain_ops = _element_wise_ops(fold_for_inference(model, implementation=plain))
    folded_ops = _element_wise_ops(fold_for_inference(model))
    assert plain_ops - folded_ops == 2 * 2 * sum(VARIANTS["tiny"].depths)  # 2 GELUs/block, 5 -> 3


@pytest.mark.parametrize("activation", [gelu, fused_gelu], ids=["tf-ops", "xla-fused"])
def test_gelu_is_the_exact_erf_form_with_a_correct_gradient(activation):
    x = tf.linspace(-6.0, 6.0, 1001)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours, reference = activation(x), tf.nn.gelu(x, approximate=False)
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=2e-6)
    np.testing.assert_allclose(
        tape.gradient(ours, x).numpy(), tape.gradient(reference, x).numpy(), atol=2e-6
    )
    # The tanh approximation differs by > 1e-4 here: we must not be using it.
    approx = tf.nn.gelu(x, approximate=True).numpy()
    assert np.abs(approx - ours.numpy()).max() > 1e-4
