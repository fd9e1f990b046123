"""One-time graph-building costs of tf_keras under tf.function, cut before the first step.

Measured on the demo's VAN-tiny (2-core Xeon, docs/trainer.md#time-to-first-step): tracing
`model.fit`'s train step took ~50 s, because AutoGraph rewrote every tf_keras function it passed
through (TensorFlow's conversion rules skip `keras`, not the `tf_keras` package TF 2.16 uses),
and it traced the step twice, because the optimizer created its slot variables inside it.
"""

from __future__ import annotations

import tf_keras as keras
from tensorflow.python.autograph.core import config as autograph_config
from tensorflow.python.autograph.core import config_lib

TF_KERAS_RULE = config_lib.DoNotConvert("tf_keras")


def keep_autograph_out_of_tf_keras() -> None:
    """Make AutoGraph call tf_keras' own code as plain Python, as it already does for `keras`."""
    # tf_keras is written for graph mode (its loops over tensors go through tf.range inside the
    # tf.function it creates, which AutoGraph still converts), so nothing changes but the cost. Our
    # layers' `call` methods are still converted: tf_keras converts subclassed layers itself.
    rules = autograph_config.CONVERSION_RULES
    if not any(str(rule) == str(TF_KERAS_RULE) for rule in rules):
        autograph_config.CONVERSION_RULES = (TF_KERAS_RULE, *rules)


def create_optimizer_variables(model: keras.Model) -> None:
    """Create the compiled optimizer's slots now (in the strategy scope), not in the first step."""
    # A tf.function that creates variables on its first call is traced a second time; with the slots
    # in place the train step is traced once.
    model.optimizer.build(model.trainable_variables)
