"""The optimiser recipe: batch-scaled LR, warmup + cosine, AdamW decay exemptions, NaN guard."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from van_tfx.config import TrainConfig
from van_trainer import optim, train


def test_learning_rate_scales_linearly_with_the_global_batch():
    assert optim.scaled_learning_rate(TrainConfig(batch_size=1024)) == pytest.approx(1e-3)
    assert optim.scaled_learning_rate(TrainConfig(batch_size=256)) == pytest.approx(2.5e-4)


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    cfg = TrainConfig(batch_size=1024, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)
    schedule = optim.build_schedule(cfg, steps_per_epoch=10, epochs=12)
    lr = [float(schedule(step)) for step in range(121)]
    assert lr[0] == pytest.approx(1e-6)
    assert lr[10] == pytest.approx((1e-6 + 1e-3) / 2, rel=1e-4)
    assert lr[20] == pytest.approx(1e-3, rel=1e-5)
    assert lr[70] == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-4)  # cosine midpoint
    assert lr[120] == pytest.approx(1e-5, rel=1e-4)
    assert all(a <= b for a, b in zip(lr[:20], lr[1:21], strict=True))
    assert all(a >= b for a, b in zip(lr[20:120], lr[21:121], strict=True))
    rebuilt = optim.WarmupCosineDecay(**schedule.get_config())
    assert float(rebuilt(55)) == pytest.approx(lr[55])


def _model():
    inputs = keras.Input([4, 4, 3])
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.LayerNormalization(name="ln")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def test_adamw_decays_only_kernels():
    model = _model()
    decayed = sorted(v.name for v in model.trainable_variables if optim.is_decayed(v))
    assert decayed == ["conv/kernel:0", "head/kernel:0"]
    cfg = TrainConfig(weight_decay=0.5)
    # Zero gradients make the Adam step zero, isolating the decoupled decay: w -= lr * wd * w.
    optimizer = optim.build_optimizer(cfg, 0.1, model.trainable_variables)
    before = {v.name: v.numpy().copy() for v in model.trainable_variables}
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_variables])
    for v in model.trainable_variables:
        if v.name in decayed:
            np.testing.assert_allclose(v.numpy(), before[v.name] * (1 - 0.1 * 0.5), rtol=1e-5)
        else:
            np.testing.assert_array_equal(v.numpy(), before[v.name])


def test_optimizer_options_follow_the_config():
    model = _model()
    plain = optim.build_optimizer(TrainConfig(), 1e-3, model.trainable_variables)
    assert plain.global_clipnorm is None and not plain.use_ema
    tuned = optim.build_optimizer(
        TrainConfig(clip_grad_norm=1.0, ema_decay=0.999), 1e-3, model.trainable_variables
    )
    assert tuned.global_clipnorm == 1.0 and tuned.use_ema and tuned.ema_momentum == 0.999
    scaled = optim.build_optimizer(
        TrainConfig(mixed_precision="mixed_float16"), 1e-3, model.trainable_variables
    )
    assert isinstance(scaled, keras.mixed_precision.LossScaleOptimizer)


def test_nan_loss_stops_training_with_an_error_naming_the_step():
    model = keras.Sequential([keras.Input([2]), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = np.array([[1.0, 2.0]] * 4 + [[np.inf, 1.0]] * 4, np.float32)
    y = np.ones([8, 1], np.float32)
    with pytest.raises(RuntimeError, match=r"loss became (nan|inf) at step 2"):
        model.fit(
            x, y, batch_size=4, epochs=1, shuffle=False, callbacks=[train.NanGuard()], verbose=0
        )


def test_fused_adamw_matches_tf_keras_adamw_step_for_step():
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 4, 8), (8,), (16, 5)]
    init = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(6)]
    schedule = optim.WarmupCosineDecay(peak_lr=1e-2, total_steps=6, warmup_steps=2)
    results = []
    for cls in (optim.FusedAdamW, keras.optimizers.AdamW):
        variables = [tf.Variable(v, name=f"w{i}") for i, v in enumerate(init)]
        optimizer = cls(learning_rate=schedule, weight_decay=0.05, epsilon=1e-8)
        optimizer.exclude_from_weight_decay(var_list=[variables[1]])
        step = tf.function(
            lambda g, opt=optimizer, vs=variables: opt.apply_gradients(zip(g, vs, strict=True))
        )
        for g in grads:
            step([tf.constant(x) for x in g])
        results.append([v.numpy() for v in variables])
    for fused, reference in zip(*results, strict=True):
        np.testing.assert_allclose(fused, reference, rtol=1e-5, atol=1e-6)  # float rounding
    assert not np.allclose(results[0][0], init[0])  # the step moved the weights


def _tiny_compiled(steps: int, **train_keys):
    """VAN-tiny compiled the Trainer's way and `steps` batches of 4 random images."""
    from van_tfx.config import Config

    config = Config.model_validate(
        {
            "model": {"variant": "tiny", "image_size": 32},
            "train": {"batch_size": 4, **train_keys},
        }
    )
    model = train.build_model(config, 3)
    schedule = optim.build_schedule(config.train, steps_per_epoch=steps, epochs=1)
    train.compile_model(model, config, schedule, 3)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (4 * steps, 32, 32, 3)).astype(np.float32)
    targets = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 4 * steps)]
    return model, tf.data.Dataset.from_tensor_slices((images, targets)).batch(4)


def _tiny_fit(steps: int, **train_keys):
    """Fit VAN-tiny for one epoch of `steps` batches; (model, data, batch indices callbacks saw)."""
    model, data = _tiny_compiled(steps, **train_keys)
    seen = []
    callback = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(b))
    model.fit(data, epochs=1, callbacks=[callback], verbose=0)
    return model, data, seen


def _train_step_graph(model, data):
    """The graph of the train function fit() traced (fetched from its cache, not retraced)."""
    return model.train_function.get_concrete_function(iter(data)).graph


def test_the_trainers_train_step_is_traced_once_without_autograph_in_tf_keras():
    from tensorflow.python.autograph.impl import conversion

    model, data, seen = _tiny_fit(steps=2)
    assert conversion.is_allowlisted(keras.Model.train_step)  # installed by the model module
    assert model.train_function.experimental_get_tracing_count() == 1
    assert seen == [0, 1] and int(model.optimizer.iterations.numpy()) == 2
    assert not model.jit_compile and not model.optimizer.jit_compile  # CPU default


def _xla_compiled_calls(graph) -> list[str]:
    """Functions the graph calls with _XlaMustCompile, except the model's fused GELU kernels."""
    return [
        op.get_attr("f").name
        for op in graph.get_operations()
        if "_XlaMustCompile" in op.node_def.attr
        and op.get_attr("_XlaMustCompile")
        and "_gelu_" not in op.get_attr("f").name
    ]


def test_jit_compile_reaches_the_compiled_train_step():
    model, data = _tiny_compiled(steps=1, jit_compile=True)
    model.make_train_function()  # what fit() runs; traced here, XLA compiles at its first call
    assert _xla_compiled_calls(_train_step_graph(model, data)), "train step not XLA-compiled"
    # tf_keras XLA-compiles the optimizer's own update only where there is a GPU; on CPU the
    # update runs inside the XLA-compiled train step.
    assert model.optimizer.jit_compile == bool(tf.config.list_physical_devices("GPU"))


def test_only_the_gelu_kernels_are_xla_compiled_by_default():
    model, data = _tiny_compiled(steps=1)
    model.make_train_function()
    graph = _train_step_graph(model, data)
    assert _xla_compiled_calls(graph) == []
    fused = {
        op.get_attr("f").name.split("_gelu_")[-1].split("_")[0]
        for op in graph.get_operations()
        if "_XlaMustCompile" in op.node_def.attr and op.get_attr("_XlaMustCompile")
    }
    assert fused == {"forward", "backward"}  # GELU and its gradient, each one XLA kernel


def test_steps_per_execution_runs_several_steps_per_compiled_call():
    model, data, seen = _tiny_fit(steps=4, steps_per_execution=2)
    op_types = {op.type for op in _train_step_graph(model, data).get_operations()}
    assert "While" in op_types or "StatelessWhile" in op_types  # the loop over the steps
    assert int(model.optimizer.iterations.numpy()) == 4
    assert seen == [1, 3]  # callbacks see the last step of each call
