"""The exported graph's budget: image headers are read, over-budget images (or requests of too
many images or pixels) refused, all before any decode (van_trainer.export.within_pixel_budget,
used by both image signatures)."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_sample_images

from serving import testing
from van_tfx.config import ServingConfig
from van_trainer import export


def budget(pixels: int = 25_000_000, images: int = 1000, total: int = 1_000_000_000):
    """A serving config with these limits."""
    return ServingConfig(
        max_image_pixels=pixels, max_request_images=images, max_request_pixels=total
    )


def test_declared_pixels_reads_png_and_jpeg_headers():
    china = Path(load_sample_images().filenames[0]).read_bytes()  # a real 640x427 photo
    images = [
        testing.encode_image((1, 2, 3), size=37, fmt="PNG"),
        china,
        testing.jpeg_declaring(60000, 60000),
        b"neither",
        china[:40],  # a JPEG cut inside its header: libjpeg's extract_jpeg_shape raised here
    ]
    pixels = export.declared_pixels(tf.constant(images)).numpy()
    assert pixels.tolist() == [37 * 37, 640 * 427, 60000 * 60000, 0, 0]


@pytest.mark.parametrize(
    "bomb", [testing.jpeg_declaring(60000, 60000), testing.png_bomb(16000)], ids=["jpeg", "png"]
)
def test_over_budget_images_are_refused_before_decoding(bomb):
    ok = testing.encode_image((5, 6, 7), size=16, fmt="JPEG")

    @tf.function
    def decode_after_check(images):
        images = export.within_pixel_budget(images, budget(), "images")
        return tf.map_fn(
            lambda i: tf.shape(tf.io.decode_image(i, channels=3, expand_animations=False)),
            images,
            fn_output_signature=tf.int32,
        )

    assert decode_after_check(tf.constant([ok])).numpy().tolist() == [[16, 16, 3]]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(tf.errors.InvalidArgumentError, match="more than 25000000 pixels"):
        decode_after_check(tf.constant([ok, bomb]))
    growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"\npeak RSS growth refusing a {len(bomb) / 1e6:.2f} MB bomb: {growth_mib:.0f} MiB")
    assert growth_mib < 200  # a decode would need >= 768 MiB


def test_sparse_image_features_keep_their_structure():
    sparse = tf.sparse.from_dense(tf.constant([[testing.encode_image((1, 1, 1))]]))
    checked = export.within_pixel_budget(sparse, budget(pixels=100), "image/encoded")
    assert isinstance(checked, tf.SparseTensor)
    np.testing.assert_array_equal(checked.values.numpy(), sparse.values.numpy())


def test_a_request_of_many_tiny_images_is_refused_before_decoding():
    # Each image costs the model's input however small its file: before, a 64 MiB request could
    # hold ~75,000 630-byte JPEGs (~45 GB once resized to 224 px), sent as one value that TF's
    # repeat rule fills. Refused from the count alone, before a header is read.
    tiny = testing.encode_image((5, 6, 7), size=1, fmt="JPEG")
    within = export.within_pixel_budget(tf.fill([1000], tiny), budget(), "images")
    assert within.shape == [1000]
    with pytest.raises(tf.errors.InvalidArgumentError, match="more than 1000 images in one req"):
        export.within_pixel_budget(tf.fill([1001], tiny), budget(), "images")


@settings(max_examples=40, deadline=None)
@given(
    sides=st.lists(st.tuples(st.integers(1, 4000), st.integers(1, 4000)), max_size=6),
    pixels=st.integers(1, 16_000_000),
    images=st.integers(1, 6),
    total=st.integers(1, 48_000_000),
)
def test_the_budget_refuses_exactly_what_is_over_it(sides, pixels, images, total):
    encoded = [testing.jpeg_declaring(w, h) for w, h in sides]
    declared = [w * h for w, h in sides]
    over = len(encoded) > images or any(p > pixels for p in declared) or sum(declared) > total
    limits = budget(pixels, images, total)
    tensor = tf.constant(encoded, dtype=tf.string, shape=[len(encoded)])
    if over:
        with pytest.raises(tf.errors.InvalidArgumentError, match="refused before decoding"):
            export.within_pixel_budget(tensor, limits, "images")
    else:
        kept = export.within_pixel_budget(tensor, limits, "images")
        assert kept.numpy().tolist() == encoded
