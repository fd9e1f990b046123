"""Input pipeline vs training step throughput on the same cores (goal: input >= 3x training).

Writes real digit images (scikit-learn's 8x8 digits, upscaled) as Transform-style records, then
measures in one run:
  1. the Trainer's input pipeline with the full augmentation recipe (images/s),
  2. the eval input pipeline (images/s),
  3. VAN training steps fed from memory (images/s), in float32 and in mixed precision.

    TF_USE_LEGACY_KERAS=1 .venv/bin/python benchmarks/bench_input.py --variant b0 --image-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import van_tfx  # noqa: E402,F401  (legacy Keras before TensorFlow)
from benchmarks.machine import describe_machine  # noqa: E402


def write_records(path: Path, count: int, side: int) -> list[str]:
    """Transform-layout records (JPEG bytes + int64 label) of real digit images, side x side."""
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    jpegs, labels = [], []
    for i in range(count):
        pixels = (digits.images[i % len(digits.images)] * 255 / 16).astype(np.uint8)
        image = Image.fromarray(pixels).resize((side, side), Image.BICUBIC).convert("RGB")
        jpeg = io.BytesIO()
        image.save(jpeg, "JPEG", quality=90)
        jpegs.append(jpeg.getvalue())
        labels.append(int(digits.target[i % len(digits.target)]))
    file = str(path / "transformed_examples-00000-of-00001.gz")
    return [write_transformed(file, jpegs, labels, "GZIP")]


def write_transformed(path: str, jpegs: list[bytes], labels: list[int], compression: str) -> str:
    """One shard in Transform's layout (JPEG bytes + int64 label per record); returns `path`."""
    import tensorflow as tf

    from van_tfx import features

    with tf.io.TFRecordWriter(path, options=compression) as writer:
        for jpeg, label in zip(jpegs, labels, strict=True):
            example = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        features.TRANSFORMED_IMAGE: tf.train.Feature(
                            bytes_list=tf.train.BytesList(value=[jpeg])
                        ),
                        features.TRANSFORMED_LABEL: tf.train.Feature(
                            int64_list=tf.train.Int64List(value=[label])
                        ),
                    }
                )
            )
            writer.write(example.SerializeToString())
    return path


def images_per_second(ds, batches: int, batch_size: int, warmup: int = 2) -> float:
    """Throughput of iterating `batches` batches after `warmup` warm-up batches."""
    iterator = iter(ds)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def train_step_images_per_second(config, steps: int, precision: str) -> float:
    """Training steps of VAN on an in-memory batch (no input cost), at the given precision."""
    import tensorflow as tf
    import tf_keras as keras

    from van_trainer import optim, train

    keras.mixed_precision.set_global_policy("float32" if precision == "none" else precision)
    try:
        model = train.build_model(config, 10)
        schedule = optim.build_schedule(config.train, steps + 2, 1)
        train.compile_model(model, config, schedule, 10)
        size = config.model.image_size
        x = tf.random.uniform([config.train.batch_size, size, size, 3], -1, 1)
        y = tf.one_hot(tf.random.uniform([config.train.batch_size], 0, 10, tf.int32), 10)
        for _ in range(2):
            model.train_on_batch(x, y)
        start = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(x, y)
        return steps * config.train.batch_size / (time.perf_counter() - start)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def main(argv=None) -> int:
    """Run the benchmark and print a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="b0")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--stored-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precisions", default="none,mixed_bfloat16")
    args = parser.parse_args(argv)
    print(describe_machine())

    from van_tfx.config import Config
    from van_trainer import dataset

    config = Config.model_validate(
        {
            "model": {"variant": args.variant, "image_size": args.image_size},
            "train": {"batch_size": args.batch_size},
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        files = write_records(Path(tmp), 1024, args.stored_size)
        results = {
            "input_train_full_augmentation": images_per_second(
                dataset.train_dataset(files, config, 10), args.batches, args.batch_size
            ),
            "input_eval": images_per_second(
                dataset.eval_dataset(files, config, 10).repeat(), args.batches, args.batch_size
            ),
        }
    for precision in args.precisions.split(","):
        results[f"train_step_{precision}"] = train_step_images_per_second(
            config, args.steps, precision
        )
    results["input_over_train_step"] = (
        results["input_train_full_augmentation"] / results["train_step_none"]
        if "train_step_none" in results
        else None
    )
    print(json.dumps({k: round(v, 1) if v else v for k, v in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
