"""Memory and speed of one large request, with and without the exported graph's chunks.

The export runs a request's images through the model `serving.inference_chunk_images` at a time
(van_trainer.export.in_chunks); the baseline is the whole request at once, as it ran before. Each
measurement is a fresh process (peak RSS is per process), baseline and chunked alternating round
by round; a child decodes JPEGs of real sample photos, then runs the folded VAN in
`serving.inference_slices` slices, as `predict_images` does after Transform:

    .venv/bin/python benchmarks/bench_request_memory.py                  # VAN-b0, 16 and 256 images
    .venv/bin/python benchmarks/bench_request_memory.py --batches 16,1000 --rounds 1

Reports the peak RSS growth over the first (2-image) call and img/s, per request size.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before any TensorFlow import
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def sample_jpegs(count: int, side: int = 256) -> list[bytes]:
    """`count` JPEGs cut from scikit-learn's sample photos (real images, not noise)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    jpegs = []
    for i in range(count):
        photo = photos[i % len(photos)]
        top, left = (37 * i) % (photo.shape[0] - side), (53 * i) % (photo.shape[1] - side)
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(photo[top : top + side, left : left + side])).save(
            buffer, "JPEG", quality=90
        )
        jpegs.append(buffer.getvalue())
    return jpegs


def child(variant: str, image_size: int, batch: int, chunked: bool, calls: int) -> dict:
    """Peak RSS growth and img/s of `calls` requests of `batch` images, in this process."""
    import resource
    import time

    sys.path.insert(0, REPO)
    import tensorflow as tf

    import van_tfx  # noqa: F401  (legacy Keras before TensorFlow)
    from van_tfx.config import EvalConfig, ServingConfig
    from van_trainer import augment
    from van_trainer.export import forward_in_slices, in_chunks
    from van_trainer.model import build_van, fold_for_inference

    serving, crop_pct = ServingConfig(), EvalConfig().crop_pct
    tf.keras.utils.set_random_seed(0)
    model = fold_for_inference(build_van(variant, 1000, (image_size, image_size, 3)))

    def probabilities(jpegs):
        images = augment.eval_images_from_jpeg(jpegs, image_size, crop_pct)
        return tf.nn.softmax(forward_in_slices(model, images, serving.inference_slices))

    def request(jpegs):
        if not chunked:
            return probabilities(jpegs)
        return in_chunks(probabilities, jpegs, serving.inference_chunk_images, 1000)

    serve = tf.function(request, input_signature=[tf.TensorSpec([None], tf.string)])
    jpegs = tf.constant(sample_jpegs(batch))
    serve(jpegs[:2]).numpy()  # traced, weights and thread pools in place: the RSS baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for _ in range(calls):
        serve(jpegs).numpy()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_growth_gb": (after - before) / 1e6, "images_per_second": batch * calls / seconds}


def measure(args, batch: int, chunked: bool) -> dict:
    """One child process's figures."""
    command = [sys.executable, os.path.abspath(__file__), "--child", f"--variant={args.variant}",
               f"--image-size={args.image_size}", f"--batches={batch}", f"--calls={args.calls}"]  # fmt: skip
    if chunked:
        command.append("--chunked")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {command} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(runs: list[dict], key: str) -> float:
    """The median of one figure over rounds."""
    return statistics.median(run[key] for run in runs)


def main() -> None:
    """Parse flags; run the children; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="b0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", default="16,256", help="request sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=2, help="requests timed per child")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunked", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        print(
            json.dumps(child(args.variant, args.image_size, batches[0], args.chunked, args.calls))
        )
        return

    sys.path.insert(0, REPO)
    from benchmarks.machine import describe_machine
    from van_tfx.config import ServingConfig

    print(describe_machine())
    chunk = ServingConfig().inference_chunk_images
    print(f"VAN-{args.variant} at {args.image_size} px, folded, {args.rounds} rounds, medians; "
          f"chunked = {chunk} images at a time (serving.inference_chunk_images)")  # fmt: skip
    for batch in batches:
        runs = {False: [], True: []}
        for _ in range(args.rounds):
            for chunked in (False, True):
                runs[chunked].append(measure(args, batch, chunked))

        whole, parts = (median(runs[c], "peak_growth_gb") for c in (False, True))
        fast_whole, fast_parts = (median(runs[c], "images_per_second") for c in (False, True))
        print(f"{batch:5d} images: peak RSS growth {whole:5.2f} GB whole vs {parts:5.2f} GB chunked; "
              f"{fast_whole:5.1f} vs {fast_parts:5.1f} img/s (x{fast_parts / fast_whole:.2f})",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
