"""Bundled sample: scikit-learn's 1,797 real 8x8 handwritten digits as an ImageNet-style span.

Each span holds every digit once, rendered to 64x64 RGB JPEG, split train/validation by a draw
seeded with the span number. Span 1 renders the digits plainly; later spans (`--new-span`) also
vary each rendering (small shifts, rotations, contrast), so they are new data, not copies.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from van_tfx.data.records import (
    SYNSETS_FILE,
    ImageRecord,
    make_output_dir,
    write_split,
    write_synset_list,
)

SAMPLE_IMAGE_SIZE = 64
VALIDATION_IMAGES = 360  # 20% of 1,797; >= 300 so the top-1 gate is not decided by a few images
SAMPLE_SEED = 20220220  # VAN's arXiv date; any fixed value works
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SYNSET_TEXTS = {f"digit_{d}": f"digit {word}" for d, word in enumerate(DIGIT_WORDS)}
SPAN_DIR = re.compile(r"^span-(\d+)$")


def existing_spans(data_dir: str | os.PathLike) -> list[int]:
    """Span numbers present under data_dir (complete spans only: they are renamed into place)."""
    root = Path(data_dir)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := SPAN_DIR.match(p.name)))


def build_sample(
    data_dir: str | os.PathLike | None = None, new_span: bool = False, shards: int = 2
) -> Path:
    """Write the digits sample as span 1 (or span N+1 with new_span) and return the span dir."""
    # Without new_span an existing span is left untouched (rewriting it would change the files'
    # mtimes and so ExampleGen's fingerprint, which would retrain on identical data).
    from van_tfx.env import van_tfx_home

    if not 1 <= shards <= 2 * VALIDATION_IMAGES:
        raise ValueError(f"shards must be from 1 to {2 * VALIDATION_IMAGES}, got {shards}")
    root = Path(data_dir) if data_dir else Path(van_tfx_home()) / "data"
    spans = existing_spans(root)
    if spans and not new_span:
        return root / f"span-{spans[-1]}"
    span = spans[-1] + 1 if spans else 1
    return write_span(root, span, shards)


def write_span(root: Path, span: int, shards: int) -> Path:
    """Render and write one span atomically (a temp dir renamed to span-<N>)."""
    make_output_dir(root)
    train, validation = span_records(span)
    final = root / f"span-{span}"
    tmp = root / f".tmp-span-{span}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_split(train, tmp, "train", shards)
        write_split(validation, tmp, "validation", max(1, shards // 2))
        write_synset_list(tmp / SYNSETS_FILE, SYNSET_TEXTS)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def span_records(span: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, validation) records of one span: a seeded split and, after span 1, varied renders."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng([SAMPLE_SEED, span])
    order = rng.permutation(len(digits.images))
    vary = span > 1
    records = [
        digit_record(digits.images[i], int(digits.target[i]), int(i), span, rng if vary else None)
        for i in order
    ]
    return records[VALIDATION_IMAGES:], records[:VALIDATION_IMAGES]


def digit_record(pixels: np.ndarray, digit: int, index: int, span: int, rng) -> ImageRecord:
    """One digit as a labelled RGB JPEG record."""
    image = render_digit(pixels, rng)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    synset = f"digit_{digit}"
    return ImageRecord(
        jpeg=out.getvalue(),
        height=image.height,
        width=image.width,
        label=digit + 1,  # synsets digit_0..digit_9 sort in digit order
        synset=synset,
        text=SYNSET_TEXTS[synset],
        filename=f"span-{span}/{synset}/{index:04d}.jpg",
    )


def render_digit(pixels: np.ndarray, rng: np.random.Generator | None = None) -> Image.Image:
    """Dark ink on white, smoothly upscaled to 64x64 RGB; rng varies pose and contrast."""
    gray = (255 - np.asarray(pixels, np.float32) * (255 / 16)).clip(0, 255).astype(np.uint8)
    size = SAMPLE_IMAGE_SIZE
    image = Image.fromarray(gray, "L").resize((size, size), Image.BICUBIC)
    if rng is not None:
        angle = float(rng.uniform(-12, 12))
        dx, dy = (int(v) for v in rng.integers(-4, 5, size=2))
        image = image.rotate(angle, Image.BICUBIC, translate=(dx, dy), fillcolor=255)
        image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.6, 1.0)))
    return image.convert("RGB")
