"""The Trainer's input pipeline on ImageNet-like records, baseline and candidate in one run.

Records hold real photos (scikit-learn's sample images, random 500x375 crops, JPEG quality 90,
as Transform stores ImageNet) and are read by van_trainer.dataset, 224 px, the paper's recipe.

  --sections augment: transforms applied with probability p run only when applied
      (augment.apply_if, tf.cond) vs. computed for every image and kept by tf.where (baseline).
  --sections storage: transformed shards uncompressed vs. GZIP (baseline): bytes on disk, raw
      read throughput, and the eval pipeline's images/s.

    TF_USE_LEGACY_KERAS=1 .venv/bin/python benchmarks/bench_augment.py --rounds 3
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import van_tfx  # noqa: E402,F401  (legacy Keras before TensorFlow)
from benchmarks.bench_input import images_per_second, write_transformed  # noqa: E402
from benchmarks.machine import describe_machine  # noqa: E402


def photo_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct 500x375 JPEGs cut from scikit-learn's sample photos."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images  # 427 x 640 x 3
    jpegs = []
    for i in range(count):
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, 427 - 375), rng.integers(0, 640 - 500)
        crop = Image.fromarray(photo[top : top + 375, left : left + 500])
        if i % 2:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def write_shard(path: str, jpegs: list[bytes]) -> str:
    """One Transform-layout shard of `jpegs` (labels 0-9 in turn), GZIP when `path` is *.gz."""
    from van_tfx.tfrecords import tfrecord_compression

    labels = [i % 10 for i in range(len(jpegs))]
    return write_transformed(path, jpegs, labels, tfrecord_compression(path))


def recipe_config(batch_size: int):
    """The paper's recipe (RandAugment m9 n2, random erasing 0.25, mixup/cutmix) at 224 px."""
    from van_tfx.config import load_config

    return load_config(overrides=[f"train.batch_size={batch_size}", "model.image_size=224"])


def select_with_where(condition, transform, image):
    """The baseline of augment.apply_if: compute the transform for every image, then select."""
    import tensorflow as tf

    return tf.where(condition, transform(), image)


def mixup_cutmix_both_branches(images, targets, seed, cfg):
    """The baseline of augment.mixup_cutmix: build the cutmix and the mixup batch, then select."""
    import tensorflow as tf

    from van_trainer.augment import _cutmix_mask, fold_seed, mixup_draws

    draws = mixup_draws(seed, cfg)  # the same draws: only how the batch is built differs
    if draws is None:
        return images, targets
    cutmix, lam = draws
    flipped = tf.reverse(images, axis=[0])
    mask, box_lam = _cutmix_mask(tf.shape(images)[1], tf.shape(images)[2], lam, fold_seed(seed, 44))
    images = tf.where(cutmix, tf.where(mask, flipped, images), lam * images + (1.0 - lam) * flipped)
    lam = tf.where(cutmix, tf.where(lam < 1.0, box_lam, 1.0), lam)
    targets = lam * targets + (1.0 - lam) * tf.reverse(targets, axis=[0])
    return images, targets


def alternate(pipelines: dict, rounds: int, measure) -> dict[str, float]:
    """Median of `rounds` measurements of each pipeline, measured in turn each round."""
    results: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(rounds):
        for name, pipeline in pipelines.items():
            results[name].append(measure(pipeline))
    return {name: statistics.median(values) for name, values in results.items()}


def augment_section(root: Path, args) -> None:
    """Training pipeline images/s with apply_if (candidate) and with tf.where (baseline)."""
    from van_trainer import augment, dataset

    files = [write_shard(str(root / "train-00000-of-00001"), photo_jpegs(args.images))]
    config = recipe_config(args.batch_size)
    candidate = dataset.train_dataset(files, config, 10)
    original = augment.apply_if
    augment.apply_if = select_with_where
    try:
        baseline = dataset.train_dataset(files, config, 10)  # traced with the baseline
    finally:
        augment.apply_if = original
    original_mix = augment.mixup_cutmix
    augment.mixup_cutmix = mixup_cutmix_both_branches
    try:
        both = dataset.train_dataset(files, config, 10)  # mixup and cutmix both built per batch
    finally:
        augment.mixup_cutmix = original_mix
    medians = alternate(
        {"tf.where (baseline)": baseline, "mixup+cutmix both": both, "apply_if": candidate},
        args.rounds,
        lambda ds: images_per_second(ds, args.batches, args.batch_size),
    )
    for name, value in medians.items():
        print(f"  train pipeline, {name:>20}: {value:7.1f} img/s (median of {args.rounds})")
    ratio = medians["apply_if"] / medians["tf.where (baseline)"]
    print(f"  apply_if vs tf.where: x{ratio:.2f}")
    ratio = medians["apply_if"] / medians["mixup+cutmix both"]
    print(f"  mixup or cutmix (tf.cond) vs both built per batch: x{ratio:.2f}")


def read_megabytes_per_second(path: str) -> float:
    """Raw TFRecord read throughput of one shard (records only, no parsing; GZIP if *.gz)."""
    import tensorflow as tf

    from van_tfx.tfrecords import tfrecord_compression

    start = time.perf_counter()
    total = 0
    for record in tf.data.TFRecordDataset(path, tfrecord_compression(path)).batch(256):
        total += int(tf.reduce_sum(tf.strings.length(record)))
    return total / 1e6 / (time.perf_counter() - start)


def storage_section(root: Path, args) -> None:
    """Uncompressed (candidate) vs GZIP (baseline) shards: size, read MB/s, eval images/s."""
    from van_trainer import dataset

    jpegs = photo_jpegs(args.images, seed=1)
    paths = {"GZIP (baseline)": str(root / "eval.gz"), "uncompressed": str(root / "eval")}
    writes = alternate(paths, args.rounds, lambda path: write_seconds(path, jpegs))
    shards = {name: write_shard(path, jpegs) for name, path in paths.items()}
    for name, path in shards.items():
        print(
            f"  {name:>16}: {os.path.getsize(path) / 1e6:7.2f} MB on disk, "
            f"written in {writes[name]:.3f} s"
        )
    reads = alternate(shards, args.rounds, lambda path: read_megabytes_per_second(path))
    config = recipe_config(args.batch_size)
    pipelines = {
        name: dataset.eval_dataset([path], config, 10).repeat() for name, path in shards.items()
    }
    evals = alternate(
        pipelines, args.rounds, lambda ds: images_per_second(ds, args.batches, args.batch_size)
    )
    for name in shards:
        print(f"  {name:>16}: read {reads[name]:7.1f} MB/s, eval pipeline {evals[name]:7.1f} img/s")
    base, ours = "GZIP (baseline)", "uncompressed"
    print(
        f"  uncompressed vs GZIP: write x{writes[base] / writes[ours]:.2f}, "
        f"read x{reads[ours] / reads[base]:.2f}, "
        f"eval pipeline x{evals[ours] / evals[base]:.2f}, "
        f"size x{os.path.getsize(shards[ours]) / os.path.getsize(shards[base]):.3f}"
    )


def write_seconds(path: str, jpegs: list[bytes]) -> float:
    """Seconds to write `jpegs` as one shard at `path` (compressed if it ends in .gz)."""
    start = time.perf_counter()
    write_shard(path, jpegs)
    return time.perf_counter() - start


def main() -> int:
    """Run the chosen sections and print each baseline and candidate, measured in one run."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", default="augment,storage")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(describe_machine())
    with tempfile.TemporaryDirectory() as tmp:
        for section in args.sections.split(","):
            print(f"{section}:")
            {"augment": augment_section, "storage": storage_section}[section](Path(tmp), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
