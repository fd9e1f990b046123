"""VAN train-step and inference throughput on CPU against PyTorch, both measured in this run.

    .venv/bin/python benchmarks/bench_model.py                     # b0, this CPU's own ISA
    .venv/bin/python benchmarks/bench_model.py --isa avx2          # oneDNN/ATen capped to AVX2
    .venv/bin/python benchmarks/bench_model.py --isa native,avx2 --rounds 3
    .venv/bin/python benchmarks/bench_model.py --ideas             # each optimisation alone

The reference is Hugging Face's `VanForImageClassification` (transformers 4.57.6, torch 2.13.0
CPU) in the side environment `.bench-venv/`, created on first use (benchmarks/torch_reference.py),
timed in NCHW and channels-last; the faster layout counts. Ours is `build_van` trained with the
Trainer's optimizer (optim.build_optimizer: fused AdamW, decay exemptions) and served as the
folded copy (`fold_for_inference`). Same batch, size, drop-path rate and loss on both sides.

Rounds alternate PyTorch and TensorFlow (one round of each, repeated) so load from other processes
on a shared machine hits them alike; the median round is reported, with the load average.
`--isa avx2` caps oneDNN (TF and torch: ONEDNN_MAX_CPU_ISA=AVX2) and ATen (ATEN_CPU_CAPABILITY=avx2)
on this CPU: TF's own Eigen kernels are compiled into the pip wheel for AVX and ignore the cap, so
a capped figure approximates, and is not, an AVX2 machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

import van_tfx  # noqa: E402,F401  (legacy Keras and oneDNN defaults; imports no TensorFlow)
from benchmarks.machine import cpu_model, describe_machine, load_average  # noqa: E402

ISA_CAPS = {
    "native": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}
TORCH_LAYOUTS = ("nchw", "channels_last")
OURS = "ours"
GOALS = {"train": 2.0, "infer": 1.5}


def tf_candidates(ideas: bool) -> dict:
    """name -> (Implementation, fold for inference, precision policy) of the TF rows to time."""
    from van_trainer.model import Implementation

    rows = {OURS: (Implementation(), True, "float32")}
    if ideas:
        naive = Implementation(
            pointwise="conv",
            depthwise="grouped",
            fused_batch_norm=False,
            analytic_gelu_gradient=False,
        )
        rows |= {
            "naive port (grouped conv, conv 1x1, unfused BN, autodiff GELU)": (
                naive,
                False,
                "float32",
            ),
            "ours, not folded for inference": (Implementation(), False, "float32"),
            "ours, conv 1x1 for training": (Implementation(pointwise="conv"), True, "float32"),
            "ours, autodiff GELU gradient": (
                Implementation(analytic_gelu_gradient=False),
                True,
                "float32",
            ),
            "ours, mixed_bfloat16": (Implementation(), True, "mixed_bfloat16"),
        }
    return rows


def make_train_step(model):
    """One compiled step of the Trainer's AdamW on label cross-entropy (no metrics, no input)."""
    import tensorflow as tf
    import tf_keras as keras

    from van_tfx.config import TrainConfig
    from van_trainer import optim

    optimizer = optim.build_optimizer(TrainConfig(), 1e-3, model.trainable_variables)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    return step


def make_infer_step(model):
    """Inference as serving runs it: one traced function, training=False."""
    import tensorflow as tf

    @tf.function
    def infer(images):
        return model(images, training=False)

    return infer


def time_steps(fn, args, steps: int) -> float:
    """Images per second over `steps` calls (warm functions only)."""
    import numpy as np

    start = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    np.asarray(out)  # wait for the last result
    return args[0].shape[0] * steps / (time.perf_counter() - start)


def build_tf_runners(variant: str, batch: int, size: int, rows: dict) -> tuple[dict, tuple]:
    """name -> (train step, infer step), each traced and warmed up."""
    import tensorflow as tf
    import tf_keras as keras

    from van_trainer.model import build_van, fold_for_inference

    images = tf.random.normal([batch, size, size, 3])
    labels = tf.random.uniform([batch], 0, 1000, dtype=tf.int64)
    runners = {}
    for name, (impl, fold, policy) in rows.items():
        keras.mixed_precision.set_global_policy(policy)
        try:
            model = build_van(
                variant, input_shape=(size, size, 3), drop_path_rate=0.1, implementation=impl
            )
            train = make_train_step(model)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        infer = make_infer_step(fold_for_inference(model) if fold else model)
        for _ in range(2):
            train(images, labels), infer(images)
        runners[name] = (train, infer)
    return runners, (images, labels)


def measure(args, variant: str, worker, rows: dict) -> dict:
    """name -> {"train": [img/s per round], "infer": [...]}, PyTorch and TF rounds alternating."""
    from van_trainer.model import VARIANTS

    cfg = VARIANTS[variant]
    facts = worker.ask(
        cmd="setup",
        embed_dims=list(cfg.embed_dims),
        depths=list(cfg.depths),
        mlp_ratios=list(cfg.mlp_ratios),
        batch=args.batch,
        image_size=args.image_size,
        drop_path_rate=0.1,
    )
    runners, (images, labels) = build_tf_runners(variant, args.batch, args.image_size, rows)
    names = [f"PyTorch (HF VAN), {layout}" for layout in TORCH_LAYOUTS] + list(runners)
    samples = {name: {"train": [], "infer": []} for name in names}
    for _ in range(args.rounds):
        for kind, steps in (("train", args.steps), ("infer", 3 * args.steps)):
            for layout in TORCH_LAYOUTS:
                answer = worker.ask(cmd=kind, layout=layout, steps=steps)
                samples[f"PyTorch (HF VAN), {layout}"][kind].append(answer["images_per_second"])
            for name, (train, infer) in runners.items():
                fn, fn_args = (train, (images, labels)) if kind == "train" else (infer, (images,))
                samples[name][kind].append(time_steps(fn, fn_args, steps))
    return facts, samples


def report(variant: str, args, facts: dict, samples: dict, loads: tuple[str, str]) -> None:
    """Median img/s per row, the best PyTorch layout, and ours / best PyTorch."""
    medians = {
        n: {k: statistics.median(v) for k, v in kinds.items()} for n, kinds in samples.items()
    }
    torch_rows = [n for n in medians if n.startswith("PyTorch")]
    best = {k: max(medians[n][k] for n in torch_rows) for k in ("train", "infer")}
    print(
        f"\n== VAN-{variant}, batch {args.batch}, {args.image_size} px: images/s, median of "
        f"{args.rounds} interleaved rounds; load average before / after: {loads[0]} / {loads[1]} =="
    )
    print(
        f"PyTorch {facts['torch']} (ATen {facts['cpu_capability']}, {facts['threads']} threads), "
        f"transformers {facts['transformers']} VanForImageClassification: "
        f"{facts['parameters_used']:,} parameters in use ({facts['parameters']:,} defined)"
    )
    print(f"{'implementation':<64}{'train':>9}{'infer':>9}   vs best PyTorch")
    for name, m in medians.items():
        ratio = (
            ""
            if name in torch_rows
            else f"   x{m['train'] / best['train']:.2f} / x{m['infer'] / best['infer']:.2f}"
        )
        print(f"{name:<64}{m['train']:>9.1f}{m['infer']:>9.1f}{ratio}")
    ours = medians[OURS]
    verdict = ", ".join(
        f"{kind} x{ours[kind] / best[kind]:.2f} (goal x{goal}: {'met' if ours[kind] / best[kind] >= goal else 'NOT met'})"
        for kind, goal in GOALS.items()
    )
    print(f"ours vs best PyTorch layout: {verdict}")


def run_capped(isa: str, argv: list[str]) -> int:
    """Re-run this benchmark in a process that starts with the ISA cap in its environment."""
    env = {**os.environ, **ISA_CAPS[isa], "VAN_TFX_BENCH_ISA": isa}
    return subprocess.run(
        [sys.executable, __file__, *argv, "--isa", isa], env=env, check=False
    ).returncode


def main(argv=None) -> int:
    """Parse arguments, re-run per ISA cap when needed, then measure and print."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="b0")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="train steps per round (infer: 3x)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--isa", default="native", help="comma-separated: native, avx2")
    parser.add_argument("--ideas", action="store_true", help="also time each optimisation alone")
    args = parser.parse_args(argv)
    isas = args.isa.split(",")
    if unknown := set(isas) - set(ISA_CAPS):
        parser.error(f"unknown --isa {sorted(unknown)}; choose from {sorted(ISA_CAPS)}")
    if isas != [os.environ.get("VAN_TFX_BENCH_ISA")]:
        rest = [
            a for i, a in enumerate(argv) if a != "--isa" and (i == 0 or argv[i - 1] != "--isa")
        ]
        rest = [a for a in rest if not a.startswith("--isa=")]
        return max(run_capped(isa, rest) for isa in isas)
    return measure_and_report(args, isas[0])


def measure_and_report(args, isa: str) -> int:
    """Measure every variant under the ISA cap this process was started with."""
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    from benchmarks.torch_reference import TorchWorker

    label = (
        f"AVX2-capped on {cpu_model()} (oneDNN + ATen only; not a real AVX2 machine)"
        if isa == "avx2"
        else "native ISA"
    )
    print(f"\n##### {label}")
    print(describe_machine())
    print(
        f"TF {tf.__version__}: oneDNN {'on' if _pywrap_util_port.IsMklEnabled() else 'off'}, "
        f"intra-op threads {tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()}"
    )
    with TorchWorker(env=ISA_CAPS[isa]) as worker:
        for variant in args.variants.split(","):
            before = load_average()
            facts, samples = measure(args, variant, worker, tf_candidates(args.ideas))
            report(variant, args, facts, samples, (before, load_average()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
