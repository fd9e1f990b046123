"""Per-step augmentation and the eval preprocessing, on real pixel data."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from van_tfx.config import AugmentConfig
from van_trainer import augment

SEED = tf.constant([7, 11], tf.int64)


def _image(size=40, seed=0):
    """A deterministic photo-like RGB uint8 image: gradients plus a bright square."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    image = np.stack([x * 255 / size, y * 255 / size, (x + y) * 127 / size], axis=-1)
    image[size // 4 : size // 2, size // 4 : size // 2] = 250
    image += rng.normal(0, 4, image.shape)
    return tf.constant(np.clip(image, 0, 255).astype(np.uint8))


def test_eval_preprocess_resizes_center_crops_and_maps_to_minus_one_one():
    images = tf.stack(
        [tf.fill([40, 40, 3], tf.constant(255, tf.uint8)), tf.zeros([40, 40, 3], tf.uint8)]
    )
    out = augment.eval_preprocess(images, 32, 0.9).numpy()
    assert out.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(out[0], 1.0, atol=1e-5)
    np.testing.assert_allclose(out[1], -1.0, atol=1e-5)
    assert augment.eval_resize_size(224, 0.875) == 256


def test_eval_preprocess_center_crop_keeps_the_middle():
    image = np.zeros([1, 40, 40, 3], np.uint8)
    image[:, 18:22, 18:22] = 255  # centre marker survives the crop, centred
    out = augment.eval_preprocess(tf.constant(image), 32, 0.9).numpy()[0, ..., 0]
    peak = np.unravel_index(out.argmax(), out.shape)
    assert abs(peak[0] - 15.5) <= 1.5 and abs(peak[1] - 15.5) <= 1.5


@pytest.mark.parametrize("op", range(len(augment.RANDAUGMENT_OPS)))
def test_every_randaugment_op_changes_the_image_and_stays_in_range(op):
    image = tf.cast(_image(), tf.float32) * 0.6 + 50.0  # low contrast, so AutoContrast acts
    out = augment.randaugment_op(image, tf.constant(op), tf.constant(9.0), SEED)
    assert out.shape == image.shape
    assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 255.0
    assert float(tf.reduce_mean(tf.abs(out - image))) > 0.5, augment.RANDAUGMENT_OPS[op]


def test_pixel_ops_match_their_pil_definitions():
    image = tf.constant([[[0.0, 100.0, 200.0]]])
    np.testing.assert_array_equal(augment._posterize(image, 1).numpy(), [[[0, 0, 128]]])
    np.testing.assert_array_equal(augment._solarize(image, 128.0).numpy(), [[[0, 100, 55]]])
    np.testing.assert_array_equal(augment._solarize_add(image, 30.0).numpy(), [[[30, 130, 200]]])


def test_train_augment_is_deterministic_per_seed_and_varies_across_seeds():
    cfg = AugmentConfig()
    image = _image()
    a = augment.train_augment(image, SEED, 32, cfg)
    b = augment.train_augment(image, SEED, 32, cfg)
    c = augment.train_augment(image, tf.constant([7, 12], tf.int64), 32, cfg)
    assert a.shape == (32, 32, 3) and a.dtype == tf.float32
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.allclose(a.numpy(), c.numpy())


def test_train_augment_with_everything_off_is_the_uncropped_eval_view():
    cfg = AugmentConfig(
        random_resized_crop=False,
        horizontal_flip=False,
        randaugment=False,
        color_jitter=0.0,
        random_erasing_prob=0.0,
    )
    image = _image()
    out = augment.train_augment(image, SEED, 32, cfg).numpy()
    expected = augment.normalize(
        tf.image.resize(tf.cast(image, tf.float32), [32, 32], "bicubic", antialias=True)
    )
    np.testing.assert_allclose(out, np.clip(expected.numpy(), -1, 1), atol=1e-5)


def test_random_erasing_fills_one_box_with_normal_noise():
    image = tf.zeros([32, 32, 3])
    erased = [
        augment.random_erasing(image, 1.0, tf.constant([i, 3], tf.int64)).numpy() for i in range(20)
    ]
    changed = [e for e in erased if np.any(e != 0)]
    assert len(changed) >= 15  # probability 1 (a few draws may find no box that fits)
    mask = np.any(changed[0] != 0, axis=-1)
    rows, cols = np.where(mask)
    # One axis-aligned rectangle, fully filled.
    assert mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].mean() > 0.95
    noise = changed[0][mask]
    assert 0.5 < noise.std() < 1.5
    kept = augment.random_erasing(image, 0.0, SEED).numpy()
    assert not np.any(kept)


def test_mixup_cutmix_mix_targets_in_proportion_to_the_pixels():
    images = tf.concat([tf.fill([4, 16, 16, 3], -1.0), tf.fill([4, 16, 16, 3], 1.0)], 0)
    targets = tf.one_hot([0] * 4 + [1] * 4, 2)
    for mode, cfg in (
        ("cutmix", AugmentConfig(mixup_alpha=0.0, cutmix_alpha=1.0)),
        ("mixup", AugmentConfig(mixup_alpha=0.8, cutmix_alpha=0.0)),
    ):
        for i in range(5):
            mixed, soft = augment.mixup_cutmix(images, targets, tf.constant([i, 1], tf.int64), cfg)
            mixed, soft = mixed.numpy(), soft.numpy()
            np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-6)
            # Image 0 (all -1) mixed with image 7 (all +1): its "+1" share is its class-1 weight.
            share_of_partner = (mixed[0].mean() + 1.0) / 2.0
            np.testing.assert_allclose(share_of_partner, soft[0, 1], atol=1e-5, err_msg=mode)
            if mode == "cutmix":
                assert set(np.unique(mixed[0])) <= {-1.0, 1.0}


def test_mixup_disabled_returns_inputs_unchanged():
    images = tf.random.normal([4, 8, 8, 3])
    targets = tf.one_hot([0, 1, 2, 3], 4)
    cfg = AugmentConfig(mixup_alpha=0.0, cutmix_alpha=0.0)
    out_images, out_targets = augment.mixup_cutmix(images, targets, SEED, cfg)
    np.testing.assert_array_equal(out_images.numpy(), images.numpy())
    np.testing.assert_array_equal(out_targets.numpy(), targets.numpy())


def _jpeg(pixels: np.ndarray) -> bytes:
    return tf.io.encode_jpeg(tf.constant(pixels), quality=95).numpy()


def test_random_resized_crop_samples_the_whole_non_square_image_in_the_recipe_ranges():
    # A wide 360x120 image: a crop confined to the centre square (the old stored format) could
    # never reach columns < 120 or >= 240.
    height, width = 120, 360
    windows = np.array(
        [
            augment.random_resized_crop_window(
                height, width, (0.08, 1.0), (3 / 4, 4 / 3), tf.constant([i, 5], tf.int64)
            ).numpy()
            for i in range(400)
        ]
    )
    top, left, h, w = windows.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # Both side borders are reached (to a pixel: positions are uniform, 400 draws).
    assert left.min() <= 1 and (left + w).max() >= width - 1
    assert top.min() == 0 and (top + h).max() == height
    area = h * w / (height * width)
    ratio = w / h
    assert area.min() < 0.12 and area.max() <= 1.0 and area.max() > 0.3
    assert ratio.min() >= 0.75 - 0.02 and ratio.max() <= 4 / 3 + 0.02


def test_random_resized_crop_of_a_jpeg_reaches_its_border_colours():
    # Left third red, right third blue: a whole-image crop shows both, centre crops neither.
    pixels = np.full([96, 288, 3], 128, np.uint8)
    pixels[:, :96] = [255, 0, 0]
    pixels[:, -96:] = [0, 0, 255]
    encoded = tf.constant(_jpeg(pixels))
    seen_red = seen_blue = False
    for i in range(40):
        view = augment.random_resized_crop_jpeg(
            encoded, 32, (0.08, 1.0), (3 / 4, 4 / 3), tf.constant([i, 1], tf.int64)
        ).numpy()
        assert view.shape == (32, 32, 3)
        seen_red |= bool(((view[..., 0] > 200) & (view[..., 2] < 60)).mean() > 0.5)
        seen_blue |= bool(((view[..., 2] > 200) & (view[..., 0] < 60)).mean() > 0.5)
    assert seen_red and seen_blue


def test_random_resized_crop_of_a_jpeg_equals_the_crop_of_its_decoded_pixels():
    pixels = _image(64).numpy()
    encoded = tf.constant(_jpeg(np.concatenate([pixels, pixels[:, :32]], axis=1)))
    decoded = tf.io.decode_jpeg(encoded, channels=3)
    for i in range(5):
        seed = tf.constant([i, 9], tf.int64)
        from_jpeg = augment.random_resized_crop_jpeg(encoded, 32, (0.08, 1.0), (0.75, 4 / 3), seed)
        from_pixels = augment.random_resized_crop(
            tf.cast(decoded, tf.float32), 32, (0.08, 1.0), (0.75, 4 / 3), seed
        )
        # libjpeg upsamples chroma differently at a crop window's edge: a level or two there.
        difference = np.abs(from_jpeg.numpy() - from_pixels.numpy())
        assert difference.max() < 3 and difference.mean() < 0.1


def test_eval_view_of_a_non_square_image_resizes_the_shorter_side_and_crops_the_centre():
    image = np.zeros([60, 120, 3], np.uint8)
    image[:, 40:80] = 255  # a bright central band, 1/3 of the width
    out = augment.eval_view(tf.constant(image), 32, 0.9).numpy()[..., 0]
    # Shorter side 60 -> 35, longer 120 -> 70; the 32-wide centre crop spans columns 19..51 of
    # 70, and the band (23..47 after resizing) sits in the middle of it.
    assert out.shape == (32, 32)
    band = (out > 0.5).mean(axis=0)
    assert band[:2].max() == 0 and band[-2:].max() == 0 and band[12:20].min() == 1.0


def test_transforms_that_run_only_when_applied_give_the_images_that_select_did(monkeypatch):
    # apply_if runs a transform only for the images it applies to; the seeds are stateless, so
    # each image must equal the old tf.where(condition, transform(), image) result.
    config = AugmentConfig(random_erasing_prob=0.5)
    image = _image(48)

    def augmented_by_seed():
        run = tf.function(lambda seed: augment.train_augment(image, seed, 32, config))
        return [run(tf.constant([7, s], tf.int64)).numpy() for s in range(12)]

    candidate = augmented_by_seed()
    monkeypatch.setattr(augment, "apply_if", lambda cond, fn, img: tf.where(cond, fn(), img))
    baseline = augmented_by_seed()
    for seed, (new, old) in enumerate(zip(candidate, baseline, strict=True)):
        np.testing.assert_array_equal(new, old, err_msg=f"seed {seed}")
    assert len({a.tobytes() for a in candidate}) == 12  # the seeds did vary the images
