"""Our side of bench_model.py: VAN in tf_keras, timed on request in a process of its own.

Speaks torch_van.py's protocol (one JSON command per line on stdin, one JSON answer per line on
stdout), so bench_model.py can run several of these with different environments (oneDNN on/off,
ISA caps, thread counts: all read once, when TensorFlow starts) and alternate their rounds with
PyTorch's:

    {"cmd": "setup", "variant": "b0", "batch": 16, "image_size": 224, "drop_path_rate": 0.1,
     "rows": ["ours", ...]}                                -> TF facts
    {"cmd": "train" | "infer", "row": "ours", "steps": 2}  -> images/s
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import van_tfx  # noqa: E402,F401  (legacy Keras and the oneDNN default before TensorFlow)
from benchmarks.protocol import serve  # noqa: E402
from van_tfx.config import ServingConfig  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Row:
    """One way of laying out VAN: training layout, inference fold, precision, inference slices."""

    implementation: object
    fold: object | None  # None: infer with the training model itself
    policy: str = "float32"
    slices: int = ServingConfig().inference_slices  # what the exported graph does by default


def rows() -> dict[str, Row]:
    """Row name -> Row: ours as the Trainer and the export run it, and each idea undone."""
    from van_trainer.model import INFERENCE_IMPLEMENTATION as FOLD
    from van_trainer.model import Implementation, training_implementation

    ours = training_implementation()  # what the Trainer runs here: C++ kernels where they load
    naive = Implementation(
        pointwise="conv", depthwise="grouped", fused_batch_norm=False, gelu="autodiff"
    )
    replace = dataclasses.replace
    return {
        "ours": Row(ours, FOLD),
        "naive port (grouped conv, conv 1x1, unfused BN, autodiff GELU)": Row(
            naive, None, slices=1
        ),
        "ours, stock TF depthwise convs (no C++ kernels)": Row(
            replace(ours, depthwise="depthwise"), FOLD
        ),
        "ours, inference as one batch (no slices)": Row(ours, FOLD, slices=1),
        "ours, inference in 4 slices": Row(ours, FOLD, slices=4),
        "ours, not folded for inference": Row(ours, None),
        "ours, GELU constants not folded (inference)": Row(
            ours, replace(FOLD, fold_gelu_constants=False)
        ),
        "ours, conv 1x1 for training": Row(replace(ours, pointwise="conv"), FOLD),
        "ours, GELU as TF ops (not XLA-fused)": Row(replace(ours, gelu="analytic"), FOLD),
        "ours, autodiff GELU gradient": Row(replace(ours, gelu="autodiff"), FOLD),
        "ours, mixed_bfloat16": Row(ours, FOLD, policy="mixed_bfloat16"),
    }


def make_train_step(model):
    """One compiled step of the Trainer's AdamW on label cross-entropy (no metrics, no input)."""
    import tensorflow as tf
    import tf_keras as keras

    from van_tfx.config import TrainConfig
    from van_trainer import optim

    optimizer = optim.build_optimizer(TrainConfig(), 1e-3, model.trainable_variables)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    return step


def make_infer_step(model, slices: int):
    """Inference as the exported graph runs it: one traced function, the batch in chunks."""
    # The chunks are of serving.inference_chunk_images, each in slices.
    import tensorflow as tf

    from van_trainer.export import forward_in_slices, in_chunks

    chunk = ServingConfig().inference_chunk_images

    def logits(images):
        return tf.cast(forward_in_slices(model, images, slices), tf.float32)

    @tf.function
    def infer(images):
        return in_chunks(logits, images, chunk, model.output_shape[-1])

    return infer


def build(cmd: dict) -> dict:
    """row name -> (train step, infer step, images, labels), each traced and warmed up."""
    import tensorflow as tf
    import tf_keras as keras

    from van_trainer.model import build_van, fold_for_inference

    catalogue = rows()
    size, batch = cmd["image_size"], cmd["batch"]
    images = tf.random.normal([batch, size, size, 3])
    labels = tf.random.uniform([batch], 0, 1000, dtype=tf.int64)
    runners = {}
    for name in cmd["rows"]:
        row = catalogue[name]
        keras.mixed_precision.set_global_policy(row.policy)
        try:
            model = build_van(
                cmd["variant"],
                input_shape=(size, size, 3),
                drop_path_rate=cmd["drop_path_rate"],
                implementation=row.implementation,
            )
            train = make_train_step(model)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        folded = model if row.fold is None else fold_for_inference(model, implementation=row.fold)
        infer = make_infer_step(folded, row.slices)
        for _ in range(2):
            train(images, labels), infer(images)
        runners[name] = (train, infer, images, labels)
    return runners


def seconds_per_call(fn, args, steps: int) -> float:
    """Wall seconds per call over `steps` calls of a warm function."""
    import numpy as np

    start = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    np.asarray(out)  # wait for the last result
    return (time.perf_counter() - start) / steps


def facts(variant: str) -> dict:
    """What the parent prints about this side, and the variant's shape for the reference."""
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    from van_trainer import kernels
    from van_trainer.model import VARIANTS

    cfg = VARIANTS[variant]
    threads = tf.config.threading
    return {
        "variant_config": {
            "embed_dims": list(cfg.embed_dims),
            "depths": list(cfg.depths),
            "mlp_ratios": list(cfg.mlp_ratios),
        },
        "tf": tf.__version__,
        "onednn": bool(_pywrap_util_port.IsMklEnabled()),
        "kernels_isa": kernels.isa(),
        "intra_op_threads": threads.get_intra_op_parallelism_threads() or os.cpu_count(),
        "inter_op_threads": threads.get_inter_op_parallelism_threads() or os.cpu_count(),
    }


def main() -> int:
    """Answer commands until 'quit' or end of input."""
    runners: dict = {}

    def answer(cmd: dict) -> dict:
        if cmd["cmd"] == "setup":
            runners.update(build(cmd))
            return facts(cmd["variant"])
        train, infer, images, labels = runners[cmd["row"]]
        if cmd["cmd"] == "train":
            seconds = seconds_per_call(train, (images, labels), cmd["steps"])
        else:
            seconds = seconds_per_call(infer, (images,), cmd["steps"])
        return {"images_per_second": int(images.shape[0]) / seconds}

    return serve(answer)


if __name__ == "__main__":
    raise SystemExit(main())
