"""The exported graph's pixel budget: image headers are read, over-budget images refused, all
before any decode (van_trainer.export.within_pixel_budget, used by both image signatures)."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_sample_images

from serving import testing
from van_trainer import export


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
        images = export.within_pixel_budget(images, 25_000_000, "images")
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
    checked = export.within_pixel_budget(sparse, 100, "image/encoded")
    assert isinstance(checked, tf.SparseTensor)
    np.testing.assert_array_equal(checked.values.numpy(), sparse.values.numpy())
