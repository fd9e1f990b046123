"""Serving export: the trained model + Transform graph + THE eval preprocessing as signatures.

Signatures (names in van_tfx.features):
- `serving_default`: serialized tf.Example `examples` [N] -> `probabilities` [N,C] float32 and
  `classes` [N,C] string (synset of each column).
- `predict_images`: encoded JPEG/PNG `images` [N] -> `probabilities`, `top_k_indices` int32,
  `top_k_synsets` string, `top_k_scores` float32 ([N,K], K = min(serving.top_k, C)).
- `transform_features`: serialized tf.Example -> every Transform output (label included), for
  TFMA's `preprocessing_function_names`.
The Keras weights also go to `<export>/assets.extra/van.weights.h5` (warm start of the next run).
"""

from __future__ import annotations

import itertools
import os

import tensorflow as tf
import tensorflow_transform as tft
import tf_keras as keras

from van_tfx import features, storage
from van_tfx.config import Config, ServingConfig
from van_tfx.saved_model import mark_classification_signature
from van_trainer import augment, preprocessing
from van_trainer.model import fold_for_inference

KERAS_WEIGHTS_PATH = os.path.join("assets.extra", "van.weights.h5")
# Beside them, the class of each classifier row: a warm start must not give a row to another
# class when the list changes (same count, new order or a swapped class).
CLASS_LIST_PATH = os.path.join("assets.extra", "van.classes.txt")
# Raw features that carry the answer: never required (or accepted) at serving time.
LABEL_KEYS = (features.LABEL, features.SYNSET, features.CLASS_TEXT)


def keras_weights_path(export_dir: str) -> str:
    """Where an exported model keeps its Keras weights."""
    return os.path.join(export_dir, KERAS_WEIGHTS_PATH)


# Bounds on a class list read back from a model (it may be damaged, or not ours): more classes
# than any image model has (ImageNet-22k: 21,841), and bytes for names of ~160 characters each.
MAX_CLASSES = 100_000
MAX_CLASS_LIST_BYTES = 16 << 20


class ClassListFileError(ValueError):
    """An exported model's class list is unreadable or not one distinct name a line; names it."""


def read_class_list(export_dir: str) -> list[str] | None:
    """The synsets an exported model's classifier rows stand for, or None if it kept none."""
    # ClassListFileError naming the file when it is not a list of distinct names.
    path = os.path.join(export_dir, CLASS_LIST_PATH)
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path, "rb") as handle:
            # Read no more than a class list can be: a 300 MB file of newlines took 5 GB.
            data = handle.read(MAX_CLASS_LIST_BYTES + 1)
    except tf.errors.OpError as exc:
        raise ClassListFileError(f"{path} is unreadable: {exc.message}") from None
    return parse_class_list(data, path)


def parse_class_list(data: bytes, path: str) -> list[str]:
    """One class name a line, each line ended by a newline, distinct, non-empty UTF-8 text."""

    def refuse(problem: str):
        return ClassListFileError(f"{path} is not a class list (one name a line): {problem}")

    if len(data) > MAX_CLASS_LIST_BYTES or data.count(b"\n") > MAX_CLASSES:
        raise refuse(f"over {MAX_CLASS_LIST_BYTES} bytes or {MAX_CLASSES} lines")
    if not data.endswith(b"\n"):  # the writer ends every line: a cut file lost its last name
        raise refuse("its last line has no newline (a cut file?)" if data else "it is empty")
    try:
        names = data.decode("utf-8").split("\n")[:-1]
    except UnicodeDecodeError as exc:
        raise refuse(f"not UTF-8 text ({exc})") from None
    for line, name in enumerate(names, 1):
        # What the writer can't have written (class_list.py refuses such synsets): an empty
        # name would give a row to no class, and a repeated one two rows to one class.
        if not name or "\r" in name:
            raise refuse(f"line {line} is {name[:100]!r}: empty, or with a carriage return")
    if len(set(names)) != len(names):
        seen: set[str] = set()
        first = next(n for n in names if n in seen or seen.add(n))
        raise refuse(f"{first[:100]!r} is on more than one line")
    return names


def serving_feature_spec(tft_output: tft.TFTransformOutput) -> dict:
    """The raw feature spec minus the label keys: what a serving request's tf.Example holds."""
    return {k: v for k, v in tft_output.raw_feature_spec().items() if k not in LABEL_KEYS}


def synsets(tft_output: tft.TFTransformOutput) -> list[str]:
    """Class id -> synset, from Transform's vocabulary."""
    return [s.decode() for s in tft_output.vocabulary_by_name(features.SYNSET_VOCABULARY)]


class ServingModule(tf.Module):
    """What is saved: the model, the Transform layer and the signature functions."""

    def __init__(self, model: keras.Model, tft_output: tft.TFTransformOutput, config: Config):
        super().__init__(name="van_serving")
        # Track the variables, not the Keras model: saving a Keras model re-traces every layer's
        # call (minutes for VAN); the signatures below are all that serving and TFMA use.
        self.model_variables = list(model.variables)
        self._forward = _Untracked(model)
        self.tft_layer = tft_output.transform_features_layer()
        self._raw_spec = tft_output.raw_feature_spec()
        self._spec = serving_feature_spec(tft_output)
        self._synsets = synsets(tft_output)
        self._top_k = min(config.serving.top_k, len(self._synsets))
        self._image_size = config.model.image_size
        self._crop_pct = config.eval.crop_pct
        self._budget = config.serving
        self._slices = config.serving.inference_slices
        self._chunk = config.serving.inference_chunk_images

    def _probabilities(self, transformed: dict) -> tf.Tensor:
        # Chunk by chunk: a 1000-image request (what TFMA's Evaluator sends) would otherwise hold
        # the activations of all 1000 at once (VAN-b0: ~9.6 MB an image).
        return in_chunks(
            self._probabilities_of_chunk,
            transformed[features.TRANSFORMED_IMAGE],
            self._chunk,
            self._forward.model.output_shape[-1],
        )

    def _probabilities_of_chunk(self, stored_jpegs: tf.Tensor) -> tf.Tensor:
        images = augment.eval_images_from_jpeg(stored_jpegs, self._image_size, self._crop_pct)
        logits = forward_in_slices(self._forward.model, images, self._slices)
        return tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)

    def _classes(self, batch_size: tf.Tensor) -> tf.Tensor:
        return tf.tile(tf.constant(self._synsets)[None], [batch_size, 1])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve_examples(self, examples):
        """serving_default: serialized raw tf.Examples -> class probabilities."""
        raw = tf.io.parse_example(examples, self._spec)
        raw[features.IMAGE_ENCODED] = within_pixel_budget(
            raw[features.IMAGE_ENCODED], self._budget, features.IMAGE_ENCODED
        )
        probabilities = self._probabilities(self.tft_layer(raw))
        return {"probabilities": probabilities, "classes": self._classes(tf.shape(examples)[0])}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=features.CLASSIFY_INPUT)])
    def classify(self, inputs):
        """classify: serialized raw tf.Examples -> classes and scores (TF Serving's Classify)."""
        outputs = self.serve_examples(inputs)
        return {"classes": outputs["classes"], "scores": outputs["probabilities"]}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def transform_features(self, examples):
        """Serialized raw tf.Examples (label included) -> Transform outputs."""
        raw = tf.io.parse_example(examples, self._raw_spec)
        return self.tft_layer(raw)

    @tf.function(
        input_signature=[tf.TensorSpec([None], tf.string, name=features.PREDICT_IMAGES_INPUT)]
    )
    def predict_images(self, images):
        """Encoded JPEG/PNG bytes -> probabilities and the top-k classes."""
        images = checked_images(images)
        images = within_pixel_budget(images, self._budget, features.PREDICT_IMAGES_INPUT)
        # The raw spec comes from the schema (shape [1] for image/encoded): match its rank.
        image_shape = self._raw_spec[features.IMAGE_ENCODED].shape
        transformed = self.tft_layer(
            {features.IMAGE_ENCODED: tf.reshape(images, [-1, *image_shape])}
        )
        probabilities = self._probabilities(transformed)
        scores, indices = tf.math.top_k(probabilities, k=self._top_k)
        return {
            "probabilities": probabilities,
            "top_k_indices": indices,
            "top_k_synsets": tf.gather(tf.constant(self._synsets), indices),
            "top_k_scores": scores,
        }

    def signatures(self) -> dict:
        """Signature functions keyed by name."""
        # tf.functions with input signatures, not concrete functions: only those can be saved
        # when the variables are distributed (Mirrored/MultiWorkerMirrored strategies).
        return {
            features.SERVING_EXAMPLES_SIGNATURE: self.serve_examples,
            features.PREDICT_IMAGES_SIGNATURE: self.predict_images,
            features.TRANSFORM_FEATURES_SIGNATURE: self.transform_features,
            features.CLASSIFY_SIGNATURE: self.classify,
        }


def in_chunks(fn, inputs: tf.Tensor, chunk: int, width: int) -> tf.Tensor:
    """fn(inputs) [N, width] float32, computed `chunk` rows of `inputs` at a time, in turn."""
    # So the work in flight (decoded pixels, activations) is bounded by `chunk` rows.
    size = tf.shape(inputs)[0]
    # One pass for a batch of at most `chunk` (an empty one too: fn answers it), so small batches
    # run as before and the model is traced once, inside the loop.
    count = tf.maximum((size + chunk - 1) // chunk, 1)

    def step(i, parts):
        rows = inputs[i * chunk : (i + 1) * chunk]
        return i + 1, parts.write(i, fn(rows))

    parts = tf.TensorArray(tf.float32, size=count, infer_shape=False, element_shape=[None, width])
    # parallel_iterations=1: chunks one after another; in parallel they would hold N rows again.
    _, parts = tf.while_loop(lambda i, _: i < count, step, [0, parts], parallel_iterations=1)
    return tf.ensure_shape(parts.concat(), [None, width])


def forward_in_slices(model: keras.Model, images: tf.Tensor, slices: int) -> tf.Tensor:
    """model(images) with the batch cut into `slices` parts that TF runs concurrently."""
    # A batch smaller than `slices` runs whole, an empty one gives empty logits.
    # Two half-batch ops keep two cores busier than one op split across both: VAN-b0 at batch 16
    # infers ~18 % faster in 2 slices (13 % AVX2-capped), benchmarks/bench_model.py --ideas.
    size = tf.shape(images)[0]

    def whole():
        return model(images, training=False)

    def sliced():
        bounds = [size * i // slices for i in range(slices + 1)]
        parts = [model(images[a:b], training=False) for a, b in itertools.pairwise(bounds)]
        return tf.concat(parts, axis=0)

    def empty():  # oneDNN's fused convs fail on a batch of 0 with an error naming no input
        return tf.zeros([0, model.output_shape[-1]], model.output.dtype)

    run = whole if slices <= 1 else lambda: tf.cond(size >= slices, sliced, whole)
    return tf.cond(size > 0, run, empty)


class _Untracked:
    """Holds an object out of tf.Module's dependency tracking."""

    def __init__(self, model):
        self.model = model


def checked_images(images: tf.Tensor) -> tf.Tensor:
    """`images`, after failing with InvalidArgumentError if any is not a whole JPEG or PNG."""
    # The error names the input (unknown format or truncated): never a silent placeholder image.
    check = tf.debugging.assert_equal(
        tf.reduce_all(preprocessing.image_is_complete(images)),
        True,
        message=(
            f"'{features.PREDICT_IMAGES_INPUT}' holds bytes that are not a complete JPEG or PNG image"
        ),
    )
    with tf.control_dependencies([check]):  # runs before any decode sees the bytes
        return tf.identity(images)


def declared_pixels(encoded: tf.Tensor) -> tf.Tensor:
    """Width x height each JPEG/PNG header declares (int64, 0 for anything else), undecoded."""
    # The header reader Transform uses: string ops that never raise, whatever the bytes (libjpeg's
    # extract_jpeg_shape fails on a damaged header with an error that names no input).
    return preprocessing.declared_pixels(preprocessing.image_headers(tf.reshape(encoded, [-1])))


def within_pixel_budget(encoded, budget: ServingConfig, name: str):
    """`encoded` (dense or sparse), after failing with InvalidArgumentError if it is over budget."""
    # Over budget: any image declares more than serving.max_image_pixels pixels, or the request more
    # images or pixels in all than serving.max_request_images / max_request_pixels. A 1 MB file can
    # declare 400 M pixels, a 64 MiB request can hold 75,000 tiny JPEGs (45 GB once resized for the
    # model), and decoding happens before any model code could object (TF Serving itself has no such
    # limit).
    values = encoded.values if isinstance(encoded, tf.SparseTensor) else encoded
    many = _at_most(
        tf.size(values, out_type=tf.int64),
        budget.max_request_images,
        f"input {name} holds more than {budget.max_request_images} images in one request "
        "(serving.max_request_images); it was refused before decoding",
    )
    with tf.control_dependencies([many]):  # the headers are read only for a count in budget
        pixels = declared_pixels(values)
    large = _at_most(
        pixels,
        budget.max_image_pixels,
        f"input {name} holds an image of more than {budget.max_image_pixels} pixels (width x "
        "height, serving.max_image_pixels); it was refused before decoding",
        summarize=4,
    )
    total = _at_most(
        tf.reduce_sum(pixels),
        budget.max_request_pixels,
        f"input {name} holds images of more than {budget.max_request_pixels} pixels in all "
        "(serving.max_request_pixels); they were refused before decoding",
    )
    with tf.control_dependencies([many, large, total]):
        if isinstance(encoded, tf.SparseTensor):
            return tf.SparseTensor(encoded.indices, tf.identity(values), encoded.dense_shape)
        return tf.identity(encoded)


def _at_most(value: tf.Tensor, limit: int, message: str, summarize: int | None = None):
    """An assertion that every element of the int64 `value` is <= `limit`, failing with `message`."""
    return tf.debugging.assert_less_equal(
        value, tf.constant(limit, tf.int64), message=message, summarize=summarize
    )


def export_serving_model(
    model: keras.Model, tft_output: tft.TFTransformOutput, config: Config, export_dir: str
) -> str:
    """Save the serving SavedModel (and the Keras weights) to `export_dir`."""
    # Serve the folded copy (BatchNorm and layer scales folded into the convs: +5–13 % inference,
    # same logits to float rounding); the trained model's own weights are kept for warm starts.
    module = ServingModule(fold_for_inference(model), tft_output, config)
    tf.saved_model.save(module, export_dir, signatures=module.signatures())
    mark_classification_signature(export_dir, features.CLASSIFY_SIGNATURE)
    weights = keras_weights_path(export_dir)
    tf.io.gfile.makedirs(os.path.dirname(weights))
    # h5py writes local files only (and tf_keras sends a gs:// .h5 to a temp file it never
    # uploads): write locally, then copy to object storage.
    with storage.local_output(weights) as local:
        model.save_weights(local)
    with tf.io.gfile.GFile(os.path.join(export_dir, CLASS_LIST_PATH), "wb") as handle:
        handle.write("".join(f"{name}\n" for name in synsets(tft_output)).encode("utf-8"))
    return export_dir
