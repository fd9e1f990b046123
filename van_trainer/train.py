"""TFX Trainer entry point (GenericExecutor): `run_fn="van_trainer.train.run_fn"`.

run_fn rebuilds the typed config from `custom_config`, picks a distribution strategy, trains VAN
on Transform output with per-step augmentation (resumable from checkpoints in model_run_dir), and
exports the serving SavedModel from the chief only. model_run_dir receives TensorBoard logs,
history.csv, metrics.json and training_curves.png.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os

import tensorflow as tf
import tf_keras as keras

from van_tfx import features, storage
from van_tfx.config import Config
from van_tfx.data import shards
from van_trainer import checkpoint_index, dataset, distribute, export, optim, tracing, weights

log = logging.getLogger(__name__)

# TFX Trainer's split names (train_args / eval_args defaults).
TRAIN_SPLIT, EVAL_SPLIT = "train", "eval"
# The Config sections the pipeline hands the Trainer through custom_config.
TRAINER_SECTIONS = ("data", "model", "augment", "train", "eval", "serving")
BACKUP_DIR = "backup"
HISTORY_CSV = "history.csv"
METRICS_JSON = "metrics.json"
CURVES_PNG = "training_curves.png"


# --------------------------------------------------------------------------- config


def custom_config_for(config: Config) -> dict:
    """What the pipeline passes as the Trainer's custom_config (JSON-able sections)."""
    return {name: getattr(config, name).model_dump(mode="json") for name in TRAINER_SECTIONS}


def config_from_custom_config(custom_config: dict | None) -> Config:
    """Rebuild the typed Config from the Trainer's custom_config (missing sections: defaults)."""
    sections = {k: v for k, v in (custom_config or {}).items() if k in Config.model_fields}
    return Config.model_validate(sections)


def plan_steps(config: Config, transform_output: str, train_steps: int | None) -> tuple[int, int]:
    """(epochs, steps_per_epoch) from TFX train_args.num_steps or the train config."""
    # TFX train_args.num_steps, if set, is the total step budget spread over train.epochs; otherwise
    # train.steps_per_epoch, or one pass over the training split as counted by Transform (never by
    # reading the data).
    epochs = config.train.epochs
    if train_steps:
        epochs = min(epochs, train_steps)
        return epochs, math.ceil(train_steps / epochs)
    if config.train.steps_per_epoch:
        return epochs, config.train.steps_per_epoch
    return epochs, max(1, split_size(transform_output, TRAIN_SPLIT) // config.train.batch_size)


def split_size(transform_output: str, split: str) -> int:
    """Examples in a transformed split, from the count Transform recorded in its graph."""
    count = shards.read_example_count(transform_output, split)
    if count is None:
        raise ValueError(
            f"the transform graph {transform_output} records no example count for split "
            f"{split!r} ({shards.example_count_path(transform_output, split)}): Transform "
            "writes it when run with components.transform_executor.ShardingTransformExecutor, "
            "as the pipeline does; otherwise set train.steps_per_epoch"
        )
    return count


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """A validation pass: `steps` full batches per replica; real examples weigh `weight`."""

    steps: int
    weight: float


def eval_plan(
    strategy: tf.distribute.Strategy,
    config: Config,
    transform_output: str,
    eval_files: list[str],
    steps: int | None = None,
) -> EvalPlan:
    """Steps and weight of a validation pass in which every worker reads its own eval files."""
    # Keras needs a step count for distributed datasets, and every worker must run the same steps:
    # the full pass is as long as the longest worker's share (from the per-file counts Transform
    # recorded, never by reading), the other workers pad theirs with zero-weight examples
    # (dataset.eval_dataset). Keras divides the summed loss by the slots of every batch, padding
    # included, so real examples weigh slots / real examples: loss and weighted metrics are then
    # exactly those of the real examples. `steps` (train.eval_steps, TFX eval num_steps) shortens
    # the pass.
    per_file = shards.read_shard_examples(transform_output, EVAL_SPLIT) or {}
    missing = [f for f in eval_files if os.path.basename(f) not in per_file]
    if missing:
        raise ValueError(
            f"the transform graph {transform_output} records no example count for eval file "
            f"{missing[0]} ({shards.example_count_path(transform_output, EVAL_SPLIT)}): Transform "
            "writes them when run with components.transform_executor.ShardingTransformExecutor, "
            "as the pipeline does: rerun Transform with it"
        )
    pipelines = distribute.input_pipelines(strategy)
    per_step = config.train.batch_size // pipelines  # examples each worker feeds per step
    shares = [
        sum(per_file[os.path.basename(f)] for f in eval_files[i::pipelines])
        for i in range(pipelines)
    ]
    full = max(1, *(math.ceil(n / per_step) for n in shares))
    steps = min(steps or full, full)
    real = sum(min(n, steps * per_step) for n in shares)
    if real == 0:
        raise ValueError(f"the eval split of {transform_output} holds no examples")
    return EvalPlan(steps=steps, weight=steps * per_step * pipelines / real)


def eval_data(strategy, config: Config, eval_files: list[str], num_classes: int, plan: EvalPlan):
    """The distributed validation dataset of `plan`."""
    return dataset.distributed(
        strategy,
        dataset.eval_dataset,
        eval_files,
        config,
        num_classes,
        steps=plan.steps,
        weight=plan.weight,
    )


# --------------------------------------------------------------------------- callbacks


class NanGuard(keras.callbacks.Callback):
    """Stop training with a clear error as soon as the loss is NaN or infinite."""

    def on_train_batch_end(self, batch, logs=None):
        """Raise a RuntimeError naming the step if the batch's loss is NaN or infinite."""
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            step = int(self.model.optimizer.iterations.numpy())
            raise RuntimeError(
                f"training loss became {float(loss)} at step {step}; lower train.base_learning_rate "
                "or enable train.clip_grad_norm"
            )


class ProgressLog(keras.callbacks.Callback):
    """Record the step training (re)started from and the learning rate of every epoch."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.initial_step = 0

    def on_train_begin(self, logs=None):
        """Record and log the step training (re)starts from."""
        # Runs after BackupAndRestore restored the optimizer, so this is the resumed step.
        self.initial_step = int(self.model.optimizer.iterations.numpy())
        log.info("training starts at step %d", self.initial_step)

    def on_epoch_end(self, epoch, logs=None):
        """Add the epoch's learning rate to the logs."""
        if logs is not None:
            logs["learning_rate"] = float(self.schedule(self.model.optimizer.iterations))


class ResumeCheckpointError(RuntimeError):
    """The run directory's resume checkpoint can't be restored: names it and what to do."""


# A checkpoint's `.index` holds one short entry per tensor (about 100 bytes for VAN's keys): a
# legitimate one stays far below this per expected tensor. TF reads the whole index into memory.
INDEX_BYTES_PER_TENSOR = 1024
INDEX_BYTES_BASE = 64 * 1024
# The state file `checkpoint` names the last checkpoints (tf_keras keeps one): TF reads it whole.
STATE_FILE_MAX_BYTES = 64 * 1024
# The object graph (a string) holds a short node per object: VAN-tiny's, with AdamW and EMA,
# is about 100 bytes per variable (a test checks the bound holds for VAN).
STRING_BYTES_PER_TENSOR = 2048
STRING_BYTES_BASE = 1024 * 1024
# The entry TF's saver adds to every checkpoint: the object graph, one serialized proto.
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


def checkpoint_mismatches(
    declared: dict[str, tuple[tuple[int, ...], str]],
    expected: dict[str, tuple[tuple[int, ...], str, str]],
) -> list[str]:
    """Each entry of a checkpoint's index (key -> shape, dtype) that the model does not hold."""
    # `expected` maps each checkpoint key to (shape, dtype, the variable's name). TF allocates a
    # declared shape before reading a byte of data, so every declared entry must be one the
    # model has with the same shape and dtype: then restoring costs what the model's variables
    # do, whatever the index says. A key the model has no variable for is a problem too (the
    # restore would read it, or drop it without a word), and so is a variable the checkpoint
    # lacks: tf_keras would restore the rest and leave it fresh without a word.
    problems = [
        f"{key} (the model's {expected[key][2]}) is missing from the checkpoint"
        for key in sorted(set(expected) - set(declared))
    ]
    for key in sorted(declared):
        shape, dtype = declared[key]
        if key not in expected:
            problems.append(f"{key} (shape {list(shape)}) is not a variable of this model")
            continue
        want_shape, want_dtype, name = expected[key]
        if tuple(shape) != tuple(want_shape):
            problems.append(
                f"{key} declares shape {list(shape)} where the model's {name} has shape "
                f"{list(want_shape)}"
            )
        elif dtype != want_dtype:
            problems.append(
                f"{key} declares dtype {dtype} where the model's {name} has dtype {want_dtype}"
            )
    return problems


def checkpoint_entries(root) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """Each key a checkpoint of `root` holds -> (shape, dtype, variable name), from TF's naming."""
    # TF's own traversal (the one its saver uses), so the keys are the ones it writes; reads
    # no variable's value. Every trackable the model holds with state is a variable (checked by
    # a test against a checkpoint TF writes for VAN and its optimizer).
    from tensorflow.python.checkpoint import graph_view, util

    objects, _, _, _, paths = util.objects_ids_and_slot_variables_and_paths(
        graph_view.ObjectGraphView(root)
    )
    entries = {OBJECT_GRAPH_KEY: ((), tf.string.name, "object graph")}
    for obj in objects:
        if isinstance(obj, tf.Variable):
            key = f"{paths[obj]}/.ATTRIBUTES/VARIABLE_VALUE"
            entries[key] = (tuple(obj.shape.as_list()), obj.dtype.name, obj.name)
    return entries


def resume_checkpoint_entries(model: keras.Model) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """checkpoint_entries of what tf_keras' BackupAndRestore saves for `model` (optimizer built)."""
    # The optimizer's variables are created by its first step otherwise (compile_model creates
    # them already), and a checkpoint holds them: build them now, as that step would (same
    # variables, same order), so they can be compared too.
    if model.optimizer is not None:
        tracing.create_optimizer_variables(model)
    # The objects tf_keras' WorkerTrainingState checkpoints, under the same names.
    root = tf.train.Checkpoint(
        model=model,
        ckpt_saved_epoch=tf.Variable(0, dtype=tf.int64),
        ckpt_saved_batch=tf.Variable(0, dtype=tf.int64),
        train_counter=model._train_counter,
    )
    root.save_counter  # noqa: B018  (created on first use, as saving does)
    return checkpoint_entries(root)


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """tf_keras' BackupAndRestore; a checkpoint it can't restore is an error naming the backup."""

    # The error names the backup directory and how to go on: never a bare TF error or a silent
    # start from step 0.

    # What a damaged or foreign checkpoint raises (found by cutting, removing and swapping
    # real checkpoint files): IndexError for a cut data file, ValueError for another model's.
    _RESTORE_ERRORS = (tf.errors.OpError, ValueError, IndexError, KeyError, AssertionError)

    def on_train_begin(self, logs=None):
        """Restore the last checkpoint as tf_keras does, or refuse naming the directory."""
        chief = os.path.join(self.backup_dir, "chief")  # where tf_keras reads checkpoints
        if tf.io.gfile.glob(os.path.join(chief, "ckpt-*.index")):
            self._check_size(chief, os.path.join(chief, "checkpoint"), STATE_FILE_MAX_BYTES)
            try:
                latest = tf.train.latest_checkpoint(chief)
            except self._RESTORE_ERRORS as exc:
                raise self._refusal(chief, f"{type(exc).__name__}: {exc}") from None
            if latest is None:  # tf_keras would start again from step 0 without a word
                raise self._refusal(chief, "its state file `checkpoint` names no checkpoint")
            self._check_entries(chief, latest)
            # Every value read once, checksums checked, before fit: tf_keras restores some
            # (optimizer slots) only when they are created in the first step, where a damaged
            # value raised DataLossError from inside the train function.
            try:
                reader = tf.train.load_checkpoint(latest)
                for key in reader.get_variable_to_shape_map():
                    reader.get_tensor(key)
            except self._RESTORE_ERRORS as exc:
                raise self._refusal(chief, f"{type(exc).__name__}: {exc}") from None
        try:
            super().on_train_begin(logs)
        except self._RESTORE_ERRORS as exc:
            raise self._refusal(chief, f"{type(exc).__name__}: {exc}") from None

    def _check_entries(self, chief: str, latest: str) -> None:
        # The index declares each tensor's shape and dtype, and TF allocates that shape before
        # reading its data: 8 KB on disk declaring a 1 GiB tensor grew the process by 1 GiB,
        # 8 TiB made the allocator fail. So the index alone (never the data) is compared with
        # the model's variables first, its own size bounded.
        if not self.model.built:
            raise self._refusal(chief, "the model is not built, so its variables can't be checked")
        expected = resume_checkpoint_entries(self.model)
        # The index's structure first (TF allocates the block sizes it declares), in Python.
        limit = INDEX_BYTES_BASE + INDEX_BYTES_PER_TENSOR * len(expected)
        try:
            entries = checkpoint_index.read_index(f"{latest}.index", limit)
        except checkpoint_index.CheckpointIndexError as exc:
            raise self._refusal(chief, str(exc)) from None
        except self._RESTORE_ERRORS as exc:
            raise self._refusal(chief, f"{type(exc).__name__}: {exc}") from None
        try:
            reader = tf.train.load_checkpoint(latest)
            shapes = reader.get_variable_to_shape_map()
            dtypes = reader.get_variable_to_dtype_map()
        except self._RESTORE_ERRORS as exc:
            raise self._refusal(chief, f"{type(exc).__name__}: {exc}") from None
        declared = {key: (tuple(shapes[key]), dtypes[key].name) for key in shapes}
        problems = checkpoint_mismatches(declared, expected)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise self._refusal(chief, f"{problems[0]}{more}")
        # The shapes are the model's; the object graph (a string) is sized by the data file.
        try:
            checkpoint_index.check_strings(
                latest, entries, STRING_BYTES_BASE + STRING_BYTES_PER_TENSOR * len(expected)
            )
        except checkpoint_index.CheckpointIndexError as exc:
            raise self._refusal(chief, str(exc)) from None
        except self._RESTORE_ERRORS as exc:
            raise self._refusal(chief, f"{type(exc).__name__}: {exc}") from None

    def _check_size(self, chief: str, path: str, limit: int) -> None:
        try:
            size = tf.io.gfile.stat(path).length
        except tf.errors.NotFoundError:
            return  # reading it gives the error (and its wording) it always gave
        if size > limit:
            raise self._refusal(
                chief,
                f"{os.path.basename(path)} is {size} bytes, more than the {limit} a checkpoint "
                "of this model needs",
            )

    def _refusal(self, chief: str, problem: str) -> ResumeCheckpointError:
        return ResumeCheckpointError(
            f"the resume checkpoint in {chief} can't be restored ({problem[:500]}): remove "
            f"{self.backup_dir} to train this run from its first step"
        )


def build_callbacks(config: Config, model_run_dir: str, schedule, chief: bool) -> list:
    """Checkpoint/resume first (the others must see restored state), then logging and guards."""
    callbacks = [
        BackupAndRestore(
            os.path.join(model_run_dir, BACKUP_DIR),
            save_freq=config.train.checkpoint_every_steps,
            delete_checkpoint=True,
        ),
        ProgressLog(schedule),
        NanGuard(),
        keras.callbacks.TensorBoard(model_run_dir, update_freq=config.train.log_every_steps),
    ]
    if chief:
        csv_path = os.path.join(model_run_dir, HISTORY_CSV)
        callbacks.append(keras.callbacks.CSVLogger(csv_path, append=True))
    return callbacks


# --------------------------------------------------------------------------- model


def build_model(config: Config, num_classes: int) -> keras.Model:
    """VAN at config.model, taking config.model.image_size inputs, in the fastest layout here."""
    # Fastest layout: C++ depthwise kernels on CPU unless train.cpu_kernels is off or XLA compiles.
    from van_trainer.model import build_van, training_implementation  # heavy: import late

    size = config.model.image_size
    # XLA can't compile a custom op, so jit_compile gets the stock layout.
    use_kernels = config.train.cpu_kernels and not config.train.jit_compile
    return build_van(
        config.model.variant,
        num_classes=num_classes,
        input_shape=(size, size, 3),
        drop_path_rate=config.model.drop_path_rate,
        implementation=training_implementation(use_kernels),
    )


def describe_depthwise_kernels(model: keras.Model) -> str | None:
    """Log and return which depthwise convs train: the C++ kernels' ISA, or None (stock ops)."""
    from van_trainer import kernels
    from van_trainer.model import uses_kernels

    if uses_kernels(model):
        isa = kernels.isa()
        logging.info("depthwise convs train with the van-tfx C++ kernels (%s)", isa)
        return isa
    logging.info("depthwise convs train with stock TF ops")
    return None


def load_initial_weights(
    model: keras.Model,
    config: Config,
    num_classes: int,
    base_model: str | None,
    class_names: list[str] | None = None,
) -> str:
    """Warm start from the last blessed model, else official weights; returns what was loaded."""
    # The classifier is warm-started only when the base model's class list is `class_names`: with
    # the same count but another list, its rows would stand for other classes. The rest of the
    # network is warm-started whatever the classes.
    if base_model and config.train.warm_start:
        path = export.keras_weights_path(base_model)
        if not tf.io.gfile.exists(base_model):
            # ServedModel leaves its artifact empty when nothing is served: every first run
            # (every demo) warned about a missing weights file for what is not a problem.
            log.info("no warm start: nothing is served yet (%s is empty)", base_model)
        elif not tf.io.gfile.exists(path):
            log.warning("warm start skipped: %s has no Keras weights at %s", base_model, path)
        else:
            try:
                why_fresh = _classes_changed(export.read_class_list(base_model), class_names)
            except export.ClassListFileError as exc:
                # Which class each row is can't be known: only the classifier starts fresh.
                why_fresh = f"the base model's class list is unusable ({exc})"
            if _load_if_compatible(model, config, num_classes, path, why_fresh):
                return path
    if config.model.pretrained_weights:
        # Fine-tuning to another class count: only the classifier may differ and stay fresh.
        with storage.local_copy(config.model.pretrained_weights) as local:
            fresh = weights.load_weights_by_name(model, local, keep_fresh=("head",))
        log.info(
            "initialised from %s%s",
            config.model.pretrained_weights,
            f" (kept fresh: {', '.join(fresh)})" if fresh else "",
        )
        return config.model.pretrained_weights
    return ""


def _classes_changed(base: list[str] | None, current: list[str] | None) -> str | None:
    """Why the classifier can't be warm-started from a model of classes `base`, or None."""
    if current is None or base == current:
        return None
    if base is None:
        return "the base model does not say which class each classifier row is"
    added, removed = len(set(current) - set(base)), len(set(base) - set(current))
    if added or removed:
        return f"the class list changed ({added} added, {removed} removed)"
    return "the class list is in another order"


def _load_if_compatible(model, config, num_classes, path, why_fresh: str | None) -> bool:
    head = ("head",) if why_fresh else ()
    try:
        # h5py reads local files only: a base model on object storage is copied here first.
        with storage.local_copy(path) as local:
            weights.load_weights_by_name(model, local, skip=head)  # all or nothing
    except weights.WeightsMismatchError as exc:
        # Another variant or a damaged file (the message says which, naming the file): the
        # run trains fresh rather than fail for the model it would replace.
        log.warning(
            "warm start skipped, VAN-%s with %d classes starts fresh: %s",
            config.model.variant,
            num_classes,
            exc,
        )
        return False
    log.info("warm start from %s%s", path, f" (classifier kept fresh: {why_fresh})" if head else "")
    return True


def compile_model(model, config: Config, schedule, num_classes: int) -> None:
    """AdamW recipe, label-smoothed soft-target cross-entropy, top-1/top-5 accuracy."""
    # XLA and steps per call as train.jit_compile / train.steps_per_execution say.
    model.compile(
        optimizer=optim.build_optimizer(config.train, schedule, model.trainable_variables),
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=config.train.label_smoothing
        ),
        # Weighted: validation pads each worker's share with zero-weight examples (eval_plan).
        weighted_metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
        ],
        jit_compile=config.train.jit_compile,
        steps_per_execution=config.train.steps_per_execution,
    )
    tracing.create_optimizer_variables(model)


# --------------------------------------------------------------------------- run


def run_fn(fn_args) -> None:
    """TFX Trainer entry point: train on Transform output and export the serving model."""
    config = config_from_custom_config(fn_args.custom_config)
    train_and_export(
        config,
        train_files=fn_args.train_files,
        eval_files=fn_args.eval_files,
        transform_output=fn_args.transform_graph_path or fn_args.transform_output,
        serving_model_dir=fn_args.serving_model_dir,
        model_run_dir=fn_args.model_run_dir,
        base_model=fn_args.base_model,
        train_steps=fn_args.train_steps,
        eval_steps=fn_args.eval_steps,
    )


def train_and_export(
    config: Config,
    *,
    train_files: list[str],
    eval_files: list[str],
    transform_output: str,
    serving_model_dir: str,
    model_run_dir: str,
    base_model: str | None = None,
    train_steps: int | None = None,
    eval_steps: int | None = None,
) -> dict:
    """Train, export (chief only) and return the metrics written to model_run_dir."""
    import tensorflow_transform as tft

    train_files = dataset.resolve_files(train_files)
    eval_files = dataset.resolve_files(eval_files)
    keras.utils.set_random_seed(config.train.seed)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = distribute.choose_strategy(config.train)
    chief = distribute.is_chief(strategy)
    _check_batch(config, strategy)
    tft_output = tft.TFTransformOutput(transform_output)
    num_classes = tft_output.vocabulary_size_by_name(features.SYNSET_VOCABULARY)
    epochs, steps_per_epoch = plan_steps(config, transform_output, train_steps)
    schedule = optim.build_schedule(config.train, steps_per_epoch, epochs)
    previous_policy = keras.mixed_precision.global_policy()
    if config.train.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(config.train.mixed_precision)
    try:
        with strategy.scope():
            model = build_model(config, num_classes)
            cpu_kernels = describe_depthwise_kernels(model)
            warm_from = load_initial_weights(
                model, config, num_classes, base_model, export.synsets(tft_output)
            )
            compile_model(model, config, schedule, num_classes)
        callbacks = build_callbacks(config, model_run_dir, schedule, chief)
        plan = eval_plan(
            strategy, config, transform_output, eval_files, config.train.eval_steps or eval_steps
        )
        # Each worker reads only its own files; validation runs over the whole eval split once
        # (each worker its files, to their end).
        history = model.fit(
            dataset.distributed(strategy, dataset.train_dataset, train_files, config, num_classes),
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            validation_data=eval_data(strategy, config, eval_files, num_classes, plan),
            validation_steps=plan.steps,
            callbacks=callbacks,
            verbose=2,
        )
        final = _final_metrics(model, config, history, strategy, eval_files, num_classes, plan)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    # After the policy reset: the model keeps its dtypes, the Transform layer must not autocast.
    export_dir = distribute.write_dir(serving_model_dir, strategy)
    export.export_serving_model(model, tft_output, config, export_dir)
    distribute.remove_worker_dir(export_dir, serving_model_dir)
    report = {
        "final": final,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "train_examples": shards.read_example_count(transform_output, TRAIN_SPLIT),
        "eval_examples": shards.read_example_count(transform_output, EVAL_SPLIT),
        "initial_step": callbacks[1].initial_step,
        "final_step": int(model.optimizer.iterations.numpy()),
        "num_classes": num_classes,
        "replicas": strategy.num_replicas_in_sync,
        "cpu_kernels": cpu_kernels,
        "warm_start_from": warm_from,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
    }
    if chief:
        write_run_report(model_run_dir, report)
    return report


def _check_batch(config: Config, strategy) -> None:
    replicas = strategy.num_replicas_in_sync
    if config.train.batch_size % replicas:
        raise ValueError(
            f"train.batch_size ({config.train.batch_size}) must be divisible by the "
            f"{replicas} replicas of {type(strategy).__name__}"
        )


def _final_metrics(model, config, history, strategy, eval_files, num_classes, plan) -> dict:
    # fit() swaps the EMA weights in at its end, so only then do they need a fresh evaluation.
    if config.train.ema_decay > 0:
        return model.evaluate(
            eval_data(strategy, config, eval_files, num_classes, plan),
            steps=plan.steps,
            return_dict=True,
            verbose=0,
        )
    return {k[4:]: float(v[-1]) for k, v in history.history.items() if k.startswith("val_")}


# --------------------------------------------------------------------------- report


# history.csv gains a row an epoch: more is not a run's history (and is not read).
MAX_HISTORY_ROWS = 100_000
MAX_HISTORY_BYTES = 64 << 20


class HistoryFileError(ValueError):
    """history.csv can't be plotted: names the file, the line and what is wrong with it."""


def write_run_report(model_run_dir: str, report: dict) -> None:
    """metrics.json and training_curves.png (from history.csv, which spans restarts)."""
    tf.io.gfile.makedirs(model_run_dir)
    with tf.io.gfile.GFile(os.path.join(model_run_dir, METRICS_JSON), "w") as f:
        f.write(json.dumps(report, indent=2))
    csv_path = os.path.join(model_run_dir, HISTORY_CSV)
    if tf.io.gfile.exists(csv_path):
        try:
            plot_training_curves(csv_path, os.path.join(model_run_dir, CURVES_PNG))
        except HistoryFileError as exc:
            # The model is trained and exported, and metrics.json holds this run's history:
            # a damaged plot input (a row cut by a killed run) must not fail the Trainer.
            log.warning("%s not drawn: %s", CURVES_PNG, exc)


def _read_history(csv_path: str) -> dict[str, tuple[list[int], list[float]]]:
    """history.csv's columns as (epochs, values), each value with its own row's epoch (1-based);
    HistoryFileError naming the file and line for anything else."""
    import csv

    try:
        size = tf.io.gfile.stat(csv_path).length
        if size > MAX_HISTORY_BYTES:
            raise HistoryFileError(f"{csv_path} is over {MAX_HISTORY_BYTES} bytes ({size})")
        with tf.io.gfile.GFile(csv_path, "rb") as f:
            text = f.read().decode("utf-8")
    except tf.errors.OpError as exc:
        raise HistoryFileError(f"{csv_path} is unreadable: {exc.message}") from None
    except UnicodeDecodeError as exc:
        raise HistoryFileError(f"{csv_path} is not UTF-8 text ({exc})") from None
    reader = csv.DictReader(io.StringIO(text))
    columns: dict[str, tuple[list[int], list[float]]] = {}
    try:
        for row in reader:
            where = f"{csv_path} line {reader.line_num}"
            if reader.line_num > MAX_HISTORY_ROWS + 1:
                raise HistoryFileError(f"{where}: more than {MAX_HISTORY_ROWS} rows")
            if None in row:  # a row cut by a kill, continued by the next run's first row
                raise HistoryFileError(
                    f"{where}: more fields than the header's {len(reader.fieldnames)}"
                )
            epoch = _number(row.get("epoch") or "", f"{where}: epoch")
            if not (epoch.is_integer() and epoch >= 0):
                raise HistoryFileError(f"{where}: epoch is {row['epoch'][:50]!r}")
            for key, value in row.items():
                # "NA" is CSVLogger's mark for a value not logged that epoch.
                if key != "epoch" and value not in ("", None, "NA"):
                    xs, ys = columns.setdefault(key, ([], []))
                    xs.append(int(epoch) + 1)
                    ys.append(_number(value, f"{where}: {key}"))
    except csv.Error as exc:
        raise HistoryFileError(f"{csv_path} line {reader.line_num}: {exc}") from None
    return columns


def _number(value: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise HistoryFileError(f"{where} is {value[:50]!r}, not a number") from None


def plot_training_curves(csv_path: str, png_path: str) -> None:
    """Loss, accuracy and learning-rate curves per epoch, as a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = _read_history(csv_path)
    panels = (("loss", "loss"), ("accuracy", "top-1 accuracy"), ("learning_rate", "learning rate"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for name, style in ((key, "-o"), (f"val_{key}", "--s")):
            if name in history:
                ax.plot(*history[name], style, label=name, ms=3)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    with tf.io.gfile.GFile(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
