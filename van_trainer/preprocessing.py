"""TFX Transform: raw ImageNet-style records -> fixed-size uint8 RGB bytes + 0-based class ids.

Deterministic only: this graph also runs at serving time, and anything random it materialised
would be frozen into the transformed data for every epoch. The paper's augmentation runs per step
in the Trainer (van_trainer/augment.py).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
import tensorflow_transform as tft

from van_tfx import features

DEFAULT_STORED_IMAGE_SIZE = 64  # = van_tfx.config.DataConfig.stored_image_size's default
_JPEG_START = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
_PNG_START = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
# Some cameras append padding after the JPEG end-of-image marker; look for it near the end.
_JPEG_END_SEARCH = 32


def stored_image_size(custom_config: dict[str, Any] | None) -> int:
    """The stored side S from the Transform custom_config ({'data': DataConfig dump} or flat)."""
    config = custom_config or {}
    data = config.get("data", config)
    return int(data.get("stored_image_size", DEFAULT_STORED_IMAGE_SIZE))


def preprocessing_fn(
    inputs: dict[str, Any], custom_config: dict[str, Any] | None = None
) -> dict[str, tf.Tensor]:
    """Transform raw examples into {'image': raw uint8 [S,S,3] bytes, 'label': int64 class id}."""
    size = stored_image_size(custom_config)
    encoded = _column(inputs[features.IMAGE_ENCODED], b"")
    outputs = {features.TRANSFORMED_IMAGE: encode_stored_images(encoded, size)}
    if features.SYNSET in inputs and features.LABEL in inputs:
        filenames = _column(inputs.get(features.IMAGE_FILENAME), b"<no image/filename>", encoded)
        outputs[features.TRANSFORMED_LABEL] = class_ids(
            _column(inputs[features.SYNSET], b""),
            _column(inputs[features.LABEL], -1),
            check_images_complete(encoded, filenames),
        )
    return outputs


def _column(x, default, like: tf.Tensor | None = None) -> tf.Tensor:
    # One value per example as a [batch] tensor, whether the schema made it fixed-length (dense
    # [batch, 1]) or variable-length (sparse); a missing optional feature becomes `default`.
    if x is None:
        return tf.fill(tf.shape(like)[:1], tf.constant(default))
    if isinstance(x, tf.SparseTensor):
        width = tf.maximum(x.dense_shape[1], 1)
        x = tf.sparse.to_dense(
            tf.SparseTensor(x.indices, x.values, [x.dense_shape[0], width]), default
        )
    return tf.reshape(x[:, 0] if x.shape.rank == 2 else x, [-1])


# ---- images -----------------------------------------------------------------------------------


def image_is_complete(encoded: tf.Tensor) -> tf.Tensor:
    """Per example: starts like a JPEG/PNG and ends with its end marker (catches truncation)."""
    length = tf.strings.length(encoded)

    def ends_with(marker: bytes, offset: int) -> tf.Tensor:
        start = tf.maximum(length - offset, 0)
        width = tf.fill(tf.shape(start), len(marker))  # Substr wants pos and len alike
        return tf.equal(tf.strings.substr(encoded, start, width), marker)

    is_png = tf.strings.substr(encoded, 0, len(_PNG_START)) == _PNG_START
    png_complete = is_png & ends_with(_PNG_END, len(_PNG_END))
    is_jpeg = tf.strings.substr(encoded, 0, len(_JPEG_START)) == _JPEG_START
    jpeg_end = tf.reduce_any(
        tf.stack([ends_with(_JPEG_END, k) for k in range(2, _JPEG_END_SEARCH + 1)], axis=1), axis=1
    )
    return png_complete | (is_jpeg & jpeg_end)


def check_images_complete(encoded: tf.Tensor, filenames: tf.Tensor) -> tf.Operation:
    """An assertion that fails naming the first record whose image/encoded is not a whole image."""
    complete = image_is_complete(encoded)
    first_bad = tf.argmin(tf.cast(complete, tf.int32), output_type=tf.int32)
    return tf.debugging.Assert(
        tf.reduce_all(complete),
        [
            "image/encoded of record image/filename =",
            tf.gather(filenames, first_bad),
            "is not a complete JPEG or PNG image (unknown format or truncated).",
        ],
        name="image_is_complete",
    )


def encode_stored_images(encoded: tf.Tensor, size: int) -> tf.Tensor:
    """Decode each JPEG/PNG (any channel count) to RGB, resize+center-crop to S, raw uint8 bytes."""
    return tf.map_fn(
        lambda image: _stored_image_bytes(image, size),
        encoded,
        fn_output_signature=tf.TensorSpec([], tf.string),
    )


def _stored_image_bytes(encoded: tf.Tensor, size: int) -> tf.Tensor:
    # No Assert in here: a stateful op would make TFT run this decode in every analysis phase
    # too (measured 4x slower). The named completeness check sits on the label path instead, so
    # an incomplete image must not reach libjpeg here: its "Invalid JPEG data" names no record
    # and could win the race against the named check. It becomes a placeholder that the named
    # check (always among Transform's outputs) rejects; serving checks completeness up front.
    def decode() -> tf.Tensor:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return raw_bytes(resize_and_center_crop(image, size))

    placeholder = lambda: tf.constant(b"\0" * (size * size * 3))  # noqa: E731
    return tf.cond(image_is_complete(encoded[tf.newaxis])[0], decode, placeholder)


def resize_and_center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resize the shorter side to `size` (bicubic, antialiased), center-crop size x size, uint8."""
    image.set_shape([None, None, 3])
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(shape)
    new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
    resized = tf.image.resize(image, new_shape, method="bicubic", antialias=True)
    top = (new_shape[0] - size) // 2
    left = (new_shape[1] - size) // 2
    cropped = resized[top : top + size, left : left + size, :]
    # Bicubic overshoots at edges: clip before the cast instead of letting uint8 wrap around.
    pixels = tf.cast(tf.round(tf.clip_by_value(cropped, 0.0, 255.0)), tf.uint8)
    return tf.ensure_shape(pixels, [size, size, 3])


def raw_bytes(pixels: tf.Tensor) -> tf.Tensor:
    """The raw bytes of a uint8 tensor (what tf.io.decode_raw reads back)."""
    # TF has no encode_raw; a serialized TensorProto ends with the tensor's raw content.
    serialized = tf.io.serialize_tensor(pixels)
    num_bytes = tf.size(pixels)
    return tf.strings.substr(serialized, tf.strings.length(serialized) - num_bytes, num_bytes)


def decode_transformed_image(raw: tf.Tensor, stored_size: int) -> tf.Tensor:
    """Transform's `image` bytes -> uint8 [..., S, S, 3] (works on a scalar or a batch)."""
    pixels = tf.io.decode_raw(raw, tf.uint8)
    return tf.reshape(pixels, tf.concat([tf.shape(raw), [stored_size, stored_size, 3]], axis=0))


# ---- labels -----------------------------------------------------------------------------------


def class_ids(synsets: tf.Tensor, labels: tf.Tensor, image_check: tf.Operation) -> tf.Tensor:
    """0-based class ids from the `synsets` vocabulary, ordered like the sorted synset list.

    TFT orders a vocabulary by decreasing (weighted) frequency. Weighting each example by
    (max_label + 1 - label) / count(label) makes synset number `label` total exactly
    max_label + 1 - label, so the vocabulary comes out in label order (= sorted synset order)
    whatever the class frequencies, and class id == image/class/label - 1, asserted per example.
    """
    labels = tf.cast(labels, tf.int64)
    keys, counts = tft.count_per_key(labels)
    matches = tf.equal(labels[:, tf.newaxis], keys[tf.newaxis, :])
    count = tf.reduce_sum(tf.where(matches, counts[tf.newaxis, :], 0), axis=1)
    rank = tf.cast(tft.max(labels) + 1 - labels, tf.float32)
    weights = rank / tf.cast(tf.maximum(count, 1), tf.float32)
    ids = tft.compute_and_apply_vocabulary(
        synsets, vocab_filename=features.SYNSET_VOCABULARY, weights=weights, default_value=-1
    )
    # Assert ops also run while TFT analyzes, when the vocabulary is still a placeholder whose
    # size reads 0; only check once the real vocabulary is in place.
    analyzed = tft.experimental.get_vocabulary_size_by_name(features.SYNSET_VOCABULARY) > 0
    consistent = tf.debugging.Assert(
        tf.logical_not(analyzed) | tf.reduce_all(tf.equal(ids, labels - 1)),
        [
            "image/class/label is inconsistent with image/class/synset (expected label - 1 == "
            "position in the sorted synset list; a class absent from the analyzed split also "
            "causes this); first labels:",
            labels[:8],
            "synsets:",
            synsets[:8],
        ],
        name="label_matches_synset",
        summarize=8,
    )
    with tf.control_dependencies([image_check, consistent]):
        return tf.identity(ids)
