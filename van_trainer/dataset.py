"""tf.data input from Transform output: parallel reads, per-step augmentation, prefetch."""

from __future__ import annotations

import tensorflow as tf

from van_tfx import features
from van_tfx.config import Config
from van_trainer import augment

AUTOTUNE = tf.data.AUTOTUNE
# The map functions branch only on Python config values (tensor branches are explicit tf.cond /
# tf.switch_case / tf.where), so AutoGraph has nothing to rewrite: skipping it saves ~2.5 s of
# tracing per dataset (benchmarks/bench_first_step.py).
graph_function = tf.autograph.experimental.do_not_convert


def resolve_files(patterns: list[str] | str) -> list[str]:
    """Expand file patterns (TFX passes `.../Split-train/*`); fail naming them when none match."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files = sorted(f for p in patterns for f in tf.io.gfile.glob(p))
    if not files:
        raise FileNotFoundError(f"no input files match {patterns}")
    return files


def _compression(files: list[str]) -> str:
    # Transform writes GZIP'ed TFRecords named *.gz; anything else is read uncompressed.
    return "GZIP" if files[0].endswith(".gz") else ""


def _records(files: list[str], shuffle_files: bool, seed: int) -> tf.data.Dataset:
    """Read the TFRecord files in parallel, interleaved."""
    compression = _compression(files)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_files:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    return ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=compression),
        cycle_length=min(len(files), 8),
        num_parallel_calls=AUTOTUNE,
    )


def transformed_feature_spec() -> dict:
    """The Transform outputs the Trainer reads (see van_tfx.features)."""
    return {
        features.TRANSFORMED_IMAGE: tf.io.FixedLenFeature([], tf.string),
        features.TRANSFORMED_LABEL: tf.io.FixedLenFeature([], tf.int64),
    }


def decode_stored_images(raw: tf.Tensor, size: int) -> tf.Tensor:
    """Raw uint8 bytes of [size,size,3] images (any leading shape) -> uint8 [..., size, size, 3]."""
    pixels = tf.io.decode_raw(raw, tf.uint8)
    expected = size * size * 3
    tf.debugging.assert_equal(
        tf.shape(pixels)[-1],
        expected,
        message=f"Transform '{features.TRANSFORMED_IMAGE}' does not hold {size}x{size}x3 uint8 "
        "bytes; is data.stored_image_size the value Transform ran with?",
    )
    return tf.reshape(pixels, tf.concat([tf.shape(raw), [size, size, 3]], 0))


def _options(config: Config) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = config.train.deterministic
    # Element-wise sharding works for any file count (Transform often writes one file).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def train_dataset(
    files: list[str], config: Config, num_classes: int, batch_size: int | None = None
) -> tf.data.Dataset:
    """Endless, shuffled, augmented batches of (normalised images, soft one-hot targets)."""
    batch_size = batch_size or config.train.batch_size
    seed = config.train.seed
    size = config.data.stored_image_size
    spec = transformed_feature_spec()

    @graph_function
    def parse_and_augment(index, record):
        example = tf.io.parse_single_example(record, spec)
        image = decode_stored_images(example[features.TRANSFORMED_IMAGE], size)
        item_seed = augment.example_seed(seed, index)
        image = augment.train_augment(image, item_seed, config.model.image_size, config.augment)
        target = tf.one_hot(example[features.TRANSFORMED_LABEL], num_classes)
        return image, target

    @graph_function
    def mix(index, batch):
        images, targets = batch
        return augment.mixup_cutmix(
            images, targets, augment.example_seed(seed + 1, index), config.augment
        )

    ds = _records(files, shuffle_files=True, seed=seed)
    ds = ds.shuffle(config.train.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat().enumerate().map(parse_and_augment, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True).enumerate()
    ds = ds.map(mix, num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE).with_options(_options(config))


def eval_dataset(
    files: list[str], config: Config, num_classes: int, batch_size: int | None = None
) -> tf.data.Dataset:
    """One pass of (eval-preprocessed images, one-hot targets), via augment.eval_preprocess."""
    batch_size = batch_size or config.train.batch_size
    size = config.data.stored_image_size
    spec = transformed_feature_spec()

    @graph_function
    def parse_and_preprocess(records):
        batch = tf.io.parse_example(records, spec)
        images = decode_stored_images(batch[features.TRANSFORMED_IMAGE], size)
        images = augment.eval_preprocess(images, config.model.image_size, config.eval.crop_pct)
        return images, tf.one_hot(batch[features.TRANSFORMED_LABEL], num_classes)

    ds = _records(files, shuffle_files=False, seed=config.train.seed).batch(batch_size)
    ds = ds.map(parse_and_preprocess, num_parallel_calls=AUTOTUNE)
    options = _options(config)
    options.deterministic = True
    return ds.prefetch(AUTOTUNE).with_options(options)


def count_records(files: list[str]) -> int:
    """Number of records in the files (one cheap pass; used when no step count is configured)."""
    ds = tf.data.TFRecordDataset(files, compression_type=_compression(files))
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1).numpy())
