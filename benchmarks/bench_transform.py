"""Throughput of the data path, each against a baseline measured in the same run.

1. Transform: van_trainer.preprocessing.preprocessing_fn through tf.Transform's Beam
   AnalyzeAndTransformDataset (what the TFX Transform component runs), vs a bare tf.data loop that
   does the least any checked Transform must: decode each image once (at 1/8 scale, as our check
   does) and pass its bytes on. Goal: >= 0.5x the bare loop.
2. Converter: `van-tfx data build` images/s on a folder of the sample's JPEGs (serial vs all cores).

`--analysis-pass` instead measures TFX Transform's analysis pass over ImageNet-sized records
(~110 KB), as TFX runs it: the records decoded by tfx_bsl, projected to the columns
`tft.get_analyze_input_columns` names, then `tft_beam.AnalyzeDataset`. The working tree's
preprocessing_fn against the one of `--baseline` (a git revision), alternating, in the same run.

Run: TF_USE_LEGACY_KERAS=1 .venv/bin/python benchmarks/bench_transform.py [--max-side 512]
     TF_USE_LEGACY_KERAS=1 .venv/bin/python benchmarks/bench_transform.py --analysis-pass
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import van_tfx  # noqa: E402,F401
from benchmarks.machine import describe_machine  # noqa: E402

COPIES = 8  # the sample replicated 8x: enough images that per-image cost outweighs start-up noise
REPO = Path(__file__).resolve().parents[1]
# The last revision whose analysis pass decoded image/encoded (the class list named records
# without an image/filename by the image's size).
ANALYSIS_BASELINE = "495ac99"


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


def imagenet_sized_records(directory: Path, count: int, shards: int = 4) -> list[str]:
    """`count` labelled records of ~110 KB JPEGs (ImageNet-1k's mean), in `shards` files."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from van_tfx.data.records import ImageRecord, write_split

    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    jpegs = []
    for k in range(16):  # distinct crops; decoding costs the same whatever the picture
        photo = photos[k % len(photos)]
        h, w = photo.shape[:2]
        top, left = rng.integers(0, h // 4), rng.integers(0, w // 4)
        image = Image.fromarray(photo[top : top + 3 * h // 4, left : left + 3 * w // 4])
        scale = int(rng.integers(740, 861)) / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=93)
        jpegs.append((out.getvalue(), image.height, image.width))

    def records():
        for i in range(count):
            jpeg, height, width = jpegs[i % len(jpegs)]
            label = i % 100 + 1
            synset = f"n{label:08d}"
            name = f"train/{synset}/{i:07d}.JPEG"
            yield ImageRecord(jpeg, height, width, label, synset, f"class {label}", name)

    write_split(records(), directory, "train", shards)
    return sorted(str(p) for p in directory.glob("train-*"))


def preprocessing_at(revision: str, directory: Path):
    """van_trainer/preprocessing.py as of a git revision, imported as a module of its own."""
    # It imports the rest of the project, van_trainer.class_list included, from the working tree.
    source = subprocess.run(
        ["git", "show", f"{revision}:van_trainer/preprocessing.py"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = directory / "preprocessing_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("preprocessing_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Beam pickles the preprocessing_fn by reference
    spec.loader.exec_module(module)
    return module


def curated_schema():
    """The curated schema (components/schema), as a tensorflow_metadata Schema proto."""
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    from components.curated_schema import curated_schema_text

    return text_format.Parse(curated_schema_text(), schema_pb2.Schema())


def curated_source(files: list[str]):
    """The records as TFX's Transform reads them: tfx_bsl's TFXIO with the curated schema."""
    from tfx_bsl.public import tfxio

    return tfxio.TFExampleRecord(file_pattern=files, schema=curated_schema())


def analyze_columns(preprocessing_fn, source) -> list[str]:
    """The columns TFX's Transform decodes from `source` to analyze for `preprocessing_fn`."""
    import tensorflow_transform as tft

    specs = source.TensorAdapter().OriginalTypeSpecs()
    return tft.get_analyze_input_columns(preprocessing_fn, specs)


def analysis_pass(files: list[str], preprocessing_fn, workdir: str) -> float:
    """Seconds for TFX Transform's analysis pass on Beam's DirectRunner."""
    # The records read, decoded by tfx_bsl projected to the analyzer input columns, then
    # AnalyzeDataset.
    import apache_beam as beam
    import tensorflow_transform.beam as tft_beam

    source = curated_source(files)
    # As tfx/components/transform/executor.py does (statistics disabled, as the pipeline does).
    source = source.Project(analyze_columns(preprocessing_fn, source))
    start = time.perf_counter()
    with beam.Pipeline() as pipeline:
        batches = pipeline | "Read" >> source.BeamSource()
        with tft_beam.Context(temp_dir=workdir, use_deep_copy_optimization=True):
            _ = (batches, source.TensorAdapterConfig()) | tft_beam.AnalyzeDataset(preprocessing_fn)
    return time.perf_counter() - start


def decode_time(serialized: list[bytes], columns: list[str]) -> tuple[float, int]:
    """(seconds, Arrow bytes) for tfx_bsl to decode `serialized` in one batch, projected."""
    # Projected to `columns`: the decode step of the analysis pass alone, without reading or Beam.
    from tfx_bsl.coders import example_coder
    from tfx_bsl.tfxio import tensor_representation_util

    # What TFXIO's Project does to the schema its decoder gets.
    projected = tensor_representation_util.ProjectTensorRepresentationsInSchema(
        curated_schema(), columns
    )
    decoder = example_coder.ExamplesToRecordBatchDecoder(projected.SerializeToString())
    start = time.perf_counter()
    batch = decoder.DecodeBatch(serialized)
    return time.perf_counter() - start, batch.nbytes


def analysis_pass_section(baseline: str, records: int, rounds: int) -> None:
    """Print the analysis pass's decode and whole time per 1,000 records, before / after."""
    # Both the baseline's and ours.
    import tensorflow as tf

    from van_trainer import preprocessing

    copies = 8
    with tempfile.TemporaryDirectory() as tmp:
        functions = {
            f"before ({baseline})": preprocessing_at(baseline, Path(tmp)).preprocessing_fn,
            "after (working tree)": preprocessing.preprocessing_fn,
        }
        small = imagenet_sized_records(Path(tmp) / "records", records)
        large = replicated(small, copies, Path(tmp) / "many")
        serialized = [r.numpy() for r in tf.data.TFRecordDataset(small)]
        size = sum(map(len, serialized)) / records
        print(f"{records} records of {size / 1000:.0f} KB on average ({copies}x: hard links)")
        columns = {
            name: analyze_columns(fn, curated_source(small)) for name, fn in functions.items()
        }
        for name in functions:
            print(f"{name:22} projects {sorted(columns[name])}")
        for fn in functions.values():  # warm-up: imports, first traces, caches
            analysis_pass(small, fn, f"{tmp}/warm")
        decode: dict[str, list[float]] = {name: [] for name in functions}
        whole: dict[str, list[float]] = {name: [] for name in functions}
        held = {}
        for round_ in range(rounds):
            order = list(functions.items())
            for name, fn in order if round_ % 2 == 0 else order[::-1]:  # alternating
                seconds, held[name] = decode_time(serialized, columns[name])
                decode[name].append(seconds * 1000 / records)
                # Per 1,000 records: (Nx - 1x), which removes Beam's fixed start-up cost.
                one = analysis_pass(small, fn, f"{tmp}/t{round_}")
                many = analysis_pass(large, fn, f"{tmp}/t{round_}")
                whole[name].append((many - one) / ((copies - 1) * records) * 1000)
                print(
                    f"  round {round_ + 1} {name:22}: decode {decode[name][-1] * 1000:6.1f} ms, "
                    f"analysis pass {whole[name][-1] * 1000:7.1f} ms per 1,000 records "
                    f"(1x {one:.1f} s, {copies}x {many:.1f} s)"
                )
        before, after = functions
        for what, times in (("tfx_bsl decode", decode), ("whole analysis pass", whole)):
            b, a = statistics.median(times[before]), statistics.median(times[after])
            print(
                f"{what:20}: before {b * 1000:7.1f} ms, after {a * 1000:7.1f} ms per 1,000 records "
                f"(medians of {rounds}): before / after = {b / a:.2f}x"
            )
        print(
            f"Arrow batch of {records} records: before {held[before] / 1e6:.1f} MB, "
            f"after {held[after] / 1e6:.2f} MB"
        )


def main() -> None:
    """Print images/s for Transform vs bare tf.data, and for the converter."""
    # Or, with --analysis-pass, the analysis pass's time, before vs after.
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-side", dest="size", type=int, default=512)
    parser.add_argument("--analysis-pass", action="store_true")
    parser.add_argument("--baseline", default=ANALYSIS_BASELINE, help="git revision to compare")
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    print(describe_machine())
    if args.analysis_pass:
        analysis_pass_section(args.baseline, args.records, args.rounds)
        return
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
