"""TFX Transform: raw ImageNet-style records -> JPEG bytes (longer side capped) + 0-based class ids.

What Transform stores is a JPEG, so a stored image costs no more than its source: a JPEG whose
longer side is within `data.max_image_side` is kept byte for byte (no decode, no re-encode); a
larger one, or a PNG, is decoded, resized (bicubic, antialiased) so its longer side is the cap
and encoded as JPEG at `data.jpeg_quality`. The aspect ratio is kept, so the Trainer's
RandomResizedCrop samples from the whole image (van_trainer/augment.py) and the eval/serving view
is resize-shorter-side + centre crop of the same bytes.

Deterministic only: this graph also runs at serving time, and anything random it materialised
would be frozen into the transformed data for every epoch. The paper's augmentation runs per step
in the Trainer (van_trainer/augment.py).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
import tensorflow_transform as tft
from tensorflow_transform import annotators as tft_annotators

from van_tfx import features
from van_tfx.config import DataConfig

# Fallbacks when custom_config has no data section: the config's defaults (one place). A pixel
# budget matters because a 400 KB PNG can declare 400 M pixels, and a decode plus the float
# resize of one costs ~12 bytes a pixel.
_DATA_DEFAULTS = DataConfig()
DEFAULT_MAX_IMAGE_SIDE = _DATA_DEFAULTS.max_image_side
DEFAULT_JPEG_QUALITY = _DATA_DEFAULTS.jpeg_quality
DEFAULT_MAX_IMAGE_PIXELS = _DATA_DEFAULTS.max_image_pixels
_JPEG_START = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
_PNG_START = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
# Some cameras append padding after the JPEG end-of-image marker; look for it near the end.
_JPEG_END_SEARCH = 32
# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic): C0-CF but DHT
# (C4), JPG (C8) and DAC (CC). The frame header after them holds height, width and channels.
_SOF_MARKERS = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
# Segments (and fill bytes) read before giving up on the frame header (APPn/EXIF/ICC/DQT/DHT come
# first; the loop ends as soon as every image's frame is found, so the bound costs nothing).
_MAX_JPEG_SEGMENTS = 256


def image_settings(custom_config: dict[str, Any] | None) -> tuple[int, int, int]:
    """(max_image_side, jpeg_quality, max_image_pixels) from the Transform custom_config."""
    config = custom_config or {}
    data = config.get("data", config)  # {'data': ...} or flat
    return (
        int(data.get("max_image_side", DEFAULT_MAX_IMAGE_SIDE)),
        int(data.get("jpeg_quality", DEFAULT_JPEG_QUALITY)),
        int(data.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)),
    )


# Set in custom_config by Transform's executor from the schema (the label's int_domain max).
DECLARED_CLASSES_KEY = "declared_classes"


def preprocessing_fn(
    inputs: dict[str, Any], custom_config: dict[str, Any] | None = None
) -> dict[str, tf.Tensor]:
    """Transform raw examples into {'image': JPEG bytes, 'label': int64 class id}."""
    max_side, quality, max_pixels = image_settings(custom_config)
    encoded = _column(inputs[features.IMAGE_ENCODED], b"")
    if not (features.SYNSET in inputs and features.LABEL in inputs):
        # Serving (no label): the model server's own checks come first (van_trainer/export.py).
        return {features.TRANSFORMED_IMAGE: stored_images(encoded, max_side, quality)}
    filenames = _column(inputs.get(features.IMAGE_FILENAME), b"<no image/filename>", encoded)
    synsets = _column(inputs[features.SYNSET], b"")
    labels = tf.cast(_column(inputs[features.LABEL], -1), tf.int64)
    declared = (custom_config or {}).get(DECLARED_CLASSES_KEY)
    vocabulary, count = class_vocabulary(labels, synsets, filenames, declared)
    ids = tft.apply_vocabulary(synsets, vocabulary, default_value=-1)
    # Assert ops (and the tf.data ops of image_decodes, stateful too) also run while TFT
    # analyzes, when the class count is still a placeholder that reads 0: the checks that
    # need the class list, or that cost a decode, wait for the real one, so they run once per
    # record (when it is transformed).
    analyzed = count > 0
    headers = image_headers(encoded)  # one header parse per batch for the checks and the store
    affordable = declared_pixels(headers) <= max_pixels
    # Only images whose header gives an affordable size reach a decoder: an unreadable header
    # fails check_images anyway, and hides its size (libjpeg may still find a huge frame).
    decodes = tf.cond(
        analyzed,
        lambda: image_decodes(encoded, headers["readable"] & affordable),
        lambda: tf.ones_like(encoded, tf.bool),
    )
    checks = [
        check_pixel_budget(headers, filenames, max_pixels),
        check_images(encoded, filenames, decodes | ~affordable, headers),
        check_labels(ids, labels, synsets, filenames, analyzed),
    ]
    with tf.control_dependencies(checks):
        label = tf.identity(ids)
    return {
        features.TRANSFORMED_IMAGE: stored_images(
            encoded, max_side, quality, decodes & affordable, headers
        ),
        features.TRANSFORMED_LABEL: label,
    }


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


# ---- image headers (string ops only: they never raise, whatever the bytes) ---------------------


def _bytes_at(encoded: tf.Tensor, pos: tf.Tensor, count: int) -> tf.Tensor:
    """`count` bytes of each string from its `pos` on, as int32 [batch, count] (0 past the end)."""
    padded = tf.strings.join([encoded, tf.constant(b"\0" * count)])
    pos = tf.clip_by_value(pos, 0, tf.strings.length(padded) - count)
    chunk = tf.strings.substr(padded, pos, tf.fill(tf.shape(pos), count))
    # fixed_length: [batch, count] even for an empty batch (else [0, 0], and slicing it fails).
    return tf.cast(tf.io.decode_raw(chunk, tf.uint8, fixed_length=count), tf.int32)


def _jpeg_frame(encoded: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """(height, width, channels, found) of each JPEG from its start-of-frame segment."""
    length = tf.strings.length(encoded)
    zeros = tf.zeros_like(length)
    sof = tf.constant(_SOF_MARKERS, tf.int32)

    def step(i, pos, height, width, channels, found, alive):
        segment = _bytes_at(encoded, pos, 10)
        is_marker = tf.equal(segment[:, 0], 0xFF)
        is_frame = is_marker & tf.reduce_any(tf.equal(segment[:, 1:2], sof[tf.newaxis]), axis=1)
        hit = alive & is_frame & (pos + 10 <= length)
        height = tf.where(hit, segment[:, 5] * 256 + segment[:, 6], height)
        width = tf.where(hit, segment[:, 7] * 256 + segment[:, 8], width)
        channels = tf.where(hit, segment[:, 9], channels)
        # A marker may be preceded by any number of 0xFF fill bytes (JPEG B.1.1.2): skip one.
        is_fill = is_marker & tf.equal(segment[:, 1], 0xFF)
        size = segment[:, 2] * 256 + segment[:, 3]
        has_segment = (size >= 2) & (pos + 2 + size < length)
        alive = alive & is_marker & ~is_frame & (is_fill | has_segment)
        return (
            i + 1,
            tf.where(alive, tf.where(is_fill, pos + 1, pos + 2 + size), pos),
            height,
            width,
            channels,
            found | hit,
            alive,
        )

    def more(i, *state):
        return (i < _MAX_JPEG_SEGMENTS) & tf.reduce_any(state[-1])

    starts = tf.equal(tf.strings.substr(encoded, 0, 2), _JPEG_START[:2])
    state = (0, zeros + 2, zeros, zeros, zeros, tf.zeros_like(starts), starts)
    _, _, height, width, channels, found, _ = tf.while_loop(more, step, state)
    return height, width, channels, found & (height > 0) & (width > 0)


def _png_header(encoded: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """(height, width, found) of each PNG from its IHDR chunk (always the first)."""
    ihdr = _bytes_at(encoded, tf.fill(tf.shape(encoded), 12), 12)
    found = tf.reduce_all(tf.equal(ihdr[:, :4], tf.constant(list(b"IHDR"))), axis=1)

    def be32(column):
        # PNG allows 2^31 - 1; anything above 2^24 is far beyond any pixel budget anyway.
        top = tf.minimum(ihdr[:, column], 127) * (1 << 24)
        return top + ihdr[:, column + 1] * 65536 + ihdr[:, column + 2] * 256 + ihdr[:, column + 3]

    width, height = be32(4), be32(8)
    return height, width, found & (height > 0) & (width > 0)


def image_headers(encoded: tf.Tensor) -> dict[str, tf.Tensor]:
    """Per image: is_jpeg, is_png, height, width, channels (JPEG), readable (header parsed)."""
    is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_START)), _PNG_START)
    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, len(_JPEG_START)), _JPEG_START)
    j_height, j_width, channels, j_found = _jpeg_frame(encoded)
    p_height, p_width, p_found = _png_header(encoded)
    return {
        "is_jpeg": is_jpeg,
        "is_png": is_png,
        "height": tf.where(is_png, p_height, j_height),
        "width": tf.where(is_png, p_width, j_width),
        "channels": channels,
        "readable": (is_png & p_found) | (is_jpeg & j_found),
    }


def declared_pixels(headers: dict[str, tf.Tensor]) -> tf.Tensor:
    """Per image: width x height from its header (int64), 0 where the header is unreadable."""
    pixels = tf.cast(headers["height"], tf.int64) * tf.cast(headers["width"], tf.int64)
    return tf.where(headers["readable"], pixels, tf.zeros_like(pixels))


# ---- images -----------------------------------------------------------------------------------


def image_is_complete(encoded: tf.Tensor, headers: dict | None = None) -> tf.Tensor:
    """Per example: a JPEG/PNG whose header gives its size and which ends with its end marker."""
    length = tf.strings.length(encoded)

    def ends_with(marker: bytes, offset: int) -> tf.Tensor:
        start = tf.maximum(length - offset, 0)
        width = tf.fill(tf.shape(start), len(marker))  # Substr wants pos and len alike
        return tf.equal(tf.strings.substr(encoded, start, width), marker)

    headers = headers or image_headers(encoded)
    png_complete = headers["is_png"] & ends_with(_PNG_END, len(_PNG_END))
    jpeg_end = tf.reduce_any(
        tf.stack([ends_with(_JPEG_END, k) for k in range(2, _JPEG_END_SEARCH + 1)], axis=1), axis=1
    )
    return headers["readable"] & (png_complete | (headers["is_jpeg"] & jpeg_end))


def image_decodes(encoded: tf.Tensor, allowed: tf.Tensor | None = None) -> tf.Tensor:
    """Per example: whether TensorFlow's decoder accepts the image (a decode error is a False);
    only images `allowed` marks are decoded (the rest are False).

    tf.data's ignore_errors is the one graph-mode way to catch a kernel error per element. JPEGs
    are decoded at 1/8 scale: the same header, table and scan parsing, a fraction of the IDCT.
    """
    if allowed is None:
        allowed = tf.ones_like(encoded, tf.bool)

    def decode(index, image):
        is_jpeg = tf.equal(tf.strings.substr(image, 0, len(_JPEG_START)), _JPEG_START)
        pixels = tf.cond(
            is_jpeg,
            lambda: tf.io.decode_jpeg(image, channels=3, ratio=8),
            lambda: tf.io.decode_png(image, channels=3),
        )
        return index, tf.size(pixels)

    count = tf.size(encoded, out_type=tf.int64)
    decoded = (
        tf.data.Dataset.from_tensor_slices((tf.range(count), encoded, allowed))
        .filter(lambda index, image, ok: ok)
        .map(lambda index, image, ok: decode(index, image))
        .ignore_errors(log_warning=False)
    )
    hits = decoded.reduce(
        tf.zeros([count], tf.int32),
        lambda seen, item: seen + tf.one_hot(item[0], tf.cast(count, tf.int32), dtype=tf.int32),
    )
    return hits > 0


# Assert computes its data even when the check passes, and an empty batch has no element 0: each
# lookup below reads from the batch with one sentinel appended.
def _first_false(good: tf.Tensor) -> tf.Tensor:
    """Index of the first False in `good` (its length if none)."""
    return tf.argmin(tf.concat([tf.cast(good, tf.int32), [0]], 0), output_type=tf.int32)


def _value_at(values: tf.Tensor, index: tf.Tensor, sentinel) -> tf.Tensor:
    """values[index] of a batch column, `sentinel` for the index one past its end."""
    return tf.gather(tf.concat([tf.reshape(values, [-1]), [sentinel]], 0), index)


def check_pixel_budget(
    headers: dict[str, tf.Tensor], filenames: tf.Tensor, max_pixels: int
) -> tf.Operation:
    """An assertion that fails naming the first record whose image declares more than
    `max_pixels` pixels (data.max_image_pixels), before anything decodes it."""
    within = declared_pixels(headers) <= max_pixels
    first = _first_false(within)
    return tf.debugging.Assert(
        tf.reduce_all(within),
        [
            "image/encoded of record image/filename =",
            _value_at(filenames, first, ""),
            "declares",
            _value_at(headers["width"], first, 0),
            "x",
            _value_at(headers["height"], first, 0),
            f"pixels, more than data.max_image_pixels = {max_pixels}; refused before decoding.",
        ],
        name="image_within_pixel_budget",
    )


def check_images(
    encoded: tf.Tensor, filenames: tf.Tensor, decodes: tf.Tensor, headers: dict | None = None
) -> tf.Operation:
    """An assertion that fails naming the first record whose image/encoded is not a whole JPEG
    or PNG, or does not decode (`decodes`, from image_decodes)."""
    good = image_is_complete(encoded, headers) & decodes
    first_bad = _first_false(good)
    return tf.debugging.Assert(
        tf.reduce_all(good),
        [
            "image/encoded of record image/filename =",
            _value_at(filenames, first_bad, ""),
            "is not a complete, decodable JPEG or PNG image (unknown format, truncated or "
            "corrupt).",
        ],
        name="image_is_complete",
    )


def stored_images(
    encoded: tf.Tensor,
    max_side: int,
    quality: int,
    decodes: tf.Tensor | None = None,
    headers: dict | None = None,
) -> tf.Tensor:
    """What Transform stores per image: the JPEG itself if it is RGB/gray within the cap, else the
    image resized to the cap (aspect kept) and encoded as JPEG; b'' for unreadable bytes (and for
    those `decodes` marks False). `headers`: image_headers(encoded), if already read."""
    headers = headers or image_headers(encoded)
    # No Assert in here: a stateful op would make TFT run this work in every analysis phase too.
    # Unreadable or undecodable bytes must not reach a decoder here either (its error names no
    # record): they become b'', which the named check (always among Transform's outputs) rejects.
    readable = image_is_complete(encoded, headers)
    if decodes is not None:
        readable = readable & decodes
    keep = (
        readable
        & headers["is_jpeg"]
        & ((headers["channels"] == 1) | (headers["channels"] == 3))
        & (tf.maximum(headers["height"], headers["width"]) <= max_side)
    )

    def store(args):
        image, kept, ok = args
        return tf.cond(
            kept,
            lambda: image,
            lambda: tf.cond(
                ok, lambda: reencoded(image, max_side, quality), lambda: tf.constant(b"")
            ),
        )

    return tf.map_fn(
        store, (encoded, keep, readable), fn_output_signature=tf.TensorSpec([], tf.string)
    )


def reencoded(encoded: tf.Tensor, max_side: int, quality: int) -> tf.Tensor:
    """Decode any JPEG/PNG to RGB, shrink it so its longer side is <= max_side, encode as JPEG."""
    image = rgb_on_white(encoded)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.minimum(1.0, max_side / tf.reduce_max(shape))
    new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), 1)
    resized = tf.image.resize(image, new_shape, method="bicubic", antialias=True)
    # Bicubic overshoots at edges: clip before the cast instead of letting uint8 wrap around.
    pixels = tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)
    return tf.io.encode_jpeg(pixels, quality=quality)


def rgb_on_white(encoded: tf.Tensor) -> tf.Tensor:
    """A JPEG or PNG as float32 RGB [h, w, 3], PNG transparency composited on white."""

    def png():
        # As `van-tfx data build` does (van_tfx/data/records.py): dropping alpha would show what
        # the transparent pixels happen to hold, often black.
        rgba = tf.cast(tf.io.decode_png(encoded, channels=4), tf.float32)
        alpha = rgba[..., 3:] / 255.0
        return rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)

    def jpeg():
        return tf.cast(tf.io.decode_jpeg(encoded, channels=3), tf.float32)

    is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_START)), _PNG_START)
    image = tf.cond(is_png, png, jpeg)
    image.set_shape([None, None, 3])
    return image


# ---- labels -----------------------------------------------------------------------------------


def class_vocabulary(
    labels: tf.Tensor, synsets: tf.Tensor, filenames: tf.Tensor, declared: int | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """(the `synsets` vocabulary file, its length): label i's synset on line i - 1.

    One analyzer over the distinct (label, synset) pairs (van_trainer/class_list.py), in the same
    analysis pass as everything else: TFT's frequency-ordered vocabulary needed label-count
    weights, i.e. a second pass over the training split, to come out in label order.
    """
    from van_trainer.class_list import PLACEHOLDER, ClassList

    columns = [labels, synsets, filenames]
    (path,) = tft.experimental.ptransform_analyzer(
        columns,
        ClassList("path", declared),
        [tf.string],
        [[]],
        output_asset_default_values=[PLACEHOLDER],
        name="class_list",
    )
    (count,) = tft.experimental.ptransform_analyzer(
        columns, ClassList("count", declared), [tf.int64], [[]], name="class_count"
    )
    # What tft.vocabulary registers, so tft.experimental.get_vocabulary_size_by_name works too.
    tft_annotators.annotate_vocab_size(features.SYNSET_VOCABULARY, count)
    return path, count


def check_labels(
    ids: tf.Tensor,
    labels: tf.Tensor,
    synsets: tf.Tensor,
    filenames: tf.Tensor,
    analyzed: tf.Tensor,
) -> tf.Operation:
    """An assertion, once the class list exists, that every class id is image/class/label - 1;
    it names the first record where it is not, with its label and synset (the training split's
    pairs are checked while the list is made; this catches the eval split's)."""
    good = tf.equal(ids, labels - 1)
    first = _first_false(good)
    return tf.debugging.Assert(
        tf.logical_not(analyzed) | tf.reduce_all(good),
        [
            "record image/filename =",
            _value_at(filenames, first, ""),
            "has image/class/label",
            _value_at(labels, first, tf.constant(0, tf.int64)),
            "and image/class/synset",
            _value_at(synsets, first, ""),
            # No apostrophes: tf.debugging.Assert prints each string as a Python repr.
            "which disagree with the class list of the training split: label - 1 must be the "
            "position of the synset in it (labels 1..N, one synset each; a synset absent from "
            "the training split also causes this).",
        ],
        name="label_matches_synset",
    )
