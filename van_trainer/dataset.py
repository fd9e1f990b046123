"""tf.data input from Transform output: each worker's own files, per-step augmentation, prefetch.

Transform stores JPEGs (van_trainer/preprocessing.py) in files of `data.examples_per_shard`
records. Under a distribution strategy the datasets are built per input pipeline
(`distributed`, i.e. `strategy.distribute_datasets_from_function`): pipeline i of n reads files
i, i+n, i+2n, ... and nothing else, so each worker reads, decodes and augments only its share.
"""

from __future__ import annotations

import tensorflow as tf

from van_tfx import features
from van_tfx.config import Config
from van_tfx.tfrecords import tfrecord_compression
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


def worker_files(files: list[str], input_context: tf.distribute.InputContext | None) -> list[str]:
    """This input pipeline's disjoint share of the files: every n-th, from its id on."""
    if input_context is None or input_context.num_input_pipelines == 1:
        return files
    count, index = input_context.num_input_pipelines, input_context.input_pipeline_id
    if len(files) < count:
        raise ValueError(
            f"{len(files)} input files for {count} workers: each worker reads its own files, so "
            "every worker needs at least one (lower data.examples_per_shard and rerun Transform)"
        )
    return files[index::count]


def _compression(files: list[str]) -> str:
    # Transform writes uncompressed TFRecords; *.gz files (older runs) are read as GZIP.
    return tfrecord_compression(files[0])


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


def _options(config: Config) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = config.train.deterministic
    # Sharded by file in worker_files already: tf.distribute must not shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return options


def _per_replica_batch(batch_size: int, input_context) -> int:
    return input_context.get_per_replica_batch_size(batch_size) if input_context else batch_size


def train_dataset(
    files: list[str],
    config: Config,
    num_classes: int,
    batch_size: int | None = None,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """Endless, shuffled, augmented batches of (normalised images, soft one-hot targets)."""
    # The shuffle comes before the repeat, so epoch k + 1 starts only once epoch k has emitted every
    # record of this pipeline's files. With `input_context`, batches are per replica.
    batch_size = _per_replica_batch(batch_size or config.train.batch_size, input_context)
    files = worker_files(files, input_context)
    seed = config.train.seed
    if input_context is not None and input_context.num_input_pipelines > 1:
        seed = seed * 1009 + input_context.input_pipeline_id  # each pipeline its own draws
    spec = transformed_feature_spec()

    @graph_function
    def parse_and_augment(index, record):
        example = tf.io.parse_single_example(record, spec)
        item_seed = augment.example_seed(seed, index)
        image = augment.train_augment_jpeg(
            example[features.TRANSFORMED_IMAGE], item_seed, config.model.image_size, config.augment
        )
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
    files: list[str],
    config: Config,
    num_classes: int,
    batch_size: int | None = None,
    input_context: tf.distribute.InputContext | None = None,
    steps: int | None = None,
    weight: float = 1.0,
) -> tf.data.Dataset:
    """One pass of (eval view, one-hot targets) over this pipeline's files (augment.eval_view)."""
    # With `steps`, the pass is exactly `steps` full batches per replica, padded with zero-weight
    # examples and yielding (images, targets, weights), real examples weighing `weight`: every
    # worker of a strategy then runs the same steps over its own files, none sees an empty batch
    # (TensorFlow's CPU convolution returns its input unchanged for one), and weighted metrics and
    # the loss (sum over slots / slots, see train.eval_plan) are exactly those of the real examples.
    batch_size = _per_replica_batch(batch_size or config.train.batch_size, input_context)
    spec = transformed_feature_spec()
    size = config.model.image_size

    @graph_function
    def parse_and_preprocess(record):
        example = tf.io.parse_single_example(record, spec)
        image = augment.eval_view_from_jpeg(
            example[features.TRANSFORMED_IMAGE], size, config.eval.crop_pct
        )
        return image, tf.one_hot(example[features.TRANSFORMED_LABEL], num_classes)

    ds = _records(worker_files(files, input_context), shuffle_files=False, seed=config.train.seed)
    ds = ds.map(parse_and_preprocess, num_parallel_calls=AUTOTUNE)
    if steps:
        replicas_here = 1
        if input_context is not None:
            replicas_here = input_context.num_replicas_in_sync // input_context.num_input_pipelines
        real = ds.map(lambda image, target: (image, target, tf.constant(weight, tf.float32)))
        padding = tf.data.Dataset.from_tensors(
            (tf.zeros([size, size, 3]), tf.zeros([num_classes]), tf.constant(0.0))
        ).repeat()
        ds = real.concatenate(padding).take(steps * batch_size * max(1, replicas_here))
        ds = ds.batch(batch_size, drop_remainder=True)
    else:
        ds = ds.batch(batch_size)
    options = _options(config)
    options.deterministic = True
    return ds.prefetch(AUTOTUNE).with_options(options)


def distributed(strategy: tf.distribute.Strategy, make_dataset, *args, **kwargs):
    """`make_dataset(*args, input_context=..., **kwargs)`, built once per input pipeline."""
    return strategy.distribute_datasets_from_function(
        lambda input_context: make_dataset(*args, input_context=input_context, **kwargs)
    )
