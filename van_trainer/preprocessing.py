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
# budget matters because a 400 KB PNG can declare 400 M pixels, and a decode plus the resize of
# one costs up to ~17 bytes a pixel (a PNG with alpha; 37 when it was composited in float32).
_DATA_DEFAULTS = DataConfig()
DEFAULT_MAX_IMAGE_SIDE = _DATA_DEFAULTS.max_image_side
DEFAULT_JPEG_QUALITY = _DATA_DEFAULTS.jpeg_quality
DEFAULT_MAX_IMAGE_PIXELS = _DATA_DEFAULTS.max_image_pixels
_JPEG_START = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
_PNG_START = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
# Bytes after a JPEG's end marker that are taken for padding: the JPEG is stored as it is. More
# (a motion photo's MP4, a multi-picture trailer) is stored re-encoded, which drops them.
_JPEG_PADDING = 32
# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic): C0-CF but DHT
# (C4), JPG (C8) and DAC (CC). The frame header after them holds height, width and channels.
_SOF_MARKERS = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
# Markers without a length: RST0-RST7 and TEM. SOI, EOI and SOS before a frame end libjpeg's
# header read with an error.
_STANDALONE_MARKERS = (0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0x01)
_FATAL_MARKERS = (0xD8, 0xD9, 0xDA)
# Re-encoding passes, one after another: up to k images at once, of up to max_pixels / k pixels
# each (the last pass takes the rest, one at a time).
_REENCODE_PASSES = (10, 4, 2, 1)
# Markers walked step by step (a real JPEG has a dozen before its frame; the rare image with more
# is walked by _jpeg_frame_walk, whose cost does not grow with the count).
_MARKER_STEPS = 64
# Bytes looked at per step for the next marker: libjpeg skips any run of fill bytes and stray
# bytes before a marker, so a run this long costs one step, not one per byte.
_MARKER_WINDOW = 64


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
        return {
            features.TRANSFORMED_IMAGE: stored_images(
                encoded, max_side, quality, max_pixels=max_pixels
            )
        }
    synsets = _column(inputs[features.SYNSET], b"")
    labels = tf.cast(_column(inputs[features.LABEL], -1), tf.int64)
    # Shaped like the synsets, not the image: see below.
    filenames = _column(inputs.get(features.IMAGE_FILENAME), b"", synsets)
    declared = (custom_config or {}).get(DECLARED_CLASSES_KEY)
    # TFX's Transform reads the training split for analysis in a pass of its own, decoding only
    # the columns the analysis needs (tft.get_analyze_input_columns): anything the class list
    # reads from image/encoded, even its length, makes that pass decode every image's bytes
    # (~146 GB at ImageNet-1k) for ~1,000 (label, synset) pairs. So the class list names records
    # by image/filename alone (by label and synset where none has one, van_trainer/class_list.py).
    vocabulary, count = class_vocabulary(labels, synsets, filenames, declared)
    ids = tft.apply_vocabulary(synsets, vocabulary, default_value=-1)
    # The label check also runs while TFT analyzes (below), when the class count is still a
    # placeholder that reads 0: it waits for the real one.
    analyzed = count > 0
    if not transforming(count):
        # TFT's analysis trace. tf.function runs every stateful op (an Assert, the decode check's
        # tf.data) whatever is fetched, and TFT's analysis pass reads every column they read: the
        # image checks exist only in the graph that transforms (they run there on every record
        # of both splits). The label check stays, although it never fails here: TFX feeds the
        # transform pass the columns this trace's outputs read (tft.get_transform_input_columns),
        # and it is what reads image/class/label and image/filename, which the checks need.
        with tf.control_dependencies([check_labels(ids, labels, synsets, filenames, analyzed)]):
            label = tf.identity(ids)
        return {
            features.TRANSFORMED_IMAGE: stored_images(
                encoded, max_side, quality, max_pixels=max_pixels
            ),
            features.TRANSFORMED_LABEL: label,
        }
    filenames = record_names(filenames, encoded, synsets, labels)  # what the errors name
    headers = image_headers(encoded)  # one header parse per batch for the checks and the store
    affordable = declared_pixels(headers) <= max_pixels
    # Only images whose header gives an affordable size reach a decoder: an unreadable header
    # fails check_images anyway, and hides its size (libjpeg may still find a huge frame).
    decodes = image_decodes(encoded, headers["readable"] & affordable)
    checks = [
        check_pixel_budget(headers, filenames, max_pixels),
        check_images(encoded, filenames, decodes | ~affordable, headers),
        check_labels(ids, labels, synsets, filenames, analyzed),
    ]
    with tf.control_dependencies(checks):
        label = tf.identity(ids)
    return {
        features.TRANSFORMED_IMAGE: stored_images(
            encoded, max_side, quality, decodes & affordable, headers, max_pixels
        ),
        features.TRANSFORMED_LABEL: label,
    }


def transforming(count: tf.Tensor) -> bool:
    """Whether preprocessing_fn is being traced into the graph that transforms records."""
    # Under TF2, TFT traces preprocessing_fn once per use: while it analyzes, the class count is
    # a placeholder; in the graph that transforms (and serves), a constant (>= 1). TF1's one
    # graph serves both, but analyzing fetches only the analyzer inputs there, so no check runs.
    return not tf.inside_function() or tf.get_static_value(count) is not None


def record_names(
    filenames: tf.Tensor, encoded: tf.Tensor, synsets: tf.Tensor, labels: tf.Tensor
) -> tf.Tensor:
    """Per record, how errors name it: its image/filename, else its synset, label and size."""
    # The graph sees features only, not the shard or the position of a record in it, and
    # image/filename is optional: without it the synset and label narrow a record down to a
    # class, and the byte count of its image to (nearly always) one record of it.
    described = tf.strings.join(
        [
            "<no image/filename>, image/class/synset = ",
            synsets,
            ", image/class/label = ",
            tf.strings.as_string(labels),
            ", image/encoded of ",
            tf.strings.as_string(tf.strings.length(encoded)),
            " bytes",
        ]
    )
    return tf.where(tf.strings.length(filenames) > 0, filenames, described)


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


def _padded(encoded: tf.Tensor, count: int) -> tf.Tensor:
    """Each string with `count` zero bytes appended, so that _bytes_at can read past its end."""
    return tf.strings.join([encoded, tf.constant(b"\0" * count)])


def _bytes_at(padded: tf.Tensor, pos: tf.Tensor, count: int) -> tf.Tensor:
    """`count` bytes of each _padded string from its `pos` on, as int32 [batch, count] (0 past
    the end of the unpadded string)."""
    pos = tf.clip_by_value(pos, 0, tf.strings.length(padded) - count)
    chunk = tf.strings.substr(padded, pos, tf.fill(tf.shape(pos), count))
    # fixed_length: [batch, count] even for an empty batch (else [0, 0], and slicing it fails).
    return tf.cast(tf.io.decode_raw(chunk, tf.uint8, fixed_length=count), tf.int32)


def _among(codes: tf.Tensor, values: tuple[int, ...]) -> tf.Tensor:
    return tf.reduce_any(tf.equal(codes[..., tf.newaxis], tf.constant(values, codes.dtype)), -1)


def _at_marker(code, size, at, length):
    """libjpeg's read_markers at a marker `code` at `at` with length field `size`: (a usable
    frame header, where the search for the next marker starts, whether the walk goes on)."""
    frame = _among(code, _SOF_MARKERS) & (at + 10 <= length)
    # APPn and COM of a length below 2 skip nothing in libjpeg; other segments need one.
    lenient = ((code >= 0xE0) & (code <= 0xEF)) | (code == 0xFE)
    size = tf.where(lenient, tf.maximum(size, 2), size)
    standalone = _among(code, _STANDALONE_MARKERS)
    after = tf.where(standalone, at + 2, at + 2 + size)
    goes_on = (
        ~_among(code, _FATAL_MARKERS)
        & ~_among(code, _SOF_MARKERS)
        & (standalone | (size >= 2))
        & (after < length)
    )
    return frame, after, goes_on


def _jpeg_frame(encoded: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """(height, width, channels, found, end of the frame header) of each JPEG, from its
    start-of-frame segment found as libjpeg's marker reader (jdmarker.c) finds it."""
    length = tf.strings.length(encoded)
    padded = _padded(encoded, _MARKER_WINDOW)
    zeros = tf.zeros_like(length)

    def step(i, pos, height, width, channels, frame_end, found, alive):
        window = _bytes_at(padded, pos, _MARKER_WINDOW)
        # next_marker: the first 0xFF followed by neither a fill byte (0xFF) nor a stuffed zero;
        # whatever comes before it is skipped (libjpeg warns, decodes on).
        follower = window[:, 1:]
        starts = tf.equal(window[:, :-1], 0xFF) & (follower != 0xFF) & (follower != 0)
        seen = tf.reduce_any(starts, axis=1)
        at = pos + tf.argmax(tf.cast(starts, tf.int32), axis=1, output_type=tf.int32)
        segment = _bytes_at(padded, at, 10)
        frame, after, goes_on = _at_marker(
            segment[:, 1], segment[:, 2] * 256 + segment[:, 3], at, length
        )
        hit = alive & seen & frame
        height = tf.where(hit, segment[:, 5] * 256 + segment[:, 6], height)
        width = tf.where(hit, segment[:, 7] * 256 + segment[:, 8], width)
        channels = tf.where(hit, segment[:, 9], channels)
        frame_end = tf.where(hit, at + 10, frame_end)
        # Not seen: the window held no marker; look on from its last byte (a 0xFF there may
        # start the next one).
        pos = tf.where(seen, after, pos + _MARKER_WINDOW - 1)
        alive = alive & ~hit & tf.where(seen, goes_on, pos < length)
        return i + 1, pos, height, width, channels, frame_end, found | hit, alive

    def more(i, *state):
        return (i < _MARKER_STEPS) & tf.reduce_any(state[-1])

    starts = tf.equal(tf.strings.substr(encoded, 0, 2), _JPEG_START[:2])
    state = (0, zeros + 2, zeros, zeros, zeros, zeros, tf.zeros_like(starts), starts)
    _, pos, *frame, alive = tf.while_loop(more, step, state)

    def jump():
        # The few images with more markers than _MARKER_STEPS (hundreds of segments; a hostile
        # header has 16 k per 64 KB): walked in log2(markers) steps, whatever their number.
        index = tf.where(alive)
        walked = tf.map_fn(
            lambda args: _jpeg_frame_walk(*args),
            (tf.gather_nd(encoded, index), tf.gather_nd(pos, index)),
            parallel_iterations=1,  # one such image's markers in memory at a time
            fn_output_signature=(tf.int32, tf.int32, tf.int32, tf.int32, tf.bool),
        )
        return [
            tf.tensor_scatter_nd_update(old, index, new)
            for old, new in zip(frame, walked, strict=True)
        ]

    height, width, channels, frame_end, found = tf.cond(tf.reduce_any(alive), jump, lambda: frame)
    return height, width, channels, found & (height > 0) & (width > 0), frame_end


def _jpeg_frame_walk(encoded: tf.Tensor, start: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """(height, width, channels, frame end, found) of one JPEG, walking its markers from `start`
    as _jpeg_frame's steps do: every marker's successor at once, then pointer doubling."""
    flat = tf.io.decode_raw(encoded, tf.uint8)
    length = tf.size(flat)
    flat = tf.concat([flat, tf.zeros([10], tf.uint8)], 0)
    # Marker candidates: 0xFF followed, inside the image, by neither 0xFF nor 0x00.
    follower = flat[1 : length + 1]
    marker = tf.cast(
        tf.where((flat[:length] == 0xFF) & (follower != 0xFF) & (follower != 0))[:, 0], tf.int32
    )
    marker = marker[marker + 1 < length]

    def byte(offset):
        return tf.cast(tf.gather(flat, marker + offset), tf.int32)

    frame, after, goes_on = _at_marker(byte(1), byte(2) * 256 + byte(3), marker, length)
    count = tf.size(marker)

    def first_marker(position):
        # The first marker at or after `position` (libjpeg skips whatever lies before it).
        return tf.searchsorted(marker, position, out_type=tf.int32)  # count: none

    nxt = tf.where(frame, tf.range(count), tf.where(goes_on, first_marker(after), count))
    nxt = tf.concat([nxt, [count]], 0)  # count: the end of the walk, found nothing
    nxt = tf.while_loop(
        lambda n: tf.reduce_any(tf.gather(n, n) != n), lambda n: [tf.gather(n, n)], [nxt]
    )[0]
    last = nxt[first_marker(tf.reshape(start, [1]))[0]]
    hit = tf.concat([frame, [False]], 0)[last]
    at = tf.concat([marker, [0]], 0)[last]
    values = tf.cast(flat[at + 5 : at + 10], tf.int32)
    return (
        tf.where(hit, values[0] * 256 + values[1], 0),
        tf.where(hit, values[2] * 256 + values[3], 0),
        tf.where(hit, values[4], 0),
        tf.where(hit, at + 10, 0),
        hit,
    )


# PNG signature (8 bytes) and IHDR chunk (length, type, 13 bytes of data, CRC).
_PNG_IHDR_END = 8 + 25


def _png_header(encoded: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """(height, width, found) of each PNG from its IHDR chunk (always the first)."""
    ihdr = _bytes_at(_padded(encoded, 12), tf.fill(tf.shape(encoded), 12), 12)
    found = tf.reduce_all(tf.equal(ihdr[:, :4], tf.constant(list(b"IHDR"))), axis=1)

    def be32(column):
        # PNG allows 2^31 - 1; anything above 2^24 is far beyond any pixel budget anyway.
        top = tf.minimum(ihdr[:, column], 127) * (1 << 24)
        return top + ihdr[:, column + 1] * 65536 + ihdr[:, column + 2] * 256 + ihdr[:, column + 3]

    width, height = be32(4), be32(8)
    return height, width, found & (height > 0) & (width > 0)


def image_headers(encoded: tf.Tensor) -> dict[str, tf.Tensor]:
    """Per image: is_jpeg, is_png, height, width, channels (JPEG), readable, header_end."""
    # readable: the header parsed; header_end: where the image data begins.
    is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_START)), _PNG_START)
    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, len(_JPEG_START)), _JPEG_START)
    j_height, j_width, channels, j_found, frame_end = _jpeg_frame(encoded)
    p_height, p_width, p_found = _png_header(encoded)
    return {
        "is_jpeg": is_jpeg,
        "is_png": is_png,
        "height": tf.where(is_png, p_height, j_height),
        "width": tf.where(is_png, p_width, j_width),
        "channels": channels,
        "readable": (is_png & p_found) | (is_jpeg & j_found),
        "header_end": tf.where(is_png, tf.fill(tf.shape(frame_end), _PNG_IHDR_END), frame_end),
    }


def declared_pixels(headers: dict[str, tf.Tensor]) -> tf.Tensor:
    """Per image: width x height from its header (int64), 0 where the header is unreadable."""
    pixels = tf.cast(headers["height"], tf.int64) * tf.cast(headers["width"], tf.int64)
    return tf.where(headers["readable"], pixels, tf.zeros_like(pixels))


# ---- images -----------------------------------------------------------------------------------


def image_is_complete(encoded: tf.Tensor, headers: dict | None = None) -> tf.Tensor:
    """Per example: a JPEG/PNG whose header gives its size and whose end marker follows it."""
    # Decoders stop at the end marker (libjpeg at EOI, libpng at IEND) and ignore what follows, so
    # an end marker anywhere after the header passes: phones append an MP4 to a motion photo's
    # JPEG. Without a decode this cannot tell a JPEG cut inside its scan data whose APPn,
    # tables or trailer hold the two bytes FF D9; Transform decodes every image as well.
    headers = headers or image_headers(encoded)
    length = tf.strings.length(encoded)
    body = tf.strings.substr(encoded, tf.minimum(headers["header_end"], length), length)

    def contains(marker: bytes) -> tf.Tensor:
        return tf.strings.split(body, sep=marker).row_lengths() > 1

    png_complete = headers["is_png"] & contains(_PNG_END)
    jpeg_complete = headers["is_jpeg"] & contains(_JPEG_END)
    return headers["readable"] & (png_complete | jpeg_complete)


def _jpeg_padding_only(encoded: tf.Tensor) -> tf.Tensor:
    """Per example: whether the bytes end with a JPEG end marker followed by at most
    _JPEG_PADDING bytes (camera padding), i.e. nothing worth dropping follows the image."""
    length = tf.strings.length(encoded)
    ends = []
    for offset in range(len(_JPEG_END), _JPEG_PADDING + len(_JPEG_END) + 1):
        start = tf.maximum(length - offset, 0)
        width = tf.fill(tf.shape(start), len(_JPEG_END))  # Substr wants pos and len alike
        ends.append(tf.equal(tf.strings.substr(encoded, start, width), _JPEG_END))
    return tf.reduce_any(tf.stack(ends, axis=1), axis=1)


def image_decodes(encoded: tf.Tensor, allowed: tf.Tensor | None = None) -> tf.Tensor:
    """Per example: whether TensorFlow's decoder accepts the image (a decode error is a False)."""
    # Only images `allowed` marks are decoded (the rest are False). tf.data's ignore_errors is the
    # one graph-mode way to catch a kernel error per element. JPEGs are decoded at 1/8 scale: the
    # same header, table and scan parsing, a fraction of the IDCT.
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
    """An assertion naming the first record whose image declares more than `max_pixels` pixels."""
    # `max_pixels` is data.max_image_pixels; the check runs before anything decodes the image.
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
    """An assertion naming the first record whose image/encoded is no whole, decodable JPEG/PNG."""
    # Not decodable: `decodes` (from image_decodes) marks it False.
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
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tf.Tensor:
    """What Transform stores per image: the JPEG if RGB/gray within the cap, else a resized JPEG."""
    # Resized: the image scaled to the cap (aspect kept) and encoded as JPEG; b'' for unreadable
    # bytes (and for those `decodes` marks False). `headers`: image_headers(encoded), if already
    # read; `max_pixels`: the pixels a batch may have decoded at once (data.max_image_pixels).
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
        & _jpeg_padding_only(encoded)
        & ((headers["channels"] == 1) | (headers["channels"] == 3))
        & (tf.maximum(headers["height"], headers["width"]) <= max_side)
    )

    # Re-encoding decodes the whole image (~17 bytes a pixel at its peak, for a PNG with alpha)
    # and tf.map_fn runs up to 10 iterations at once: ten 64 M-pixel PNGs in one batch would cost
    # ten times one. So images are re-encoded in passes, one after another, by declared size:
    # a pass that runs k at once takes images of at most max_pixels / k pixels, and the pixels
    # decoded at once in a batch never exceed max_pixels.
    pixels = declared_pixels(headers)
    pending = readable & ~keep
    stored = tf.where(keep, encoded, tf.fill(tf.shape(encoded), b""))
    previous, lower = [], 0
    for number, parallel in enumerate(_REENCODE_PASSES):
        last = number == len(_REENCODE_PASSES) - 1
        upper = max_pixels // parallel
        chosen = pending & (pixels > lower) & (True if last else pixels <= upper)
        where = tf.where(chosen)
        with tf.control_dependencies(previous):
            done = tf.map_fn(
                lambda image: reencoded(image, max_side, quality),
                tf.gather(encoded, where[:, 0]),
                parallel_iterations=parallel,
                fn_output_signature=tf.TensorSpec([], tf.string),
            )
        stored = tf.tensor_scatter_nd_update(stored, where, done)
        previous, lower = [done], upper
    return stored


def reencoded(encoded: tf.Tensor, max_side: int, quality: int) -> tf.Tensor:
    """Decode any JPEG/PNG to RGB, shrink it so its longer side is <= max_side, encode as JPEG."""
    image = rgb_on_white(encoded)  # uint8: resize reads it as is (a float copy: 12 bytes a pixel)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.minimum(1.0, max_side / tf.reduce_max(shape))
    new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), 1)
    resized = tf.image.resize(image, new_shape, method="bicubic", antialias=True)
    # Bicubic overshoots at edges: clip before the cast instead of letting uint8 wrap around.
    pixels = tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)
    return tf.io.encode_jpeg(pixels, quality=quality)


def rgb_on_white(encoded: tf.Tensor) -> tf.Tensor:
    """A JPEG or PNG as uint8 RGB [h, w, 3], PNG transparency composited on white."""

    def png():
        # As `van-tfx data build` does (van_tfx/data/records.py): dropping alpha would show what
        # the transparent pixels happen to hold, often black. In 16-bit integers, not float32:
        # 255 - (255 - c) * a / 255, rounded; (255 - c) * a + 127 fits in uint16.
        rgba = tf.io.decode_png(encoded, channels=4)
        alpha = tf.cast(rgba[..., 3:], tf.uint16)
        ink = (255 - tf.cast(rgba[..., :3], tf.uint16)) * alpha
        return 255 - tf.cast((ink + 127) // 255, tf.uint8)

    def jpeg():
        return tf.io.decode_jpeg(encoded, channels=3)

    is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_START)), _PNG_START)
    image = tf.cond(is_png, png, jpeg)
    image.set_shape([None, None, 3])
    return image


# ---- labels -----------------------------------------------------------------------------------


def class_vocabulary(
    labels: tf.Tensor, synsets: tf.Tensor, filenames: tf.Tensor, declared: int | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """(the `synsets` vocabulary file, its length): label i's synset on line i - 1."""
    # One analyzer over the distinct (label, synset) pairs (van_trainer/class_list.py), in the same
    # analysis pass as everything else: TFT's frequency-ordered vocabulary needed label-count
    # weights, i.e. a second pass over the training split, to come out in label order.
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
    """An assertion, once the class list exists, that every class id is image/class/label - 1."""
    # It names the first record where it is not, with its label and synset (the training split's
    # pairs are checked while the list is made; this catches the eval split's).
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
