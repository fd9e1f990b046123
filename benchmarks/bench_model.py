"""VAN train-step and inference throughput on CPU, against a naive port measured in the same run.

    TF_USE_LEGACY_KERAS=1 .venv/bin/python benchmarks/bench_model.py               # b0, b1
    TF_USE_LEGACY_KERAS=1 .venv/bin/python benchmarks/bench_model.py --variants b0 --steps 3
    TF_USE_LEGACY_KERAS=1 .venv/bin/python benchmarks/bench_model.py --ideas        # every idea

Implementations are interleaved (one round of each, repeated) so load from other processes on a
shared machine hits them alike; the median round is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from van_trainer.model import Implementation, build_van, fold_for_inference  # noqa: E402

# Official PyTorch VAN-Classification code on CPU, b0, 224 px, batch 16, on this machine's 2 cores:
# constants from DEVELOPERS.md (torch cannot be installed in the py3.10 venv).
TORCH_IMAGES_PER_SECOND = {"b0": {"train": 5.9, "infer": 36.3}}

NAIVE = Implementation(
    pointwise="conv", depthwise="grouped", fused_batch_norm=False, analytic_gelu_gradient=False
)
OURS = "ours (dense 1x1, fused BN, analytic GELU grad, folded)"
IDEAS = {
    "naive (grouped conv, conv 1x1, unfused BN, autodiff GELU)": NAIVE,
    "depthwise + conv 1x1 + fused BN": Implementation(pointwise="conv"),
    "depthwise + dense 1x1 + unfused BN": Implementation(fused_batch_norm=False),
    "depthwise + dense 1x1 + fused BN, not folded": Implementation(),
    "depthwise + dense 1x1 + fused BN, autodiff GELU": Implementation(analytic_gelu_gradient=False),
}


def make_train_step(model: keras.Model):
    """A compiled AdamW + softmax cross-entropy step, as the Trainer runs it."""
    optimizer = keras.optimizers.AdamW(1e-3, weight_decay=0.05)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(reduce_retracing=True)
    def step(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=False))
        return loss

    return step


def make_infer_step(model: keras.Model):
    """Inference as serving runs it: one traced function, training=False."""

    @tf.function(reduce_retracing=True)
    def infer(images):
        return model(images, training=False)

    return infer


def time_steps(fn, args, steps: int) -> float:
    """Seconds per call, averaged over `steps` calls after the caller's warm-up."""
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    np.asarray(out)  # wait for the last result
    return (time.perf_counter() - start) / steps


def build_runners(variant: str, batch: int, size: int, ideas: dict) -> dict:
    """name -> (train step, infer step), each traced and warmed up once."""
    images = tf.random.normal([batch, size, size, 3])
    labels = tf.random.uniform([batch], 0, 1000, dtype=tf.int64)
    runners = {}
    for name, impl in ideas.items():
        model = build_van(
            variant, input_shape=(size, size, 3), drop_path_rate=0.1, implementation=impl
        )
        # Ours serves the folded copy (BatchNorm and layer scales folded into the convs).
        infer_model = fold_for_inference(model) if name == OURS else model
        train, infer = make_train_step(model), make_infer_step(infer_model)
        for _ in range(2):
            train(images, labels), infer(images)
        runners[name] = (train, infer)
    return runners, (images, labels)


def measure(variant: str, batch: int, size: int, steps: int, rounds: int, ideas: dict) -> dict:
    """name -> {"train": img/s, "infer": img/s}, median over interleaved rounds."""
    runners, (images, labels) = build_runners(variant, batch, size, ideas)
    samples = {name: {"train": [], "infer": []} for name in runners}
    for _ in range(rounds):
        for name, (train, infer) in runners.items():
            samples[name]["train"].append(batch / time_steps(train, (images, labels), steps))
            samples[name]["infer"].append(batch / time_steps(infer, (images,), steps * 3))
    return {
        name: {kind: statistics.median(v) for kind, v in kinds.items()}
        for name, kinds in samples.items()
    }


def report(variant: str, results: dict, naive_name: str) -> None:
    """Print img/s and the ratios vs the naive port and vs PyTorch."""
    torch = TORCH_IMAGES_PER_SECOND.get(variant, {})
    print(f"\n== VAN-{variant} ==")
    print(f"{'implementation':<60}{'train img/s':>12}{'infer img/s':>12}  ratios")
    for name, r in results.items():
        ratios = [
            f"vs naive x{r['train'] / results[naive_name]['train']:.2f}/"
            f"x{r['infer'] / results[naive_name]['infer']:.2f}"
        ]
        if torch:
            ratios.append(
                f"vs torch x{r['train'] / torch['train']:.2f}/x{r['infer'] / torch['infer']:.2f}"
            )
        print(f"{name:<60}{r['train']:>12.1f}{r['infer']:>12.1f}  {'  '.join(ratios)}")
    if torch:
        print(
            f"{'official PyTorch (DEVELOPERS.md constant)':<60}{torch['train']:>12.1f}{torch['infer']:>12.1f}"
        )


def main(argv=None) -> int:
    """Run the benchmark and print a table per variant."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="b0,b1")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5, help="train steps per round (infer: 3x)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ideas", action="store_true", help="also time each optimisation alone")
    args = parser.parse_args(argv)
    naive_name = next(iter(IDEAS))
    ideas = dict(IDEAS) if args.ideas else {naive_name: NAIVE}
    ideas[OURS] = Implementation()
    print(
        f"TF {tf.__version__}, intra-op threads {tf.config.threading.get_intra_op_parallelism_threads()} "
        f"(0 = all {os.cpu_count()} cores), batch {args.batch}, {args.image_size} px"
    )
    for variant in args.variants.split(","):
        results = measure(variant, args.batch, args.image_size, args.steps, args.rounds, ideas)
        report(variant, results, naive_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
