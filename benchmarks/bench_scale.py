"""ImageNet-scale data path, each figure against a baseline measured in the same run.

Images are realistic stand-ins for ImageNet photos: random crops, scales, flips and exposure of
scikit-learn's two bundled photos, saved as ~500x375 JPEGs (quality 80-92) over a few hundred
synsets. Sections:

  formats   bytes stored per image (GZIP TFRecords, as Transform wrote them) against the source
            JPEG, and the Trainer's input pipeline at 224 px with the full recipe, per stored
            format: raw 256x256 centre crop (the old format), JPEG kept (ours), JPEG re-encoded
            with a smaller cap, and ours with a full decode instead of decode_and_crop_jpeg.
            Rounds alternate the formats; the median is printed.
  transform the TFX Transform component (ShardingTransformExecutor, our preprocessing_fn) alone,
            at each size, Beam in_memory vs multi_processing on all cores, alternating: wall
            time, images/s, peak RSS of the whole process tree (Beam workers included).
            `--modes in_memory+twophase,in_memory` compares the class list made in one analysis
            pass (ours) with the weighted TFT vocabulary that needed two.
  input     the Trainer's train_dataset on that Transform output at 224 px, full recipe, on one
            core and on all, vs VAN-b0 training steps fed from memory on the same cores.
  ingest    ImportExampleGen alone on the largest size's shards: TFX's executor (read, Reshuffle,
            GZIP write) vs ours (a copy per shard, CRCs checked), alternating, in one process:
            wall time and bytes written.
  corrupt   one corrupt JPEG (frame header damaged, markers intact) among the largest size's
            images: Transform must fail naming its image/filename.

    make bench-scale           # or: .venv/bin/python benchmarks/bench_scale.py --sizes 1000,5000,20000
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe_machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EVAL_FRACTION = 20  # eval split = 1/20 of the train split
SHARD_RECORDS = 1024  # input shards as `van-tfx data build` writes them
MODES = {
    "in_memory": ["--direct_running_mode=in_memory"],
    "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=0"],
}


# --------------------------------------------------------------------------- images


def _photos():
    import numpy as np
    from sklearn.datasets import load_sample_images

    return [np.asarray(image) for image in load_sample_images().images]


_PHOTOS = None


def make_photo(index: int, seed: int = 0) -> tuple[bytes, int, int]:
    """One ~500x375 JPEG: a random crop of a sample photo, rescaled, flipped, re-exposed."""
    import numpy as np
    from PIL import Image, ImageEnhance

    global _PHOTOS
    _PHOTOS = _PHOTOS or _photos()
    rng = np.random.default_rng([seed, index])
    photo = _PHOTOS[index % len(_PHOTOS)]
    height, width = photo.shape[:2]
    area = rng.uniform(0.3, 1.0) * height * width
    ratio = math.exp(rng.uniform(math.log(1.2), math.log(1.5)))
    if rng.random() < 0.2:
        ratio = 1 / ratio  # some portraits
    w = min(width, round(math.sqrt(area * ratio)))
    h = min(height, round(math.sqrt(area / ratio)))
    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    image = Image.fromarray(photo[top : top + h, left : left + w])
    longer = int(rng.integers(440, 501))
    scale = longer / max(w, h)
    image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=int(rng.integers(80, 93)))
    return out.getvalue(), image.height, image.width


def _record(args):
    from van_tfx.data.records import ImageRecord

    index, synsets, prefix = args
    jpeg, height, width = make_photo(index)
    label = index % synsets + 1
    synset = f"n{label:08d}"
    name = f"{prefix}/{synset}/{index:07d}.JPEG"
    return ImageRecord(jpeg, height, width, label, synset, f"class {label}", name)


def break_frame_header(jpeg: bytes) -> bytes:
    """A JPEG whose start and end markers are intact but whose frame header libjpeg rejects."""
    at = jpeg.find(b"\xff\xc0")
    return jpeg[: at + 5] + b"\0\0\0\0" + jpeg[at + 9 :]


def write_examples(root: Path, count: int, synsets: int, corrupt_index: int | None = None) -> dict:
    """Examples in ExampleGen's layout (<root>/Split-train, Split-eval) and the curated schema."""
    import dataclasses

    from components.curated_schema import curated_schema_text, with_label_max
    from van_tfx.data.records import write_split

    sizes = {"train": count, "eval": max(50, count // EVAL_FRACTION)}
    seen = {"source_bytes": 0, "corrupt": None}
    with get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        for split, size in sizes.items():
            base = 0 if split == "train" else 10_000_000
            jobs = ((base + i, synsets, split) for i in range(size))

            def counted(stream, split=split):
                for i, record in enumerate(stream):
                    if split == "train":
                        seen["source_bytes"] += len(record.jpeg)
                        if i == corrupt_index:
                            broken = break_frame_header(record.jpeg)
                            record = dataclasses.replace(record, jpeg=broken)
                            seen["corrupt"] = record.filename
                    yield record

            shards = max(2, math.ceil(size / SHARD_RECORDS))
            write_split(
                counted(pool.imap(_record, jobs, chunksize=64)),
                root / f"Split-{split}",
                "data",
                shards,
            )
    schema_dir = root / "schema"
    schema_dir.mkdir()
    (schema_dir / "schema.pbtxt").write_text(with_label_max(curated_schema_text(), synsets))
    return {
        "sizes": sizes,
        "source_bytes_per_image": seen["source_bytes"] / count,
        "corrupt_filename": seen["corrupt"],
    }


# --------------------------------------------------------------------------- transform worker


def run_transform(examples: Path, out: Path, mode: str) -> dict:
    """The Transform component alone on LocalDagRunner (importers feed it); its wall time."""
    from tfx import v1 as tfx
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    from pipeline import ingest
    from van_tfx.config import DataConfig

    examples_node = tfx.dsl.Importer(
        source_uri=str(examples),
        artifact_type=tfx.types.standard_artifacts.Examples,
        properties={"split_names": '["train", "eval"]'},
    ).with_id("examples")
    schema_node = tfx.dsl.Importer(
        source_uri=str(examples / "schema"), artifact_type=tfx.types.standard_artifacts.Schema
    ).with_id("schema")
    mode, _, extra = mode.partition("+")
    if extra == "twophase":
        use_weighted_vocabulary()
    transform = ingest.transform(
        DataConfig(),
        examples_node.outputs["result"],
        schema_node.outputs["result"],
        statistics=extra == "stats",
    )
    metadata = str(out / "metadata.sqlite")
    pipeline = tfx.dsl.Pipeline(
        pipeline_name="bench-scale",
        pipeline_root=str(out / "root"),
        components=[examples_node, schema_node, transform],
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            metadata
        ),
        beam_pipeline_args=MODES[mode],
    )
    LocalDagRunner().run(pipeline)
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = metadata
    store = metadata_store.MetadataStore(config)
    # LocalDagRunner names execution types by class path (tfx.components.transform...Transform).
    [transform_type] = [t for t in store.get_execution_types() if t.name.endswith(".Transform")]
    [execution] = store.get_executions_by_type(transform_type.name)
    return {
        "start": execution.create_time_since_epoch / 1000,
        "end": execution.last_update_time_since_epoch / 1000,
        "state": metadata_store_pb2.Execution.State.Name(execution.last_known_state),
    }


def use_weighted_vocabulary() -> None:
    """The baseline: the class vocabulary as it was made before van_trainer/class_list.py."""
    # tft.compute_and_apply_vocabulary weighted by (max_label + 1 - label) / count(label), so that
    # TFT's frequency order comes out in label order: the weights need tft.count_per_key and tft.max
    # first, i.e. a second analysis phase (another pass over the training split).
    import tensorflow as tf
    import tensorflow_transform as tft

    from van_tfx import features
    from van_trainer import preprocessing

    def weighted_vocabulary(labels, synsets, filenames, declared=None):
        keys, counts = tft.count_per_key(labels)
        matches = tf.equal(labels[:, tf.newaxis], keys[tf.newaxis, :])
        count = tf.reduce_sum(tf.where(matches, counts[tf.newaxis, :], 0), axis=1)
        rank = tf.cast(tft.max(labels) + 1 - labels, tf.float32)
        weights = rank / tf.cast(tf.maximum(count, 1), tf.float32)
        path = tft.vocabulary(synsets, vocab_filename=features.SYNSET_VOCABULARY, weights=weights)
        return path, tft.experimental.get_vocabulary_size_by_name(features.SYNSET_VOCABULARY)

    preprocessing.class_vocabulary = weighted_vocabulary


def transform_in_subprocess(examples: Path, out: Path, mode: str) -> dict:
    """run_transform in a fresh process, sampling the RSS of its whole process tree."""
    import psutil

    out.mkdir(parents=True)
    command = [sys.executable, __file__, "--worker", str(examples), str(out), mode]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="")
    log = open(out / "log.txt", "wb")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    samples: list[tuple[float, int]] = []

    def sample():
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                samples.append((time.time(), sum(p.memory_info().rss for p in tree)))
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    sampler.join()
    log.close()
    text = (out / "log.txt").read_text(errors="replace")
    if code != 0:
        return {"failed": True, "log": text}
    result = json.loads(text.strip().splitlines()[-1])
    window = [rss for t, rss in samples if result["start"] <= t <= result["end"]]
    result["peak_rss_mb"] = max(window or [rss for _, rss in samples]) / 2**20
    result["seconds"] = result["end"] - result["start"]
    return result


def transformed_dir(out: Path) -> tuple[Path, Path]:
    """(transformed examples uri, transform graph uri) of a finished run."""
    examples = next((out / "root" / "Transform" / "transformed_examples").glob("*"))
    graph = next((out / "root" / "Transform" / "transform_graph").glob("*"))
    return examples, graph


def bytes_per_image(split_dir: Path, count: int) -> float:
    """Bytes on disk per example in one transformed split."""
    return sum(f.stat().st_size for f in split_dir.glob("*")) / count


# --------------------------------------------------------------------------- formats


def raw_square(jpeg: bytes, side: int = 256) -> bytes:
    """The old stored format: shorter side to 256 (bicubic), centre 256x256, raw uint8 bytes."""
    import numpy as np
    import tensorflow as tf

    image = tf.io.decode_jpeg(jpeg, channels=3)
    height, width = image.shape[:2]
    scale = side / min(height, width)
    shape = [max(side, round(height * scale)), max(side, round(width * scale))]
    resized = tf.image.resize(image, shape, "bicubic", antialias=True)
    top, left = (shape[0] - side) // 2, (shape[1] - side) // 2
    square = resized[top : top + side, left : left + side]
    return np.asarray(tf.cast(tf.round(tf.clip_by_value(square, 0, 255)), tf.uint8)).tobytes()


def write_format(path: Path, images: list[bytes], labels: list[int]) -> float:
    """Transform-layout GZIP TFRecord of (image bytes, label); returns bytes per image on disk."""
    import tensorflow as tf

    from van_tfx import features

    with tf.io.TFRecordWriter(str(path), options="GZIP") as writer:
        for image, label in zip(images, labels, strict=True):
            feature = {
                features.TRANSFORMED_IMAGE: tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[image])
                ),
                features.TRANSFORMED_LABEL: tf.train.Feature(
                    int64_list=tf.train.Int64List(value=[label])
                ),
            }
            writer.write(
                tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
            )
    return path.stat().st_size / len(images)


def train_input(files: list[str], config, classes: int, decode: str, threads: int):
    """The Trainer's train_dataset, or the same recipe on another stored format."""
    import tensorflow as tf

    from van_tfx import features
    from van_trainer import augment, dataset

    if decode == "jpeg_crop":
        ds = dataset.train_dataset(files, config, classes)
    else:
        spec = dataset.transformed_feature_spec()
        size = config.model.image_size

        def parse(index, record):
            example = tf.io.parse_single_example(record, spec)
            raw = example[features.TRANSFORMED_IMAGE]
            if decode == "raw256":
                pixels = tf.reshape(tf.io.decode_raw(raw, tf.uint8), [256, 256, 3])
            else:  # "jpeg_full": decode everything, then crop
                pixels = tf.io.decode_jpeg(raw, channels=3)
            seed = augment.example_seed(0, index)
            image = augment.train_augment(pixels, seed, size, config.augment)
            return image, tf.one_hot(example[features.TRANSFORMED_LABEL], classes)

        def mix(index, batch):
            return augment.mixup_cutmix(*batch, augment.example_seed(1, index), config.augment)

        ds = tf.data.TFRecordDataset(files, compression_type="GZIP").repeat().enumerate()
        ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(config.train.batch_size, drop_remainder=True).enumerate()
        ds = ds.map(mix, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def images_per_second(ds, batches: int, batch_size: int) -> float:
    """Throughput of `batches` batches after three warm-up batches."""
    from bench_input import images_per_second as measured

    return measured(ds, batches, batch_size, warmup=3)


def recipe_config(batch_size: int = 32):
    """VAN-b0 at 224 px with the paper's full augmentation (the default recipe)."""
    from van_tfx.config import Config

    return Config.model_validate({"train": {"batch_size": batch_size, "shuffle_buffer": 256}})


def formats_section(work: Path, jpegs: list[bytes], rounds: int, batches: int) -> dict:
    """Bytes per image and input img/s (1 core) per stored format, rounds alternating."""
    import tensorflow as tf

    from van_trainer import preprocessing

    labels = [i % 200 for i in range(len(jpegs))]
    source = sum(map(len, jpegs)) / len(jpegs)
    capped_320 = preprocessing.stored_images(tf.constant(jpegs), 320, 90).numpy().tolist()
    stored = {
        "raw 256x256 centre crop (old)": ([raw_square(j) for j in jpegs], "raw256"),
        "JPEG kept, cap 512 (ours)": (jpegs, "jpeg_crop"),
        "JPEG re-encoded, cap 320 q90": (capped_320, "jpeg_crop"),
        "ours, full decode then crop": (jpegs, "jpeg_full"),
    }
    results = {}
    for name, (images, _) in stored.items():
        path = work / f"format-{len(results)}.gz"
        size = write_format(path, images, labels)
        results[name] = {"bytes": size, "vs_source": size / source, "file": str(path), "rates": []}
    config = recipe_config()
    for _ in range(rounds):
        for name, (_, decode) in stored.items():
            ds = train_input([results[name]["file"]], config, 200, decode, threads=1)
            results[name]["rates"].append(images_per_second(ds, batches, config.train.batch_size))
    for entry in results.values():
        entry["img_s_1core"] = statistics.median(entry.pop("rates"))
    return {"source_bytes": source, "formats": results}


def run_ingest(executor_class, data: Path, out: Path) -> dict:
    """One ImportExampleGen executor over data/Split-{train,eval}/*: wall time, bytes written."""
    from tfx.proto import example_gen_pb2
    from tfx.types.standard_artifacts import Examples
    from tfx.utils import proto_utils

    examples = Examples()
    examples.uri = str(out)
    splits = [
        example_gen_pb2.Input.Split(name=name, pattern=f"Split-{name}/*")
        for name in ("train", "eval")
    ]
    exec_properties = {
        "input_base": str(data),
        "input_config": proto_utils.proto_to_json(example_gen_pb2.Input(splits=splits)),
        "output_config": "{}",
        "output_data_format": example_gen_pb2.FORMAT_TF_EXAMPLE,
        "output_file_format": example_gen_pb2.FORMAT_TFRECORDS_GZIP,
    }
    executor = executor_class(
        executor_class.Context(
            beam_pipeline_args=["--direct_running_mode=in_memory"], tmp_dir=str(out) + "-tmp"
        )
    )
    start = time.perf_counter()
    executor.Do({}, {"examples": [examples]}, exec_properties)
    seconds = time.perf_counter() - start
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"seconds": seconds, "bytes_written": written}


def ingest_section(work: Path, data: Path, rounds: int) -> dict:
    """TFX's ImportExampleGen executor against ours on the same shards, alternating."""
    from tfx.components.example_gen.import_example_gen.executor import Executor as TfxExecutor

    from components.example_gen import SpanResolvingImportExecutor

    source = sum(f.stat().st_size for f in data.glob("Split-*/*"))
    runs: dict = {"tfx": [], "ours": []}
    for round_index in range(rounds):
        for name, executor in (("tfx", TfxExecutor), ("ours", SpanResolvingImportExecutor)):
            result = run_ingest(executor, data, work / f"ingest-{name}-{round_index}")
            runs[name].append(result)
            print("ingest", name, json.dumps(result), flush=True)
    seconds = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    return {
        "source_bytes": source,
        "seconds": seconds,
        "bytes_written": {k: v[-1]["bytes_written"] for k, v in runs.items()},
        "speedup": seconds["tfx"] / seconds["ours"],
    }


def train_step_rate(steps: int, batch_size: int) -> float:
    """VAN-b0 training steps at 224 px fed from memory (no input cost), images/s."""
    from bench_input import train_step_images_per_second

    return train_step_images_per_second(recipe_config(batch_size), steps, "none")


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    """Run the sections and print one JSON report (plus a readable summary)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,20000")
    parser.add_argument("--synsets", type=int, default=300)
    parser.add_argument(
        "--modes",
        default="in_memory,multi_processing",
        help="Beam modes to alternate; a '+stats' suffix also runs TFX Transform's statistics, "
        "'+twophase' uses the weighted vocabulary (two analysis phases) as a baseline",
    )
    parser.add_argument("--format-images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sections", default="formats,transform,input,ingest,corrupt")
    parser.add_argument("--work", default="", help="keep data here (default: a temp dir)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import van_tfx  # noqa: F401  (legacy Keras before TensorFlow)

    if args.worker:
        examples, out, mode = args.worker
        print(json.dumps(run_transform(Path(examples), Path(out), mode)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    sections = set(args.sections.split(","))
    modes = args.modes.split(",")
    print(describe_machine(), flush=True)
    report: dict = {"machine": describe_machine()}
    with tempfile.TemporaryDirectory(dir=args.work or None) as tmp:
        work = Path(tmp)
        if "formats" in sections:
            jpegs = [make_photo(i, seed=7)[0] for i in range(args.format_images)]
            report["formats"] = formats_section(work, jpegs, args.rounds, args.batches)
            print(json.dumps(report["formats"], indent=1), flush=True)
        runs = {}
        if "transform" in sections or "input" in sections:
            for size in sizes:
                data = work / f"data-{size}"
                info = write_examples(data, size, args.synsets)
                runs[size] = {"source_bytes_per_image": info["source_bytes_per_image"]}
                for mode in modes:  # alternating modes at each size
                    result = transform_in_subprocess(data, work / f"out-{size}-{mode}", mode)
                    if result.get("failed"):
                        print(result["log"][-3000:])
                        return 1
                    images = sum(info["sizes"].values())
                    examples_uri, _ = transformed_dir(work / f"out-{size}-{mode}")
                    result.update(
                        images=images,
                        img_s=images / result["seconds"],
                        stored_bytes_per_image=bytes_per_image(examples_uri / "Split-train", size),
                        files=len(list((examples_uri / "Split-train").glob("*"))),
                    )
                    runs[size][mode] = result
                    print(size, mode, json.dumps(result), flush=True)
            report["transform"] = runs
        if "input" in sections:
            size = sizes[min(1, len(sizes) - 1)]
            mode = modes[-1]
            examples_uri, _ = transformed_dir(work / f"out-{size}-{mode}")
            files = sorted(str(f) for f in (examples_uri / "Split-train").glob("*"))
            config = recipe_config()
            cores = os.cpu_count() or 1
            rates = {"input_1core": [], "input_all_cores": [], "step_all_cores": []}
            for _ in range(args.rounds):
                for key, threads in (("input_1core", 1), ("input_all_cores", cores)):
                    ds = train_input(files, config, args.synsets, "jpeg_crop", threads)
                    rates[key].append(images_per_second(ds, args.batches, 32))
                rates["step_all_cores"].append(train_step_rate(args.steps, 32))
            medians = {k: statistics.median(v) for k, v in rates.items()}
            medians["input_over_step"] = medians["input_all_cores"] / medians["step_all_cores"]
            medians["input_per_core"] = medians["input_all_cores"] / cores
            medians["cores_per_h100_bf16_b0"] = 2400 / medians["input_1core"]
            report["input"] = medians
            print(json.dumps(medians), flush=True)
        if "ingest" in sections:
            size = sizes[-1]
            data = work / f"data-{size}"
            if not data.exists():
                write_examples(data, size, args.synsets)
            report["ingest"] = ingest_section(work, data, args.rounds)
            print(json.dumps(report["ingest"]), flush=True)
        if "corrupt" in sections:
            size = sizes[-1]
            data = work / "data-corrupt"
            info = write_examples(data, size, args.synsets, corrupt_index=size // 2)
            result = transform_in_subprocess(data, work / "out-corrupt", modes[-1])
            named = bool(result.get("failed")) and info["corrupt_filename"] in result["log"]
            report["corrupt"] = {"filename": info["corrupt_filename"], "named_in_error": named}
            print(json.dumps(report["corrupt"]), flush=True)
    print(describe_machine())
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
