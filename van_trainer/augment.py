"""Per-step augmentation of official VAN (timm 0.4.12 recipe) and THE eval preprocessing, in TF ops.

Training, per image: random resized crop of the whole stored image (decoding only the crop window
of the JPEG) -> horizontal flip -> RandAugment `rand-m9-mstd0.5-inc1`
(or color jitter when RandAugment is off, as timm does) -> normalise -> random erasing (per-pixel
normal noise). Per batch: mixup / cutmix with soft targets. Every random draw is stateless and
derived from a per-example seed, so a fixed seed gives the same batches on every run.

Images travel as float32 in [0, 255] until `normalize`; the model sees (x / 255 - 0.5) / 0.5.
"""

from __future__ import annotations

import functools
import math

import tensorflow as tf

from van_tfx.config import AugmentConfig

MEAN = 0.5  # official VAN: mean = std = 0.5 on [0, 1] pixels, i.e. inputs in [-1, 1]
STD = 0.5
FILL_VALUE = 128.0  # timm fills geometric ops with round(255 * mean)
MAX_LEVEL = 10.0

# timm's _RAND_INCREASING_TRANSFORMS, in its order.
RANDAUGMENT_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


# --------------------------------------------------------------------------- seeds


def fold_seed(seed: tf.Tensor, salt: int) -> tf.Tensor:
    """A new independent stateless seed derived from `seed` and a constant salt."""
    return tf.random.experimental.stateless_fold_in(seed, salt)


def example_seed(base_seed: int, index: tf.Tensor) -> tf.Tensor:
    """The stateless seed of the `index`-th element of a stream seeded with `base_seed`."""
    return tf.stack([tf.cast(base_seed, tf.int64), tf.cast(index, tf.int64)])


def _uniform(seed, salt, minval=0.0, maxval=1.0, shape=()):
    return tf.random.stateless_uniform(shape, fold_seed(seed, salt), minval, maxval)


def _random_sign(seed, salt, value):
    return tf.where(_uniform(seed, salt) < 0.5, -value, value)


# --------------------------------------------------------------------------- eval path


def normalize(images: tf.Tensor) -> tf.Tensor:
    """Map [0, 255] pixels to the model's [-1, 1] inputs (official VAN mean = std = 0.5)."""
    return (tf.cast(images, tf.float32) / 255.0 - MEAN) / STD


def eval_resize_size(image_size: int, crop_pct: float) -> int:
    """Side the shorter side is resized to before the center crop (timm: floor(size / crop_pct))."""
    return int(math.floor(image_size / crop_pct))


def center_view(image: tf.Tensor, image_size: int, crop_pct: float) -> tf.Tensor:
    """Resize-shorter-side + centre crop of one image: [H,W,3] -> float32 [s,s,3] in [0, 255]."""
    # timm/torchvision: bicubic (antialiased, like PIL) resize of the shorter side to
    # floor(image_size / crop_pct) (the longer side scaled alike, truncated), then centre crop.
    resize = eval_resize_size(image_size, crop_pct)
    shape = tf.shape(image)[:2]
    new_shape = tf.maximum(shape * resize // tf.reduce_min(shape), resize)
    resized = tf.image.resize(tf.cast(image, tf.float32), new_shape, "bicubic", antialias=True)
    # torchvision CenterCrop: offsets int(round((side - size) / 2)).
    top, left = tf.unstack(tf.cast(tf.round((new_shape - image_size) / 2), tf.int32))
    cropped = resized[top : top + image_size, left : left + image_size, :]
    return tf.ensure_shape(tf.clip_by_value(cropped, 0.0, 255.0), [image_size, image_size, 3])


def eval_view(image: tf.Tensor, image_size: int, crop_pct: float) -> tf.Tensor:
    """THE deterministic eval/serving view of one image: [H,W,3] -> float32 [s,s,3] in [-1, 1]."""
    return normalize(center_view(image, image_size, crop_pct))


def eval_preprocess(images: tf.Tensor, image_size: int, crop_pct: float) -> tf.Tensor:
    """eval_view over a batch of same-size decoded images: uint8 [N,H,W,3] -> float32 [N,s,s,3]."""
    return tf.map_fn(
        lambda image: eval_view(image, image_size, crop_pct),
        images,
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
    )


def eval_view_from_jpeg(encoded: tf.Tensor, image_size: int, crop_pct: float) -> tf.Tensor:
    """THE eval/serving input from a stored JPEG (Transform's `image`): decode, then eval_view."""
    return eval_view(tf.io.decode_jpeg(encoded, channels=3), image_size, crop_pct)


def eval_images_from_jpeg(encoded: tf.Tensor, image_size: int, crop_pct: float) -> tf.Tensor:
    """eval_view_from_jpeg over a [N] batch of stored JPEGs -> float32 [N,s,s,3]."""
    return tf.map_fn(
        lambda image: eval_view_from_jpeg(image, image_size, crop_pct),
        encoded,
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
    )


# --------------------------------------------------------------------------- geometry


def random_resized_crop_window(height, width, scale, ratio, seed, attempts: int = 10):
    """timm RandomResizedCrop.get_params: [top, left, h, w] of a box in a height x width image."""
    # Up to `attempts` draws of area fraction ~ U(scale) and log aspect ratio ~ U(log ratio); the
    # first box that fits wins, at a uniform position. Otherwise the whole image, cropped to the
    # nearest allowed ratio, centred. Sampled over the whole image, whatever its aspect ratio.
    h_img = tf.cast(height, tf.float32)
    w_img = tf.cast(width, tf.float32)
    area = _uniform(seed, 51, scale[0], scale[1], [attempts]) * h_img * w_img
    log_ratio = _uniform(seed, 52, math.log(ratio[0]), math.log(ratio[1]), [attempts])
    aspect = tf.exp(log_ratio)
    w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    h_fit, w_fit = h[first], w[first]
    top = tf.cast(_uniform(seed, 53) * tf.cast(height - h_fit + 1, tf.float32), tf.int32)
    left = tf.cast(_uniform(seed, 54) * tf.cast(width - w_fit + 1, tf.float32), tf.int32)
    # Fallback (timm): whole image, clamped to the ratio range, centred.
    in_ratio = w_img / h_img
    w_fb = tf.where(
        in_ratio > ratio[1], tf.cast(tf.round(h_img * ratio[1]), tf.int32), tf.cast(width, tf.int32)
    )
    h_fb = tf.where(
        in_ratio < ratio[0],
        tf.cast(tf.round(w_img / ratio[0]), tf.int32),
        tf.cast(height, tf.int32),
    )
    h_fb, w_fb = tf.maximum(h_fb, 1), tf.maximum(w_fb, 1)
    fallback = tf.stack([(height - h_fb) // 2, (width - w_fb) // 2, h_fb, w_fb])
    window = tf.stack([top, left, h_fit, w_fit])
    return tf.where(tf.reduce_any(fits), window, tf.cast(fallback, tf.int32))


def random_resized_crop(image, size, scale, ratio, seed):
    """timm RandomResizedCrop of a decoded [H,W,3] image, resized (bilinear) to size x size."""
    shape = tf.shape(image)
    top, left, h, w = tf.unstack(random_resized_crop_window(shape[0], shape[1], scale, ratio, seed))
    crop = tf.slice(image, [top, left, 0], [h, w, 3])
    return tf.image.resize(crop, [size, size], method="bilinear", antialias=True)


def random_resized_crop_jpeg(encoded, size, scale, ratio, seed):
    """random_resized_crop of a JPEG, decoding only the crop window (TF's ImageNet pipelines)."""
    shape = tf.image.extract_jpeg_shape(encoded)
    window = random_resized_crop_window(shape[0], shape[1], scale, ratio, seed)
    crop = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    return tf.image.resize(crop, [size, size], method="bilinear", antialias=True)


def apply_if(condition, transform, image):
    """`transform()` where `condition` holds, else `image`; the transform runs only when applied."""
    # tf.where would compute the transform for every image and keep it for some.
    return tf.cond(condition, transform, lambda: image)


def random_flip(image, seed):
    """Horizontal flip with probability 0.5."""
    return apply_if(_uniform(seed, 2) < 0.5, lambda: tf.reverse(image, axis=[1]), image)


def _affine(image, transform):
    """Apply a projective transform (output -> input coordinates), filling with the mean."""
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=tf.reshape(tf.cast(transform, tf.float32), [1, 8]),
        output_shape=tf.shape(image)[:2],
        fill_value=FILL_VALUE,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return out[0]


def _rotate(image, degrees):
    radians = degrees * math.pi / 180.0
    h = tf.cast(tf.shape(image)[0], tf.float32) - 1.0
    w = tf.cast(tf.shape(image)[1], tf.float32) - 1.0
    cos, sin = tf.cos(radians), tf.sin(radians)
    x_offset = (w - (cos * w - sin * h)) / 2.0
    y_offset = (h - (sin * w + cos * h)) / 2.0
    return _affine(image, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])


# --------------------------------------------------------------------------- pixel ops


def _blend(degenerate, image, factor):
    """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped to [0, 255]."""
    return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _grayscale(image):
    return tf.image.rgb_to_grayscale(image)


def _auto_contrast(image):
    lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
    scaled = (image - lo) * 255.0 / tf.maximum(hi - lo, 1e-3)
    return tf.where(hi > lo, scaled, image)


def _equalize_channel(channel):
    """PIL ImageOps.equalize for one uint8 channel (same algorithm as TF models' autoaugment)."""
    values = tf.cast(tf.clip_by_value(tf.round(channel), 0, 255), tf.int32)
    histogram = tf.math.bincount(values, minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(histogram, histogram > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

    def equalized():
        lut = (tf.cumsum(histogram) + step // 2) // step
        lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
        return tf.cast(tf.gather(lut, values), tf.float32)

    return tf.cond(step > 0, equalized, lambda: tf.cast(values, tf.float32))


def _equalize(image):
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def _posterize(image, bits):
    # Keep the top `bits` bits of each uint8 value (0 bits -> black, as PIL).
    step = tf.pow(2.0, tf.cast(8 - bits, tf.float32))
    return tf.floor(tf.clip_by_value(tf.round(image), 0.0, 255.0) / step) * step


def _solarize(image, threshold):
    return tf.where(image >= threshold, 255.0 - image, image)


def _solarize_add(image, addition, threshold=128.0):
    return tf.where(image < threshold, tf.clip_by_value(image + addition, 0.0, 255.0), image)


def _sharpness(image, factor):
    # PIL's SMOOTH filter; the 1-pixel border keeps the original pixels, as in PIL.
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    interior = tf.pad(tf.ones([height - 2, width - 2, 3]), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(interior > 0, smooth, image)
    return _blend(degenerate, image, factor)


def randaugment_op(image, op_index, magnitude, seed):
    """Apply timm RandAugment op number `op_index` at `magnitude` (0..10) to a [0,255] image."""
    level = magnitude / MAX_LEVEL
    size = tf.cast(tf.shape(image)[0], tf.float32)
    enhance = 1.0 + _random_sign(seed, 11, level * 0.9)
    branches = [
        lambda: _auto_contrast(image),
        lambda: _equalize(image),
        lambda: 255.0 - image,
        lambda: _rotate(image, _random_sign(seed, 12, level * 30.0)),
        lambda: _posterize(image, 4 - tf.cast(level * 4.0, tf.int32)),
        lambda: _solarize(image, 256.0 - tf.floor(level * 256.0)),
        lambda: _solarize_add(image, tf.floor(level * 110.0)),
        lambda: _blend(_grayscale(image), image, enhance),
        lambda: _blend(tf.reduce_mean(_grayscale(image)), image, enhance),
        lambda: _blend(tf.zeros_like(image), image, enhance),
        lambda: _sharpness(image, enhance),
        lambda: _affine(image, [1.0, _random_sign(seed, 13, level * 0.3), 0, 0, 1, 0, 0, 0]),
        lambda: _affine(image, [1.0, 0, 0, _random_sign(seed, 14, level * 0.3), 1, 0, 0, 0]),
        lambda: _affine(
            image, [1.0, 0, _random_sign(seed, 15, level * 0.45) * size, 0, 1, 0, 0, 0]
        ),
        lambda: _affine(
            image, [1.0, 0, 0, 0, 1, _random_sign(seed, 16, level * 0.45) * size, 0, 0]
        ),
    ]
    out = tf.switch_case(op_index, branches)
    return tf.ensure_shape(out, image.shape)


def randaugment(image, num_ops, magnitude, magnitude_std, seed, prob=0.5):
    """timm RandAugment: `num_ops` ops drawn with replacement, each applied with probability 0.5."""
    # Each op runs at a magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10].
    for i in range(num_ops):
        op_seed = fold_seed(seed, 100 + i)
        op_index = tf.random.stateless_uniform(
            [], fold_seed(op_seed, 0), 0, len(RANDAUGMENT_OPS), tf.int32
        )
        level = magnitude + magnitude_std * tf.random.stateless_normal([], fold_seed(op_seed, 1))
        level = tf.clip_by_value(level if magnitude_std > 0 else magnitude, 0.0, MAX_LEVEL)
        image = apply_if(
            _uniform(op_seed, 2) < prob,
            functools.partial(randaugment_op, image, op_index, level, op_seed),
            image,
        )
    return image


def color_jitter(image, strength, seed):
    """torchvision ColorJitter(brightness=contrast=saturation=strength), in a fixed order."""

    def factor(salt):
        return _uniform(seed, salt, max(0.0, 1.0 - strength), 1.0 + strength)

    image = _blend(tf.zeros_like(image), image, factor(21))
    image = _blend(tf.reduce_mean(_grayscale(image)), image, factor(22))
    return _blend(_grayscale(image), image, factor(23))


def random_erasing(image, prob, seed, attempts=10):
    """timm RandomErasing(mode='pixel', max_count=1) on a normalised image: per-pixel N(0,1)."""
    height = tf.shape(image)[0]
    width = tf.shape(image)[1]
    area = tf.cast(height * width, tf.float32)
    target = _uniform(seed, 31, 0.02, 1 / 3, [attempts]) * area
    aspect = tf.exp(_uniform(seed, 32, math.log(0.3), math.log(1 / 0.3), [attempts]))
    h = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
    w = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
    fits = (h < height) & (w < width)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    h, w = h[first], w[first]
    top = tf.cast(_uniform(seed, 33) * tf.cast(height - h + 1, tf.float32), tf.int32)
    left = tf.cast(_uniform(seed, 34) * tf.cast(width - w + 1, tf.float32), tf.int32)
    erase = (_uniform(seed, 35) < prob) & tf.reduce_any(fits)

    def erased():
        rows = tf.range(height)[:, None, None]
        cols = tf.range(width)[None, :, None]
        inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        noise = tf.random.stateless_normal(tf.shape(image), fold_seed(seed, 36))
        return tf.where(inside, noise, image)

    return apply_if(erase, erased, image)


# --------------------------------------------------------------------------- pipelines


def train_augment(image, seed, image_size: int, cfg: AugmentConfig):
    """Per-image training augmentation: decoded [H,W,3] (any size) -> normalised float32 [s,s,3]."""
    image = tf.cast(image, tf.float32)
    if cfg.random_resized_crop:
        view = random_resized_crop(image, image_size, cfg.crop_scale, cfg.crop_ratio, seed)
    else:
        view = center_view(image, image_size, 1.0)  # the eval view, without its margin
    return augment_view(view, seed, image_size, cfg)


def train_augment_jpeg(encoded, seed, image_size: int, cfg: AugmentConfig):
    """train_augment of a stored JPEG; the random crop decodes only its window."""
    if cfg.random_resized_crop:
        view = random_resized_crop_jpeg(encoded, image_size, cfg.crop_scale, cfg.crop_ratio, seed)
        return augment_view(view, seed, image_size, cfg)
    return train_augment(tf.io.decode_jpeg(encoded, channels=3), seed, image_size, cfg)


def augment_view(image, seed, image_size: int, cfg: AugmentConfig):
    """Everything after the crop: flip, RandAugment or color jitter, normalise, random erasing."""
    if cfg.horizontal_flip:
        image = random_flip(image, seed)
    image = tf.clip_by_value(image, 0.0, 255.0)
    if cfg.randaugment and cfg.randaugment_num_ops > 0:
        image = randaugment(
            image,
            cfg.randaugment_num_ops,
            cfg.randaugment_magnitude,
            cfg.randaugment_magnitude_std,
            fold_seed(seed, 3),
        )
    elif cfg.color_jitter > 0:  # timm uses color jitter only without auto-augment
        image = color_jitter(image, cfg.color_jitter, fold_seed(seed, 4))
    image = normalize(image)
    if cfg.random_erasing_prob > 0:
        image = random_erasing(image, cfg.random_erasing_prob, fold_seed(seed, 5))
    return tf.ensure_shape(image, [image_size, image_size, 3])


def _sample_beta(alpha, seed):
    g1 = tf.random.stateless_gamma([], fold_seed(seed, 1), alpha)
    g2 = tf.random.stateless_gamma([], fold_seed(seed, 2), alpha)
    return g1 / (g1 + g2)


def _cutmix_mask(height, width, lam, seed):
    """timm rand_bbox: a box of area ~(1 - lam) centred uniformly; returns mask and exact lam."""
    cut = tf.sqrt(1.0 - lam)
    cut_h = tf.cast(tf.cast(height, tf.float32) * cut, tf.int32)
    cut_w = tf.cast(tf.cast(width, tf.float32) * cut, tf.int32)
    cy = tf.random.stateless_uniform([], fold_seed(seed, 3), 0, height, tf.int32)
    cx = tf.random.stateless_uniform([], fold_seed(seed, 4), 0, width, tf.int32)
    y0, y1 = (
        tf.clip_by_value(cy - cut_h // 2, 0, height),
        tf.clip_by_value(cy + cut_h // 2, 0, height),
    )
    x0, x1 = (
        tf.clip_by_value(cx - cut_w // 2, 0, width),
        tf.clip_by_value(cx + cut_w // 2, 0, width),
    )
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    mask = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    exact_lam = 1.0 - tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(
        height * width, tf.float32
    )
    return mask[None, :, :, None], exact_lam


def mixup_draws(seed, cfg: AugmentConfig):
    """(cutmix?, lam) of one batch, or None when the recipe mixes no batch."""
    use_mixup, use_cutmix = cfg.mixup_alpha > 0, cfg.cutmix_alpha > 0
    if not (use_mixup or use_cutmix) or cfg.mixup_prob <= 0:
        return None
    if use_mixup and use_cutmix:
        cutmix = _uniform(seed, 41) < cfg.mixup_switch_prob
    else:
        cutmix = tf.constant(use_cutmix)
    alpha = tf.where(cutmix, cfg.cutmix_alpha or 1.0, cfg.mixup_alpha or 1.0)
    lam = _sample_beta(alpha, fold_seed(seed, 42))
    return cutmix, tf.where(_uniform(seed, 43) < cfg.mixup_prob, lam, 1.0)


def mixup_cutmix(images, targets, seed, cfg: AugmentConfig):
    """timm Mixup(mode='batch'): mix the batch with its reverse; cutmix or mixup per batch."""
    draws = mixup_draws(seed, cfg)
    if draws is None:
        return images, targets
    cutmix, lam = draws

    def cut():
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        mask, box_lam = _cutmix_mask(height, width, lam, fold_seed(seed, 44))
        return tf.where(mask, tf.reverse(images, axis=[0]), images), box_lam

    def mix():
        return lam * images + (1.0 - lam) * tf.reverse(images, axis=[0]), lam

    # Only the chosen one runs (tf.where computed both for every batch: +17 % input throughput
    # at 224 px), and neither when lam is 1 (mixup_prob said no), where both return the batch.
    images, lam = tf.cond(
        lam < 1.0, lambda: tf.cond(cutmix, cut, mix), lambda: (images, tf.ones_like(lam))
    )
    targets = lam * targets + (1.0 - lam) * tf.reverse(targets, axis=[0])
    return images, targets
