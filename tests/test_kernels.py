"""The C++ depthwise kernels against stock TensorFlow: values, gradients, every ISA path, errors,
the model built on them, and the fallback where they can't be built."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from van_trainer import kernels
from van_trainer.model import (
    DEFAULT_IMPLEMENTATION,
    KERNELS_IMPLEMENTATION,
    build_van,
    fold_for_inference,
    training_implementation,
    uses_kernels,
)

pytestmark = pytest.mark.skipif(
    kernels.load() is None, reason=f"kernels unavailable: {kernels.unavailable_reason()}"
)


def stock_depthwise(x, kernel, bias, dilation, activation):
    """The same layer from stock TF ops: depthwise conv, bias, exact GELU."""
    y = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "SAME", dilations=[dilation, dilation])
    y = tf.nn.bias_add(y, bias)
    return tf.nn.gelu(y, approximate=False) if activation == "gelu" else y


def values_and_gradients(fn, x, kernel, bias, dy, dilation, activation):
    """fn's output and its gradients with respect to input, kernel and bias for upstream dy."""
    with tf.GradientTape() as tape:
        tape.watch([x, kernel, bias])
        y = fn(x, kernel, bias, dilation, activation)
    return [y, *tape.gradient(y, [x, kernel, bias], output_gradients=dy)]


def assert_matches_stock(shape, kh, kw, dilation, activation, seed=0):
    """Ours equals stock TF on random data, value and all three gradients, to float rounding."""
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    x = tf.constant(rng.normal(size=shape), tf.float32)
    kernel = tf.constant(rng.normal(scale=0.3, size=(kh, kw, channels, 1)), tf.float32)
    bias = tf.constant(rng.normal(size=channels), tf.float32)
    dy = tf.constant(rng.normal(size=shape), tf.float32)
    ours = values_and_gradients(kernels.depthwise_conv2d, x, kernel, bias, dy, dilation, activation)
    ref = values_and_gradients(stock_depthwise, x, kernel, bias, dy, dilation, activation)
    for name, a, b in zip(
        ("output", "input grad", "filter grad", "bias grad"), ours, ref, strict=True
    ):
        b = b.numpy()
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a.numpy(), b, rtol=0, atol=2e-5 * scale, err_msg=name)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    height=st.integers(1, 13),
    width=st.integers(1, 13),
    channels=st.integers(1, 40),
    kh=st.sampled_from([1, 3, 5, 7]),
    kw=st.sampled_from([1, 3, 5, 7]),
    dilation=st.integers(1, 4),
    activation=st.sampled_from(kernels.ACTIVATIONS),
    seed=st.integers(0, 2**16),
)
def test_any_shape_matches_stock_tensorflow(
    batch, height, width, channels, kh, kw, dilation, activation, seed
):
    # Covers what the vector code special-cases: channel remainders, rows narrower than a tile,
    # taps that fall entirely in the padding, single-pixel images.
    assert_matches_stock((batch, height, width, channels), kh, kw, dilation, activation, seed)


@pytest.mark.parametrize(
    ("hw", "channels", "k", "dilation", "activation"),
    [
        (56, 32, 5, 1, "none"),
        (28, 64, 7, 3, "none"),
        (14, 160, 3, 1, "gelu"),
        (7, 256, 7, 3, "none"),
    ],
)
def test_van_b0_layer_shapes_match_stock_tensorflow(hw, channels, k, dilation, activation):
    assert_matches_stock((2, hw, hw, channels), k, k, dilation, activation)


ISA_CHECK = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    import conftest  # Keras 2 before TensorFlow
    import test_kernels as t
    cases = [((2, 9, 11, 19), 3, 3, 1, "gelu"), ((1, 13, 6, 40), 7, 7, 3, "none"),
             ((2, 5, 17, 33), 5, 3, 2, "gelu"), ((1, 1, 1, 3), 7, 7, 3, "none"),
             ((3, 8, 8, 16), 5, 5, 1, "none"), ((1, 14, 14, 64), 7, 7, 3, "gelu"),
             ((2, 5, 7, 131), 3, 3, 1, "gelu"), ((1, 9, 4, 256), 5, 5, 2, "none")]
    for case in cases:
        t.assert_matches_stock(*case)
    print(json.dumps(t.kernels.isa()))
    """
)


def cpu_runs(isa: str) -> bool:
    flags = open("/proc/cpuinfo").read().split()
    return {"avx512": "avx512f", "avx2": "avx2", "avx": "avx"}[isa] in flags


@pytest.mark.parametrize("isa", ["avx512", "avx2", "avx"])
def test_every_instruction_set_path_matches_stock_tensorflow(isa):
    # One build holds an AVX-512, an AVX2 and an AVX path; this CPU runs each it supports, so
    # the AVX2 code AMD EPYC users run is checked on AVX-512 machines too.
    if not cpu_runs(isa):
        pytest.skip(f"this CPU has no {isa}")
    env = {**os.environ, "VAN_TFX_KERNELS_ISA": isa}
    script = ISA_CHECK.format(tests=os.path.dirname(__file__))
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == isa


def test_an_isa_the_cpu_lacks_is_refused_by_name():
    env = {**os.environ, "VAN_TFX_KERNELS_ISA": "sse"}
    script = "import conftest; from van_trainer import kernels; print(kernels.isa())"
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=os.path.dirname(__file__),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "VAN_TFX_KERNELS_ISA=sse names an ISA this CPU lacks" in out.stderr


@pytest.mark.parametrize(
    ("x_shape", "k_shape", "b_shape", "message"),
    [
        ((1, 8, 8, 4), (3, 3, 5, 1), (4,), "filter has 5 channels, input has 4"),
        ((1, 8, 8, 4), (4, 3, 4, 1), (4,), "filter height and width must be odd"),
        ((1, 8, 8, 4), (3, 3, 4, 2), (4,), "filter must be [height, width, channels, 1]"),
        ((1, 8, 8, 4), (3, 3, 4, 1), (3,), "bias must be [4]"),
        ((8, 8, 4), (3, 3, 4, 1), (4,), "input must be NHWC (rank 4)"),
    ],
)
def test_bad_shapes_are_refused_naming_the_input(x_shape, k_shape, b_shape, message):
    module = kernels.load()
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=re.escape(message)):
        module.van_depthwise_conv2d(tf.zeros(x_shape), tf.zeros(k_shape), tf.zeros(b_shape))


@pytest.mark.parametrize(
    ("kwargs", "refused"),
    [
        ({"strides": 2}, "strides"),
        ({"padding": "valid"}, "padding"),
        ({"depth_multiplier": 2}, "depth_multiplier"),
        ({"activation": "relu"}, "activation (use fused_gelu)"),
        ({"kernel_size": 4}, "even kernel_size"),
    ],
)
def test_kernel_layer_refuses_what_the_kernels_do_not_compute(kwargs, refused):
    from van_trainer.model import KernelDepthwiseConv2D

    arguments = {"kernel_size": 3, "padding": "same", **kwargs}
    with pytest.raises(ValueError, match=re.escape(refused)):
        KernelDepthwiseConv2D(**arguments)


def test_gradients_are_bitwise_repeatable():
    # Each thread's share is a fixed range of work summed in a fixed order: the same inputs give
    # the same bits whatever the scheduling (train.deterministic relies on it).
    module = kernels.load()
    rng = np.random.default_rng(3)
    x, dy = (tf.constant(rng.normal(size=(6, 20, 17, 48)), tf.float32) for _ in range(2))
    kernel = tf.constant(rng.normal(size=(5, 5, 48, 1)), tf.float32)
    bias = tf.constant(rng.normal(size=48), tf.float32)
    runs = [
        [t.numpy() for t in module.van_depthwise_conv2d_grad(x, kernel, bias, dy, activation=a)]
        for a in ("gelu", "gelu", "none", "none")
    ]
    for first, again in ((runs[0], runs[1]), (runs[2], runs[3])):
        for a, b in zip(first, again, strict=True):
            assert np.array_equal(a, b)


def test_gradient_of_a_different_shape_is_refused():
    module = kernels.load()
    with pytest.raises(tf.errors.InvalidArgumentError, match="out_backprop shape"):
        module.van_depthwise_conv2d_grad(
            tf.zeros([1, 8, 8, 4]), tf.zeros([3, 3, 4, 1]), tf.zeros([4]), tf.zeros([1, 8, 7, 4])
        )


def _twin_models():
    """The stock layout and the kernels layout of one tiny VAN, with the same weights."""
    stock = build_van("tiny", num_classes=5, input_shape=(64, 64, 3))
    ours = build_van(
        "tiny", num_classes=5, input_shape=(64, 64, 3), implementation=KERNELS_IMPLEMENTATION
    )
    rng = np.random.default_rng(1)
    for layer in stock.layers:
        if getattr(layer, "bias", None) is not None:  # zero biases would hide a dropped bias
            layer.bias.assign(rng.normal(0.0, 0.3, layer.bias.shape))
    ours.set_weights(stock.get_weights())
    return stock, ours


def test_kernel_layout_has_the_stock_weights_and_computes_the_same_training_step():
    stock, ours = _twin_models()
    assert uses_kernels(ours) and not uses_kernels(stock)
    assert [w.name for w in ours.weights] == [w.name for w in stock.weights]
    x = tf.random.normal([2, 64, 64, 3], seed=4)
    labels = tf.constant([1, 3])
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    results = []
    for model in (stock, ours):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            value = loss(labels, logits)
        results.append((logits, tape.gradient(value, model.trainable_variables)))
    (stock_logits, stock_grads), (our_logits, our_grads) = results
    np.testing.assert_allclose(our_logits.numpy(), stock_logits.numpy(), rtol=1e-4, atol=1e-5)
    for var, a, b in zip(stock.trainable_variables, our_grads, stock_grads, strict=True):
        b = b.numpy()
        np.testing.assert_allclose(
            a.numpy(), b, rtol=1e-3, atol=1e-5 * max(1.0, np.abs(b).max()), err_msg=var.name
        )


def test_a_kernel_layout_model_folds_to_stock_ops_with_the_same_logits():
    _, ours = _twin_models()
    folded = fold_for_inference(ours)
    x = tf.random.normal([2, 64, 64, 3], seed=5)
    np.testing.assert_allclose(
        folded(x).numpy(), ours(x, training=False).numpy(), rtol=1e-4, atol=1e-4
    )
    graph = tf.function(folded).get_concrete_function(tf.TensorSpec([1, 64, 64, 3])).graph
    assert not [op.type for op in graph.get_operations() if op.type.startswith("Van")]


def test_training_implementation_uses_the_kernels_here_unless_switched_off():
    assert training_implementation() == KERNELS_IMPLEMENTATION
    assert training_implementation(use_kernels=False) == DEFAULT_IMPLEMENTATION


FALLBACK_CHECK = textwrap.dedent(
    """
    import json, conftest
    import tensorflow as tf
    from van_trainer import kernels
    from van_trainer.model import build_van, training_implementation, uses_kernels
    model = build_van("tiny", input_shape=(32, 32, 3), implementation=training_implementation())
    model(tf.zeros([1, 32, 32, 3]), training=True)
    print(json.dumps({"kernels": uses_kernels(model), "reason": kernels.unavailable_reason(),
                      "isa": kernels.isa()}))
    """
)


def _run_fallback_check(env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", FALLBACK_CHECK],
        env={**os.environ, **env},
        cwd=os.path.dirname(__file__),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_without_a_compiler_training_falls_back_to_stock_ops_and_says_why(tmp_path):
    result = _run_fallback_check(
        {"VAN_TFX_KERNELS_DIR": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")}
    )
    assert result["kernels"] is False and result["isa"] is None
    assert "no-such-compiler" in result["reason"]


def test_a_missing_library_is_built_on_first_use_and_found_after(tmp_path):
    first = _run_fallback_check({"VAN_TFX_KERNELS_DIR": str(tmp_path)})
    assert first["kernels"] is True and first["reason"] is None
    built = list(tmp_path.glob("van_kernels-*.so"))
    assert len(built) == 1
    # Found, not rebuilt: a compiler that doesn't exist is never needed again.
    again = _run_fallback_check(
        {"VAN_TFX_KERNELS_DIR": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")}
    )
    assert again["kernels"] is True
    assert list(tmp_path.glob("van_kernels-*.so")) == built
