"""Throughput of the data path, each against a baseline measured in the same run.

1. Transform: van_trainer.preprocessing.preprocessing_fn through tf.Transform's Beam
   AnalyzeAndTransformDataset (what the TFX Transform component runs), vs a bare tf.data loop that
   does the least any checked Transform must: decode each image once (at 1/8 scale, as our check
   does) and pass its bytes on. Goal: >= 0.5x the bare loop.
2. Converter: `van-tfx data build` images/s on a folder of the sample's JPEGs (serial vs all cores).

Run: TF_USE_LEGACY_KERAS=1 .venv/bin/python benchmarks/bench_transform.py [--max-side 512]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import van_tfx  # noqa: E402,F401
from benchmarks.machine import describe_machine  # noqa: E402

COPIES = 8  # the sample replicated 8x: enough images that per-image cost outweighs start-up noise


def bare_tf_data(files: list[str], size: int) -> tuple[int, float]:
    """Decode every record's JPEG once at 1/8 scale with tf.data, keep its bytes (the floor)."""
    import tensorflow as tf

    from van_tfx import features

    spec = {features.IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string)}

    def decode(raw):
        encoded = tf.io.parse_single_example(raw, spec)[features.IMAGE_ENCODED]
        pixels = tf.io.decode_jpeg(encoded, channels=3, ratio=8)
        return encoded, tf.size(pixels)

    dataset = tf.data.TFRecordDataset(files).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    start = time.perf_counter()
    count = sum(1 for _ in dataset)
    return count, time.perf_counter() - start


def tf_transform(files: list[str], size: int, workdir: str) -> tuple[int, float]:
    """Analyze + transform the records with the project's preprocessing_fn on Beam."""
    import apache_beam as beam
    import tensorflow_transform.beam as tft_beam
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2
    from tfx_bsl.public import tfxio

    from components.curated_schema import curated_schema_text
    from van_trainer import preprocessing

    schema = text_format.Parse(curated_schema_text(), schema_pb2.Schema())
    source = tfxio.TFExampleRecord(file_pattern=files, schema=schema)

    def fn(inputs):
        return preprocessing.preprocessing_fn(inputs, {"data": {"max_image_side": size}})

    start = time.perf_counter()
    with beam.Pipeline() as pipeline, tft_beam.Context(temp_dir=workdir):
        raw = pipeline | "Read" >> source.BeamSource()
        (transformed, _), _ = (
            raw,
            source.TensorAdapterConfig(),
        ) | tft_beam.AnalyzeAndTransformDataset(fn, output_record_batches=True)
        _ = (
            transformed
            | beam.Map(lambda batch: batch[0].num_rows)
            | beam.CombineGlobally(sum)
            | beam.io.WriteToText(os.path.join(workdir, "count"), shard_name_template="")
        )
    elapsed = time.perf_counter() - start
    return int(Path(workdir, "count").read_text()), elapsed


def replicated(files: list[str], copies: int, workdir: Path) -> list[str]:
    """The same shards `copies` times (hard links), to separate fixed Beam cost from per-image."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(copies):
        for f in files:
            target = workdir / f"{k}-{Path(f).name}"
            if not target.exists():
                os.link(f, target)
            out.append(str(target))
    return out


def converter(sample_span: Path, workdir: Path, workers: int) -> tuple[int, float]:
    """Images/s of build_dataset on a folder of the sample's JPEGs."""
    from van_tfx.data.build import build_dataset
    from van_tfx.data.records import read_examples

    images = workdir / "images"
    if not images.exists():
        for record in read_examples(sorted(sample_span.glob("train-*"))):
            name = record["image/filename"].decode().split("/", 1)[1]
            path = images / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(record["image/encoded"])
    out = workdir / f"out-{workers}"
    start = time.perf_counter()
    result = build_dataset(images, out, workers=workers, progress=False)
    return result.num_records, time.perf_counter() - start


def main() -> None:
    """Print images/s for Transform vs bare tf.data, and for the converter."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-side", dest="size", type=int, default=512)
    args = parser.parse_args()
    print(describe_machine())
    from van_tfx.data.sample import build_sample

    with tempfile.TemporaryDirectory() as tmp:
        span = build_sample(Path(tmp) / "data")
        files = sorted(str(p) for p in span.glob("train-*"))
        n_bare, t_bare = bare_tf_data(files, args.size)
        many = replicated(files, COPIES, Path(tmp) / "many")
        n_bare4, t_bare4 = bare_tf_data(many, args.size)
        n_tft, t_tft = tf_transform(files, args.size, str(Path(tmp) / "tft1"))
        n_tft4, t_tft4 = tf_transform(many, args.size, str(Path(tmp) / "tftN"))
        bare = (n_bare4 - n_bare) / (t_bare4 - t_bare)
        tft = (n_tft4 - n_tft) / (t_tft4 - t_tft)
        print(
            f"bare tf.data decode (1/8)  : {n_bare4} images in {t_bare4:6.2f}s (1x: {t_bare:.2f}s)"
        )
        print(f"tf.Transform analyze+apply : {n_tft4} images in {t_tft4:6.2f}s (1x: {t_tft:.2f}s)")
        print(f"per-image rate (Nx - 1x)   : bare {bare:8.1f} img/s, Transform {tft:8.1f} img/s")
        print(
            f"Transform / bare           : {tft / bare:.2f}x (goal >= 0.5x); "
            f"whole-run incl. Beam start-up: {(n_tft4 / t_tft4) / (n_bare4 / t_bare4):.2f}x"
        )
        for workers in (1, os.cpu_count() or 1):
            n, t = converter(span, Path(tmp), workers)
            print(
                f"converter, {workers} worker(s)    : {n} images in {t:6.2f}s = {n / t:8.1f} img/s"
            )


if __name__ == "__main__":
    main()
