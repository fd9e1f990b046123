"""Optimiser recipe of official VAN: AdamW + cosine LR with linear warmup, scaled to the batch."""

from __future__ import annotations

import math
import weakref

import tensorflow as tf
import tf_keras as keras

from van_tfx.config import TrainConfig

REFERENCE_BATCH = 1024  # the official recipe's lr 1e-3 is for 8 GPUs x 128 images

# timm's param_groups_weight_decay exempts every 1-D parameter (biases, norm scales/shifts, layer
# scales); the name patterns catch the same variables should a model keep them in other shapes.
NO_DECAY_NAME_PATTERNS = ("bias", "gamma", "beta", "layer_scale", "norm", "moving_")


def scaled_learning_rate(train: TrainConfig) -> float:
    """Peak learning rate: base lr at global batch 1024, scaled linearly to the actual batch."""
    return train.base_learning_rate * train.batch_size / REFERENCE_BATCH


@keras.saving.register_keras_serializable(package="van_trainer")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from `warmup_lr` to `peak_lr`, then cosine decay to `min_lr` at `total_steps`."""

    def __init__(self, peak_lr, total_steps, warmup_steps=0, warmup_lr=1e-6, min_lr=1e-6):
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(min(warmup_steps, total_steps))
        self.warmup_lr = float(warmup_lr)
        self.min_lr = float(min_lr)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = float(max(self.warmup_steps, 1))
        warm_lr = self.warmup_lr + (self.peak_lr - self.warmup_lr) * step / warmup
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        progress = tf.clip_by_value((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        cosine_lr = self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (
            1.0 + tf.cos(math.pi * progress)
        )
        return tf.where(step < self.warmup_steps, warm_lr, cosine_lr)

    def get_config(self):
        """Constructor arguments, for serialisation."""
        return {
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "warmup_lr": self.warmup_lr,
            "min_lr": self.min_lr,
        }


def build_schedule(train: TrainConfig, steps_per_epoch: int, epochs: int) -> WarmupCosineDecay:
    """The recipe's schedule for a run of `epochs` x `steps_per_epoch` steps."""
    return WarmupCosineDecay(
        peak_lr=scaled_learning_rate(train),
        total_steps=steps_per_epoch * epochs,
        warmup_steps=round(train.warmup_epochs * steps_per_epoch),
        warmup_lr=train.warmup_lr,
        min_lr=train.min_lr,
    )


def is_decayed(variable: tf.Variable) -> bool:
    """Whether AdamW should apply weight decay to this variable (only conv/dense kernels)."""
    name = variable.name.lower()
    if any(pattern in name for pattern in NO_DECAY_NAME_PATTERNS):
        return False
    return len(variable.shape) > 1


@keras.saving.register_keras_serializable(package="van_trainer")
class FusedAdamW(keras.optimizers.AdamW):
    """tf_keras AdamW with TF's fused ResourceApplyAdam kernel and per-step scalars built once."""

    # tf_keras builds about fifteen graph ops per variable per step (learning-rate reads, casts,
    # beta powers, the Adam arithmetic, the decay); here the scalars are built once per traced step
    # and each variable gets the one fused kernel (same formula) plus, if decayed, one
    # multiply-subtract. The train step traces in about half the time and dispatches fewer ops.
    # Clipping, EMA and loss scaling stay tf_keras' own; sparse gradients and AMSGrad fall back to
    # the tf_keras update.

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._scalars_by_graph = weakref.WeakKeyDictionary()

    def _build_step_scalars(self, dtype) -> dict:
        lr = tf.cast(self.learning_rate, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        return {
            "lr": lr,
            "beta1": beta_1,
            "beta2": beta_2,
            "beta1_power": tf.pow(beta_1, step),
            "beta2_power": tf.pow(beta_2, step),
            "epsilon": tf.cast(self.epsilon, dtype),
            "decay": lr * tf.cast(self.weight_decay or 0.0, dtype),
        }

    def _step_scalars(self, dtype) -> dict:
        """This step's scalars: built once per graph being traced (per call when eager).

        Read before the step's variable updates (the learning rate after tf_keras assigns it,
        the iteration count before it is incremented), as tf_keras' own per-variable reads are.
        """
        if tf.executing_eagerly():
            return self._build_step_scalars(dtype)
        by_dtype = self._scalars_by_graph.setdefault(tf.compat.v1.get_default_graph(), {})
        if dtype not in by_dtype:
            by_dtype[dtype] = self._build_step_scalars(dtype)
        return by_dtype[dtype]

    def _apply_weight_decay(self, variables):
        # tf_keras' distributed decay (variable -= variable * wd * lr) with the scalars shared.
        if self.weight_decay is None:
            return

        def decay(variable):
            if self._use_weight_decay(variable):
                variable.assign_sub(variable * self._step_scalars(variable.dtype)["decay"])

        def apply_decay(distribution, variables, **kwargs):
            for variable in variables:
                distribution.extended.update(variable, decay, group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(
            apply_decay, self._distribution_strategy, variables
        )

    def update_step(self, gradient, variable):
        """One Adam update of `variable`: m, v and the bias-corrected step in one kernel."""
        if isinstance(gradient, tf.IndexedSlices) or self.amsgrad:
            return super().update_step(gradient, variable)
        index = self._index_dict[self._var_key(variable)]
        scalars = self._step_scalars(variable.dtype)
        return tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=self._momentums[index].handle,
            v=self._velocities[index].handle,
            beta1_power=scalars["beta1_power"],
            beta2_power=scalars["beta2_power"],
            lr=scalars["lr"],
            beta1=scalars["beta1"],
            beta2=scalars["beta2"],
            epsilon=scalars["epsilon"],
            grad=gradient,
        )


def build_optimizer(
    train: TrainConfig, schedule, model_variables: list[tf.Variable]
) -> keras.optimizers.Optimizer:
    """AdamW with the recipe's decay exemptions, optional clipping, EMA and loss scaling."""
    optimizer = FusedAdamW(
        learning_rate=schedule,
        weight_decay=train.weight_decay,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,  # PyTorch's AdamW default (Keras uses 1e-7)
        global_clipnorm=train.clip_grad_norm or None,
        use_ema=train.ema_decay > 0,
        ema_momentum=train.ema_decay or 0.99,
        jit_compile=train.jit_compile,  # off by default: XLA makes VAN much slower on CPU
    )
    optimizer.exclude_from_weight_decay(var_list=[v for v in model_variables if not is_decayed(v)])
    if train.mixed_precision == "mixed_float16":
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer
